"""Gradient filtering in the chunked backward: each token leaves out of ``p @ Wq`` (the ``q_hidden``
gradient) and of a trainable head's ``dQ^T h_q`` the vocabulary blocks that hold the least of its
policy ``p``, as many as fit a probability budget (``grad_filter_eps``), so the gradient loses at
most that share of its ``E_p[Wq]`` term (docs/design.md, "The gradient in closed form", has the
bound and the measurements).

A block is :data:`steps.FILTER_BLOCK` columns of a tile, the compiled CPU step's sweep block, whose
sum of ``p`` per token that step reports as it goes. A tile's products then run once per column range
over the tokens that keep it. What was skipped and how much probability it held are reported to a
:func:`grad_filter_report` in effect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import AUTO
from .steps import FILTER_BLOCK


def mass_budget(eps: float | str, dtype: torch.dtype) -> float:
    """The probability each token may leave out, of ``grad_filter_eps`` for inputs of ``dtype``.

    ``"auto"``: the unit roundoff of ``dtype`` (half its machine epsilon). A token that loses less
    than that of its ``p`` changes its ``E_p[Wq]`` by less than one unit roundoff of the longest row
    of ``Wq``: what rounding the gradient into ``dtype`` costs at that scale anyway.
    """
    return torch.finfo(dtype).eps / 2 if eps == AUTO else float(eps)


@dataclass
class GradFilterReport:
    """What gradient filtering left out, summed over the backwards run while it was in effect (each
    loss call's once per backward: twice if its graph is kept for a second one).

    ``entries`` / ``skipped_entries``: token x vocabulary entries of ``p @ Wq`` (the ``q_hidden``
    gradient) seen and left out; ``head_entries`` / ``head_skipped_entries``: the same for a
    trainable head's ``dWq``. ``dropped_mass``: per scored token (of every call, in the order their
    backwards ran), the probability ``p`` held by the entries left out of its ``p @ Wq``. ``eps``:
    the last budget used.
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
def grad_filter_report() -> Iterator[GradFilterReport]:
    """Collects what the chunked backend's gradient filtering skips, for the backwards run inside the
    block (each once, a checkpointed region's too)::

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


def leave_out(mass: torch.Tensor, budget_so_far: float, dropped: torch.Tensor, width: int,
              ) -> tuple[torch.Tensor | None, int]:
    """What each row of a ``width``-column tile leaves out: its lightest blocks of ``mass``
    (``[rows, blocks]``, upper bounds of the probability each block holds) within ``budget_so_far``
    less what it already left out (``dropped``, ``[rows]``, which grows by their mass in place).
    Returns the ``[rows, blocks]`` bool mask of the blocks left out (None when nothing is: the
    exact product) and the number of entries left out."""
    drop = dropped_blocks(mass, budget_so_far - dropped)
    dropped.add_(torch.where(drop, mass, 0.0).sum(dim=1))
    widths = torch.full((drop.shape[1],), FILTER_BLOCK, device=drop.device)
    widths[-1] = width - (drop.shape[1] - 1) * FILTER_BLOCK
    left_out = int((drop * widths).sum())
    return (drop if left_out else None), left_out


def dropped_blocks(mass: torch.Tensor, allowance: torch.Tensor) -> torch.Tensor:
    """``[rows, blocks]`` bool: per row, its lightest blocks of ``mass`` (``[rows, blocks]``, the
    probability each block holds) while their sum stays within the row's ``allowance`` (``[rows]``).
    NaN is never within: a non-finite row keeps every block from its first NaN on."""
    ordered, order = mass.sort(dim=1)
    within = ordered.cumsum(dim=1) <= allowance.unsqueeze(1)
    return torch.zeros_like(within).scatter_(1, order, within)


def kept_parts(dropped: torch.Tensor, width: int) -> Iterator[tuple[int, int, torch.Tensor | None]]:
    """``(a, b, rows)``: the tile's columns ``[a, b)`` and the rows that keep them (None: every row),
    covering every kept (row, block) once. Runs of blocks that every row keeps come as one range, so
    a tile nobody filters is one product, as on the exact path."""
    kept = ~dropped
    counts = kept.sum(dim=0).tolist()
    rows, start = dropped.shape[0], None
    for b, count in enumerate([*counts, 0]):
        if count == rows and start is None:
            start = b
        elif count != rows and start is not None:
            yield start * FILTER_BLOCK, min(b * FILTER_BLOCK, width), None
            start = None
        if 0 < count < rows:
            yield b * FILTER_BLOCK, min((b + 1) * FILTER_BLOCK, width), kept[:, b].nonzero().squeeze(1)
