"""Benchmark shapes and inputs: the lm_head geometries of real models and the token counts to sweep.

The loss cost depends only on the head (hidden size ``d``, vocabulary ``V``) and on the number of
scored tokens ``N``, so a "shape" is just ``(d, V)`` taken from a real model. Inputs are random
(no model hub is reachable here): hidden states ~ N(0, 1) and a head scaled by ``1/sqrt(d)`` give
logits of unit scale, like a trained model's.

Defaults keep the CPU run short: the small shape at N = 256 and 1024 (on 2 cores one
``N x V x d`` GEMM at N=1024 takes about a second, a forward+backward several). ``full=True``
sweeps every shape and N in {1024, 4096, 16384} and is meant for a GPU; the GPU default is every
shape at N=4096.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """The lm_head geometry of one model."""

    name: str
    hidden: int
    vocab: int


SHAPES = {
    s.name: s
    for s in (
        Shape("smollm2-135m", 576, 49152),
        Shape("llama-3.1-8b", 4096, 128256),
        Shape("qwen2.5-7b", 3584, 152064),
        # Not a model: a seconds-long shape for the CI smoke test of the suite and the report.
        Shape("tiny", 64, 512),
    )
}
FULL_SHAPES = ("smollm2-135m", "llama-3.1-8b", "qwen2.5-7b")
FULL_TOKENS = (1024, 4096, 16384)
CPU_SHAPES = ("smollm2-135m",)
CPU_TOKENS = (256, 1024)
PAIRS = 2  # B = 4 rows: 2 chosen, 2 rejected, as in DESIGN's N=4096 example at T ~ 1024.


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
    """bf16 on GPU (how models train there); fp32 on CPU, where bf16 GEMMs are slow and unrepresentative."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_cases(
    device: torch.device,
    *,
    full: bool = False,
    shapes: tuple[str, ...] | None = None,
    tokens: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> list[Case]:
    """The cases to run: explicit ``shapes``/``tokens`` win, else all (``full``), else the CPU/GPU default."""
    if shapes is None:
        shapes = FULL_SHAPES if full or device.type == "cuda" else CPU_SHAPES
    if tokens is None:
        tokens = FULL_TOKENS if full else (CPU_TOKENS if device.type == "cpu" else (4096,))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    dtype = dtype or bench_dtype(device)
    for n in tokens:
        if n < 2 * PAIRS or n % (2 * PAIRS):
            raise ValueError(f"token counts must be positive multiples of {2 * PAIRS} (the rows); got {n}")
    return [Case(SHAPES[s], n, dtype, device) for s in shapes for n in tokens]


def make_case_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random loss inputs for ``case``: every position but the first of each row is scored.

    Nothing is masked so that every backend and baseline does the same ``N``-token work (the
    packing of scored tokens, which favours the project's backends, is measured end to end).
    """
    g = torch.Generator().manual_seed(seed)
    b, t, d, v = case.batch, case.seq, case.shape.hidden, case.shape.vocab
    base = torch.randn(b, t, d, generator=g)
    hq = base + 0.5 * torch.randn(b, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, 0] = -100  # never an action (position t scores labels[t + 1])
    dev, dt = case.device, case.dtype
    return {
        "base_hidden": base.to(dev, dt),
        "q_hidden": hq.to(dev, dt).requires_grad_(),
        "weight": weight.to(dev, dt),
        "labels": labels.to(dev),
    }
