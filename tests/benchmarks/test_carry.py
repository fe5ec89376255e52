"""bitsandbytes carried to the GPU machine (``python -m bench.carry``): a small copy with the CUDA 13.0
and CPU libraries only and the metadata transformers reads; ``--check`` imports it from there and
quantizes, and says so when bitsandbytes came from elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

from bench import carry  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def check(directory: Path, *path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (*path, ROOT, ROOT / "python")))}
    return subprocess.run([sys.executable, "-m", "bench.carry", "--check", str(directory)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_carried_copy_is_small_imports_and_quantizes(tmp_path):
    site = carry.build(tmp_path / "carry")
    package = site / "bitsandbytes"
    assert sorted(p.name for p in carry.native_libraries(package)) == ["libbitsandbytes_cpu.so",
                                                                         "libbitsandbytes_cuda130.so"]
    assert len(list(site.glob("bitsandbytes-*.dist-info/METADATA"))) == 1  # transformers finds it by its metadata
    assert not list(site.rglob("__pycache__"))
    assert sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) < carry.LIMIT
    run = check(tmp_path / "carry", site)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"from {package}" in run.stdout and "NF4 round trip" in run.stdout
    elsewhere = check(tmp_path / "carry")  # the installed bitsandbytes, not the carried copy
    assert elsewhere.returncode == 1 and "PROBLEM: bitsandbytes came from" in elsewhere.stdout


def test_a_missing_library_is_named(tmp_path):
    with pytest.raises(SystemExit, match="libbitsandbytes_cuda999.so"):
        carry.build(tmp_path, cuda="999")
