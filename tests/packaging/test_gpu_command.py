"""The GPU proof's one command, `bench/gpu.sh`, in its CPU dry run: every step's imports,
arguments and result files are exercised here, so a GPU run is never lost to a typo. The checks run
as modules from the repository root (`python -m bench.gpu_check`), as on a GPU machine where
nothing is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qadapter_kernels.toolchain import cuda_archs

ROOT = Path(__file__).resolve().parents[2]


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
    for step in ("versions", "triton tests", "gpu_check", "consumer step", "wheel", "consumer decoding, compiled"):
        assert f"| {step}" in summary, summary
    assert "FAILED" not in summary and "TIMEOUT" not in summary, summary
    assert "skipped: no GPU (dry run)" in summary  # the GPU-only steps say why they did not run
    check = json.loads((out / "gpu-check.json").read_text())
    assert check["rows"] and all(r["ok"] for r in check["rows"] if r["kind"] == "error")
    assert json.loads((out / "versions.json").read_text())["torch"]
    if importlib.util.find_spec("bitsandbytes") is not None:  # part 3 on what would be carried
        assert "| bitsandbytes (carried) | ok" in summary and "| quantized base (tiny model) | ok" in summary, summary
        rows = json.loads((out / "quantized.json").read_text())["parts"]
        assert rows and all(row["status"] == "ok" for row in rows.values()), rows
        assert sum("plan_allocator_gib" in row for row in rows.values()) == 5  # each fused-loss row has its plan
    assert len(list(out.iterdir())) <= 8  # what comes back from a GPU machine: at most 8 files
    log = (out / "gpu-run.log").read_text()
    # The arch list the GPU run would build for, and the pytest flags both branches pass (plugins
    # that do not import here are left out here as there).
    archs = re.search(r"TORCH_CUDA_ARCH_LIST=(\S*);", log).group(1)
    assert cuda_archs.parse_arch_list(archs), log[:500]
    flags = re.search(r"pytest flags: (.*)", log).group(1)
    assert ("-n" in flags.split()) == (importlib.util.find_spec("xdist") is not None), flags
    assert ("--timeout" in flags.split()) == (importlib.util.find_spec("pytest_timeout") is not None), flags


def test_gpu_and_dry_runs_pass_the_same_pytest_flags():
    """The test steps of both branches take their flags from the arrays the dry run exercises: no
    plugin flag (-n, --timeout) is written out anywhere else, so none can fail only on the GPU."""
    script = (ROOT / "bench" / "gpu.sh").read_text()
    body = script.split("plugin_flags() {", 1)[1].split("\n}\n", 1)[1]
    pytest_lines = [line for line in body.splitlines() if "-m pytest" in line and "compute-sanitizer" not in line
                    and "tests/kernels/test_cuda_ext.py" not in line]
    assert len(pytest_lines) == 4, pytest_lines  # triton and backend tests, dry and GPU
    for line in pytest_lines:
        assert '"${TRITON_PYTEST[@]}"' in line or '"${BACKEND_PYTEST[@]}"' in line, line
    assert "--timeout" not in body and not any(re.search(r"\s-n\s", line) for line in pytest_lines), \
        "a plugin flag outside plugin_flags"


def test_gpu_command_rejects_an_unknown_step(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path), "no-such-step", "--dry-run"],
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no-such-step" in run.stderr


def test_every_test_the_gpu_command_names_exists():
    """The sanitizer steps name single tests (`tests/...py::test_name[params]`), which only run on a
    GPU: each must be collected here, so that a renamed test or parameter fails in CI, not there."""
    nodes = sorted(set(re.findall(r"tests/[\w/]+\.py::[\w\[\]\-.]+", (ROOT / "bench" / "gpu.sh").read_text())))
    assert len(nodes) >= 6, nodes
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *nodes],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    collected = {line.strip() for line in run.stdout.splitlines()}
    assert set(nodes) <= collected, set(nodes) - collected
