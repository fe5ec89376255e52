"""One-shot GPU check: correctness, speed and memory of every backend at real model shapes.

From the repository root (nothing to install: ``-m`` puts the root on the path)::

    python -m bench.gpu_check                 # on a CUDA machine, < 8 minutes on an H100
    TRITON_INTERPRET=1 python -m bench.gpu_check --dry-run --out /tmp/check.json   # CPU, tiny shapes

What it measures (the performance model of docs/design.md is the yardstick):

- ``T_gemm3``: three ``N x V x d`` torch matmuls (``z = h_b W^T``, ``Q = h_q W^T``, ``P W``), the
  unavoidable work of the loss; every backend's forward+backward time is reported as a multiple.
- device copy bandwidth (a large ``copy_``), and the row step's effective bandwidth as a fraction
  of it, counting the bytes the step cannot avoid (read ``z`` and ``Q``, write ``P``).
- per model shape (Llama-3.1-8B: d=4096, V=128256; Qwen2.5-7B: d=3584, V=152064; Gemma-2-2B:
  d=2304, V=256000, its tied head with logits soft-capped at 30), per dtype (bfloat16, float32):
  loss and gradient error of each backend against ``reference`` at a token count where the
  reference fits, then forward+backward time (CUDA events, warmup, median) and peak extra memory
  at ``N`` tokens. ``reference`` is timed only where its ``[N, V]`` tensors fit.

Backends: every registered one available here (reference, chunked, triton = fully fused,
chunked-triton = the chunked pipeline with the Triton row step, cuda), plus the authors'
full-logits formulation and the Liger-style pair-chunked baseline. Timings are bfloat16 (the
training dtype); float32 is checked for errors only. A markdown table goes to stdout, everything to
``bench/results/gpu-check-<device>-<date>.json`` with device, torch, triton and CUDA versions.
The errors, which decide the exit status, come first, then the timings, the slowest backends
last. A time budget skips the remaining rows (and says so) rather than overrun, and each row has
its own time limit (a first-call autotune can take minutes): a row over it is skipped with the
reason, as are that backend's later rows. Every row is written to the JSON as soon as it exists,
so a run cut short keeps the rows it measured.

Shapes, inputs, the timer and the version record are bench/common.py's; ``T_gemm3`` is
bench/harness.py's floor and the row-step bandwidth its measure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.baselines import chunked_pairs_loss, eager_authors_loss
from bench.common import (
    RESULTS,
    SHAPES,
    Case,
    CutShort,
    RowTimeout,
    Shape,
    Timer,
    copy_bandwidth,
    dtype_name,
    error_text,
    make_case_inputs,
    release,
    slug,
    stop_on_sigterm,
    time_limit,
    versions,
)
from bench.harness import gemm3_step, row_step_bandwidth, row_step_inputs
from bench.memory import peak_extra_memory
from qadapter_kernels import backends as backend_statuses
from qadapter_kernels import qadapter_loss
from qadapter_kernels.sizing import auto_chunk_size
from qadapter_kernels.steps import torch_row_step


@dataclass(frozen=True)
class Plan:
    """The head shapes to check, ``tokens`` (N) for timing and memory, ``check_tokens`` against the reference."""

    shapes: tuple[Shape, ...]
    tokens: int
    check_tokens: int
    copy_bytes: int


GPU_PLAN = Plan((SHAPES["llama-3.1-8b"], SHAPES["qwen2.5-7b"], SHAPES["gemma-2-2b"]), tokens=4096, check_tokens=512,
                copy_bytes=2**30)
DRY_PLAN = Plan((SHAPES["tiny-odd"], SHAPES["tiny-capped"]), tokens=72, check_tokens=40, copy_bytes=2**20)
# Timed in this order, the slowest last: what a run cut short by its budget loses matters least.
TIME_ORDER = ("cuda", "chunked-triton", "chunked", "eager-authors", "chunked-pairs", "reference")
# The baselines have no soft cap: soft-capped shapes check and time the registered backends only.
NO_SOFTCAP = ("eager-authors", "chunked-pairs")
PAIRS = 4  # B = 8 rows, T = N / 8 + 1
ADAPTER_NOISE = 0.1  # q_hidden = base_hidden + 0.1 * noise: an adapter near its base model
TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}
# Bytes the reference holds per [N, V] element (fp32 logits, Q, log-probs, combined, their grads).
REFERENCE_BYTES_PER_LOGIT = 48


def loss_fns() -> dict[str, Callable]:
    """Every backend available here, then the authors' full-logits formulation and the
    Liger-style pair-chunked baseline (``bench/baselines.py``), by the name used in the report."""
    fns = {name: functools.partial(qadapter_loss, backend=name)
           for name, st in backend_statuses().items() if st.available}
    fns["eager-authors"] = eager_authors_loss
    fns["chunked-pairs"] = chunked_pairs_loss
    return fns


def make_inputs(shape: Shape, tokens: int, dtype: torch.dtype, device: str, *, q_head: bool = False, seed: int = 0):
    """bench.common's inputs over ``B = 8`` rows of ``tokens / 8 + 1`` positions, ``B * (T - 1) = tokens`` scored."""
    case = Case(shape, tokens, dtype, torch.device(device), pairs=PAIRS)
    return make_case_inputs(case, seed, q_head=q_head, adapter_noise=ADAPTER_NOISE)


@dataclass
class Limits:
    """The run's deadline, each row's own limit, and the backends already over it once."""

    deadline: float
    row_s: float
    over: set

    def left(self) -> float:
        """Seconds a row may take now: its limit, or what is left of the budget."""
        return min(self.row_s, self.deadline - time.monotonic())

    def skip_reason(self, name: str) -> str | None:
        if name in self.over:
            return "skipped: an earlier row of this backend ran over its time limit"
        if self.left() < 1:
            return "skipped: time budget"
        return None


def run_loss(fn: Callable, inputs: dict, softcap: float | None = None):
    """Loss and the gradients of the trainable inputs (fresh leaves, inputs untouched)."""
    leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in inputs.items() if v.is_floating_point()}
    extra = {} if softcap is None else {"logit_softcap": softcap}
    out = fn(labels=inputs["labels"], **leaves, **extra)
    trainable = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(out.loss, [leaves[k] for k in trainable])
    return out.loss.detach(), dict(zip(trainable, grads))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def gemm3_ms(timer: Timer, n: int, vocab: int, hidden: int, dtype: torch.dtype, device: str) -> float:
    """Three N x V x d matmuls (bench/harness.py's floor): the two logit GEMMs and P @ W."""
    return timer.median_ms(gemm3_step(n, hidden, vocab, dtype, torch.device(device)))


def row_step_gbps(timer: Timer, rows: int, vocab: int, dtype: torch.dtype, device: str) -> dict[str, float]:
    """Effective bandwidth in GB/s of each row step on one ``[rows, V]`` chunk (bench/harness.py's measure)."""
    steps = {"torch": torch_row_step}
    if backend_statuses()["chunked-triton"].available:
        from qadapter_kernels.triton import triton_row_step

        steps["triton"] = triton_row_step
    z, q, targets = row_step_inputs(rows, vocab, dtype, device)
    return {name: row_step_bandwidth(timer, step, z, q, targets) / 1e9 for name, step in steps.items()}


def reference_fits(tokens: int, vocab: int, device: str) -> bool:
    if device != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return REFERENCE_BYTES_PER_LOGIT * tokens * vocab < 0.8 * free


def _failure(exc: Exception) -> str:
    return f"FAILED {error_text(exc)}".replace("|", "/")


def check_errors(shape: Shape, check_tokens: int, dtype: torch.dtype, fns: dict, device: str, limits: Limits):
    """Loss and gradient errors of every backend against the reference at ``check_tokens``, each
    row within its time limit. A soft-capped shape (Gemma-2's tied head) checks the shared head."""
    for q_head in (False, True) if shape.softcap is None else (False,):
        head = "q_weight+bias" if q_head else "shared"
        names = [n for n in fns if n != "reference" and not (q_head and n == "chunked-pairs" and device == "cuda")
                 and not (shape.softcap is not None and n in NO_SOFTCAP)]  # pair-chunked: shared head only
        rows = {n: dict(kind="error", model=shape.title, dtype=dtype_name(dtype), backend=n, tokens=check_tokens,
                        head=head) for n in names}
        small = make_inputs(shape, check_tokens, dtype, device, q_head=q_head, seed=1)
        try:
            with time_limit(limits.left()):
                want_loss, want_grads = run_loss(fns["reference"], small, shape.softcap)
        except (Exception, RowTimeout) as exc:  # noqa: BLE001 - nothing to compare with
            why = f"skipped: the reference did not run ({error_text(exc)})".replace("|", "/")
            for row in rows.values():
                yield {**row, "errors": {}, "ok": None, "failure": why}
            continue
        for name in names:
            row, fn = rows[name], fns[name]
            skip = limits.skip_reason(name)
            if skip:
                yield {**row, "errors": {}, "ok": None, "failure": skip}
                continue
            started = time.monotonic()
            try:
                with time_limit(limits.left()):
                    loss, grads = run_loss(fn, small, shape.softcap)
            except RowTimeout as exc:
                limits.over.add(name)
                release(device)
                yield {**row, "errors": {}, "ok": None, "failure": f"skipped: {exc}"}
                continue
            except Exception as exc:  # noqa: BLE001 - one broken backend must not hide the others
                yield {**row, "errors": {}, "ok": False, "failure": _failure(exc)}
                continue
            errors = {"loss": rel_err(loss, want_loss), **{k: rel_err(grads[k], g) for k, g in want_grads.items()}}
            yield {**row, "errors": errors, "ok": all(e <= TOL[dtype] for e in errors.values()),
                   "seconds": round(time.monotonic() - started, 2)}
        del small


def time_backends(shape: Shape, tokens: int, dtype: torch.dtype, fns: dict, timer: Timer, device: str,
                  limits: Limits, gemm_ms: float):
    """Forward+backward time (as a multiple of ``T_gemm3``), peak extra memory and determinism at
    ``tokens``, the fastest backends first, each row within its time limit."""
    big = make_inputs(shape, tokens, dtype, device, seed=2)
    order = sorted(fns, key=lambda n: TIME_ORDER.index(n) if n in TIME_ORDER else len(TIME_ORDER))
    for name in order:
        if shape.softcap is not None and name in NO_SOFTCAP:
            continue
        fn = fns[name]
        row = dict(kind="time", model=shape.title, dtype=dtype_name(dtype), backend=name, tokens=tokens)
        skip = limits.skip_reason(name)
        if skip:
            yield {**row, "skipped": skip.removeprefix("skipped: ")}
            continue
        if name == "reference" and not reference_fits(tokens, shape.vocab, device):
            yield {**row, "skipped": "does not fit in memory"}
            continue
        step = functools.partial(run_loss, fn, big, shape.softcap)
        started = time.monotonic()
        try:
            with time_limit(limits.left()):
                (loss, grads), peak = peak_extra_memory(step, device)
                ms = timer.median_ms(step)
                again = step()[1]["q_hidden"]
        except RowTimeout as exc:
            limits.over.add(name)
            yield {**row, "skipped": str(exc)}
            continue
        except torch.OutOfMemoryError:
            yield {**row, "skipped": "out of memory"}
            continue
        except Exception as exc:  # noqa: BLE001 - one broken backend must not hide the others
            yield {**row, "skipped": _failure(exc)}
            continue
        finally:
            release(device)
        yield {**row, "ms": ms, "x_gemm3": ms / gemm_ms, "peak_mib": peak / 2**20,
               "deterministic": bool(torch.equal(again, grads["q_hidden"])), "seconds": round(time.monotonic() - started, 2)}
        del loss, grads, again


def markdown(result: dict) -> str:
    lines = [f"## GPU check: {result['versions']['device']}", "",
             "| quantity | value |", "|---|---|"]
    for key in ("torch", "triton", "cuda", "capability"):
        lines.append(f"| {key} | {result['versions'].get(key)} |")
    lines.append(f"| copy bandwidth | {result['copy_gbps']:.0f} GB/s |")
    for model, per_dtype in result["gemm3_ms"].items():
        for dtype, ms in per_dtype.items():
            lines.append(f"| T_gemm3 {model} {dtype} | {ms:.2f} ms |")
    if "row_step_failure" in result:
        lines.append(f"| row step | {result['row_step_failure']} |")
    for dtype, per_step in result["row_step"].items():
        for step, gbps in per_step.items():
            lines.append(f"| row step {step} {dtype} | {gbps:.0f} GB/s ({gbps / result['copy_gbps']:.0%} of copy) |")
    lines += ["", "| model | dtype | backend | head | N | loss err | worst grad err | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "error" and "failure" in r:  # failed or skipped
            lines.append(f"| {r['model']} | {r['dtype']} | {r['backend']} | {r['head']} | {r['tokens']} | "
                         f"{r['failure']} | | {'NO' if r['ok'] is False else 'skipped'} |")
        elif r["kind"] == "error":
            grad = max((v for k, v in r["errors"].items() if k != "loss"), default=0.0)
            lines.append(f"| {r['model']} | {r['dtype']} | {r['backend']} | {r['head']} | {r['tokens']} | "
                         f"{r['errors']['loss']:.1e} | {grad:.1e} | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", "| model | dtype | backend | N | fwd+bwd ms | x T_gemm3 | peak MiB | deterministic |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "time":
            if "skipped" in r:
                lines.append(f"| {r['model']} | {r['dtype']} | {r['backend']} | {r['tokens']} | {r['skipped']} | | | |")
            else:
                lines.append(f"| {r['model']} | {r['dtype']} | {r['backend']} | {r['tokens']} | {r['ms']:.1f} | "
                             f"{r['x_gemm3']:.2f} | {r['peak_mib']:.0f} | {r['deterministic']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="correctness, speed and memory of every backend on this GPU")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (use TRITON_INTERPRET=1)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the rows left after this many seconds")
    parser.add_argument("--row-limit-s", type=float, default=40.0, help="skip a row (and its backend's later rows) "
                        "that takes longer than this")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu-check-<device>-<date>.json)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    limits = Limits(started + args.budget_s, args.row_limit_s, set())
    if args.dry_run:
        device, plan, timer = "cpu", DRY_PLAN, Timer("cpu", warmup=0, repeats=1)
    elif torch.cuda.is_available():
        device, plan, timer = "cuda", GPU_PLAN, Timer("cuda", warmup=1, repeats=5)
    else:
        print("no CUDA device: run with --dry-run (and TRITON_INTERPRET=1) to check the script on CPU")
        return 2
    stop_on_sigterm()
    fns = loss_fns()
    result = {"versions": versions(device), "date": dt.datetime.now().isoformat(timespec="seconds"),
              "backends": {name: st.reason or "available" for name, st in backend_statuses().items()},
              "gemm3_ms": {}, "row_step": {}, "rows": []}
    result["copy_gbps"] = copy_bandwidth(timer, plan.copy_bytes) / 1e9
    device_tag = slug(result["versions"]["device"].lower())
    out = args.out or RESULTS / f"gpu-check-{device_tag}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(row: dict | None = None) -> None:
        """Every row is written as soon as it exists: a run cut short still leaves its numbers."""
        if row is not None:
            result["rows"].append(row)
            print(json.dumps(row, default=str), flush=True)
        result["seconds"] = time.monotonic() - started
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, out)

    dtypes = (torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32,)
    save()
    try:
        # The errors decide the exit status: all of them first, the training dtype's first.
        for dtype in dtypes:
            for shape in plan.shapes:
                for row in check_errors(shape, plan.check_tokens, dtype, fns, device, limits):
                    save(row)
        first = plan.shapes[0]
        for dtype in dtypes:  # the chunk the fused GPU row steps take
            chunk = auto_chunk_size(plan.tokens, first.vocab, dtype, torch.device(device), widened=False)
            try:
                with time_limit(limits.left()):
                    result["row_step"][dtype_name(dtype)] = row_step_gbps(timer, chunk, first.vocab, dtype, device)
            except (Exception, RowTimeout) as exc:  # noqa: BLE001 - the timings still run
                result["row_step_failure"] = error_text(exc)
            save()
        # Then the timings of the training dtype, shape by shape.
        for shape in plan.shapes:
            for dtype in dtypes[:1]:
                try:
                    with time_limit(limits.left()):
                        gemm = gemm3_ms(timer, plan.tokens, shape.vocab, shape.hidden, dtype, device)
                except (Exception, RowTimeout) as exc:  # noqa: BLE001 - nothing to time against
                    save({"kind": "time", "model": shape.title, "dtype": dtype_name(dtype), "backend": "T_gemm3",
                          "tokens": plan.tokens, "skipped": error_text(exc)})
                    continue
                finally:
                    release(device)
                result["gemm3_ms"].setdefault(shape.title, {})[dtype_name(dtype)] = gemm
                save()
                for row in time_backends(shape, plan.tokens, dtype, fns, timer, device, limits, gemm):
                    save(row)
    except CutShort as exc:
        result["cut_short"] = str(exc)
        save()
    print(markdown(result))
    print(f"\nwrote {out} in {result['seconds']:.0f} s" + (" (cut short)" if "cut_short" in result else ""))
    failed = [r for r in result["rows"] if r["kind"] == "error" and r["ok"] is False]
    return 1 if failed or "cut_short" in result else 0


if __name__ == "__main__":
    sys.exit(main())
