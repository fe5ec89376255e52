"""The measured candidates and how each is timed and sized; shared by the pytest suite and the report.

A *candidate* turns a case's inputs into a ``step``: one forward and backward of a loss,
synchronized on CUDA. Each is one of

* ``backend``  -- ``qadapter_loss(backend=name)`` for every backend of ``qadapter_kernels.backends()``;
* ``baseline`` -- the same loss computed another way (bench/baselines.py);
* ``peer``     -- a published fused loss computing a *different* loss, for scale.

A candidate that cannot run here raises :class:`Unavailable` with the reason, which is recorded
instead of a number; so is an out-of-memory, which is itself a result.

Times come from the one timer of bench/common.py; the floor of the memory-bound row step is
the copy bandwidth measured there, and :func:`row_step_bandwidth` rates a row step against it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import torch

import qadapter_kernels
from bench import baselines
from bench.common import Timer, error_text, first_line, is_oom, release, sync
from bench.memory import peak_extra_memory

Step = Callable[[], None]


class Unavailable(Exception):
    """The candidate cannot run here; the message says why."""


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # "floor" | "backend" | "baseline" | "peer"
    description: str
    build: Callable[[dict], Step]  # from the case inputs to a step; raises Unavailable


def _loss_step(inputs: dict, loss_of: Callable[[dict], torch.Tensor]) -> Step:
    """A step: fresh gradient, forward, backward, synchronized."""
    hq = inputs["q_hidden"]

    def step() -> None:
        hq.grad = None
        loss_of(inputs).backward()
        sync(hq.device)

    return step


def _backend(name: str) -> Candidate:
    def build(inputs: dict) -> Step:
        st = qadapter_kernels.backends()[name]
        if not st.available:
            raise Unavailable(st.reason)
        return _loss_step(inputs, lambda x: qadapter_kernels.qadapter_loss(**x, backend=name).loss)

    return Candidate(name, "backend", f"qadapter_loss(backend={name!r})", build)


def _baseline(name: str, description: str, fn: Callable) -> Candidate:
    return Candidate(name, "baseline", description, lambda inputs: _loss_step(inputs, lambda x: fn(**x).loss))


def _peer(name: str, module: str, package: str, description: str, loss_of: Callable[[dict], torch.Tensor]) -> Candidate:
    def build(inputs: dict) -> Step:
        available, reason = baselines.peer_status(module, package)
        if not available:
            raise Unavailable(reason)
        return _loss_step(inputs, loss_of)

    return Candidate(name, "peer", description, build)


def _pairs(compiled: bool):
    def fn(**x):
        return baselines.chunked_pairs_loss(**x, compiled=compiled)

    return fn


def _chunked_eager_step(**x):
    from qadapter_kernels import _cpu

    # The switch is read on every call: the compiled step is skipped for this one only.
    with mock.patch.dict(os.environ, {_cpu.ENV_SWITCH: "0"}):
        return qadapter_kernels.qadapter_loss(**x, backend="chunked")


def _chunked_whole_rows(**x):
    from qadapter_kernels import chunked, sizing

    def whole_rows(n_tokens, vocab, dtype, device, chunk_size=None):
        return chunk_size or sizing.auto_chunk_size(n_tokens, vocab, dtype, device), vocab

    # The tiling is looked up on every call: this one takes [chunk, V] chunks (128 MiB on a CPU).
    with mock.patch.object(chunked, "auto_tiles", whole_rows):
        return qadapter_kernels.qadapter_loss(**x, backend="chunked")


GEMM3 = "gemm3"


def candidates() -> list[Candidate]:
    """Every candidate: the floor, then every backend (unavailable ones are recorded with the
    reason), baselines and peers."""
    return [
        Candidate(GEMM3, "floor", "T_gemm3: the 3 N x V x d GEMMs (z, Q, P @ W), torch.matmul", _gemm3),
        *(_backend(name) for name in qadapter_kernels.backends()),
        _baseline("eager-authors", "the authors' formulation: fp32 [B,T,V] logits of both heads, autograd",
                  baselines.eager_authors_loss),
        _baseline("compiled-reference", "torch.compile of qadapter_kernels.reference", baselines.compiled_reference_loss),
        _baseline("chunked-eager-step", "the chunked backend with the eager torch row step "
                  "(QADAPTER_CPU_KERNELS=0, or a CPU without a C compiler)", _chunked_eager_step),
        _baseline("chunked-whole-rows", "the chunked backend over whole-vocabulary [chunk, V] chunks of a 128 MiB "
                  "budget instead of cache-sized tiles (the same step)", _chunked_whole_rows),
        _baseline("chunked-pairs", "Liger's pattern: 1 pair per chunk, grad_and_value, eager", _pairs(False)),
        _baseline("chunked-pairs-compiled", "Liger's pattern: 1 pair per chunk, grad_and_value, torch.compile",
                  _pairs(True)),
        _peer("liger-dpo", "liger_kernel", "liger-kernel",
              "peer, a different loss: Liger fused-linear DPO with reference model (also computes dW)",
              lambda x: baselines.liger_dpo_loss(**x)),
        _peer("cce", "cut_cross_entropy", "cut-cross-entropy",
              "peer, a different loss: Cut Cross-Entropy, one head, next-token CE",
              lambda x: baselines.cce_loss(x["q_hidden"], x["weight"], x["labels"])),
    ]


def select(names: list[str] | None) -> list[Candidate]:
    """The candidates named (all when ``names`` is None), checking the names."""
    every = candidates()
    if names is None:
        return every
    known = {c.name: c for c in every}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


@dataclass
class Result:
    """One candidate on one case. ``status``: "ok", "skipped" (reason says why) or "oom"."""

    name: str
    kind: str
    description: str
    status: str
    reason: str = ""
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    first_call_s: float | None = None  # the first warm-up call: a torch.compile candidate compiles here

    @property
    def time_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


def prepare(candidate: Candidate, inputs: dict, device: torch.device, warmup: int = 1) -> tuple[Step | None, Result]:
    """Builds the step and runs the warm-up calls (compilation happens here).

    Returns the ready step, or None with a result saying why it cannot be measured.
    """
    result = Result(candidate.name, candidate.kind, candidate.description, "ok")
    try:
        step = candidate.build(inputs)
        for i in range(warmup):
            (elapsed,) = Timer(device).times_s(step, 1)
            if i == 0:
                result.first_call_s = elapsed
        return step, result
    except Unavailable as exc:
        result.status, result.reason = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 -- a failing candidate is a recorded result, not a crash
        if is_oom(exc):
            result.status, result.reason = "oom", first_line(exc)
        else:
            result.status, result.reason = "skipped", f"failed on {device.type}: {error_text(exc)}"
    inputs["q_hidden"].grad = None
    release(device)
    return None, result


def measure_all(
    chosen: list[Candidate], inputs: dict, device: torch.device, *, repeats: int, warmup: int = 1
) -> list[Result]:
    """Median forward+backward time of every candidate, then the peak extra memory of one more call.

    The timed calls are interleaved (round r times every candidate once) so that a drift in the
    machine's load, common on shared hosts, biases no candidate against another.
    """
    prepared = [prepare(c, inputs, device, warmup) for c in chosen]
    timer = Timer(device)
    for _ in range(repeats):
        for step, result in prepared:
            if step is not None and result.status == "ok":
                _guarded(result, inputs, device, lambda: result.times_s.extend(timer.times_s(step, 1)))
    for step, result in prepared:
        if step is not None and result.status == "ok":
            _guarded(result, inputs, device, lambda: setattr(result, "peak_bytes", peak_extra_memory(step, device)[1]))
    return [result for _, result in prepared]


def _guarded(result: Result, inputs: dict, device: torch.device, action: Callable[[], None]) -> None:
    """Runs ``action``, recording an out-of-memory as the candidate's result.

    The allocator's cache is emptied only after an out-of-memory: emptying it after every call
    would make each call pay for fresh device allocations.
    """
    try:
        action()
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        result.status, result.reason, result.times_s = "oom", first_line(exc), []
        release(device)
    finally:
        inputs["q_hidden"].grad = None


def gemm3_step(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Step:
    """The three GEMMs of the performance model (docs/design.md: ``z``, ``Q`` and ``P @ W``) as plain
    torch.matmul calls.

    Outputs are allocated per call, as every loss does: holding a ``[N, V]`` buffer across the
    whole case would shrink what the other candidates can use before running out of memory.
    Inputs are drawn on the device itself: a GPU head holds half a billion elements.
    """
    g = torch.Generator(device).manual_seed(1)
    hb, hq = (torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype) for _ in range(2))
    w = torch.randn(vocab, hidden, generator=g, device=device, dtype=dtype) / hidden**0.5

    def step() -> None:
        torch.matmul(hb, w.T)
        torch.matmul(torch.matmul(hq, w.T), w)
        sync(device)

    return step


def _gemm3(inputs: dict) -> Step:
    """The floor at the inputs' shape: N = scored tokens, the head's d and V, the inputs' dtype."""
    hq, weight = inputs["q_hidden"], inputs["weight"]
    tokens = int((inputs["labels"][:, 1:] != -100).sum())
    return gemm3_step(tokens, weight.shape[1], weight.shape[0], hq.dtype, hq.device)


def row_step_inputs(rows: int, vocab: int, dtype: torch.dtype, device: torch.device | str):
    """Logits ``z`` and Q-values ``q`` of ``rows`` positions (``[rows, V]``, ``dtype``) and their targets.

    Drawn on the device itself: a GPU chunk can hold billions of elements.
    """
    z, q = (torch.randn(rows, vocab, device=device, dtype=dtype) for _ in range(2))
    return z, q, torch.randint(0, vocab, (rows,), device=device)


def row_step_bandwidth(timer: Timer, step: Callable, z: torch.Tensor, q: torch.Tensor, targets: torch.Tensor) -> float:
    """Effective bandwidth (bytes/s) of a row step on one ``[rows, V]`` chunk.

    Counts the bytes no row step can avoid (read ``z`` and ``Q``, write ``P``), so a two-pass
    kernel shows up as a lower fraction of the copy bandwidth. Steps may overwrite ``z`` and ``q``
    (P in place); repeated calls then see probabilities instead of logits, which costs the same,
    so no copy needs to be timed or subtracted.
    """
    nbytes = 3 * z.numel() * z.element_size()
    return nbytes / timer.median_s(lambda: step(z, q, targets, 1.0, 0.01, z.dtype))
