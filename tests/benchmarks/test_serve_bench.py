"""The serving benchmark (``bench/serve.py``) against a server over a tiny base: both ways of sending
the same requests are timed, and every request's tokens are counted."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
from helpers import save_tiny_base  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

from bench.adapter_set import save_adapters  # noqa: E402
from bench.serve import serve_rows, serving  # noqa: E402


def test_both_ways_are_timed_over_the_same_requests(tmp_path):
    save_tiny_base(tmp_path / "base")
    paths = save_adapters(QAdapterModel.from_base(str(tmp_path / "base")), tmp_path, 2)
    with serving(paths, max_batch=4, threads=1) as base_url:
        row = serve_rows(base_url, list(paths), requests=4, max_tokens=3, rounds=1)
    assert set(row["tokens_per_s"]) == {"one at a time", "4 concurrent"}
    assert all(v > 0 for v in row["tokens_per_s"].values())
    assert row["concurrent_over_one_at_a_time"] == pytest.approx(
        row["tokens_per_s"]["4 concurrent"] / row["tokens_per_s"]["one at a time"])
