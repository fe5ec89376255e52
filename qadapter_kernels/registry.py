"""The backend registry: each backend's declared record, whether it runs here (and why not), and
the ``auto`` choice.

Every backend implements one contract, ``token_stats`` (:class:`TokenStatsFn`): from the packed
scored tokens it returns ``(Q[t, a_t], V_t)`` with gradients to ``q_hidden``, ``q_weight`` and
``q_bias``. The rest of the loss (rewards, pairing, BT, chi2) is shared, in
``pairwise.py``; a backend may declare a fused replacement (``pairwise``) and a combine for decoding
(``combine``). Records are imported lazily, so a missing optional dependency only disables its
backend, with the reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .config import check_choice


@dataclass(frozen=True)
class StatsOptions:
    """The options every backend's ``token_stats`` takes, in one record: the combination
    (``alpha_tilde``, ``alpha_0``), the model's logit soft cap (``logit_softcap`` s: both heads' logits
    become ``s * tanh(logits / s)``; None: none) and, for backends that chunk, ``chunk_size``
    (tokens per chunk; None: from the backend's memory budget); ``grad_filter_eps``, gradient
    filtering (the probability a token may leave out of ``p @ Wq``; 0: the exact gradient;
    ``"auto"``: ``grad_filter.mass_budget``)."""

    alpha_tilde: float
    alpha_0: float
    logit_softcap: float | None = None
    chunk_size: int | None = None
    grad_filter_eps: float | str = 0.0  # LossConfig.grad_filter_eps; the chunked backends' steps report for it


def require_exact_gradient(grad_filter_eps: float | str, backend: str) -> None:
    """A backend that computes the exact gradient refuses a request for gradient filtering."""
    if grad_filter_eps:
        raise ValueError(f"grad_filter_eps={grad_filter_eps!r} asks for gradient filtering, which the "
                         f"{backend} backend does not implement: use a chunked backend (chunked, chunked-triton, cuda), or "
                         f"grad_filter_eps=0")


class TokenStatsFn(Protocol):
    """The contract every backend's ``token_stats`` implements, written once.

    ``base``, ``hq``: ``[N, d]`` the scored tokens' hidden states of the frozen model (no gradient)
    and of the adapter; ``weight``, ``q_weight``: ``[V, d]`` the frozen head and the Q head (the
    frozen one, detached, when the adapter sits below the head); ``q_bias``: ``[V]`` or None;
    ``targets``: ``[N]`` int64 in ``[0, V)``. Returns ``(Q[t, a_t], V_t)``, two ``[N]`` tensors in
    ``inputs.stats_dtype``, differentiable in ``hq``, ``q_weight`` and ``q_bias``, with
    ``V_t = alpha~ lse((Q_t + alpha_0 log_softmax(z_t)) / alpha~)``.
    """

    def __call__(self, base: torch.Tensor, hq: torch.Tensor, weight: torch.Tensor, q_weight: torch.Tensor,
                 q_bias: torch.Tensor | None, targets: torch.Tensor,
                 options: StatsOptions) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Backend:
    """What a backend is and offers. ``availability()`` says whether it runs here, and why not."""

    name: str
    summary: str
    token_stats: TokenStatsFn
    availability: Callable[[], tuple[bool, str]]
    float64: bool = True  # False: its kernels compute in float32 at most and refuse float64
    pairwise: Callable | None = None  # replaces pairwise.pairwise_loss (same signature)
    combine: Callable | None = None  # combined-policy log-probs of held logits (combine.combine_logits' contract)
    note: Callable[[], str] | None = None  # for the report only: a slower path it takes here, and why
    grad_filter: bool = True  # False: it computes the exact gradient only and refuses grad_filter_eps


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here and, when it cannot, why; ``note``: where it runs a slower path
    here, which and why (:func:`backends` only)."""

    name: str
    available: bool
    reason: str = ""
    note: str = ""


# name -> (module, attribute holding its Backend record)
_RECORDS = {
    "reference": (".reference", "BACKEND"),
    "chunked": (".chunked", "BACKEND"),
    "chunked-triton": (".triton", "CHUNKED_BACKEND"),
    "cuda": (".cuda_backend", "BACKEND"),
}
BACKEND_NAMES = ("auto", *_RECORDS)
# What "auto" tries, fastest first, per device type: the order the GPU check measured
# (docs/architecture.md, "Choosing a backend", has the rule; README and bench/results/ the figures).
_AUTO_ORDER = {"cuda": ("chunked-triton", "cuda", "chunked")}
_AUTO_DEFAULT = ("chunked",)


def check_name(name: str) -> str:
    return check_choice("backend", name, BACKEND_NAMES)


def check_options(name: str, grad_filter_eps: float | str = 0.0) -> str:
    """``name`` checked, and refused with options it does not implement: gradient filtering on a
    backend that computes the exact gradient only. A model's or a trainer's options are refused as they
    are set, not at the first step's loss, after the base and the data have loaded. ``auto``, which
    picks a backend per device, and a backend whose module cannot be imported here are left to
    :func:`resolve`."""
    name = check_name(name)
    if name == "auto" or not grad_filter_eps:
        return name
    try:
        record = get(name)
    except ImportError:
        return name
    if not record.grad_filter:
        require_exact_gradient(grad_filter_eps, name)
    return name


def get(name: str) -> Backend:
    """The record of a named backend (not ``auto``); ImportError if its module cannot be imported."""
    module, attribute = _RECORDS[check_choice("backend", name, tuple(_RECORDS))]
    return getattr(importlib.import_module(module, __package__), attribute)


def status(name: str) -> BackendStatus:
    try:
        available, reason = get(name).availability()
    except ImportError as exc:  # an optional dependency of that backend is missing
        return BackendStatus(name, False, f"cannot import it: {exc}")
    return BackendStatus(name, available, reason)


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine and, for a missing one, the reason; for one that
    runs a slower path here, a note (the chunked backend without its compiled CPU step)."""
    report = {}
    for name in _RECORDS:
        found = status(name)
        note = get(name).note if found.available else None
        report[name] = replace(found, note=note()) if note is not None else found
    return report


def _takes_float64(name: str) -> bool:
    try:
        return get(name).float64
    except ImportError:  # a backend whose module cannot be imported here takes nothing
        return False


def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend that runs ``name`` on ``device`` for inputs of ``dtype``; raises if it cannot run."""
    check_name(name)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, _AUTO_DEFAULT):
            if status(candidate).available and (dtype != torch.float64 or get(candidate).float64):
                return get(candidate)
        return get("chunked")
    st = status(name)
    if not st.available:
        raise RuntimeError(f"backend {name!r} is not available: {st.reason}")
    if dtype == torch.float64 and not get(name).float64:
        takers = ", ".join(repr(n) for n in BACKEND_NAMES if n != "auto" and _takes_float64(n))
        raise TypeError(f"backend {name!r} takes float16, bfloat16 and float32 inputs, got float64 (float64 runs on "
                        f"{takers} or 'auto')")
    return get(name)
