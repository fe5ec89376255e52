"""The prompt-scoring benchmark (``bench/echo.py``) on a tiny base: both ways give the same log-probs
and alternatives, and each is measured."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers import perturb_adapter, save_tiny_base  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

from bench.echo import score_rows, scorers  # noqa: E402


def test_both_ways_score_the_prompt_alike_and_are_measured(tmp_path):
    save_tiny_base(tmp_path / "base")
    model = QAdapterModel.from_base(str(tmp_path / "base"), lora_dropout=0.0)
    perturb_adapter(model)
    model.save_pretrained(tmp_path / "a")
    adapter_set = AdapterSet.from_pretrained({"a": tmp_path / "a"})
    solo = QAdapterModel.from_pretrained(tmp_path / "a").eval()
    adapter_set.peft_model.eval()
    vocab = adapter_set.base_model.get_output_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ways = {name: fn() for name, fn in scorers(adapter_set, solo, prompt, top=3).items()}
    for ours, theirs in zip(ways["read_prompts"], ways["whole logits"]):
        assert ours.shape[0] == 11
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    row = score_rows(adapter_set, solo, vocab, tokens=16, rounds=1)
    assert row["max_abs_difference"] < 1e-4
    assert set(row["peak_mib"]) == set(row["seconds"]) == {"read_prompts", "whole logits"}
    assert all(v > 0 for v in row["peak_mib"].values()) and all(v > 0 for v in row["seconds"].values())
