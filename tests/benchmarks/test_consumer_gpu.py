"""The consumer-GPU benchmark (``python -m bench.consumer_gpu``) runs end to end on CPU with
--dry-run, and a failing part, or one cut short, is recorded while the others still run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from bench import consumer_gpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LOSS_ROWS = ("train: fused", "train: eager-authors")
DECODE_ROWS = ("decode: batch 1 eager", "decode: batch 8 eager")


@pytest.fixture(autouse=True)
def sigterm_restored():
    """``main`` turns SIGTERM into an exception for the run: the test process gets its own back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "result.json"
    # As bench/gpu.sh runs it: a module, from the repository root.
    proc = subprocess.run([sys.executable, "-m", "bench.consumer_gpu", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    parts = result["parts"]
    for name in LOSS_ROWS:
        assert parts[name]["status"] == "ok", parts[name]
        assert parts[name]["ms_per_step"] > 0
    for name in DECODE_ROWS:
        row = parts[name]
        assert row["status"] == "ok", row
        assert row["base_ms_per_token"] > 0 and row["customized_ms_per_token"] > 0
        assert row["customized_over_base"] > 0
    assert parts["train: fused"]["backend"] == "chunked"
    many = parts["decode: batch 8 over 8 adapters"]
    assert many["status"] == "ok", many
    assert many["one_adapter_ms_per_token"] > 0 and many["many_over_one"] > 0
    assert many["engine_tokens_per_s"]["at once"] > 0 and many["engine_at_once_over_one_at_a_time"] > 0
    assert parts["build"]["weight_std"] > 0  # random weights, not zeros
    assert {"torch", "transformers", "peft", "triton", "cuda", "device"} <= result["versions"].keys()
    assert "| train: eager-authors | ok |" in proc.stdout


def test_failures_are_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken(*args, **kwargs):
        raise RuntimeError("decoding broke")

    monkeypatch.setattr(consumer_gpu, "eager_authors_loss", out_of_memory)
    monkeypatch.setattr(consumer_gpu, "decode", lambda model, batch, decoding, setup, device: broken() if batch == 8 else {})
    out = tmp_path / "result.json"
    assert consumer_gpu.main(["--dry-run", "--out", str(out)]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert parts["train: fused"]["status"] == "ok"
    assert parts["train: eager-authors"]["status"] == "out of memory"
    assert parts["decode: batch 1 eager"]["status"] == "ok"
    assert parts["decode: batch 8 eager"]["status"] == "error"
    assert parts["decode: batch 8 eager"]["error"] == "RuntimeError: decoding broke"


def test_time_budget_skips_the_remaining_parts(tmp_path):
    out = tmp_path / "result.json"
    assert consumer_gpu.main(["--dry-run", "--budget-s", "0", "--out", str(out)]) == 0
    parts = json.loads(out.read_text())["parts"]
    assert {row["status"] for row in parts.values()} == {"skipped: time budget"}
    assert set(parts) == {"build", *LOSS_ROWS, *DECODE_ROWS, "decode: batch 8 over 8 adapters"}


@pytest.mark.parametrize("stop", ["limit", "sigterm"])
def test_a_part_cut_short_is_recorded_and_the_result_written(tmp_path, monkeypatch, stop):
    """A part still running at ``--limit-s``, or when the step's ``timeout`` sends SIGTERM, is recorded
    as timed out; the parts after it run (or are skipped by the budget) and the JSON is written."""
    def decode(model, batch, decoding, setup, device):
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        return {}

    monkeypatch.setattr(consumer_gpu, "decode", decode)
    out = tmp_path / "result.json"
    started = time.monotonic()
    assert consumer_gpu.main(["--dry-run", "--decoding", "compiled", "--limit-s", "20", "--out", str(out)]) == 0
    assert time.monotonic() - started < 50
    result = json.loads(out.read_text())
    assert result["decoding"] == "compiled" and list(result["parts"]) == ["build", "decode: batch 1 compiled"]
    row = result["parts"]["decode: batch 1 compiled"]
    assert row["status"] == "timed out"
    assert ("stopped by SIGTERM" if stop == "sigterm" else "s limit") in row["error"]
