"""Many customized policies over one frozen base: each row of a batch decodes its own adapter's policy.

A Q-Adapter never changes the base; what differs between two customizations is their LoRA weights
and their ``alpha~``, ``alpha_0``. :class:`AdapterSet` loads saved adapters (stacked ones too) by
name onto one base (each checked as :meth:`QAdapterModel.from_pretrained` checks it) and decodes a
batch whose rows name different adapters, or none (the base), in one forward of the network per
token.

How a mixed batch runs its LoRA (the *bank*): every LoRA layer holds, under one extra PEFT adapter
name, the down-projections of the loaded adapters that adapt that layer stacked ``[W, d_in]`` and
their up-projections side by side ``[d_out, W]`` (each adapter a block of columns, its scaling folded
in). A batch runs the columns ``S`` of the adapters it names (their weights gathered once per batch
pattern, :class:`BankRows`; the whole bank where it names every one), so PEFT's own forward computes
``B_S ((A_S x) * mask)``: two GEMMs whatever the number of adapters, with a ``[rows, 1, |S|]`` mask
that keeps, on each row, its own adapter's block (all zero on frozen rows, which so get ``W x``
exactly; a stack's level row keeps the blocks of that level's Q network). PEFT's mixed-batch path
(``adapter_names=``) instead loops over the adapters in the batch, gathering and scattering each
one's rows: a Python loop per layer per adapter. The bank costs ``|S| / r`` times one adapter's LoRA
FLOPs, small beside the frozen layers for the adapter counts a batch mixes, however many are loaded
(``bench/adapter_set.py`` measures both against one adapter, and the whole bank beside the selection).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qadapter_kernels import TokenMeasures, combine_logits, vocabulary_pass
from qadapter_kernels.config import check_integer

from . import atomic
from . import quantization as quant
from .hidden import decoder_outputs, head_softcap, output_head
from .model import (
    base_fingerprint,
    check_base,
    check_prompt,
    check_quantization,
    check_stackable,
    evaluation_mode,
    find_level,
    load_lora,
    load_saved_base,
    select_combine,
)
from .one_at_a_time import network_lock, one_call_at_a_time
from .policy import ADAPTER_NAME, CombinedPolicy
from .saved import (
    LEVEL_FILES,
    AdapterLoadError,
    Level,
    adapter_digest,
    check_saved_lora,
    locate_adapter,
    read_adapter_config,
    run_options,
)
from .stack import effective_hidden, effective_logits, level_name, q_networks

BANK = "qadapter_bank"  # the PEFT adapter name under which every LoRA layer holds the bank
# The methods that set state on the shared base (the bank's selection, the row scaling) take its lock.
holding_the_base = one_call_at_a_time(lambda adapter_set: adapter_set.base_model)


class _BankSelection:
    """What the bank layers read in a forward: ``weights``, each projection's weight over the columns of
    the LoRAs the batch runs (by the projection's slot; none where the batch runs the layer's whole
    bank), gathered once per batch pattern, and ``mask`` ``[rows, 1, columns]`` per layout (the LoRAs a
    layer's bank holds), which of those columns each row keeps. A batch pays, on each layer, for the
    adapters it names that adapt that layer, not for every one loaded."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.mask: dict[tuple, torch.Tensor] = {}


class _BankProjection(nn.Module):
    """A bank weight (frozen: served, not trained), its layout, its slot in the selection's weights and
    the selection every forward reads."""

    columns_dim = 0  # where the weight's bank columns run

    def __init__(self, weight: torch.Tensor, layout: tuple, slot: int, selection: _BankSelection) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.layout, self.slot, self.selection = layout, slot, selection

    def selected(self, columns: torch.Tensor) -> torch.Tensor:
        """The weight over ``columns`` of the bank (for a batch's selection)."""
        return self.weight.index_select(self.columns_dim, columns.to(self.weight.device))


class _BankDown(_BankProjection):
    """The bank's down-projection, ``x @ A^T`` over the selected columns' rows of the stacked ``A``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.selection.weights.get(self.slot, self.weight))


class _BankUp(_BankProjection):
    """The bank's up-projection, ``(h * mask) @ B^T`` over the selected columns of the side-by-side
    ``B``: each row keeps only its own adapter's block."""

    columns_dim = 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h * self.selection.mask[self.layout], self.selection.weights.get(self.slot, self.weight))


class _Served:
    """One served policy: its name and folder, and for each level above the frozen model (one for a
    single adapter; for a stack its saved levels, then its own) the bank members (PEFT adapter names)
    its Q network runs and its ``(alpha_0, alpha~)``. ``digests``, ``members``: the sha256 of each
    level's LoRA files and its member, levels first; ``template_options``: the chat template's options
    it was trained with; ``loaded_at``: when it was loaded (Unix time)."""

    def __init__(self, name: str, path: Path, digests: list[str], members: list[str],
                 networks: list[tuple[str, ...]], alphas: list[tuple[float, float]], template_options: dict) -> None:
        self.name, self.path, self.digests, self.members = name, path, digests, members
        self.networks, self.alphas, self.template_options = networks, alphas, template_options
        self.loaded_at = time.time()

    @property
    def depth(self) -> int:
        """The rows a request for it runs beside the frozen one: one per level."""
        return len(self.networks)


def _part(logits: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return logits[rows] if isinstance(rows, slice) else logits.index_select(0, rows)


def _rows(indices: list[int], device: torch.device) -> slice | torch.Tensor:
    """``indices`` as a slice where they run contiguously (a view, no copy), else an index tensor."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, device=device)


class BankRows:
    """The row plan of an :class:`AdapterSet` (:class:`~qadapter.library.policy.RowPlan`'s contract):
    prompt row ``i`` decodes ``assignment[i]``, an index into the set's served policies or ``None``
    (the base).

    One forward runs ``B + sum(depth_i)`` rows: the ``B`` frozen rows first, then each prompt row's
    level rows in order (none for the base, one for an adapter, one per level for a stack), so a
    batch of single adapters is the doubled batch ``[frozen B, adapter B]``. :meth:`level_rows` says
    where each prompt row's levels are."""

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

    def _plan(self, batch: int, device: torch.device) -> dict:
        """The rows, bank selection and combine groups of a batch of ``batch`` prompt rows, cached per
        pattern (a compiled step sees the same tensors again and is not re-traced)."""
        assignment = self._expanded(batch)
        key = (assignment, torch.device(device))
        if key not in self._cache:
            self._cache.clear()
            bank = self.adapter_set
            served = [None if index is None else bank.adapters[index] for index in assignment]
            levels, next_row = [], batch
            for policy in served:
                depth = 0 if policy is None else policy.depth
                levels.append(list(range(next_row, next_row + depth)))
                next_row += depth
            owner = list(range(batch)) + [i for i, rows in enumerate(levels) for _ in rows]
            place = [0] * batch + [k for rows in levels for k in range(1, len(rows) + 1)]
            deepest = max(map(len, levels))
            table = [[i, *rows, *[0] * (deepest - len(rows))] for i, rows in enumerate(levels)]
            used = self._members_run(served)
            columns, masks = {}, {}
            for layout in bank.layouts:
                columns[layout], masks[layout] = self._selection(layout, used, served, levels, next_row, device)
            weights = {p.slot: p.selected(columns[p.layout]) for p in bank.projections if columns[p.layout] is not None}
            groups: dict = {}
            for i, policy in enumerate(served):
                groups.setdefault(() if policy is None else tuple(policy.alphas), []).append(i)
            every = len(groups) == 1
            self._cache[key] = {
                "mask": masks, "owner": torch.tensor(owner, device=device), "levels": levels, "weights": weights,
                "place": torch.tensor(place, device=device), "table": torch.tensor(table, device=device),
                "groups": [(alphas, None if every else torch.tensor(members, device=device),
                            [_rows(members, device)] + [_rows([levels[i][j] for i in members], device)
                                                        for j in range(len(alphas))])
                           for alphas, members in groups.items()]}
        return self._cache[key]

    def _selection(self, layout: tuple, used: set[str], served: list, levels: list[list[int]], rows: int,
                   device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The columns of a layer bank of ``layout`` ((member, rank) pairs, in its column order) that
        the batch's policies run (None: all), and the mask ``[rows, 1, columns]`` of each forward row's."""
        blocks, columns, start = {}, [], 0
        for member, rank in layout:
            if member in used:
                blocks[member] = (len(columns), len(columns) + rank)
                columns += range(start, start + rank)
            start += rank
        mask = torch.zeros(rows, 1, len(columns), device=device, dtype=self.adapter_set.dtype)
        for policy, level_rows in zip(served, levels):
            for row, network in zip(level_rows, [] if policy is None else policy.networks):
                for member in network:
                    if member in blocks:
                        mask[row, 0, blocks[member][0]:blocks[member][1]] = 1
        whole = len(columns) == start
        return None if whole else torch.tensor(columns, dtype=torch.long, device=device), mask

    @staticmethod
    def _members_run(served: list[_Served | None]) -> set[str]:
        """The bank members (LoRAs) the policies of a batch run: the only blocks its forward computes."""
        return {member for policy in served if policy is not None for network in policy.networks for member in network}

    def level_rows(self, batch: int, device: torch.device) -> list[list[int]]:
        """Each prompt row's level rows in the forward (its frozen row is its own index)."""
        return self._plan(batch, device)["levels"]

    def expand(self, value, batch: int):
        """A per-prompt-row input (ids, mask, positions; a mask dict) laid out on the forward's rows."""
        if isinstance(value, torch.Tensor):
            return value.index_select(0, self._plan(batch, value.device)["owner"])
        if isinstance(value, dict):
            return {k: self.expand(v, batch) for k, v in value.items()}
        return value

    def forward_rows(self, source: torch.Tensor, batch: int) -> torch.Tensor:
        """The forward's rows of prompt rows ``source[i]`` in row ``i``'s places: each forward row takes
        the row at the same place (frozen, level 1, ...) of its prompt row's source."""
        plan = self._plan(batch, source.device)
        return plan["table"][source[plan["owner"]], plan["place"]]

    @contextmanager
    def selecting(self, batch: int, device: torch.device):
        selection, plan = self.adapter_set.selection, self._plan(batch, device)
        previous = selection.weights, selection.mask
        selection.weights, selection.mask = plan["weights"], plan["mask"]
        try:
            yield
        finally:
            selection.weights, selection.mask = previous

    def combine(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        """Each prompt row's next-token scores from the forward's rows: its adapter's combined log-probs
        with its own ``alpha~``, ``alpha_0`` (a stack's, by the stack's recursion over its levels); a
        base row's are the frozen model's own logits, as the base alone gives them to ``generate`` (a
        repetition penalty, which is not shift-invariant, acts on them as it does there). Rows of the
        same temperatures combine together."""
        kernel = combine_logits if torch.compiler.is_compiling() else self.kernel
        out = None
        for alphas, index, rows in self._plan(batch, logits.device)["groups"]:
            blocks = [_part(logits, r) for r in rows]
            if not alphas:
                part = blocks[0].float()
            elif len(alphas) == 1:
                part = kernel(blocks[0], blocks[1], alpha_0=alphas[0][0], alpha_tilde=alphas[0][1])
            else:  # a stack: its parent's policy is the softmax of h_eff W (docs/design.md, "Stacked adapters")
                part = kernel(effective_logits(blocks[:-1], alphas[:-1]), blocks[-1].float(), alpha_0=alphas[-1][0],
                              alpha_tilde=alphas[-1][1])
            if index is None:
                return part
            if out is None:
                out = part.new_empty((batch, *part.shape[1:]))
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
        self.base_described = "the one given"  # which base this is, as a refused adapter's message names it
        self.peft_model: nn.Module | None = None
        self.adapters: list[_Served] = []
        self._members: dict[str, str] = {}  # the bank's LoRAs: sha256 of their files -> PEFT adapter name
        self._loads = 0  # LoRAs loaded so far: numbers their PEFT adapter names
        self.loras: list[str] = []  # the bank's LoRAs (PEFT adapter names), in column order
        self.layouts: set[tuple] = set()  # each LoRA layer bank's (member, rank) pairs, in column order
        self.projections: list[_BankProjection] = []  # every layer bank's two, by slot
        self.dtype = torch.float32
        self.selection = _BankSelection()
        self.rows = BankRows(self)
        weight = base_model.get_output_embeddings().weight
        self.rows.kernel = select_combine("auto", weight.device, weight.dtype)
        self._policy = CombinedPolicy(base_model, self.rows)
        # transformers renamed the forward's past_key_values to cache; take whichever this one has.
        self._cache_argument = "cache" if "cache" in inspect.signature(base_model.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, adapters: Mapping[str, str | os.PathLike] | Iterable[tuple[str, str | os.PathLike]],
                        base_model: str | os.PathLike | nn.Module | None = None, *, torch_dtype=None,
                        device=None) -> AdapterSet:
        """An adapter set with ``adapters`` (name -> saved adapter: a directory or a hub repository,
        ``owner/name[@revision]``) loaded onto ``base_model``
        (default: the base the first adapter names, loaded as it was in training)."""
        items = _named_paths(adapters)
        if not items:
            raise ValueError("adapters must name at least one saved adapter (name -> directory)")
        items = [(name, locate_adapter(path)) for name, path in items]
        first = items[0][1]
        atomic.recover(first, reading=True)
        config = read_adapter_config(first)
        base, tokenizer = load_saved_base(first, config, base_model, torch_dtype=torch_dtype, device=device)
        adapter_set = cls(base, tokenizer=tokenizer)
        if base_model is None:  # an adapter of another base is told which base was loaded, and why
            adapter_set.base_described = f"the base loaded for the first adapter, {items[0][0]!r}: {config['base_model']!r}"
        for name, path in items:
            adapter_set.load(name, path)
        return adapter_set

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def depth(self, name: str | None) -> int:
        """The rows a request for ``name`` (None: the base) runs beside its frozen row: 0 for the base,
        1 for an adapter, a stack's levels for a stack."""
        return 0 if name is None else self._served(name).depth

    def template_options(self, name: str | None) -> dict:
        """The chat template's options the adapter ``name`` was trained with (None, the base: none)."""
        return {} if name is None else self._served(name).template_options

    def _served(self, name: str) -> _Served:
        served = next((a for a in self.adapters if a.name == name), None)
        if served is None:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.names}")
        return served

    def check(self, path: str | os.PathLike) -> tuple[Path, dict, list[tuple[Level, Path | None]]]:
        """The saved adapter in ``path`` found (a hub download), its config, and a stack's levels with
        where each is (None: one loaded already), checked against this set's base before anything loads: its files' record,
        quantization and base fingerprint, and for a stack whether this base can carry one and that
        each level is where its record says and unchanged. Raises what :meth:`load` raises for them."""
        path = locate_adapter(path)
        atomic.recover(path, reading=True)
        config = read_adapter_config(path)
        check_saved_lora(path, config)
        check_quantization(path, config["quantization"], self.quantization)
        check_base(path, config, self.fingerprint, self.quantization, given=self.base_described)
        if config["stack"]:
            check_stackable(head_softcap(self.base_model), str(path))
        levels = [Level.from_dict(record, str(path), path) for record in config["stack"]]
        found = [None if level.sha256 in self._members  # loaded already (its parent is served): shared
                 else find_level(level, k, str(path), self.fingerprint, self.quantization)
                 for k, level in enumerate(levels, 1)]
        return path, config, list(zip(levels, found))

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Loads the saved adapter in ``path`` (a directory or a hub repository) under ``name``, checked as
        ``QAdapterModel.from_pretrained`` checks it (complete files, this base, its quantization, exactly
        its tensors; a stack's levels found where its record says, unchanged)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a saved adapter's directory or a hub repository name; got {path!r}")
        self._check_free(name)
        path, config, located = self.check(path)  # found (a hub download) before the network is held
        with network_lock(self.base_model):
            self._check_free(name)  # a load from another thread meanwhile
            self._load_checked(name, path, config, located)

    def _check_free(self, name: str) -> None:
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is loaded already (unload it first)")

    def _load_checked(self, name: str, path: Path, config: dict, located: list[tuple[Level, Path | None]]) -> None:
        levels = [level for level, _ in located]
        # Each LoRA of the bank (a member) is a PEFT adapter named by the set (a served name may hold what a
        # module name cannot), keyed by the sha256 of its files: a stack's level that is loaded already
        # (its parent, served too) is shared, not loaded twice.
        digests = [level.sha256 for level in levels] + [adapter_digest(path, LEVEL_FILES)]
        added = []
        with self._bank_rebuilt():
            try:
                for k, digest in enumerate(digests, 1):
                    if digest in self._members:
                        continue
                    self._loads += 1
                    if k <= len(levels):
                        found = located[k - 1][1] or find_level(levels[k - 1], k, str(path), self.fingerprint,
                                                                 self.quantization)  # unloaded since the check
                        what = f"{path}: stack level {k}"
                    else:
                        found, what = path, f"adapter {name!r}"
                    self.peft_model = load_lora(self.peft_model or self.base_model, found, f"lora{self._loads}", what,
                                                frozen=k <= len(levels))
                    self._members[digest] = f"lora{self._loads}"
                    added.append(digest)
            except Exception:
                for digest in added:
                    self.peft_model.delete_adapter(self._members.pop(digest))
                failed = f"lora{self._loads}"  # PEFT added its layers before its weights were refused: each try would stay
                if self.peft_model is not None and failed in self.peft_model.peft_config:
                    self.peft_model.delete_adapter(failed)
                raise
            members = [self._members[digest] for digest in digests]
            loss = run_options(**config["loss"])[0]
            alphas = [(level.alpha_0, level.alpha_tilde) for level in levels] + [(loss.alpha_0, loss.alpha_tilde)]
            by_level = dict(zip([level_name(k) for k in range(1, len(levels) + 1)] + [ADAPTER_NAME], members))
            networks = [tuple(by_level[n] for n in network)
                        for network in q_networks([level.q_on for level in levels] + [config["q_on"]])]
            self.adapters.append(_Served(name, path, digests, members, networks, alphas, config["chat_template_kwargs"]))

    @holding_the_base
    def unload(self, name: str) -> None:
        """Removes the adapter ``name`` (a stack: with its levels) from the device."""
        if name not in self.names:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.names}")
        (served,) = [a for a in self.adapters if a.name == name]
        with self._bank_rebuilt():
            others = [a for a in self.adapters if a.name != name]
            if others:  # PEFT warns when the active adapter is deleted
                self.peft_model.set_adapter(others[0].members[-1])
            kept = {digest for other in others for digest in other.digests}
            for digest in dict.fromkeys(served.digests):
                if digest not in kept:  # no other served adapter shares it
                    self.peft_model.delete_adapter(self._members.pop(digest))
            self.adapters = others

    @contextmanager
    def _bank_rebuilt(self):
        """PEFT's adapter bookkeeping inside (the bank is no adapter of its config: taken out, the
        active adapter a loaded one), the bank rebuilt from the adapters loaded after, even on error."""
        if self.peft_model is not None:
            for layer in self._lora_layers():
                for entries in (layer.lora_A, layer.lora_B, layer.lora_dropout, layer.scaling):
                    if BANK in entries:
                        del entries[BANK]
            if self.adapters:
                self.peft_model.set_adapter(self.adapters[0].members[-1])
        try:
            yield
        finally:
            if self.peft_model is not None:
                self._build_bank()

    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.lora.layer import LoraLayer

        return [m for m in self.peft_model.modules() if isinstance(m, LoraLayer)]

    def _build_bank(self) -> None:
        """(Re)builds every LoRA layer's bank from the loaded adapters (a stack's levels too) and makes it
        the active adapter."""
        layers, served_as = self._lora_layers(), {}
        for served in self.adapters:
            for member in served.members:
                served_as.setdefault(member, served.name)
        members = list(served_as)
        self.loras, self.layouts, self.projections = members, set(), []
        for layer in layers:
            for member in members:
                if member in layer.lora_A and (layer.lora_variant.get(member) is not None
                                               or layer.lora_B[member].bias is not None):
                    raise AdapterLoadError(f"adapter {served_as[member]!r}: an adapter set serves plain LoRA only "
                                           "(no DoRA or other variant, no LoRA bias)")
        if members:
            self.dtype = next(layer.lora_A[members[0]].weight.dtype for layer in layers if members[0] in layer.lora_A)
        for layer in layers:
            # This layer's bank holds the LoRAs that adapt it, each block its rank here.
            layout = tuple((m, layer.lora_A[m].weight.shape[0]) for m in members if m in layer.lora_A)
            device = layer.get_base_layer().weight.device
            down = torch.cat([layer.lora_A[m].weight for m, _ in layout]) if layout else \
                torch.zeros(0, layer.in_features, device=device, dtype=self.dtype)
            up = torch.cat([layer.lora_B[m].weight * layer.scaling[m] for m, _ in layout], dim=1) if layout else \
                torch.zeros(layer.out_features, 0, device=device, dtype=self.dtype)
            self.layouts.add(layout)
            layer.lora_A[BANK] = _BankDown(down.to(self.dtype), layout, len(self.projections), self.selection)
            layer.lora_B[BANK] = _BankUp(up.to(self.dtype), layout, len(self.projections) + 1, self.selection)
            self.projections += [layer.lora_A[BANK], layer.lora_B[BANK]]
            layer.lora_dropout[BANK] = nn.Identity()
            layer.scaling[BANK] = 1.0
            layer.set_adapter(BANK, inference_mode=True)
        self.peft_model.requires_grad_(False)  # served, not trained
        self.rows._cache.clear()

    @holding_the_base
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, *, adapters: Sequence[str | None], compiled: bool | None = None,
                 **kwargs):
        """Decodes row ``i`` of ``input_ids`` with the customized policy of ``adapters[i]`` (a loaded
        adapter's name, or ``None`` for the base model), all rows in one forward per token; takes what
        :meth:`QAdapterModel.generate` takes and returns what transformers' ``generate`` returns."""
        input_ids, attention_mask = check_prompt(input_ids, attention_mask)
        self._assign(_per_row("adapters", adapters), input_ids.shape[0])
        if kwargs.get("stop_strings") is not None and "tokenizer" not in kwargs:
            kwargs["tokenizer"] = self.tokenizer
        with evaluation_mode(self.peft_model or self.base_model):
            return self._policy.generate(input_ids, generation_config, attention_mask=attention_mask,
                                         compiled=compiled, **kwargs)

    @torch.no_grad()
    @holding_the_base
    def next_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: Sequence[str | None],
                    cache) -> torch.Tensor:
        """Each row's scores ``[B, V]`` of its next token under the policy of ``adapters[row]`` (its
        log-probs; a base row's, the base's logits: :meth:`BankRows.combine`), after feeding
        ``input_ids [B, t]``: one step of a caller's own decoding loop (the serving engine's).
        ``attention_mask [B, T + t]`` covers everything fed so far; ``cache`` (a transformers
        ``DynamicCache`` over the forward's rows, :class:`BankRows`: frozen rows, then each row's level
        rows) holds the first ``T`` and is extended. The model is used as it is (call ``eval()`` on it first)."""
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a tensor [B, T + t] (everything fed so far); "
                             f"got {type(attention_mask).__name__}")
        self._assign(_per_row("adapters", adapters), input_ids.shape[0])
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return self._policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **{self._cache_argument: cache}).logits[:, -1]

    @torch.no_grad()
    @holding_the_base
    def read_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: Sequence[str | None],
                     cache, *, top: Sequence[int | None]) -> tuple[torch.Tensor, list[TokenMeasures | None]]:
        """:meth:`next_scores` of a prefill (``cache`` empty, ``input_ids`` left-padded as
        ``attention_mask`` says) that also scores the prompt of each row whose ``top[row]`` is not None:
        each of its tokens after the first, its log-prob under the row's policy (``combined``) and the
        ``top[row]`` likeliest tokens' (``top_logprobs``, ``top_ids``).

        The scores come from the decoder's final hidden states of the same forward through
        :func:`qadapter_kernels.vocabulary_pass`, a chunk of positions at a time: the forward still forms
        the last position's logits only, so scoring a prompt of ``T`` tokens holds no ``[T, V]`` tensor."""
        adapters, top = _per_row("adapters", adapters), _per_row("top", top)
        if len(top) != input_ids.shape[0]:
            raise ValueError(f"top must hold one entry per row of input_ids ({input_ids.shape[0]}); got {len(top)}")
        top = tuple(None if k is None else check_integer("top", k, least=0, note=" per row (the likeliest tokens to list) or None")
                    for k in top)
        weight, cap = output_head(self.base_model)
        with decoder_outputs(self.base_model) as captured:
            next_scores = self.next_scores(input_ids, attention_mask, adapters, cache)
        (hidden,) = captured
        levels_of = self.rows.level_rows(input_ids.shape[0], input_ids.device)
        by_name = {a.name: a for a in self.adapters}
        scores: list[TokenMeasures | None] = []
        for row, (name, k) in enumerate(zip(adapters, top)):
            if k is None:
                scores.append(None)
                continue
            real = attention_mask[row, -input_ids.shape[1]:].bool()
            states = [hidden[r, real][:-1] for r in [row, *levels_of[row]]]
            if name is None:  # the base's own policy: the combination with alpha_0 = 0, alpha~ = 1 of its logits
                frozen, q, (alpha_0, alpha_tilde) = states[0], states[0], (0.0, 1.0)
            else:  # the frozen side of a stack's top level is h_eff of the levels below, as in training
                alphas = by_name[name].alphas
                frozen, q, (alpha_0, alpha_tilde) = effective_hidden(states[:-1], alphas[:-1]), states[-1], alphas[-1]
            scores.append(vocabulary_pass(frozen, q, weight, input_ids[row, real][1:], measures=("logprobs", "top"),
                                          top_k=k, logit_softcap=cap, alpha_0=alpha_0, alpha_tilde=alpha_tilde))
        return next_scores, scores

    def _assign(self, adapters: tuple, rows: int) -> None:
        """Row ``i`` decodes ``adapters[i]``: checked, and set as the row plan's assignment."""
        if len(adapters) != rows or not all(a is None or isinstance(a, str) for a in adapters):
            raise ValueError(f"adapters must name one adapter (or None, the base) per row of input_ids "
                             f"({rows}); got {adapters!r}")
        index = {name: i for i, name in enumerate(self.names)}
        unknown = sorted({a for a in adapters if a is not None and a not in index})
        if unknown:
            raise ValueError(f"adapters names {unknown}, not loaded; loaded: {self.names}")
        self.rows.assignment = tuple(None if a is None else index[a] for a in adapters)


def _named_paths(adapters: Any) -> list[tuple[str, str | os.PathLike]]:
    """``adapters`` (a mapping name -> saved adapter, or (name, path) pairs) as a list of pairs, or a
    TypeError saying what it takes."""
    expected = "a mapping of names to saved adapters (directories or hub repositories) or (name, path) pairs"
    if isinstance(adapters, (str, bytes, os.PathLike)) or not isinstance(adapters, (Mapping, Iterable)):
        raise TypeError(f"adapters must be {expected}; got {adapters!r} (name it: {{'name': path}})")
    items = list(adapters.items() if isinstance(adapters, Mapping) else adapters)
    for item in items:
        if isinstance(item, (str, bytes, os.PathLike)) or not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"adapters must be {expected}; got the item {item!r}")
        if not isinstance(item[1], (str, os.PathLike)):
            raise TypeError(f"adapters: the path of {item[0]!r} must be a directory or a hub repository name; "
                            f"got {item[1]!r}")
    return items


def _per_row(name: str, values: Any) -> tuple:
    """``values`` (a list, a tuple, a generator: one per row) as a tuple, or a ValueError naming ``name``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        what = "name one adapter (or None, the base)" if name == "adapters" else "hold one entry"
        raise ValueError(f"{name} must {what} per row of input_ids (a list); got {values!r}")
    return tuple(values)
