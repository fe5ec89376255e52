"""The LoRA rank, alpha and dropout as a caller passes them: a numpy or torch scalar is taken as the
number it holds (and the adapter saves), anything else is refused naming the setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from helpers import tiny_causal_lm  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402


@pytest.mark.parametrize("options", [
    pytest.param(dict(lora_r=np.int64(4), lora_alpha=np.int64(8), lora_dropout=np.float32(0.25)), id="numpy"),
    pytest.param(dict(lora_r=torch.tensor(4), lora_alpha=8.0, lora_dropout=0.25), id="torch"),
])
def test_numpy_and_torch_scalars_are_the_numbers_they_hold_and_the_adapter_saves(tmp_path, options):
    model = QAdapterModel(tiny_causal_lm(), **options)
    model.save_pretrained(tmp_path / "adapter")  # a numpy scalar in PEFT's config failed here, as JSON
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 8, 0.25)
    assert type(saved["lora_alpha"]) is int


@pytest.mark.parametrize(("options", "exc", "fragment"), [
    pytest.param(dict(lora_alpha="16"), TypeError, "lora_alpha must be a real number", id="alpha-str"),
    pytest.param(dict(lora_alpha=None), TypeError, "lora_alpha must be a real number", id="alpha-none"),
    pytest.param(dict(lora_alpha=True), TypeError, "lora_alpha must be a real number", id="alpha-bool"),
    pytest.param(dict(lora_alpha=0), ValueError, "lora_alpha must be > 0", id="alpha-zero"),
    pytest.param(dict(lora_dropout="0.1"), TypeError, "lora_dropout must be a real number", id="dropout-str"),
    pytest.param(dict(lora_dropout=None), TypeError, "lora_dropout must be a real number", id="dropout-none"),
    pytest.param(dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)", id="dropout-one"),
    pytest.param(dict(lora_r=4.0), TypeError, "lora_r must be an integer >= 1", id="rank-float"),
    pytest.param(dict(lora_r=True), TypeError, "lora_r must be an integer >= 1", id="rank-bool"),
    pytest.param(dict(lora_r=0), ValueError, "lora_r must be an integer >= 1; got 0", id="rank-zero"),
])
def test_a_bad_lora_setting_is_refused_naming_it(options, exc, fragment):
    with pytest.raises(exc, match=fragment):
        QAdapterModel(tiny_causal_lm(), **options)
