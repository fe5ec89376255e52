"""Many customized policies over one frozen base: each row of a batch decodes its own adapter's policy.

A Q-Adapter never changes the base; what differs between two customizations is their LoRA weights
and their ``alpha~``, ``alpha_0``. :class:`AdapterSet` loads saved adapters by name onto one base
(each checked as :meth:`QAdapterModel.from_pretrained` checks it) and decodes a batch whose rows name
different adapters, or none (the base), in one forward of the network per token.

How a mixed batch runs its LoRA (the *bank*): every LoRA layer holds, under one extra PEFT adapter
name, the down-projections of all loaded adapters stacked ``[W, d_in]`` and their up-projections side
by side ``[d_out, W]`` (each adapter a block of columns, its scaling folded in, zero where it has no
LoRA on that layer). PEFT's own forward then computes ``B_all ((A_all x) * mask)``: two GEMMs whatever
the number of adapters, with a ``[rows, 1, W]`` mask that keeps, on each row, its own adapter's block
(all zero on frozen rows and base rows, which so get ``W x`` exactly). PEFT's mixed-batch path
(``adapter_names=``) instead loops over the adapters in the batch, gathering and scattering each
one's rows: a Python loop per layer per adapter. The bank costs ``W / r`` times one adapter's LoRA
FLOPs, small beside the frozen layers for the adapter counts a batch mixes (``bench/adapter_set.py``
measures both against one adapter).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qadapter_kernels import TokenMeasures, combine_logits, vocabulary_pass

from . import atomic
from . import quantization as quant
from .hidden import output_head
from .model import (
    base_fingerprint,
    check_adapter_weights,
    check_base,
    check_prompt,
    check_quantization,
    evaluation_mode,
    load_saved_base,
    select_combine,
    warnings_held_while_checked,
)
from .policy import CombinedPolicy
from .saved import AdapterLoadError, locate_adapter, read_adapter_config, run_options

BANK = "qadapter_bank"  # the PEFT adapter name under which every LoRA layer holds the bank


class _RowMask:
    """The ``[rows, 1, W]`` mask all bank layers read in a forward: which block of columns each row keeps."""

    value: torch.Tensor | None = None


class _BankUp(nn.Module):
    """The bank's up-projection, ``(h * mask) @ B_all^T``: each row keeps only its own adapter's block."""

    def __init__(self, weight: torch.Tensor, mask: _RowMask) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.mask = mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h * self.mask.value, self.weight)


class _Adapter:
    """One loaded adapter: its name, directory and policy temperatures."""

    def __init__(self, name: str, path: Path, config: dict) -> None:
        self.name, self.path = name, path
        loss = run_options(**config["loss"])[0]
        self.alpha_tilde, self.alpha_0 = loss.alpha_tilde, loss.alpha_0


class BankRows:
    """The row plan of an :class:`AdapterSet` (:class:`~qadapter.library.policy.RowPlan`'s contract):
    prompt row ``i`` decodes ``assignment[i]``, an index into the set's adapters or ``None`` (the base)."""

    def __init__(self, adapter_set: AdapterSet) -> None:
        self.adapter_set = adapter_set
        self.assignment: tuple[int | None, ...] = ()
        self.kernel = combine_logits
        self._cache: dict = {}

    def _expanded(self, rows: int) -> tuple[int | None, ...]:
        """The assignment of the ``rows`` prompt rows a generation runs (``num_return_sequences``
        repeats each prompt row in place)."""
        if not self.assignment or rows % len(self.assignment):
            raise ValueError(f"a batch of {rows} rows does not fit the {len(self.assignment)} adapters named per row")
        repeats = rows // len(self.assignment)
        return tuple(a for a in self.assignment for _ in range(repeats))

    def _plan(self, rows: int, device: torch.device) -> dict:
        """Mask and combine groups for a doubled batch of ``rows``, cached per pattern (a compiled step
        sees the same tensors again and is not re-traced)."""
        assignment = self._expanded(rows // 2)
        key = (assignment, torch.device(device))
        if key not in self._cache:
            self._cache.clear()
            bank = self.adapter_set
            mask = torch.zeros(rows, 1, bank.width, device=device, dtype=bank.dtype)
            groups: dict = {}
            for i, index in enumerate(assignment):
                if index is None:
                    groups.setdefault(None, []).append(i)
                    continue
                start, stop = bank.blocks[index]
                mask[rows // 2 + i, 0, start:stop] = 1
                adapter = bank.adapters[index]
                groups.setdefault((adapter.alpha_tilde, adapter.alpha_0), []).append(i)
            every = len(groups) == 1
            self._cache[key] = {"mask": mask, "groups": [
                (alphas, None if every else torch.tensor(index, device=device)) for alphas, index in groups.items()]}
        return self._cache[key]

    @contextmanager
    def selecting(self, rows: int, device: torch.device):
        mask = self.adapter_set.row_mask
        previous, mask.value = mask.value, self._plan(rows, device)["mask"]
        try:
            yield
        finally:
            mask.value = previous

    def combine(self, frozen_logits: torch.Tensor, adapter_logits: torch.Tensor) -> torch.Tensor:
        """Each row's policy: its adapter's combined log-probs with its own ``alpha~``, ``alpha_0``;
        a base row's are the frozen model's own log-probs."""
        kernel = combine_logits if torch.compiler.is_compiling() else self.kernel
        groups = self._plan(2 * frozen_logits.shape[0], frozen_logits.device)["groups"]
        out = None
        for alphas, index in groups:
            frozen = frozen_logits if index is None else frozen_logits.index_select(0, index)
            if alphas is None:
                part = torch.log_softmax(frozen.float(), dim=-1)
            else:
                adapter = adapter_logits if index is None else adapter_logits.index_select(0, index)
                part = kernel(frozen, adapter, alpha_tilde=alphas[0], alpha_0=alphas[1])
            if index is None:
                return part
            if out is None:
                out = part.new_empty(frozen_logits.shape)
            out.index_copy_(0, index, part)
        return out


class AdapterSet:
    """Saved Q-Adapters loaded by name onto one frozen base and kept on its device; :meth:`generate`
    decodes each row of a batch with the adapter it names (or the base) in one forward per token.

    ``AdapterSet.from_pretrained({"a": dir_a, "b": dir_b})`` loads the base the first adapter names
    (quantized as it was in training); every adapter must have been trained on that base.
    """

    def __init__(self, base_model: nn.Module, *, tokenizer: Any = None) -> None:
        self.base_model, self.tokenizer = base_model, tokenizer
        self.fingerprint = base_fingerprint(base_model)
        self.quantization = quant.model_quantization(base_model)
        self.peft_model: nn.Module | None = None
        self.adapters: list[_Adapter] = []
        self.blocks: list[tuple[int, int]] = []  # each adapter's columns in the bank
        self.width = 0
        self.dtype = torch.float32
        self.row_mask = _RowMask()
        self.rows = BankRows(self)
        weight = base_model.get_output_embeddings().weight
        self.rows.kernel = select_combine("auto", weight.device, weight.dtype)
        self._policy = CombinedPolicy(base_model, self.rows)
        # transformers renamed the forward's past_key_values to cache; take whichever this one has.
        self._cache_argument = "cache" if "cache" in inspect.signature(base_model.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, adapters: Mapping[str, str | os.PathLike] | Iterable[tuple[str, str | os.PathLike]],
                        base_model: str | nn.Module | None = None, *, torch_dtype=None, device=None) -> AdapterSet:
        """An adapter set with ``adapters`` (name -> saved adapter: a directory or a hub repository,
        ``owner/name[@revision]``) loaded onto ``base_model``
        (default: the base the first adapter names, loaded as it was in training)."""
        items = list(adapters.items() if isinstance(adapters, Mapping) else adapters)
        if not items:
            raise ValueError("adapters must name at least one saved adapter (name -> directory)")
        items = [(name, locate_adapter(path)) for name, path in items]
        first = items[0][1]
        atomic.recover(first)
        base, tokenizer = load_saved_base(first, read_adapter_config(first), base_model, torch_dtype=torch_dtype,
                                          device=device)
        adapter_set = cls(base, tokenizer=tokenizer)
        for name, path in items:
            adapter_set.load(name, path)
        return adapter_set

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Loads the saved adapter in ``path`` (a directory or a hub repository) under ``name``, checked as ``QAdapterModel.from_pretrained``
        checks it (complete files, this base, its quantization, exactly its tensors)."""
        from peft import PeftModel

        if not isinstance(name, str) or not name or name == BANK:
            raise ValueError(f"name must be a non-empty string other than {BANK!r}; got {name!r}")
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is loaded already (unload it first)")
        path = locate_adapter(path)
        atomic.recover(path)
        config = read_adapter_config(path)
        if config["stack"]:  # its policy needs its levels' networks too, which the bank does not hold
            raise AdapterLoadError(f"adapter {name!r}: {path} is a stacked adapter (on {len(config['stack'])} saved "
                                   "level(s)); an adapter set (and qadapter serve) serves single adapters: "
                                   "load it with QAdapterModel.from_pretrained, or run qadapter generate")
        check_quantization(path, config["quantization"], self.quantization)
        check_base(path, config, self.fingerprint, self.quantization)
        with self._bank_rebuilt(), warnings_held_while_checked():
            try:
                if self.peft_model is None:
                    self.peft_model = PeftModel.from_pretrained(self.base_model, path, adapter_name=name)
                else:
                    self.peft_model.load_adapter(path, adapter_name=name)
            except Exception as exc:  # safetensors and PEFT raise several types for unreadable files
                raise AdapterLoadError(f"the adapter weights in {path} cannot be loaded (corrupted or incomplete?): "
                                       f"{exc}") from exc
            try:
                check_adapter_weights(self.peft_model, path, adapter_name=name)
                self.adapters.append(_Adapter(name, path, config))
            except Exception:
                self.peft_model.delete_adapter(name)
                raise

    def unload(self, name: str) -> None:
        """Removes the adapter ``name`` from the device."""
        if name not in self.names:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.names}")
        with self._bank_rebuilt():
            others = [n for n in self.names if n != name]
            if others:  # PEFT warns when the active adapter is deleted
                self.peft_model.set_adapter(others[0])
            self.peft_model.delete_adapter(name)
            self.adapters = [a for a in self.adapters if a.name != name]

    @contextmanager
    def _bank_rebuilt(self):
        """PEFT's adapter bookkeeping inside (the bank is no adapter of its config: taken out, the
        active adapter a loaded one), the bank rebuilt from the adapters loaded after, even on error."""
        if self.peft_model is not None:
            for layer in self._lora_layers():
                for entries in (layer.lora_A, layer.lora_B, layer.lora_dropout, layer.scaling):
                    if BANK in entries:
                        del entries[BANK]
            if self.names:
                self.peft_model.set_adapter(self.names[0])
        try:
            yield
        finally:
            if self.peft_model is not None:
                self._build_bank()

    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.lora.layer import LoraLayer

        return [m for m in self.peft_model.modules() if isinstance(m, LoraLayer)]

    def _build_bank(self) -> None:
        """(Re)builds every LoRA layer's bank from the loaded adapters and makes it the active adapter."""
        layers, names = self._lora_layers(), self.names
        widths = {name: 0 for name in names}
        for layer in layers:
            for name in names:
                if name in layer.lora_A:
                    if layer.lora_variant.get(name) is not None or layer.lora_B[name].bias is not None:
                        raise AdapterLoadError(f"adapter {name!r}: an adapter set serves plain LoRA only "
                                               "(no DoRA or other variant, no LoRA bias)")
                    widths[name] = max(widths[name], layer.lora_A[name].weight.shape[0])
        self.blocks, start = [], 0
        for name in names:
            self.blocks.append((start, start + widths[name]))
            start += widths[name]
        self.width = start
        if names:
            self.dtype = next(layer.lora_A[names[0]].weight.dtype for layer in layers if names[0] in layer.lora_A)
        for layer in layers:
            device = layer.get_base_layer().weight.device
            down = torch.zeros(self.width, layer.in_features, device=device, dtype=self.dtype)
            up = torch.zeros(layer.out_features, self.width, device=device, dtype=self.dtype)
            for name, (start, _) in zip(names, self.blocks):
                if name in layer.lora_A:
                    a = layer.lora_A[name].weight
                    down[start:start + a.shape[0]] = a
                    up[:, start:start + a.shape[0]] = layer.lora_B[name].weight * layer.scaling[name]
            layer.lora_A[BANK] = nn.Linear(layer.in_features, self.width, bias=False, device="meta")
            layer.lora_A[BANK].weight = nn.Parameter(down, requires_grad=False)
            layer.lora_B[BANK] = _BankUp(up, self.row_mask)
            layer.lora_dropout[BANK] = nn.Identity()
            layer.scaling[BANK] = 1.0
            layer.set_adapter(BANK, inference_mode=True)
        self.peft_model.requires_grad_(False)  # served, not trained
        self.rows._cache.clear()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, *, adapters: Sequence[str | None], compiled: bool | None = None,
                 **kwargs):
        """Decodes row ``i`` of ``input_ids`` with the customized policy of ``adapters[i]`` (a loaded
        adapter's name, or ``None`` for the base model), all rows in one forward per token; takes what
        :meth:`QAdapterModel.generate` takes and returns what transformers' ``generate`` returns."""
        input_ids, attention_mask = check_prompt(input_ids, attention_mask)
        self._assign(adapters, input_ids.shape[0])
        if kwargs.get("stop_strings") is not None and "tokenizer" not in kwargs:
            kwargs["tokenizer"] = self.tokenizer
        with evaluation_mode(self.peft_model or self.base_model):
            return self._policy.generate(input_ids, generation_config, attention_mask=attention_mask,
                                         compiled=compiled, **kwargs)

    @torch.no_grad()
    def next_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: Sequence[str | None],
                      cache) -> torch.Tensor:
        """Each row's log-probs ``[B, V]`` of its next token under the policy of ``adapters[row]``, after
        feeding ``input_ids [B, t]``: one step of a caller's own decoding loop (the serving engine's).
        ``attention_mask [B, T + t]`` covers everything fed so far; ``cache`` (a transformers
        ``DynamicCache`` over ``2B`` rows: frozen rows, then adapter rows) holds the first ``T`` and is
        extended. The model is used as it is (call ``eval()`` on it first)."""
        self._assign(adapters, input_ids.shape[0])
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return self._policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **{self._cache_argument: cache}).logits[:, -1]

    @torch.no_grad()
    def read_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: Sequence[str | None],
                     cache, *, top: Sequence[int | None]) -> tuple[torch.Tensor, list[TokenMeasures | None]]:
        """:meth:`next_logprobs` of a prefill (``cache`` empty, ``input_ids`` left-padded as
        ``attention_mask`` says) that also scores the prompt of each row whose ``top[row]`` is not None:
        each of its tokens after the first, its log-prob under the row's policy (``combined``) and the
        ``top[row]`` likeliest tokens' (``top_logprobs``, ``top_ids``).

        The scores come from the decoder's final hidden states of the same forward through
        :func:`qadapter_kernels.vocabulary_pass`, a chunk of positions at a time: the forward still forms
        the last position's logits only, so scoring a prompt of ``T`` tokens holds no ``[T, V]`` tensor."""
        if len(top) != input_ids.shape[0]:
            raise ValueError(f"top must hold one entry per row of input_ids ({input_ids.shape[0]}); got {len(top)}")
        weight, cap = output_head(self.base_model)
        captured = []

        def keep_hidden(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = self.base_model.get_decoder().register_forward_hook(keep_hidden)
        try:
            logprobs = self.next_logprobs(input_ids, attention_mask, adapters, cache)
        finally:
            handle.remove()
        (hidden,) = captured
        rows, by_name = input_ids.shape[0], {a.name: a for a in self.adapters}
        scores: list[TokenMeasures | None] = []
        for row, (name, k) in enumerate(zip(adapters, top)):
            if k is None:
                scores.append(None)
                continue
            real = attention_mask[row, -input_ids.shape[1]:].bool()
            frozen, adapted = hidden[row, real][:-1], hidden[rows + row, real][:-1]
            # The base's own policy is the combination with alpha_0 = 0, alpha~ = 1 of its own logits.
            alphas = dict(alpha_tilde=1.0, alpha_0=0.0) if name is None else dict(
                alpha_tilde=by_name[name].alpha_tilde, alpha_0=by_name[name].alpha_0)
            scores.append(vocabulary_pass(frozen, frozen if name is None else adapted, weight,
                                          input_ids[row, real][1:], measures=("logprobs", "top"), top_k=k,
                                          logit_softcap=cap, **alphas))
        return logprobs, scores

    def _assign(self, adapters: Sequence[str | None], rows: int) -> None:
        """Row ``i`` decodes ``adapters[i]``: checked, and set as the row plan's assignment."""
        if isinstance(adapters, str) or len(adapters) != rows:
            raise ValueError(f"adapters must name one adapter (or None, the base) per row of input_ids "
                             f"({rows}); got {adapters!r}")
        index = {name: i for i, name in enumerate(self.names)}
        unknown = sorted({str(a) for a in adapters if a is not None and a not in index})
        if unknown:
            raise ValueError(f"adapters names {unknown}, not loaded; loaded: {self.names}")
        self.rows.assignment = tuple(None if a is None else index[a] for a in adapters)
