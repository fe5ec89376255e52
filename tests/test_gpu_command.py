"""The GPU proof's one command, `bench/gpu.sh`, in its CPU dry run: every step's imports,
arguments and result files are exercised here, so a GPU run is never lost to a typo. The checks run
as modules from the repository root (`python -m bench.gpu_check`), as on a GPU machine where
nothing is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and the Triton interpreter: Linux")
def test_gpu_command_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "all", "--dry-run"],
        env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for step in ("versions", "triton tests", "gpu_check", "consumer step", "wheel"):
        assert f"| {step}" in summary, summary
    assert "FAILED" not in summary and "TIMEOUT" not in summary, summary
    assert "skipped: no GPU (dry run)" in summary  # the GPU-only steps say why they did not run
    check = json.loads((out / "gpu-check.json").read_text())
    assert check["rows"] and all(r["ok"] for r in check["rows"] if r["kind"] == "error")
    assert json.loads((out / "versions.json").read_text())["torch"]
    assert len(list(out.iterdir())) <= 8  # what comes back from a GPU machine: at most 8 files


def test_gpu_command_rejects_an_unknown_step(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path), "no-such-step", "--dry-run"],
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no-such-step" in run.stderr
