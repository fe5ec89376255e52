"""What the fused loss takes from a PEFT causal LM: the final hidden states of the frozen model and of
the adapter model, and the lm_head weight, without the ``[B, T, V]`` logits.

Both passes go through the model's own forward (so a DDP, FSDP or DeepSpeed wrapper sees them) with
``logits_to_keep=1``: the head projects one position per row, and a hook on the decoder takes its
final hidden states. The frozen pass runs with every adapter disabled and without autograd, so no
gradient ever reaches the pre-trained model.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from torch import nn

from .one_at_a_time import held
from .packing import PackedBatch, model_packing, packing_error


class LevelPasses(NamedTuple):
    """What :func:`level_hidden` returns."""

    hidden: list[torch.Tensor]  # [B, T, d] per pass: the frozen one, each level's, the adapter's
    weight: torch.Tensor  # [V, d] the frozen lm_head, whole
    tokens: int  # the tokens each pass ran: the packed batch's (padding_free), else the batch's B * T


class HiddenStates(NamedTuple):
    """The first three arguments of :func:`qadapter_kernels.qadapter_loss`, in its order."""

    base_hidden: torch.Tensor  # [B, T, d] the frozen model's (adapter disabled), no gradient
    q_hidden: torch.Tensor  # [B, T, d] the adapter model's
    weight: torch.Tensor  # [V, d] the frozen lm_head (gathered whole under FSDP2 and ZeRO-3)


def head_softcap(model: nn.Module) -> float | None:
    """The model's final logit soft-capping (Gemma-2's ``final_logit_softcapping``: logits become
    ``s * tanh(logits / s)``), or None."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return None if cap in (None, 0) else float(cap)


def linear_head(model: nn.Module, logit_softcap: float | None = None) -> nn.Linear:
    """The model's lm_head, checked to be what the fused loss models: a bias-free linear layer with a
    dense floating-point weight (not quantized: the loss multiplies hidden states by it) whose
    logits are not scaled afterwards, and soft-capped exactly when ``logit_softcap`` says so (the
    caller passes the model's cap on to the loss: a loss without it would be silently wrong)."""
    head = model.get_output_embeddings()
    name = type(model).__name__
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"{name}: a Q-Adapter needs a bias-free linear lm_head; got {head!r}")
    if not head.weight.is_floating_point():
        raise ValueError(f"{name}: the fused loss needs the lm_head's dense weight; got a {head.weight.dtype} one "
                         "(a quantized head: keep it out of quantization, llm_int8_skip_modules=['lm_head'])")
    if getattr(model.config, "logit_scale", None) not in (None, 1.0):
        raise ValueError(f"{name} scales its logits (logit_scale), which the fused loss does not model")
    cap = head_softcap(model)
    if cap != (None if logit_softcap is None else float(logit_softcap)):
        if cap is None:
            raise ValueError(f"{name} does not soft-cap its logits; got logit_softcap={logit_softcap}")
        raise ValueError(f"{name} soft-caps its logits (final_logit_softcapping={cap:g}): pass logit_softcap={cap:g} "
                         "here and to the loss (qadapter_loss(..., logit_softcap=...))")
    return head


def output_head(model: nn.Module) -> tuple[torch.Tensor, float | None]:
    """The lm_head weight of a causal LM, whole, and its logit soft cap: what its logits are formed from."""
    cap = head_softcap(model)
    return full_weight(linear_head(model, cap).weight), cap


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 padding_free: bool = False, **model_kwargs) -> torch.Tensor:
    """Final hidden states ``[B, T, d]`` of a causal LM as it stands (adapters on or off as the caller
    set them): its decoder's output, what the head projects; no logits are formed. ``padding_free``
    as :func:`level_hidden` takes it; off by default, as a caller may have set per-row state for the
    batch's rows (:func:`qadapter.library.policy.adapter_rows`), which packing would not keep."""
    inputs, model_kwargs, packed = packed_inputs(model, model, input_ids, attention_mask, padding_free, model_kwargs)
    hidden = model.get_decoder()(**inputs, use_cache=False, **model_kwargs).last_hidden_state
    return hidden if packed is None else packed.unpack(hidden)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` whole, read outside its module's forward as the fused loss reads the frozen lm_head.

    FSDP2 (``fully_shard``) keeps parameters as sharded DTensors there; DeepSpeed ZeRO-3 keeps an
    empty placeholder (the module's forward gathers it and lets it go again). The head is frozen, so
    the gather runs without autograd: one all-gather per step, as the head's own forward would do,
    and no gradient to reduce. Call it once per step and hand the result to the loss, which keeps it
    for its backward: ZeRO-3 lets a gathered parameter go by pointing it at an empty tensor, not by
    freeing the storage, so the tensor returned stays whole with no copy and no second gather."""
    if hasattr(weight, "full_tensor"):
        with torch.no_grad():
            return weight.full_tensor()
    if not hasattr(weight, "ds_id"):  # not a ZeRO-3 parameter: whole already
        return weight
    with torch.no_grad(), whole_parameters([weight]):
        return weight.detach()


def whole_parameters(params, modifier_rank: int | None = None):
    """A context in which the DeepSpeed ZeRO-3 parameters among ``params`` that are partitioned are
    whole; a collective, so every process enters it. With ``modifier_rank``, what that process
    writes into them is kept (broadcast to the others); with None, nothing written may be kept.

    Parameters already whole are left alone: inside a module's forward run by the engine
    (QAdapterModel's), reading one made ZeRO-3 gather it for that module, and ZeRO-3 keeps small
    ones whole throughout; a gather of our own would let them go under their owner on leaving.
    Without ZeRO-3, nothing happens."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        return nullcontext()
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def peft_model_of(model: nn.Module) -> nn.Module:
    """The ``peft.PeftModel`` inside ``model``, which may be it or a wrapper holding it as ``.module``
    (DDP, DataParallel, FSDP, DeepSpeed)."""
    from peft import PeftModel

    inner = model
    while not isinstance(inner, PeftModel) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not isinstance(inner, PeftModel):
        raise TypeError(f"model must be a peft.PeftModel (its adapter is the Q-function) or a wrapper of one; "
                        f"got {type(model).__name__}")
    return inner


def activate_adapters(peft_model: nn.Module, names: Sequence[str]) -> list:
    """Makes every LoRA layer of ``peft_model`` run exactly the adapters ``names``, their trainability
    untouched (PEFT's ``set_adapter`` makes the adapters it activates trainable); returns each
    layer's previous set, for :func:`only_adapters` to put back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for layer in peft_model.modules():
        if isinstance(layer, BaseTunerLayer):
            saved.append((layer, layer._active_adapter))
            layer._active_adapter = list(names)
    return saved


@contextmanager
def only_adapters(peft_model: nn.Module, names: Sequence[str]):
    """Within it, every LoRA layer of ``peft_model`` runs exactly the adapters ``names``
    (:func:`activate_adapters`): how a stack runs one level's network (:mod:`qadapter.library.stack`)."""
    saved = []
    try:
        saved = activate_adapters(peft_model, names)
        yield
    finally:
        for layer, active in saved:
            layer._active_adapter = active


def level_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 levels: Sequence[Sequence[str]] = (), logit_softcap: float | None = None,
                 padding_free: bool = True, **model_kwargs) -> LevelPasses:
    """Final hidden states of the frozen pass (adapters disabled, no grad), of one pass per entry of
    ``levels`` (the adapters named there, no grad: the frozen levels of a stack) and of the adapter
    pass (the model's active adapters, with grad: set, not switched for the pass, so that gradient
    checkpointing recomputes the same network), the lm_head weight, and the tokens each pass ran.

    Every pass goes through ``model``'s own forward with ``logits_to_keep=1``, a hook on the decoder
    keeping its output. ``model`` is a ``peft.PeftModel`` or a wrapper of one (what
    ``accelerator.prepare`` or Trainer returns), so the wrapper sees every pass; ``model_kwargs`` go
    to each. A model that soft-caps its logits (Gemma-2) is refused unless ``logit_softcap`` is its
    cap (:func:`head_softcap`), which the loss then needs too. ``padding_free`` (the default): the
    passes run on the batch packed without its padding and with each prefix its rows share once
    (:mod:`qadapter.library.packing`), the states returned in the batch's layout all the same; a
    caller's own ``position_ids`` or 4D mask is a layout of its own, run as it is.
    """
    peft_model = peft_model_of(model)
    base_model = peft_model.get_base_model()
    head = linear_head(base_model, logit_softcap)
    inputs, model_kwargs, packed = packed_inputs(model, base_model, input_ids, attention_mask, padding_free,
                                                 model_kwargs)
    kwargs = dict(inputs, use_cache=False, logits_to_keep=1, **model_kwargs)
    # Adapters switched and a hook on the shared decoder: one call at a time (one_at_a_time.py).
    with held(base_model), decoder_outputs(base_model) as captured:
        with torch.no_grad():
            with peft_model.disable_adapter():
                model(**kwargs)
            for names in levels:
                with only_adapters(peft_model, names):
                    model(**kwargs)
        model(**kwargs)
    tokens = input_ids.numel()
    if packed is not None:
        captured, tokens = [packed.unpack(hidden) for hidden in captured], packed.tokens
    return LevelPasses(captured, full_weight(head.weight), tokens)  # the weight gathered after the forwards, once


_PACKING_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # causal LM -> its attention, checked
PACKING_TOLERANCE = 0.05  # rounding in bf16 stays well below; seeing another sequence's tokens does not


def packed_inputs(model: nn.Module, causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  padding_free: bool, model_kwargs: dict) -> tuple[dict, dict, PackedBatch | None]:
    """The inputs and keyword arguments of ``model``'s forwards over a batch (``causal_lm``: the
    transformers model inside it), and the packing they run in: None where ``padding_free`` is off,
    where the caller's ``position_ids`` or 4D mask is a layout of its own, or where packing saves nothing."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    own_layout = model_kwargs.get("position_ids") is not None or attention_mask is None or attention_mask.dim() != 2
    if not padding_free or own_layout:
        return inputs, model_kwargs, None
    pack = checked_packing(model, causal_lm)
    # Host-side bookkeeping: under torch.compile run as it is, behind one graph break.
    packed = (torch.compiler.disable(pack) if torch.compiler.is_compiling() else pack)(input_ids, attention_mask)
    if packed is None:
        return inputs, model_kwargs, None
    return packed.inputs, {k: v for k, v in model_kwargs.items() if k != "position_ids"}, packed


def checked_packing(model: nn.Module, causal_lm: nn.Module):
    """:func:`~qadapter.library.packing.model_packing` of ``causal_lm``, once it has been seen to keep
    packed sequences apart (:func:`~qadapter.library.packing.packing_error`, through ``model``'s own
    forward, in eval mode, for each attention implementation the model is set to)."""
    pack = model_packing(causal_lm)
    attention = getattr(causal_lm.config, "_attn_implementation", None)
    if causal_lm in _PACKING_CHECKED and _PACKING_CHECKED[causal_lm] == attention:
        return pack

    def hidden_of(inputs: dict) -> torch.Tensor:
        with decoder_outputs(causal_lm) as captured:
            model(**inputs, use_cache=False, logits_to_keep=1)
        return captured[0]

    with evaluation_mode(model), torch.no_grad():  # no dropout: the two layouts must see one network
        error = packing_error(hidden_of, pack, causal_lm.get_output_embeddings().weight.device)
    if not error <= PACKING_TOLERANCE:
        raise ValueError(f"padding_free: {type(causal_lm).__name__} with attention {attention!r} gives a packed "
                         f"token a hidden state {error:.2g} away from its padded one (its attention does not keep "
                         "packed sequences apart): pass padding_free=False (qadapter train --padding_free false)")
    _PACKING_CHECKED[causal_lm] = attention
    return pack


@contextmanager
def evaluation_mode(module: nn.Module):
    """``module`` in eval mode (no dropout) inside; after, each of its modules back in the mode it
    was in (a wrapper's own mode need not be its modules': one left in eval stays so)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def decoder_outputs(causal_lm: nn.Module):
    """Within it, the final hidden states of each forward of ``causal_lm``'s decoder (what its head
    projects) are appended to the list it yields: a forward with ``logits_to_keep=1`` then gives them
    for every position while its head forms one position's logits."""
    captured: list[torch.Tensor] = []

    def keep_hidden(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = causal_lm.get_decoder().register_forward_hook(keep_hidden)
    try:
        yield captured
    finally:
        handle.remove()


def frozen_and_adapter_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                              *, logit_softcap: float | None = None, padding_free: bool = True,
                              **model_kwargs) -> HiddenStates:
    """Final hidden states of the frozen pass (adapters disabled, no grad) and of the adapter pass of a
    PEFT causal LM, and its lm_head weight: ``qadapter_loss(*frozen_and_adapter_hidden(model, ids, mask), labels)``
    (:func:`level_hidden` without stacked levels)."""
    (base_hidden, q_hidden), weight, _ = level_hidden(model, input_ids, attention_mask, logit_softcap=logit_softcap,
                                                      padding_free=padding_free, **model_kwargs)
    return HiddenStates(base_hidden, q_hidden, weight)
