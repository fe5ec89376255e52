"""What every benchmark shares: head shapes, random loss inputs, the one timer, machine and versions.

Shapes. The loss cost depends only on the head (hidden size ``d``, vocabulary ``V``) and on the
number of scored tokens ``N``, so a "shape" is just ``(d, V)`` taken from a real model. Inputs are
random (no model hub is reachable here): hidden states ~ N(0, 1) and a head scaled by
``1/sqrt(d)`` give logits of unit scale, like a trained model's.

The CPU default is the small shape at N = 1024 and 4096, in fp32 and (where the CPU has fast
bf16 GEMMs) bf16: on 2 cores one ``N x V x d`` fp32 GEMM at N=4096 takes about two seconds, so
the run takes minutes. ``full=True``
sweeps every shape and N in {1024, 4096, 16384} and is meant for a GPU; the GPU default is every
shape at N=4096.

Timer. :class:`Timer` is the only clock of bench/: CUDA events on a GPU, ``perf_counter``
elsewhere, warm-up calls, then the median.

Versions. :func:`versions` is the one record of the software and the device a result was
measured with; ``python -m bench.common OUT.json`` writes it with the GPU tools (bench/gpu.sh).

Nothing here imports ``qadapter_kernels``: the version record must work even where it does not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Real preference pairs beside the repository (tests' and benchmarks' data, never committed).
HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-2000.jsonl"
GIB = 2**30


# --- shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The lm_head geometry of one model; ``model`` is its published name ("" for a made-up shape)."""

    name: str
    hidden: int
    vocab: int
    model: str = ""
    softcap: float | None = None  # the model's final logit soft-capping (Gemma-2: 30)

    @property
    def title(self) -> str:
        return self.model or self.name


SHAPES = {
    s.name: s
    for s in (
        Shape("smollm2-135m", 576, 49152, "SmolLM2-135M"),
        Shape("llama-3.1-8b", 4096, 128256, "Llama-3.1-8B"),
        Shape("qwen2.5-7b", 3584, 152064, "Qwen2.5-7B"),
        Shape("gemma-2-2b", 2304, 256000, "Gemma-2-2B", softcap=30.0),
        # Not models: a seconds-long shape for the CI smoke test of the suite and the report, and
        # one of odd sizes (no block size divides them) and a soft-capped one for the GPU check's CPU dry run.
        Shape("tiny", 64, 512),
        Shape("tiny-odd", 40, 203),
        Shape("tiny-capped", 24, 301, softcap=30.0),
    )
}
FULL_SHAPES = ("smollm2-135m", "llama-3.1-8b", "qwen2.5-7b")
FULL_TOKENS = (1024, 4096, 16384)
CPU_SHAPES = ("smollm2-135m",)
CPU_TOKENS = (1024, 4096)
# B = 4 rows: 2 chosen, 2 rejected, as in the performance model's N=4096 example (docs/design.md) at T ~ 1024.
PAIRS = 2


@dataclass(frozen=True)
class Case:
    """One benchmark point: a head shape, ``tokens`` scored tokens split over ``2 * pairs`` rows."""

    shape: Shape
    tokens: int
    dtype: torch.dtype
    device: torch.device
    pairs: int = PAIRS

    @property
    def batch(self) -> int:
        return 2 * self.pairs

    @property
    def seq(self) -> int:
        # Position t scores labels[t + 1], so T positions score T - 1 tokens: one extra position
        # per row makes exactly ``tokens`` scored tokens.
        return self.tokens // self.batch + 1

    @property
    def label(self) -> str:
        return f"{self.shape.name} N={self.tokens} {dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    """The one dtype of a single-dtype run (the end-to-end step): bf16 on GPU (how models train
    there); fp32 on CPU, the dtype every CPU has fast GEMMs for."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_has_fast_bf16() -> bool:
    """Whether torch's CPU GEMMs run bf16 natively here (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bench_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The loss benchmark's dtypes: bf16 on GPU; fp32 on CPU, and bf16 too where it is fast."""
    if device.type == "cuda":
        return (torch.bfloat16,)
    return (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,)


def default_cases(
    device: torch.device,
    *,
    full: bool = False,
    shapes: tuple[str, ...] | None = None,
    tokens: tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
) -> list[Case]:
    """The cases to run: explicit ``shapes``/``tokens``/``dtypes`` win, else all (``full``), else the
    CPU/GPU default."""
    if shapes is None:
        shapes = FULL_SHAPES if full or device.type == "cuda" else CPU_SHAPES
    if tokens is None:
        tokens = FULL_TOKENS if full else (CPU_TOKENS if device.type == "cpu" else (4096,))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    dtypes = dtypes or bench_dtypes(device)
    for n in tokens:
        if n < 2 * PAIRS or n % (2 * PAIRS):
            raise ValueError(f"token counts must be positive multiples of {2 * PAIRS} (the rows); got {n}")
    return [Case(SHAPES[s], n, dtype, device) for dtype in dtypes for s in shapes for n in tokens]


def make_case_inputs(
    case: Case, seed: int = 0, *, q_head: bool = False, adapter_noise: float = 0.5
) -> dict[str, torch.Tensor]:
    """Random loss inputs for ``case``: every position but the first of each row is scored.

    Nothing is masked so that every backend and baseline does the same ``N``-token work (the
    packing of scored tokens, which favours the project's backends, is measured end to end).
    ``q_hidden`` is ``base_hidden`` plus ``adapter_noise`` times unit noise; ``q_head`` adds a
    separate trainable Q head (``q_weight`` near ``weight``, and ``q_bias``).
    """
    g = torch.Generator().manual_seed(seed)
    b, t, d, v = case.batch, case.seq, case.shape.hidden, case.shape.vocab
    base = torch.randn(b, t, d, generator=g)
    hq = base + adapter_noise * torch.randn(b, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, 0] = -100  # never an action (position t scores labels[t + 1])
    dev, dt = case.device, case.dtype
    out = {
        "base_hidden": base.to(dev, dt),
        "q_hidden": hq.to(dev, dt).requires_grad_(),
        "weight": weight.to(dev, dt),
        "labels": labels.to(dev),
    }
    if q_head:
        qw = weight + 0.02 * torch.randn(v, d, generator=g) / d**0.5
        out["q_weight"] = qw.to(dev, dt).requires_grad_()
        out["q_bias"] = (0.1 * torch.randn(v, generator=g)).to(dev, dt).requires_grad_()
    return out


# --- device helpers -------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device | str) -> None:
    """Hands the allocator's cached blocks back (CUDA only): after an out-of-memory or a large buffer."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``: how a failure is recorded in a result."""
    return f"{type(exc).__name__}: {first_line(exc)}"


# --- the timer ------------------------------------------------------------------------------


class RowTimeout(BaseException):
    """A row ran over its time limit. Not an ``Exception``: the ``except Exception`` of a library
    (an autotuner, Triton's interpreter) lets it through, as it does KeyboardInterrupt."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises :class:`RowTimeout` in the block after ``seconds`` (SIGALRM: the main thread of a
    POSIX process; Python code between kernel launches, such as an autotuner's loop, is cut short)."""
    if seconds <= 0:
        raise RowTimeout("no time left")

    def on_alarm(signum, frame):
        raise RowTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class CutShort(BaseException):
    """The run was told to stop (SIGTERM, as ``timeout`` sends at the step's budget); a
    ``BaseException`` for the reason :class:`RowTimeout` is one."""


def stop_on_sigterm() -> None:
    """SIGTERM raises :class:`CutShort` in the main thread: the run records what it was doing and
    writes its results before ``timeout``'s kill follows."""
    def on_sigterm(signum, frame):
        raise CutShort("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)


class Timer:
    """Median time of a callable: CUDA events on a GPU, ``perf_counter`` elsewhere.

    :meth:`median_s` runs ``warmup`` untimed calls, then ``repeats`` timed ones. :meth:`times_s`
    times calls without warm-up, for callers that interleave candidates (one call each per round,
    so that a drift in a shared machine's load biases none) and warm them up themselves.
    """

    def __init__(self, device: torch.device | str, *, warmup: int = 1, repeats: int = 5):
        self.device = torch.device(device)
        self.warmup, self.repeats = warmup, repeats

    def times_s(self, fn: Callable[[], object], repeats: int | None = None) -> list[float]:
        """Seconds of each of ``repeats`` (default: the timer's) calls of ``fn``."""
        times = []
        for _ in range(self.repeats if repeats is None else repeats):
            if self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                fn()
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return times

    def median_s(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        return statistics.median(self.times_s(fn))

    def median_ms(self, fn: Callable[[], object]) -> float:
        return 1e3 * self.median_s(fn)

    def rounds(self, fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
        """Seconds of each of ``fns`` per round after ``warmup`` calls each; within a round they take turns."""
        for _ in range(self.warmup):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name] += self.times_s(fn, 1)
        return times


def copy_bandwidth(timer: Timer, nbytes: int = GIB) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of an ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    seconds = timer.median_s(functools.partial(dst.copy_, src))
    del src, dst
    release(timer.device)
    return 2 * nbytes / seconds


# --- machine and versions -------------------------------------------------------------------


def package_version(package: str) -> str | None:
    """The installed distribution's version, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of anything but letters and digits become one ``-``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def device_label(device: torch.device) -> str:
    """``cpu`` or the GPU's name as a lower-case file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return slug(torch.cuda.get_device_name(device).lower())


def device_info(device: torch.device | str) -> dict:
    """The device's name; on CUDA also its compute capability, memory (GiB) and SM count."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": "cpu (triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / GIB, 1), "sms": props.multi_processor_count}


def versions(device: torch.device | str, packages: tuple[str, ...] = ("triton",)) -> dict:
    """Python, torch and its CUDA, the ``packages``' versions (None when missing), then :func:`device_info`."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    info |= {package: package_version(package) for package in packages}
    return info | device_info(device)


def tool_version(tool: str, *args: str) -> str:
    """The last output line of ``tool args`` (``nvcc --version``), or "not found"."""
    path = shutil.which(tool)
    if path is None:
        return "not found"
    lines = subprocess.run([path, *args], capture_output=True, text=True).stdout.strip().splitlines()
    return lines[-1] if lines else ""


def gpu_run_versions() -> dict:
    """What bench/gpu.sh records first: versions, the device(s) and the CUDA tools found."""
    info = versions(bench_device(), ("triton", "transformers", "peft", "accelerate", "bitsandbytes", "numpy",
                                     "prometheus-client"))
    info["device_count"] = torch.cuda.device_count()
    info["nvcc"] = tool_version("nvcc", "--version")
    info["nvidia-smi"] = tool_version("nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem",
                                      "--format=csv,noheader")
    info["compute-sanitizer"] = shutil.which("compute-sanitizer") or "not found"
    return info


def cpu_bench_args(parser, argv: list[str] | None):
    """Parses a CPU benchmark's options with the two every one takes, ``--threads`` (then set as
    torch's) and ``--out`` (the results directory)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the result JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def fresh_path(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3``, ... where an earlier result holds that name: a run
    repeated on the same day keeps the earlier one's files."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_result(result: dict, out: Path, name: str, indent: int = 1, fresh: bool = True) -> Path:
    """Writes ``result`` as ``<out>/<name>.json`` atomically, and says where: beside an earlier one of
    that name (:func:`fresh_path`), or over it where the caller named the file (not ``fresh``)."""
    from qadapter.library.atomic import write_text

    path = fresh_path(out / f"{name}.json") if fresh else out / f"{name}.json"
    write_text(path, json.dumps(result, indent=indent) + "\n")
    print(f"wrote {path}")
    return path


def options_main(argv: list[str] | None, *, prog: str, doc: str, options_class: type, run: Callable[..., dict],
                 summary: Callable[[dict], str], name: str | Callable[[dict], str], **defaults) -> int:
    """The command of a benchmark of the model layer whose options are a dataclass: its options (as
    ``qadapter``'s commands generate them, ``defaults`` replacing some) and ``--out``; runs
    ``run(options)``, prints ``summary(result)`` and writes ``<name>-<device>-<date>.json`` into ``--out``
    (``name``: or ``name(result)``, for a benchmark whose variants are kept side by side).
    (``qadapter`` is imported here, not at the top: the version record must work without it.)"""
    import argparse

    from qadapter.cli.arguments import add_dataclass_options, options_from

    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_dataclass_options(parser, options_class)
    parser.set_defaults(**defaults)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the result JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    result = run(options_from(args, options_class))
    print(summary(result))
    write_result(result, args.out, f"{name(result) if callable(name) else name}-{result['device']}-{result['date'][:10]}",
                 indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.common [OUT.json]``: prints (and writes) :func:`gpu_run_versions`."""
    argv = sys.argv[1:] if argv is None else argv
    text = json.dumps(gpu_run_versions(), indent=1)
    print(text)
    if argv:
        Path(argv[0]).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
