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

A child records its levels (:class:`~qadapter.library.saved.Level`: path, a sha256 of the files,
alpha options, ``q_on``); loading refuses a level whose files changed or that was trained on another base.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .hidden import only_adapters
from .policy import ADAPTER_NAME, RowPlan


def level_name(k: int) -> str:
    """The PEFT adapter name of stack level ``k`` (1-based) below the trained one."""
    return f"level{k}"


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

    def selecting(self, batch: int, device: torch.device):
        return level_rows(self.peft_model, self.networks, batch)

    def combine(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        blocks = logits.split(batch)
        return self.combine_pair(effective_logits(blocks[:-1], self.parent_alphas), blocks[-1].float())
