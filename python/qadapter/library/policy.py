"""The customized policy as a transformers causal LM, so that transformers' own ``generate`` decodes it.

``log pi~ = log_softmax((Q + alpha_0 * log pi1) / alpha~)`` needs, at every step, the frozen model's
logits and the adapter model's. :class:`CombinedPolicy` is a ``PreTrainedModel`` whose forward takes
a batch of ``B`` rows, runs it twice in one forward of the shared network (rows ``[0, B)`` frozen, rows
``[B, 2B)`` with the adapter, :func:`adapter_rows`), and returns the combined log-probs as its logits.
Everything else is transformers': the sampler and its logits processors, stopping criteria and stop
strings, streamers, ``num_return_sequences``, and the KV caches, which size themselves from the
first key states they see and so hold both halves (dynamic and static alike).

Why this route: transformers' generation machinery only ever sees one model with ``B`` rows whose
logits are the policy's, so every option that acts on logits or tokens works unchanged; the row
doubling stays inside the forward, and the adapter's row selection is a per-row LoRA scaling tensor
(no hooks), so ``torch.compile`` captures the whole step. Beam search reorders the cache by prompt
rows; :meth:`CombinedPolicy._reorder_cache` maps each prompt row's move onto all the forward rows it
owns (its frozen row and its adapter rows), so the cache's halves move together.

Compiled decoding (``compiled=True``) is transformers' own: a static cache and a ``torch.compile``d
decode step (CUDA graphs on a GPU, ``mode="reduce-overhead"``). :func:`compiles_by_default` is the
rule ``generate`` follows when not told (``bench/decode.py`` measures both; README has the figures).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import CompileConfig, GenerationConfig, GenerationMixin, PreTrainedModel

from qadapter_kernels import combine_logits
from qadapter_kernels.config import check_integer

from .one_at_a_time import one_call_at_a_time

ADAPTER_NAME = "default"


@contextmanager
def adapter_rows(peft_model: nn.Module, rows: torch.Tensor):
    """Within it, one forward of ``peft_model`` runs the adapter on the rows where ``rows`` is true
    and the frozen model on the others.

    Each LoRA layer's scaling becomes a per-row tensor, ``s`` on adapter rows and ``0`` on frozen
    rows, so PEFT's own forward computes ``W x + 0`` (bit for bit the frozen model's output) and
    ``W x + s * B A x``: no per-row gathering (PEFT's ``adapter_names`` path costs about as much
    again as the model in Python-bound decoding) and no hooks, so a compiled step contains it.
    The tensors are cached on each layer per row pattern, so repeated calls reuse the same objects
    and a compiled step is not re-traced.
    """
    from peft.tuners.lora.layer import LoraLayer

    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype != torch.bool:
        raise ValueError(f"rows must be a 1-D bool tensor (one flag per batch row); got {rows!r}")
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A]
    pattern = tuple(rows.tolist())  # read once, not per layer (a device sync on a GPU)
    saved = []
    try:
        for layer in layers:
            if layer.lora_variant.get(ADAPTER_NAME) is not None:
                raise NotImplementedError("row-selected forwards support plain LoRA only (no DoRA)")
            scaling = layer.scaling[ADAPTER_NAME]
            saved.append((layer, scaling))
            layer.scaling[ADAPTER_NAME] = _row_scaling(layer, rows, pattern, scaling)
        yield
    finally:
        for layer, scaling in saved:
            layer.scaling[ADAPTER_NAME] = scaling


def _row_scaling(layer: nn.Module, rows: torch.Tensor, pattern: tuple, scaling: float) -> torch.Tensor:
    weight = layer.lora_A[ADAPTER_NAME].weight
    key = (pattern, weight.device, weight.dtype, float(scaling))
    cache = layer.__dict__.setdefault("_qadapter_row_scaling", {})
    if key not in cache:
        cache.clear()  # one pattern at a time: a new batch shape replaces the old one
        cache[key] = (rows.to(device=weight.device, dtype=weight.dtype) * scaling).reshape(-1, 1, 1)
    return cache[key]


def second_half(rows: int, device) -> torch.Tensor:
    """Row flags of a doubled batch: frozen rows first, adapter rows second."""
    return torch.arange(rows, device=device) >= rows // 2


def compiles_by_default(device: torch.device) -> bool:
    """Whether ``generate`` compiles its decode step when not told: on CUDA devices (CUDA graphs
    remove the launch-bound step's overhead), not on CPUs: there the compiled step is about a tenth
    faster per token, but compiling costs tens of seconds per batch shape, repaid only after
    thousands of tokens (``bench/decode.py``)."""
    return torch.device(device).type == "cuda"


def decoding_config(config: GenerationConfig, compiled: bool) -> GenerationConfig:
    """A copy of ``config`` that decodes eagerly, or with a static cache (unless it names another
    compilable one) and transformers' compiled step, on any device (transformers compiles on
    accelerators only unless told)."""
    config = copy.deepcopy(config)
    if compiled:
        config.cache_implementation = config.cache_implementation or "static"
        config.compile_config = config.compile_config or CompileConfig()
        config.compile_config._compile_all_devices = True
    else:
        config.disable_compile = True
    return config


def end_token_ids(causal_lm: nn.Module, tokenizer) -> list[int]:
    """The ids that end an answer: every EOS id of the model's generation config (Llama-3's end of
    text and end of turn) and the tokenizer's EOS, where transformers' ``generate`` and vLLM stop. A
    caller passing the tokenizer's alone would run past an end of turn into a made-up next turn."""
    eos = getattr(getattr(causal_lm, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted(set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def check_decoding_options(config: GenerationConfig, vocab: int) -> None:
    """The options transformers takes unchecked or words vaguely, refused by name before any work
    (a top_p of 1.5, a token id as a string or beyond the vocabulary); ``config``'s counts made plain
    ints in place (transformers refuses a numpy ``top_k``)."""
    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    def is_real(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def is_token(value):
        return is_int(value) and 0 <= value < vocab

    for name, note in (("max_new_tokens", ""), ("num_return_sequences", ""), ("num_beams", " (1: no beam search)")):
        if getattr(config, name) is not None:
            setattr(config, name, check_integer(name, getattr(config, name), least=1, note=note))
    if config.do_sample:
        if config.temperature is not None and not (is_real(config.temperature) and config.temperature > 0):
            raise ValueError(f"temperature must be > 0 and finite when sampling; got {config.temperature!r}")
        if config.top_k is not None:
            config.top_k = check_integer("top_k", config.top_k, least=0, note=" (0: no top-k filter)")
        if config.top_p is not None and not (is_real(config.top_p) and 0 < config.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1: no top-p filter); got {config.top_p!r}")
        if config.min_p is not None and not (is_real(config.min_p) and 0 <= config.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] (0: no min-p filter); got {config.min_p!r}")
    if config.repetition_penalty is not None and not (is_real(config.repetition_penalty)
                                                      and config.repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 and finite (1: none); got {config.repetition_penalty!r}")
    eos = config.eos_token_id
    eos_ids = [eos] if not isinstance(eos, (list, tuple, torch.Tensor)) or isinstance(eos, str) else list(eos)
    if eos is not None and not all(is_token(int(i) if isinstance(i, torch.Tensor) else i) for i in eos_ids):
        raise ValueError(f"eos_token_id must be a token id (int) in [0, {vocab}) or a list of them; got {eos!r}")
    if config.pad_token_id is not None and not is_token(config.pad_token_id):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}) (finished rows are fed it); "
                         f"got {config.pad_token_id!r}")


def _repeated(value, copies: int = 2):
    """A per-row input repeated for each copy of the batch (2-D masks, 4-D masks, mask dicts); None stays."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value] * copies)
    if isinstance(value, dict):
        return {k: _repeated(v, copies) for k, v in value.items()}
    return value


class RowPlan:
    """What the rows of one forward run and how each prompt row's policy is formed from them: the one
    adapter of a :class:`~qadapter.library.model.QAdapterModel` here, many adapters in
    :class:`~qadapter.library.adapter_set.AdapterSet`.

    For a batch of ``batch`` prompt rows: ``expand(value, batch)`` lays a per-row input out on the
    forward's rows; ``selecting(batch, device)`` is the context in which one forward of the network
    runs each of those rows through its network; ``combine(logits, batch)`` turns the forward's
    logits into the policy's log-probs ``[batch, ..., V]``; ``forward_rows(source, batch)`` is the
    forward's rows of prompt rows ``source[i]`` laid out as the forward lays row ``i``'s (beam search
    reorders the cache by it). Here the forward runs ``copies`` copies of
    the batch: the frozen model on the first, the adapter on the second (a stack of adapters,
    :class:`~qadapter.library.stack.StackedRows`, runs one copy per level after the frozen one).
    """

    copies = 2

    def __init__(self, peft_model: nn.Module, alpha_tilde: float, alpha_0: float) -> None:
        self.peft_model, self.alpha_tilde, self.alpha_0 = peft_model, alpha_tilde, alpha_0
        self.kernel: Callable = combine_logits  # the eager combine; a backend's kernel on CUDA (select_combine)

    def expand(self, value, batch: int):
        return _repeated(value, self.copies)

    def selecting(self, batch: int, device: torch.device):
        return adapter_rows(self.peft_model, second_half(self.copies * batch, device))

    def forward_rows(self, source: torch.Tensor, batch: int) -> torch.Tensor:
        return torch.cat([source + copy * batch for copy in range(self.copies)])

    def combine(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        return self.combine_pair(logits[:batch], logits[batch:])

    def combine_pair(self, frozen_logits: torch.Tensor, adapter_logits: torch.Tensor) -> torch.Tensor:
        # Compiled, the eager combine is traced and fused with the step; eager, the backend's kernel runs.
        combine = combine_logits if torch.compiler.is_compiling() else self.kernel
        return combine(frozen_logits, adapter_logits, alpha_tilde=self.alpha_tilde, alpha_0=self.alpha_0)


class CombinedPolicy(PreTrainedModel, GenerationMixin):
    """A customized policy over a frozen network as a causal LM: ``logits`` are its log-probs
    ``[B, T, V]`` (float32), so transformers' ``generate`` samples it. ``rows`` (a :class:`RowPlan`)
    says which LoRA the doubled rows run and how their logits combine.

    It shares the network (no copy); its config and generation config are copies of the base
    model's, so decoding options never leak into the base.
    """

    # The wrapped model does the attention: accept the implementation its config names.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, causal_lm: nn.Module, rows: RowPlan) -> None:
        super().__init__(copy.deepcopy(causal_lm.config))
        self.causal_lm = causal_lm
        self.generation_config = copy.deepcopy(getattr(causal_lm, "generation_config", None)
                                               or GenerationConfig.from_model_config(causal_lm.config))
        self.__dict__["rows"] = rows  # not a submodule: it holds the network's own LoRA layers
        self._active_batch: int | None = None

    @contextmanager
    def selecting_rows(self, batch: int):
        """The row plan's networks on the forward's rows of a batch of ``batch`` prompts, for every
        forward inside."""
        with self.rows.selecting(batch, self.device):
            previous, self._active_batch = self._active_batch, batch
            try:
                yield
            finally:
                self._active_batch = previous

    @one_call_at_a_time(lambda policy: policy.causal_lm)
    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **model_kwargs):
        """Combined log-probs of the positions kept (all by default) for ``input_ids [B, T]``, as
        ``logits``; the cache (``cache`` or ``past_key_values``) holds the forward's rows (``2B`` for one
        adapter)."""
        if model_kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported: the policy doubles input_ids into frozen and adapter rows")
        batch, rows = input_ids.shape[0], self.rows
        inputs = dict(input_ids=rows.expand(input_ids, batch), attention_mask=rows.expand(attention_mask, batch),
                      position_ids=rows.expand(position_ids, batch), logits_to_keep=logits_to_keep, **model_kwargs)
        with nullcontext() if self._active_batch == batch else self.selecting_rows(batch):
            out = self.causal_lm(**inputs)
        out.logits = rows.combine(out.logits, batch)
        return out

    def _reorder_cache(self, cache, beam_idx: torch.Tensor):
        """Beam search's reorder of prompt rows (row ``i`` takes row ``beam_idx[i]``'s cache) applied to
        every forward row: a prompt row's frozen and adapter rows move together."""
        cache.reorder_cache(self.rows.forward_rows(beam_idx, beam_idx.shape[0]))
        return cache

    @torch.no_grad()
    @one_call_at_a_time(lambda policy: policy.causal_lm)
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, *,
                 compiled: bool | None = None, **kwargs):
        """transformers' ``generate`` on the customized policy; ``compiled`` decodes with a static
        cache and a compiled step (default: as ``generation_config`` says through ``disable_compile``
        or ``compile_config``, else :func:`compiles_by_default`)."""
        input_ids = kwargs.pop("input_ids", inputs)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an integer tensor [B, T]; got {getattr(input_ids, 'shape', type(input_ids))}")
        config = copy.deepcopy(generation_config or self.generation_config)
        kwargs = config.update(**kwargs)  # what is left are model inputs (attention_mask, ...)
        check_decoding_options(config, self.config.get_text_config().vocab_size)
        if compiled is not None or not (config.disable_compile or config.compile_config is not None):
            # Not told, and the config does not say either: the default rule.
            config = decoding_config(config, compiles_by_default(self.device) if compiled is None else compiled)
        batch = input_ids.shape[0] * max(config.num_beams or 1, config.num_return_sequences or 1)
        with self.selecting_rows(batch):
            return super().generate(input_ids, generation_config=config, **kwargs)
