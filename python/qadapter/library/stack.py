"""Stacked adapters (continual customization): a Q-Adapter trained on top of saved ones.

A saved customized policy ``pi~1`` takes the frozen policy's place: the next level learns
``pi~2 ∝ exp((Q2 + alpha_0' log pi~1) / alpha~')``. With a linear head ``W`` the per-row constant of
``log pi~1`` cancels inside the softmax, so every level of a stack is a softmax of ``h_eff W`` with

    h_eff_0 = h_0 (the frozen model's final hidden state),
    h_eff_k = (h_k + alpha_0_k * h_eff_{k-1}) / alpha~_k        (h_k: level k's Q network's),

and level ``L`` trains with the fused loss unchanged: ``base_hidden = h_eff_{L-1}`` (no gradient),
``q_hidden = h_L`` (docs/design.md, "Stacked adapters"). No ``[N, V]`` tensor and no new kernel.

The levels below the one being trained are saved adapters loaded as extra, frozen PEFT adapters on
the same base (``level1``, ``level2``, ...; the trained one is ``"default"``). Each level's Q network
is the base with a set of LoRAs (:func:`q_networks`): with ``q_on="parent"`` (the default) the
parent's Q network plus the new LoRA, so a fresh level starts as its parent's policy; with
``q_on="base"`` the base with the new LoRA alone.

A child records its levels (path, a sha256 of the files, alpha options, ``q_on``); loading refuses a
level whose files changed or that was trained on another base. Each level is recorded by its
absolute path and by its path relative to the child's directory, tried first (:meth:`Level.location`):
a stack moved or copied as a whole (``level1/`` and ``level2/`` side by side) finds its own levels,
not the originals; the sha256 makes either lookup safe.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from qadapter_kernels import LossConfig

from . import atomic
from .hidden import only_adapters
from .policy import ADAPTER_NAME, RowPlan

Q_ON = ("parent", "base")


# The keys of a stack level's record, all required; "relative_path" is optional (records saved before
# it have only the absolute path; readers that predate it ignore it, so the format version stays).
LEVEL_KEYS = ("path", "sha256", "alpha_0", "alpha_tilde", "q_on")


@dataclass(frozen=True)
class Level:
    """One saved adapter under the one being trained, as the child's config records it (:meth:`record`)."""

    path: str  # the adapter directory, absolute: where it was when the child was built, or where it was found
    sha256: str  # of its weights and config files (:func:`adapter_digest`)
    alpha_0: float
    alpha_tilde: float
    q_on: str | None  # how its Q network was built (None: the first level, on the base)
    # The record's "relative_path" resolved against the directory of the adapter that recorded it: where
    # the level is when the stack moved as a whole, tried before ``path``. None: not recorded.
    nearby: str | None = field(default=None, compare=False)

    def as_dict(self) -> dict:
        return {key: getattr(self, key) for key in LEVEL_KEYS}

    def record(self, directory: str | os.PathLike | None) -> dict:
        """The level as the config of an adapter written into ``directory`` records it: with
        ``relative_path``, its path relative to that adapter's directory (None where there is none:
        no directory, another drive on Windows). A hidden staging directory of
        :func:`atomic.save_files` lies inside the adapter's directory: the path is relative to that one."""
        relative = None
        if directory is not None:
            home = Path(directory).resolve()
            if home.name.startswith(atomic.STAGING_PREFIX):
                home = home.parent
            try:
                relative = os.path.relpath(self.path, home)
            except ValueError:
                pass
        return {**self.as_dict(), "relative_path": relative}

    @classmethod
    def from_dict(cls, record: dict, where: str, directory: str | os.PathLike | None = None) -> Level:
        """The level of ``record``, read from the config of the adapter in ``directory`` (None: only checked)."""
        try:
            level = cls(**{k: record[k] for k in LEVEL_KEYS})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: a stack level must be an object with path, sha256, alpha_0, alpha_tilde, "
                             f"q_on; got {record!r}") from exc
        relative = record.get("relative_path")
        if relative is not None and not isinstance(relative, str):
            raise ValueError(f"{where}: a stack level's relative_path must be a string or null; got {relative!r}")
        check_q_on(level.q_on, f"{where}: a stack level's q_on", allow_none=True)
        try:
            LossConfig.from_options(alpha_0=level.alpha_0, alpha_tilde=level.alpha_tilde)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: a stack level's {exc}") from exc
        if relative is None or directory is None:
            return level
        return replace(level, nearby=str((Path(directory).resolve() / relative).resolve()))

    def found_at(self, path: str | os.PathLike) -> Level:
        """The level as it was found at ``path``: where a save of the adapter on it records it."""
        return replace(self, path=str(Path(path).resolve()), nearby=None)

    def location(self) -> Path:
        """Where the level is: at its path relative to the adapter that recorded it if anything is
        there (the stack moved or copied as a whole), else at its recorded absolute path. Either one
        is then checked against the sha256. FileNotFoundError naming both when neither exists."""
        for place in (self.nearby, self.path):
            if place is not None and Path(place).is_dir():
                return Path(place)
        if self.nearby is None:
            raise FileNotFoundError(f"no adapter at {self.path}, its recorded path (an older record, without the "
                                    "relative one): the level must sit there")
        raise FileNotFoundError(f"no adapter at {self.nearby} (its place relative to the adapter trained on it) "
                                f"nor at {self.path} (its recorded path): a stack's levels must be moved or copied "
                                "along with it, keeping their places relative to each other, or sit at their "
                                "recorded paths")


def check_q_on(q_on, name: str = "q_on", *, allow_none: bool = False) -> str | None:
    if q_on is None and allow_none:
        return None
    if q_on not in Q_ON:
        raise ValueError(f"{name} must be one of {Q_ON}; got {q_on!r}")
    return q_on


def level_name(k: int) -> str:
    """The PEFT adapter name of stack level ``k`` (1-based) below the trained one."""
    return f"level{k}"


def adapter_digest(path: str | os.PathLike, files: Sequence[str]) -> str:
    """sha256 of the named files of an adapter directory, in order (names and contents)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        with open(Path(path) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def q_networks(q_ons: Sequence[str | None]) -> list[tuple[str, ...]]:
    """Per level (its ``q_on``, the trained level last), the adapters its Q network runs: the first
    level its own LoRA, a ``"parent"`` level its parent's set plus its own, a ``"base"`` level its own."""
    names = [level_name(k) for k in range(1, len(q_ons))] + [ADAPTER_NAME]
    sets: list[tuple[str, ...]] = []
    for k, (name, q_on) in enumerate(zip(names, q_ons)):
        sets.append((*sets[-1], name) if k > 0 and q_on == "parent" else (name,))
    return sets


def effective_hidden(hidden: Sequence[torch.Tensor], alphas: Sequence[tuple[float, float]]) -> torch.Tensor:
    """``h_eff`` of the levels ``hidden = [h_0, h_1, ..., h_k]`` with their ``(alpha_0, alpha~)``:
    the hidden state whose logits are level ``k``'s combined policy (up to a per-row constant).
    Computed in float32 (float64 for float64), returned in ``h_0``'s dtype."""
    if len(hidden) != len(alphas) + 1:
        raise ValueError(f"effective_hidden needs one (alpha_0, alpha_tilde) per level above the frozen one; "
                         f"got {len(hidden)} hidden states and {len(alphas)} pairs")
    dtype = torch.float64 if hidden[0].dtype == torch.float64 else torch.float32
    h = hidden[0].to(dtype)
    for h_k, (alpha_0, alpha_tilde) in zip(hidden[1:], alphas):
        h = (h_k.to(dtype) + alpha_0 * h) / alpha_tilde
    return h.to(hidden[0].dtype)


def effective_logits(logits: Sequence[torch.Tensor], alphas: Sequence[tuple[float, float]]) -> torch.Tensor:
    """:func:`effective_hidden` of logits (``h W`` is linear in ``h``), in float32."""
    return effective_hidden([z.float() for z in logits], alphas)


def freeze_level(peft_model: nn.Module, name: str) -> None:
    """A loaded level is part of the frozen policy: no dropout, and its LoRA weights become buffers,
    so nothing can train them (PEFT marks every active adapter trainable whenever adapters are
    re-enabled, after each ``disable_adapter()`` too, and a stack's Q network runs its levels)."""
    from peft.tuners.lora.layer import LoraLayer

    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer) and name in layer.lora_A:
            layer.lora_dropout[name] = nn.Identity()
            for module in (layer.lora_A[name], layer.lora_B[name]):
                for key, param in list(module.named_parameters(recurse=False)):
                    delattr(module, key)
                    module.register_buffer(key, param.detach())
    left = [n for n, _ in peft_model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
    if left:
        raise ValueError(f"stack levels must be LoRAs of linear layers; {name} also holds {left[:3]}")


@contextmanager
def level_rows(peft_model: nn.Module, networks: Sequence[Sequence[str]], batch: int):
    """Within it, one forward of ``peft_model`` over ``len(networks) * batch`` rows runs block ``j``
    (rows ``[j * batch, (j + 1) * batch)``) through the frozen model with the adapters ``networks[j]``.

    Every adapter is active, its LoRA scaling a per-row tensor (``s`` on the blocks that run it, 0
    elsewhere), as :func:`qadapter.library.policy.adapter_rows` does for one adapter: PEFT's own
    forward then computes each block's network exactly, in one pass.
    """
    from peft.tuners.lora.layer import LoraLayer

    names = sorted({name for network in networks for name in network})
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    saved = []
    try:
        for layer in layers:
            for name in names:
                if name not in layer.lora_A:
                    continue
                if layer.lora_variant.get(name) is not None:
                    raise NotImplementedError("row-selected forwards support plain LoRA only (no DoRA)")
                weight = layer.lora_A[name].weight
                flags = torch.tensor([name in network for network in networks], dtype=weight.dtype,
                                     device=weight.device).repeat_interleave(batch)
                saved.append((layer, name, layer.scaling[name]))
                layer.scaling[name] = (flags * layer.scaling[name]).reshape(-1, 1, 1)
        with only_adapters(peft_model, names):
            yield
    finally:
        for layer, name, scaling in saved:
            layer.scaling[name] = scaling


class StackedRows(RowPlan):
    """The row plan of a stack's generation (:class:`~qadapter.library.policy.CombinedPolicy`): the batch
    repeated once per network, the frozen model and then each level's Q network (:func:`level_rows`),
    and the log-probs ``log_softmax(h_eff_L W)`` formed from the copies' logits by the same recursion
    (:func:`effective_logits` up to the parent, then the trained level's combine)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.peft_model, model.loss.alpha_tilde, model.loss.alpha_0)
        self.networks = [(), *model.q_networks]
        self.copies = len(self.networks)
        self.parent_alphas = model.level_alphas[:-1]

    def selecting(self, rows: int, device: torch.device):
        return level_rows(self.peft_model, self.networks, rows // self.copies)

    def combine(self, frozen_logits: torch.Tensor, adapter_logits: torch.Tensor) -> torch.Tensor:
        blocks = [frozen_logits, *adapter_logits.split(frozen_logits.shape[0])]
        return super().combine(effective_logits(blocks[:-1], self.parent_alphas), blocks[-1].float())
