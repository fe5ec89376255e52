"""Padding-free forwards: a padded batch's tokens laid out without its padding, each shared prefix once.

A preference batch is padded to its longest sequence, and its chosen and rejected sequences repeat
their prompt: on preference data most of a padded batch is padding or a second copy of a prompt. The
frozen and adapter passes cost what their tokens cost, so :func:`pack_batch` lays the batch out again
before they run and :meth:`PackedBatch.unpack` puts their hidden states back in the batch's
``[B, T, d]`` layout, which is all the loss sees (its rewards, pairing and padded-length
normalization stay exactly as they were).

Two layouts, by what the model's attention takes:

- **Shared prefixes** (attention that takes a 4D mask: ``sdpa``, ``eager``). A row whose first tokens
  are another row's (the rejected sequence after its chosen one: the prompt) keeps only its own tail;
  its tail attends to the other row's tokens before the point where they part, at the positions it
  would have alone. Longest shared prefixes join first, and a tree never grows past two of the
  batch's longest rows (a pair's worth), so that a prefix every row shares (a chat template's system
  prompt) does not join the whole batch into one row. Short sequences may join up to the model's
  hidden size in tokens, where a row's attention stays small beside its linear layers and fewer
  tokens are what saves time. The trees are laid into rows at least as long as the largest tree and
  at most twice as long as a tree may be, of the length that costs least by the model's dimensions
  (:func:`row_capacity`): rows as long as the largest tree leave part of the others empty, longer
  ones cost more attention (a dense mask costs what it hides). Where attention keeps every score for
  the backward (eager: Gemma-2's soft-capped scores), a row's scores grow with its length squared:
  there the rows keep no more memory than the padded batch by an estimate from the model's shape
  (:func:`row_capacity`, ``memory_plan.scores_per_token``), or the batch runs padded.
- **Packed sequences** (any other attention, or a sliding window shorter than a sequence, which a 4D
  mask would hide): each sequence whole, laid end to end; transformers keeps the sequences of a row
  apart by their ``position_ids`` restarting at 0 and no attention mask. Rows are chosen the same
  way, unless the attention runs sequences apart without touching the others (the flash and flex
  kernels): then one row.

Either way, the hidden state of every attended token is the one the padded forward gives it (the
same network on the same tokens at the same positions, seeing the same tokens), up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .memory_plan import scores_per_token

MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask
VARLEN_ATTENTION = ("flash", "flex")  # name parts of those that skip what the mask hides
SCORES_KEPT = ("eager",)  # those that keep every query-key score for the backward


@dataclass(frozen=True)
class PackedBatch:
    """The model inputs of a packed forward and the way back to the batch's layout."""

    inputs: dict  # input_ids [R, C], position_ids [R, C], and attention_mask [R, 1, C, C] or None
    source: torch.Tensor  # [B * T] the packed flat index of each batch position (0 at padding)
    attended: torch.Tensor  # [B * T] whether a batch position is a token (not padding)
    shape: tuple[int, int]  # (B, T), the batch's
    tokens: int  # R * C: what each packed pass costs, against B * T

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, C, d]`` hidden states of the packed forward as ``[B, T, d]`` in the batch's layout
        (zeros at padding); differentiable, so the loss's gradient reaches the packed forward."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        whole = flat.index_select(0, self.source.to(flat.device))
        whole = whole * self.attended.to(flat.device, flat.dtype)[:, None]
        return whole.view(*self.shape, -1)

    def at(self, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[n, d]``: the packed forward's hidden states ``[R, C, d]`` at the batch's attended
        ``(rows[i], positions[i])``, without the rest of the batch's layout."""
        places = self.source.to(hidden.device)[rows * self.shape[1] + positions]
        return hidden.reshape(-1, hidden.shape[-1])[places]


def attended_runs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's first attended column and attended length where each row's tokens are one run
    (right- or left-padded), else None: moving tokens with gaps between them changes what they see."""
    mask = attention_mask.detach().to("cpu") != 0
    lengths = mask.sum(1)
    first = mask.int().argmax(1)
    column = torch.arange(mask.shape[1])
    runs = (column >= first[:, None]) & (column < (first + lengths)[:, None])
    return (first, lengths) if torch.equal(mask, runs) else None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the prefix two token sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _shared_prefixes(ids: list[list[int]], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """Per row, the earlier row whose prefix it shares (itself if none), that prefix's length, and the
    first row of its tree (the one without a parent): the longest shared prefixes first, each joining
    two trees only while the joined tree holds at most ``capacity`` tokens (so a prefix every row
    shares, a chat template's system prompt, cannot make the whole batch one long row, nor take a
    rejected row from its chosen one)."""
    rows = len(ids)
    parent, shared = list(range(rows)), [0] * rows
    root, size = list(range(rows)), [len(row) for row in ids]  # size: a root's tree's tokens
    links = sorted(((common_prefix(ids[r], ids[s]), r, s) for r in range(rows) for s in range(r)), reverse=True)
    for same, r, s in links:
        if same == 0:
            break
        # A row takes one parent, earlier than itself (so the trees stay trees, laid out in row order).
        if parent[r] != r or size[root[s]] + size[root[r]] - same > capacity:
            continue
        old, new = root[r], root[s]
        parent[r], shared[r] = s, same
        size[new] += size[old] - same
        root = [new if t == old else t for t in root]
    return parent, shared, root


def _fill_rows(sizes: list[int], capacity: int) -> list[list[int]]:
    """Items of ``sizes`` in rows of at most ``capacity`` (first fit, largest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for k, free in enumerate(room):
            if sizes[item] <= free:
                rows[k].append(item)
                room[k] -= sizes[item]
                break
        else:
            rows.append([item])
            room.append(capacity - sizes[item])
    return rows


def row_capacity(sizes: list[int], hidden_size: int, most: int, *, score_weight: int | None = None,
                 budget: int = 0) -> int | None:
    """The length, at most ``most`` (or the largest item), of the packed rows that hold items of
    ``sizes`` (trees, whole) at the least cost estimated for a model of ``hidden_size`` ``d``: a row of
    ``C`` tokens costs ``C`` times its linear layers' ``24 d^2`` FLOPs a token and ``C^2`` times
    attention's ``4 d`` a query-key pair (a dense mask), which run at about half the rate of the
    linear layers' GEMMs (sdpa with a mask, measured on a CPU: ``bench.padding_free``), so
    ``C (3 d + C)``. Rows as long as the largest item where ``d`` is unknown (0).

    ``score_weight``: where attention keeps every score for the backward (eager), how many scores
    weigh a token's other kept activations (``memory_plan.scores_per_token``); then only lengths whose
    ``R`` rows keep at most ``budget`` by the estimate ``R C (score_weight + C)`` are candidates, and
    None is returned where none does."""
    largest = max(sizes)
    total = sum(sizes)
    candidates = {max(largest, min(most, -(-total // rows))) for rows in range(1, len(sizes) + 1)} if hidden_size \
        else {largest}  # n rows' share
    if score_weight is not None:
        candidates = {c for c in candidates if len(_fill_rows(sizes, c)) * c * (score_weight + c) <= budget}
        if not candidates:
            return None
    return min(sorted(candidates), key=lambda c: len(_fill_rows(sizes, c)) * c * (3 * hidden_size + c))


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, attention: str,
               sliding_window: int | None = None, mask_dtype: torch.dtype = torch.float32,
               hidden_size: int = 0, score_weight: int | None = None) -> PackedBatch | None:
    """``input_ids`` and ``attention_mask`` (``[B, T]``) laid out without padding, each prefix rows
    share once where ``attention`` (the model's implementation) takes a 4D mask and the
    ``sliding_window`` does not cut a sequence; None where packing would save no token or a row's
    tokens are not one run. A tree of shared prefixes holds at most two of the longest rows, or the
    model's ``hidden_size`` in tokens where that is more (a row whose attention is cheap beside its
    linear layers); the packed rows' length is the cheapest for that size (:func:`row_capacity`), at
    most twice a tree's most. With ``score_weight`` (attention that keeps its scores: eager), rows
    keep no more than the padded batch by :func:`row_capacity`'s estimate, or the batch stays padded
    (None)."""
    runs = attended_runs(attention_mask)
    if runs is None:
        return None
    first, lengths = runs
    batch, width = input_ids.shape
    host_ids = input_ids.detach().cpu()
    rows = [host_ids[r, int(first[r]) : int(first[r] + lengths[r])] for r in range(batch)]
    longest = int(lengths.max())
    share = attention in MASKED_ATTENTION and (sliding_window is None or longest <= sliding_window)
    # A tree holds at most a pair's two longest rows, or d tokens, a row whose attention (about 4 C d FLOPs
    # a token) is at most a sixth of its linear layers' (about 24 d^2): no prefix joins a batch of long rows.
    # A packed row holds at most twice that, whatever the estimate says.
    # Where attention keeps its scores (score_weight, eager), the rows keep no more than the padded batch
    # (row_capacity's estimate), and short rows join only up to a length that could.
    budget = batch * width * (score_weight + width) if score_weight is not None else 0
    joined = hidden_size if score_weight is None else min(hidden_size, budget // max(1, int(lengths.sum())) - score_weight)
    tree_cap = max(2 * longest, joined)
    parent, shared, root = (_shared_prefixes([row.tolist() for row in rows], tree_cap) if share
                            else (list(range(batch)), [0] * batch, list(range(batch))))
    trees = sorted(set(root))
    sizes = [sum(int(lengths[r]) - shared[r] for r in range(batch) if root[r] == t) for t in trees]
    one_row = not share and any(part in attention for part in VARLEN_ATTENTION)
    capacity = sum(sizes) if one_row else row_capacity(sizes, hidden_size, 2 * tree_cap, score_weight=score_weight,
                                                       budget=budget)
    if capacity is None:
        return None
    layout = _fill_rows(sizes, capacity)
    if len(layout) * capacity >= batch * width:
        return None
    # Each row's tokens take the packed places of its parent's before the parting point, then its own.
    place = [torch.empty(0, dtype=torch.long)] * batch
    spans: list[list[tuple[int, int, int]]] = []  # per packed row, (row, first place, end) of each tail
    positions = torch.zeros((len(layout), capacity), dtype=torch.long)
    packed_ids = torch.zeros((len(layout), capacity), dtype=input_ids.dtype)
    for k, members in enumerate(layout):
        start = 0  # the next free place of packed row k
        spans.append([])
        for r in (r for t in members for r in range(batch) if root[r] == trees[t]):
            own = slice(start, start + int(lengths[r]) - shared[r])
            place[r] = torch.cat([place[parent[r]][: shared[r]], k * capacity + torch.arange(own.start, own.stop)])
            spans[-1].append((r, own.start, own.stop))
            positions[k, own] = torch.arange(shared[r], int(lengths[r]))
            packed_ids[k, own] = rows[r][shared[r] :]
            start = own.stop
        positions[k, start:] = torch.arange(capacity - start)  # the filler: a sequence of its own
        spans[-1].append((batch, start, capacity))
    source = torch.zeros(batch * width, dtype=torch.long)
    attended = torch.zeros(batch * width, dtype=torch.bool)
    for r in range(batch):
        at = r * width + int(first[r]) + torch.arange(int(lengths[r]))
        source[at], attended[at] = place[r], True
    device = input_ids.device
    mask = _tree_mask(spans, capacity, parent, shared, device) if share else None
    if mask is not None:
        # Additive, made once for every layer and pass: sdpa would turn a boolean mask into this (its -inf)
        # in each layer, a [C, C] copy that training keeps per layer for the backward; eager adds it to its scores.
        masked = float("-inf") if attention == "sdpa" else torch.finfo(mask_dtype).min
        mask = torch.zeros(mask.shape, dtype=mask_dtype, device=device).masked_fill_(~mask, masked)
    inputs = dict(input_ids=packed_ids.to(device), position_ids=positions.to(device), attention_mask=mask)
    return PackedBatch(inputs, source, attended, (batch, width), len(layout) * capacity)


def _tree_mask(spans: list[list[tuple[int, int, int]]], capacity: int, parent: list[int], shared: list[int],
               device: torch.device) -> torch.Tensor:
    """``[R, 1, C, C]``, True where a query sees a key: the keys of its own tail before it and, of each
    tail on its path to the root, those below the position where its path leaves that tail. Built
    block by block (a tail's places are one run): a causal block on the diagonal, a run of columns per
    ancestor; on ``device``, which then copies no ``C x C`` mask in."""
    mask = torch.zeros(len(spans), 1, capacity, capacity, dtype=torch.bool, device=device)
    causal = torch.ones(capacity, capacity, dtype=torch.bool, device=device).tril_()
    batch = len(parent)
    for k, row in enumerate(spans):
        places = {r: (start, stop) for r, start, stop in row}
        for r, start, stop in row:
            mask[k, 0, start:stop, start:stop] = causal[: stop - start, : stop - start]
            below, node = capacity, r  # no position reaches it
            while node < batch and parent[node] != node:
                below = min(below, shared[node])
                node = parent[node]
                first, end = places[node]  # the ancestor's tail: positions shared[node] onwards
                mask[k, 0, start:stop, first : first + max(0, min(below - shared[node], end - first))] = True
    return mask


def model_packing(causal_lm: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], PackedBatch | None]:
    """:func:`pack_batch` as ``causal_lm`` takes it: its attention, sliding window, mask dtype (its
    queries', those of its hidden states from its input embeddings: sdpa's CUDA kernels take an additive
    mask of that dtype only, and a head may be kept in another, as float32 over a bfloat16 model) and,
    where its attention keeps its scores, what they weigh against its tokens (a config the memory plan
    cannot read: no bound)."""
    config = causal_lm.config
    attention = str(getattr(config, "_attn_implementation", None) or "eager")
    text_config = config.get_text_config()
    hidden_size = int(getattr(text_config, "hidden_size", 0) or 0)
    window = getattr(config, "sliding_window", None)
    weights = (getattr(module, "weight", None) for module in (causal_lm.get_input_embeddings(),
                                                                  causal_lm.get_output_embeddings()))
    dtype = next((w.dtype for w in weights if w is not None and w.dtype.is_floating_point), torch.float32)
    score_weight = None
    if attention in SCORES_KEPT:
        try:
            score_weight = scores_per_token(text_config, dtype)
        except (TypeError, ValueError, ZeroDivisionError):
            pass

    def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch | None:
        return pack_batch(input_ids, attention_mask, attention=attention, sliding_window=window, mask_dtype=dtype,
                          hidden_size=hidden_size, score_weight=score_weight)

    return pack


PROBE_ROWS = ([1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 9, 10], [4])  # a shared prefix, and a short row


def probe_batch(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's rows right-padded: ``(input_ids, attention_mask)``."""
    width = max(map(len, PROBE_ROWS))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in PROBE_ROWS], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in PROBE_ROWS], device=device)
    return ids, mask


def packing_error(hidden_of: Callable[[dict], torch.Tensor], pack: Callable, device: torch.device) -> float:
    """The largest relative difference, over the tokens of a small batch, between their hidden states
    packed and each sequence's run alone: rounding where the model keeps packed sequences apart, far
    more where one sees another's tokens. ``hidden_of(inputs)`` runs the model's decoder on ``inputs``.

    Alone, not padded: padding is not neutral for every model (bitsandbytes' 8-bit matmul picks the
    columns it keeps in float16 over the whole batch, the pad tokens' included, and moves a padded
    token's hidden state far more than packing moves it: README, "Quantized base")."""
    ids, mask = probe_batch(device)
    packed = pack(ids, mask)
    unpacked = packed.unpack(hidden_of(packed.inputs)).float()
    worst = 0.0
    for i, row in enumerate(PROBE_ROWS):
        alone = hidden_of(dict(input_ids=ids[i:i + 1, :len(row)], attention_mask=mask[i:i + 1, :len(row)])).float()[0]
        difference = (alone - unpacked[i, :len(row)]).norm(dim=-1) / alone.norm(dim=-1).clamp_min(1e-6)
        worst = max(worst, float(difference.max()))
    return worst
