"""Forward + backward of the loss: every backend, baseline, peer and the T_gemm3 floor, per case.

Each test records in ``benchmark.extra_info`` the peak extra memory of one more call and the
median time as a multiple of ``T_gemm3`` measured in the same session.
"""

from __future__ import annotations

import pytest

from bench import harness
from bench.common import Timer, first_line, is_oom
from bench.memory import peak_extra_memory

_GEMM3: dict = {}


def rounds(case) -> int:
    return 5 if case.device.type == "cuda" else 2


def t_gemm3(case) -> float:
    """T_gemm3 of the case, measured once per session (the floor every time is divided by)."""
    if case not in _GEMM3:
        step = harness.gemm3_step(case.tokens, case.shape.hidden, case.shape.vocab, case.dtype, case.device)
        _GEMM3[case] = Timer(case.device, warmup=1, repeats=rounds(case)).median_s(step)
    return _GEMM3[case]


def test_loss_forward_backward(benchmark, case, candidate, inputs):
    step, result = harness.prepare(candidate, inputs, case.device)
    if step is None:
        pytest.skip(f"{candidate.name} {result.status}: {result.reason}")
    benchmark.group = case.label
    benchmark.extra_info.update(
        kind=candidate.kind, description=candidate.description, shape=case.shape.name,
        hidden=case.shape.hidden, vocab=case.shape.vocab, tokens=case.tokens, dtype=str(case.dtype),
    )
    try:
        benchmark.pedantic(step, rounds=rounds(case), iterations=1)
        peak = peak_extra_memory(step, case.device)[1]
    except Exception as exc:  # noqa: BLE001 -- an out-of-memory is a result: recorded as a skip
        if not is_oom(exc):
            raise
        pytest.skip(f"{candidate.name} oom: {first_line(exc)}")
    finally:
        inputs["q_hidden"].grad = None
    gemm3 = t_gemm3(case)
    benchmark.extra_info.update(peak_bytes=peak, t_gemm3_s=gemm3)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["x_gemm3"] = benchmark.stats.stats.median / gemm3
