"""The chunked loss under a logit soft cap on a CPU, forward + backward, beside ``T_gemm3`` in
interleaved rounds: the compiled step, which caps z and Q as it reads them (csrc/cpu_row_step.c);
the eager block step under the same cap on the same tiles (what the compiled step's callers ran
while it took the eager step under a cap); the eager backend altogether (``QADAPTER_CPU_KERNELS=0``,
its own, narrower tiles); and the uncapped loss with the compiled step, the cap's own cost.

Random inputs at a head shape (default SmolLM2-135M's, N = 4,096 scored tokens, bfloat16, a cap of
30 as Gemma-2's): the steps are branch-free, so the logits' values do not change their time.

    python -m bench.softcap [--softcap 30] [--tokens 4096] [--rounds 3] [--threads 1] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
from unittest import mock

import torch

import qadapter_kernels
from bench.common import SHAPES, Case, Timer, cpu_bench_args, make_case_inputs, versions, write_result
from bench.harness import gemm3_step
from qadapter_kernels import _cpu, chunked, steps

CANDIDATES = {
    "capped, compiled step": True,
    "capped, eager block step": True,
    "capped, eager backend": True,
    "uncapped, compiled step": False,
}


def _context(name: str):
    """What each candidate changes around the loss call."""
    if name == "capped, eager block step":  # the compiled step's tiles, the eager step on them
        return mock.patch.object(chunked, "default_block_step", lambda device: steps.torch_block_step)
    if name == "capped, eager backend":
        return mock.patch.dict(os.environ, {_cpu.ENV_SWITCH: "0"})
    return contextlib.nullcontext()


def loss_step(inputs: dict, name: str, softcap: float | None, losses: dict):
    hq = inputs["q_hidden"]

    def step() -> None:
        hq.grad = None
        with _context(name):
            out = qadapter_kernels.qadapter_loss(**inputs, backend="chunked", logit_softcap=softcap)
            out.loss.backward()
        losses[name] = float(out.loss.detach())

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--softcap", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = cpu_bench_args(parser, argv)
    device, dtype, shape = torch.device("cpu"), torch.bfloat16, SHAPES[args.shape]
    if not _cpu.status()[0]:
        raise SystemExit(f"the compiled CPU step is unavailable: {_cpu.status()[1]}")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(device), "threads": torch.get_num_threads(),
              "load_average_before": os.getloadavg(), "shape": shape.name, "hidden": shape.hidden,
              "vocab": shape.vocab, "tokens": args.tokens, "dtype": "bfloat16", "softcap": args.softcap,
              "rounds": args.rounds}
    inputs = make_case_inputs(Case(shape, args.tokens, dtype, device))
    losses: dict[str, float] = {}
    fns = {"gemm3": gemm3_step(args.tokens, shape.hidden, shape.vocab, dtype, device)}
    fns |= {name: loss_step(inputs, name, args.softcap if capped else None, losses)
            for name, capped in CANDIDATES.items()}
    times = Timer(device, warmup=1).rounds(fns, args.rounds)
    gemm3 = statistics.median(times["gemm3"])
    result |= {"T_gemm3_ms": 1e3 * gemm3, "T_gemm3_times_ms": [1e3 * t for t in times["gemm3"]], "candidates": []}
    for name in CANDIDATES:
        seconds = statistics.median(times[name])
        result["candidates"].append({"name": name, "time_ms": 1e3 * seconds, "x_T_gemm3": seconds / gemm3,
                                     "times_ms": [1e3 * t for t in times[name]], "loss": losses[name]})
        print(f"[bench] {name}: {1e3 * seconds:.0f} ms, {seconds / gemm3:.2f}x T_gemm3", flush=True)
    print(f"[bench] T_gemm3: {1e3 * gemm3:.0f} ms", flush=True)
    result["load_average_after"] = os.getloadavg()
    write_result(result, args.out, f"softcap-cpu-{result['date'][:10]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
