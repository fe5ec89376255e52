"""The prefix-cache benchmark (``bench/prefix_cache.py``) on a tiny base: both scenarios run with and
without the cache, give the same tokens, and the cache reads fewer prompt tokens."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")
from helpers import save_tiny_base  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

from bench.adapter_set import save_adapters  # noqa: E402
from bench.prefix_cache import prefix_rows  # noqa: E402


def test_both_scenarios_read_less_with_the_cache_and_decode_the_same(tmp_path):
    save_tiny_base(tmp_path / "base")
    paths = save_adapters(QAdapterModel.from_base(str(tmp_path / "base")), tmp_path, 1)
    adapter_set = AdapterSet.from_pretrained(paths)
    rows = prefix_rows(adapter_set, adapter_set.tokenizer, next(iter(paths)), requests=3, turns=2, max_tokens=3,
                       rounds=1, system="Be brief.")  # the tiny base reads 128 tokens at most
    for scenario in ("system prompt", "chat turns"):
        row = rows[scenario]
        assert row["same_tokens"], scenario
        off, on = row["no cache"], row["prefix cache"]
        assert off["prompt_tokens_read"] == off["prompt_tokens"] == on["prompt_tokens"] > on["prompt_tokens_read"] > 0
        assert off["seconds"] > 0 and on["ttft_ms"] > 0
