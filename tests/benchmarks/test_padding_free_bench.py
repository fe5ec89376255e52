"""The padding-free benchmark (``python -m bench.padding_free``) on tiny inputs: one batch timed both
ways with the two agreeing, and the layout sweep's shares."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from helpers import make_model, shared_prompt_pairs, tiny_chat_tokenizer  # noqa: E402
from qadapter import PreferenceCollator  # noqa: E402
from qadapter.library.packing import model_packing  # noqa: E402

from bench import padding_free  # noqa: E402


def test_one_batch_both_ways_agree_and_the_packed_one_is_smaller():
    model = make_model("llama", lora_dropout=0.0)
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=5, system=(1, 2)))
    row = padding_free.measure_batch(model, batch, rounds=1)
    assert row["sequences"] == 8 and row["padded_tokens"] == batch["input_ids"].numel()
    assert row["attended_tokens"] == int(batch["attention_mask"].sum())
    assert row["packed_tokens"] < row["padded_tokens"] and 0 < row["attention_over_padded"] <= 2
    assert set(row["seconds"]) == {"padded", "padding_free"} and row["time_over_padded"] > 0
    assert row["loss_difference"] < 1e-5 and row["gradient_relative_difference"] < 1e-4
    assert model.padding_free is True  # the model is left as it trains


def test_rows_by_cost_are_timed_beside_rows_as_long_as_the_largest_tree():
    model = make_model("llama", lora_dropout=0.0)
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=1, system=(1, 2)))
    pack = model_packing(model.base_model)
    with padding_free.largest_tree_rows():
        baseline = pack(batch["input_ids"], batch["attention_mask"])
    by_cost = pack(batch["input_ids"], batch["attention_mask"])
    # This batch's trees fit one row by cost (the tiny model's attention is cheap beside its width).
    assert by_cost.inputs["input_ids"].shape[0] == 1 < baseline.inputs["input_ids"].shape[0]
    row = padding_free.measure_batch(model, batch, rounds=1)
    assert set(row["seconds"]) == {"padded", "padding_free", "largest_tree_rows"}
    assert row["largest_tree_rows_tokens"] == baseline.tokens and row["time_over_largest_tree_rows"] > 0
    assert row["gradient_relative_difference"] < 1e-4


def test_the_layout_sweep_reports_each_shape():
    tokenizer = tiny_chat_tokenizer()
    pack = model_packing(make_model("llama").base_model)
    rows = padding_free.layouts(tokenizer, pack, pairs_options=(2, 4), lengths=(48,), batches=2)
    assert [(r["max_length"], r["pairs"], r["batches"]) for r in rows] == [(48, 2, 2), (48, 4, 2)]
    for r in rows:
        assert 0 < r["packed_tokens_over_padded"] <= 1 and r["packed_rows"] >= 1
        assert 0 < r["attention_over_padded"] <= 4  # rows up to twice a tree's most
        assert 0 < r["largest_tree_rows"]["tokens_over_padded"] <= 1
        assert 0 < r["largest_tree_rows"]["attention_over_padded"] <= 2
