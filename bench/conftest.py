"""pytest-benchmark suite set-up: ``pytest bench/ --benchmark-only`` from the repository root.

Cases come from bench/common.py (by device; ``--bench-full`` for all shapes and N, meant for a
GPU). Candidates come from bench/harness.py, so the suite and ``python -m bench.report`` measure
exactly the same things; a candidate that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import pytest

from bench import harness
from bench.common import bench_device, default_cases, make_case_inputs


def pytest_addoption(parser):
    group = parser.getgroup("qadapter-bench")
    group.addoption("--bench-full", action="store_true", help="every shape and N in {1024, 4096, 16384}")
    group.addoption("--bench-tokens", type=int, nargs="+", help="scored token counts N (default: by device)")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cfg = metafunc.config
        tokens = cfg.getoption("--bench-tokens")
        cases = default_cases(bench_device(), full=cfg.getoption("--bench-full"), tokens=tuple(tokens) if tokens else None)
        metafunc.parametrize("case", cases, ids=[c.label.replace(" ", "-") for c in cases], scope="module")
    if "candidate" in metafunc.fixturenames:
        every = harness.candidates()
        metafunc.parametrize("candidate", every, ids=[c.name for c in every])


@pytest.fixture(scope="module")
def inputs(case):
    """One case's loss inputs, kept while that case's tests run (module scope, one case at a time)."""
    return make_case_inputs(case)
