"""Gradient filtering in the chunked backward: the vocabulary blocks whose policy values ``p`` are
below a threshold in every token of a tile are left out of ``p @ Wq`` (the ``q_hidden`` gradient)
and of a trainable head's ``dQ^T h_q`` (docs/design.md, "The gradient in closed form", has the
bound and the measurements).

A block is :data:`steps.FILTER_BLOCK` columns of a tile, the compiled CPU step's sweep block, whose
largest ``p`` and sum of ``p`` that step reports as it goes. What was skipped and how much
probability it held are reported to a :func:`grad_filter_report` in effect.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .config import AUTO
from .steps import FILTER_BLOCK


def resolve_eps(eps: float | str, dtype: torch.dtype, vocab: int) -> float:
    """The threshold of ``grad_filter_eps`` for inputs of ``dtype`` over a vocabulary of ``vocab``.

    ``"auto"``: the unit roundoff of ``dtype`` (half its machine epsilon) divided by ``vocab``. Every
    skipped ``p`` is below it, so the probability a token loses, summed over however many entries
    are skipped, is below one unit roundoff, and so is the error of ``E_p[Wq]`` relative to the
    longest row of ``Wq``: what rounding the gradient into ``dtype`` costs at that scale anyway.
    """
    return torch.finfo(dtype).eps / 2 / vocab if eps == AUTO else float(eps)


@dataclass
class GradFilterReport:
    """What gradient filtering left out, summed over the loss calls made while it was in effect.

    ``entries`` / ``skipped_entries``: token x vocabulary entries of ``p @ Wq`` (the ``q_hidden``
    gradient) seen and left out; ``head_entries`` / ``head_skipped_entries``: the same for a
    trainable head's ``dWq``. ``dropped_mass``: per scored token (of every call, in order), the
    probability ``p`` held by the entries left out of its ``p @ Wq``. ``eps``: the last threshold used.
    """

    entries: int = 0
    skipped_entries: int = 0
    head_entries: int = 0
    head_skipped_entries: int = 0
    eps: float = 0.0
    masses: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def skipped_fraction(self) -> float:
        """The fraction of ``p @ Wq``'s entries left out (0 before any filtered call)."""
        return self.skipped_entries / self.entries if self.entries else 0.0

    @property
    def head_skipped_fraction(self) -> float:
        return self.head_skipped_entries / self.head_entries if self.head_entries else 0.0

    @property
    def dropped_mass(self) -> torch.Tensor:
        return torch.cat(self.masses) if self.masses else torch.zeros(0)  # float32 (float64 inputs: float64)


_REPORTS: list[GradFilterReport] = []


@contextlib.contextmanager
def grad_filter_report():
    """Collects what the chunked backend's gradient filtering skips, for the calls inside the block::

        with grad_filter_report() as report:
            qadapter_loss(..., grad_filter_eps="auto").loss.backward()
        report.skipped_fraction, report.dropped_mass.max()
    """
    report = GradFilterReport()
    _REPORTS.append(report)
    try:
        yield report
    finally:
        _REPORTS.remove(report)


def record(eps: float, *, entries: int = 0, skipped: int = 0, head_entries: int = 0, head_skipped: int = 0,
           dropped_mass: torch.Tensor | None = None) -> None:
    """Adds one call's counts to every report in effect."""
    for report in _REPORTS:
        report.eps = eps
        report.entries += entries
        report.skipped_entries += skipped
        report.head_entries += head_entries
        report.head_skipped_entries += head_skipped
        if dropped_mass is not None:
            report.masses.append(dropped_mass.detach().cpu())


def kept_blocks(block_max: torch.Tensor, row_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``[blocks]`` bool: the blocks where some row's ``block_max * row_scale`` (a bound on its ``p``)
    is not below ``eps``. NaN is never below: a non-finite row keeps every block."""
    return ~(block_max * row_scale.unsqueeze(1) < eps).all(dim=0)


def runs(kept: torch.Tensor, width: int) -> list[tuple[int, int]]:
    """The column ranges ``[a, b)`` of a ``width``-column tile covered by consecutive kept blocks."""
    flags, out, start = kept.tolist(), [], None
    for i, keep in enumerate([*flags, False]):
        if keep and start is None:
            start = i
        elif not keep and start is not None:
            out.append((start * FILTER_BLOCK, min(i * FILTER_BLOCK, width)))
            start = None
    return out
