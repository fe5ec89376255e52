"""bench/gpu_check.py's bounds on CPU: the errors come first, a row over its time limit is skipped
with the reason (and its backend's later rows with it), and a run stopped by SIGTERM keeps the
rows it measured. The dry run of the whole command is tests/packaging/test_gpu_command.py's."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from bench import gpu_check

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGALRM and SIGTERM: POSIX")


def test_time_limit_cuts_a_slow_block_short():
    started = time.monotonic()
    with pytest.raises(gpu_check.RowTimeout, match="limit"), gpu_check.time_limit(0.2):
        while True:
            pass
    assert time.monotonic() - started < 2
    with gpu_check.time_limit(5):  # disarmed on the way out: no alarm later
        pass
    time.sleep(0.01)
    with pytest.raises(gpu_check.RowTimeout), gpu_check.time_limit(0):
        pass


def _with_backends(monkeypatch, extra):
    """reference and chunked (warmed up: its first call may build the compiled CPU step), then ``extra``."""
    fns = {name: fn for name, fn in gpu_check.loss_fns().items() if name in ("reference", "chunked")}
    inputs = gpu_check.make_inputs(gpu_check.DRY_PLAN.shapes[0], 40, gpu_check.torch.float32, "cpu")
    gpu_check.run_loss(fns["chunked"], inputs)
    monkeypatch.setattr(gpu_check, "loss_fns", lambda: {**fns, **extra})
    monkeypatch.setattr(gpu_check, "row_step_gbps", lambda *args: {})  # the Triton row step: not the point here


def test_a_slow_row_is_skipped_with_its_reason_and_the_rest_run(monkeypatch, tmp_path):
    chunked = gpu_check.loss_fns()["chunked"]
    calls = []

    def slow(**kwargs):
        calls.append(1)
        time.sleep(10)
        return chunked(**kwargs)

    _with_backends(monkeypatch, {"slow": slow})
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--row-limit-s", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    errors = [r for r in rows if r["kind"] == "error"]
    times = [r for r in rows if r["kind"] == "time"]
    assert rows.index(errors[-1]) < rows.index(times[0]), "the correctness rows come first"
    slow_rows = [r for r in rows if r["backend"] == "slow"]
    assert "over its 3 s limit" in slow_rows[0]["failure"]
    assert all("earlier row" in (r.get("failure") or r.get("skipped")) for r in slow_rows[1:])
    assert len(calls) == 1, "a backend over its limit is not called again"
    assert all(r["ok"] for r in errors if r["backend"] == "chunked")
    assert any("ms" in r for r in times if r["backend"] == "chunked")


def test_sigterm_keeps_the_rows_measured(monkeypatch, tmp_path):
    chunked = gpu_check.loss_fns()["chunked"]

    def stopped(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends at the step's budget
        time.sleep(1)
        return chunked(**kwargs)

    _with_backends(monkeypatch, {"stopped": stopped})
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "check.json"
    try:
        assert gpu_check.main(["--dry-run", "--out", str(out)]) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = json.loads(out.read_text())
    assert result["cut_short"] and [r["backend"] for r in result["rows"]] == ["chunked"]
