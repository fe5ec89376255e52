"""The adapter-set benchmark's rows (``bench/adapter_set.py``) on a tiny base: every row decodes, and
the PEFT mixed-batch anchor decodes the same tokens as the set it is compared with."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers import left_padded_prompts, save_tiny_base  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402
from qadapter.library.policy import CombinedPolicy  # noqa: E402

from bench.adapter_set import PeftMixedRows, save_adapters, set_rows  # noqa: E402


def test_rows_are_timed_and_the_anchor_decodes_the_sets_tokens(tmp_path):
    vocab = len(save_tiny_base(tmp_path / "base"))
    paths = save_adapters(QAdapterModel.from_base(str(tmp_path / "base")), tmp_path, 3)
    adapter_set = AdapterSet.from_pretrained(paths)
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(6, 6, 6))
    names = adapter_set.names
    options = dict(max_new_tokens=5, eos_token_id=[], pad_token_id=0, do_sample=False)
    want = adapter_set.generate(ids, mask, adapters=names, **options)
    anchor = CombinedPolicy(adapter_set.base_model, PeftMixedRows(adapter_set, names))
    assert torch.equal(anchor.generate(ids, attention_mask=mask, **options), want)

    row = set_rows(adapter_set, QAdapterModel.from_pretrained(paths[names[0]]), ids, tokens=3, rounds=1)
    assert set(row["ms_per_token"]) == {"one adapter", "set, 3 adapters", "set, one adapter",
                                        "PEFT mixed batch, 3 adapters"}
    assert all(v > 0 for v in row["ms_per_token"].values()) and row["over_one_adapter"]["one adapter"] == 1.0


def test_the_whole_bank_anchor_decodes_the_sets_tokens_over_the_loaded_adapters(tmp_path):
    """With more adapters loaded than the rows name, the whole-bank anchor (every loaded block run)
    decodes what the set decodes running the named adapters' blocks only, and is timed beside it."""
    from bench.adapter_set import whole_bank_policy

    vocab = len(save_tiny_base(tmp_path / "base"))
    paths = save_adapters(QAdapterModel.from_base(str(tmp_path / "base")), tmp_path, 4)
    adapter_set = AdapterSet.from_pretrained(paths)
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(6, 4))
    names = adapter_set.names[1:3]
    options = dict(max_new_tokens=5, eos_token_id=[], pad_token_id=0, do_sample=False)
    want = adapter_set.generate(ids, mask, adapters=names, **options)
    assert torch.equal(whole_bank_policy(adapter_set, names).generate(ids, attention_mask=mask, **options), want)

    row = set_rows(adapter_set, QAdapterModel.from_pretrained(paths[names[0]]), ids, tokens=3, rounds=1, active=names)
    assert "set, 2 adapters of 4 loaded, whole bank" in row["ms_per_token"]
    assert "set, 2 adapters of 4 loaded" in row["ms_per_token"]
