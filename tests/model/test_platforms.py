"""What differs on macOS and Windows, checked on Linux by what the code calls there."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")


def test_demo_imports_and_measures_memory_without_the_resource_module(monkeypatch):
    """Windows has no ``resource`` module: the demo imported it at the top, so ``qadapter demo`` failed
    to start there. Its peak memory is then psutil's peak working set."""
    import psutil
    import qadapter.experiments
    import qadapter.experiments.demo as demo

    monkeypatch.setitem(sys.modules, "resource", None)  # import resource raises ImportError, as on Windows
    monkeypatch.delitem(sys.modules, "qadapter.experiments.demo")  # both put back after the test
    monkeypatch.setattr(qadapter.experiments, "demo", demo)
    fresh = importlib.import_module("qadapter.experiments.demo")
    monkeypatch.setattr(fresh.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: SimpleNamespace(rss=1, peak_wset=3 * 2**20))
    assert fresh._peak_memory_mb() == 3.0


@pytest.mark.parametrize(("platform", "unit"), [("linux", 2**10), ("darwin", 1)])
def test_demo_peak_memory_reads_max_rss_in_the_platform_unit(monkeypatch, platform, unit):
    """``ru_maxrss`` is in KiB on Linux but in bytes on macOS: the demo reported 1024 times the memory there."""
    import resource

    import qadapter.experiments.demo as demo

    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=500 * 2**20 // unit))
    assert demo._peak_memory_mb() == 500.0


def test_releasing_freed_memory_passes_where_ctypes_cannot_open_the_process(monkeypatch):
    """On Windows ``ctypes.CDLL(None)`` raises TypeError (its loader takes a file name): every
    ``qadapter compare`` failed there as its first method started training."""
    import ctypes

    from qadapter.experiments import compare

    def windows_cdll(name, *args, **kwargs):
        if name is None:
            raise TypeError("argument of type 'NoneType' is not iterable")  # Windows' CDLL, checking for a path
        raise AssertionError(name)

    monkeypatch.setattr(ctypes, "CDLL", windows_cdll)
    compare._release_freed_memory()
    with compare.peak_rss_growth() as memory:
        pass
    assert memory["mb"] >= 0


def test_training_memory_is_measured_without_proc(monkeypatch):
    """macOS and Windows have no /proc: a comparison's training memory read 0 MB for every method there."""
    import os

    import torch
    from qadapter.experiments import compare

    exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda path: path != "/proc/self/statm" and exists(path))
    with compare.peak_rss_growth() as memory:
        blocks = torch.ones(50 * 2**20 // 4)  # 50 MiB, touched
    assert memory["mb"] > 40, memory
    del blocks
