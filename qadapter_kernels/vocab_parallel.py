"""A vocabulary-parallel head: each rank of a process group holds a contiguous range of the head's
rows (``weight``, and ``q_weight`` / ``q_bias`` where the Q head is separate), and the loss, its
token statistics and the combined policy come out exactly as one process holding the whole head
computes them (docs/design.md, "A vocabulary-parallel head").

Each rank runs the ordinary backend over its own rows; what crosses ranks is small. Every
log-sum-exp over the vocabulary is merged from the ranks' own, by one ``MAX`` and one ``SUM``
all-reduce of ``O(N)`` scalars; ``Q[t, a_t]`` comes from the rank that holds ``a_t`` (the others add
0) in the same ``SUM``. In the backward, each rank's backend gives its share of ``dL/dh_q``
(``g_a Wq[a_t]`` where it holds the target, ``g_v`` times its part of ``E_p[Wq]``), and the shares
are summed by one ``[N, d]`` all-reduce; a sharded Q head's gradient stays on its rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import check_integer
from .first_order import fused_backward
from .grad_filter import mass_budget
from .inputs import check_float_tensor
from .registry import Backend, StatsOptions
from .vocabulary import logit_stats


def vocab_shard(vocab: int, group: dist.ProcessGroup | None = None) -> slice:
    """The rows of a ``vocab``-row head this rank holds when the head is split over ``group`` (the
    default group for None) as ``torch.tensor_split`` splits it: ranks in order, the first
    ``vocab % world`` of them one row more. Its ``start`` is the ``vocab_start`` the loss takes."""
    vocab = check_integer("vocab", vocab, least=1, note=" (the whole head's rows)")
    _require_initialized("vocab_shard")
    check_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if vocab < world:
        raise ValueError(f"vocab={vocab} rows cannot give each of the group's {world} ranks one")
    size, extra = divmod(vocab, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


@dataclass(frozen=True)
class VocabLayout:
    """Where this rank's rows sit in the whole vocabulary, checked against every other rank's."""

    group: dist.ProcessGroup | None
    start: int  # the first vocabulary id this rank holds
    size: int  # how many it holds
    vocab: int  # the whole vocabulary, over all ranks


def check_group(group: object) -> None:
    """``group`` is a process group of an initialized ``torch.distributed`` (or None: not split)."""
    if group is None:
        return
    _require_initialized("group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (or None: the head is not split); "
                        f"got {type(group).__name__}")


def _require_initialized(who: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who} needs torch.distributed initialized: call torch.distributed.init_process_group "
                           f"first")


def vocab_layout(group: dist.ProcessGroup | None, vocab_start: object, weight: torch.Tensor) -> VocabLayout | None:
    """The layout of a head split over ``group`` (None where it is not), from each rank's
    ``vocab_start`` and its rows of ``weight``: one all-gather of two integers per rank. The ranks'
    ranges must tile ``[0, V)`` without gap or overlap, which also catches a rank handed the whole
    head, or a start that does not go with its shard."""
    check_group(group)
    if group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is given without group: a head that is not split starts at 0")
        return None
    check_float_tensor("weight", weight)
    first = check_integer("vocab_start", vocab_start, least=0,
                          note=" with group (the first vocabulary id of this rank's rows of weight; "
                               "vocab_shard(V, group).start for torch.tensor_split's split)")
    rows = weight.shape[0] if weight.dim() == 2 else 0
    world = dist.get_world_size(group)
    mine = torch.tensor([first, rows], dtype=torch.int64, device=weight.device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    every = torch.stack(gathered).tolist()
    empty = [rank for rank, (_, size) in enumerate(every) if size == 0]
    if empty:  # raised on every rank, where the rank's own check would leave the others waiting
        raise ValueError(f"weight must be [V_r, d] with V_r >= 1 rows on every rank of group; on ranks {empty} "
                         f"it is not")
    ranges = sorted((start, start + size, rank) for rank, (start, size) in enumerate(every))
    end = 0
    for start, stop, rank in ranges:
        if start != end:
            what = "overlaps" if start < end else "leaves a gap after"
            raise ValueError(f"vocab_start: the ranks' rows of weight must tile the vocabulary, but rank {rank}'s "
                             f"[{start}, {stop}) {what} [0, {end}) (every rank's (vocab_start, rows): {every})")
        end = stop
    return VocabLayout(group, first, rows, end)


def local_head(weight, q_weight, q_bias, group, vocab_start):
    """``(weight, q_weight, q_bias, group, vocab_start)`` with a head given as DTensors sharded on
    their rows (``Shard(0)`` over a 1-D mesh, as ``ColwiseParallel`` lays out an lm_head) turned into
    this rank's rows, the mesh's group and their offset (DTensor splits as ``torch.chunk`` does); a
    head of plain tensors unchanged. ``to_local`` is differentiable: a sharded Q head's gradient
    lands on its DTensor."""
    if not dist.is_available():  # no DTensor either
        return weight, q_weight, q_bias, group, vocab_start
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    named = (("weight", weight), ("q_weight", q_weight), ("q_bias", q_bias))
    if not isinstance(weight, DTensor):
        for name, t in named[1:]:
            if isinstance(t, DTensor):
                raise TypeError(f"{name} is a DTensor but weight is not: give the whole head as DTensors sharded "
                                f"alike, or as this rank's rows with group and vocab_start")
        return weight, q_weight, q_bias, group, vocab_start
    if group is not None or vocab_start is not None:
        raise ValueError("group and vocab_start come from weight's layout when weight is a DTensor: give neither")
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(f"weight: a DTensor head must be sharded on its rows over a 1-D mesh, placements "
                         f"(Shard(0),); got {placements} over a {mesh.ndim}-D mesh")
    for name, t in named[1:]:
        if t is not None and not (isinstance(t, DTensor) and t.device_mesh == mesh and tuple(t.placements) == placements):
            raise TypeError(f"{name} must be a DTensor sharded as weight is (placements (Shard(0),) on its mesh)")
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    local = (None if t is None else t.to_local() for _, t in named)
    return (*local, mesh.get_group(), offset[0])


def split_head(weight, q_weight, q_bias, group, vocab_start):
    """``(weight, q_weight, q_bias, layout)``: this rank's rows of the head (a DTensor head's local
    rows) and where they sit (:func:`vocab_layout`; None: the head is whole)."""
    weight, q_weight, q_bias, group, vocab_start = local_head(weight, q_weight, q_bias, group, vocab_start)
    check_outside_transforms(group)
    return weight, q_weight, q_bias, vocab_layout(group, vocab_start, weight)


def check_outside_transforms(group: dist.ProcessGroup | None) -> None:
    """A split head (``group``) is refused under torch.func's transforms by name, not by the
    transforms' own error about an autograd Function."""
    if group is not None and not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError("a vocabulary-parallel head (group=) merges the ranks' statistics in autograd Functions "
                           "around collectives, which torch.func's transforms (grad, vmap, ...) cannot run, whatever "
                           "the backend; take its gradients with torch.autograd")


class _SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group: each rank's backend gives
    its vocabulary range's share of ``dL/dh_q``, and ``h_q`` itself is the same on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    @fused_backward
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_across_ranks(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _SumGradAcrossRanks.apply(x, group) if x.requires_grad else x


def merge_logsumexp(parts: torch.Tensor, group: dist.ProcessGroup,
                    summed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-sum-exps over the whole vocabulary from each rank's ``parts`` (any shape): the
    ranks' maximum (one ``MAX`` all-reduce), then their sums relative to it (one ``SUM``). A value
    of -inf everywhere stays -inf, +inf anywhere gives NaN, as one process's max-shifted form does.
    ``summed``: another tensor to sum over the ranks in the same ``SUM`` all-reduce."""
    top = parts.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(top == -float("inf"), 0.0, top)
    sums = (parts - shift).exp().reshape(-1)
    if summed is not None:
        sums = torch.cat((sums, summed.reshape(-1)))
    dist.all_reduce(sums, group=group)
    lse = shift + sums[: parts.numel()].view_as(parts).log()
    return lse, None if summed is None else sums[parts.numel():].view_as(summed)


class _MergedTokenStats(torch.autograd.Function):
    """``(Q[t, a_t], V_t)`` over the whole vocabulary from this rank's statistics over its rows.

    ``value`` is the backend's ``alpha~ lse_c - alpha_0 lse_z`` over the rank's rows, ``lse_z``
    its base log-sum-exp (no gradient), so ``lse_c = (value + alpha_0 lse_z) / alpha~``. The
    backward is local: ``dV / d value_r = exp(lse_c_r - lse_c)`` (the rank's share of ``p``), and
    ``Q[t, a_t]``'s gradient goes to the rank that holds ``a_t``.
    """

    @staticmethod
    def forward(ctx, q_taken, value, lse_z, owned, alpha_tilde, alpha_0, group):
        lse_c = (value + alpha_0 * lse_z) / alpha_tilde
        parts = torch.stack((lse_c, lse_z)) if alpha_0 else lse_c.unsqueeze(0)
        merged, taken = merge_logsumexp(parts, group, summed=torch.where(owned, q_taken, 0.0))
        whole_c = merged[0]
        weight = torch.where(whole_c == -float("inf"), 0.0, (lse_c - whole_c).exp())
        ctx.save_for_backward(owned, weight)
        merged_value = alpha_tilde * whole_c - (alpha_0 * merged[1] if alpha_0 else 0.0)
        return taken, merged_value

    @staticmethod
    @fused_backward
    def backward(ctx, grad_q_taken, grad_value):
        owned, weight = ctx.saved_tensors
        return torch.where(owned, grad_q_taken, 0.0), grad_value * weight, None, None, None, None, None


def sharded_token_stats(impl: Backend, base, hq, weight, q_weight, q_bias, targets, options: StatsOptions,
                        layout: VocabLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``token_stats`` contract over a head split as ``layout`` says: ``impl`` over this rank's
    rows (targets it does not hold read row 0 and are masked out), this rank's base log-sum-exp
    (one gradient-free pass over its rows, only where ``alpha_0`` weighs it), then the merge."""
    local, owned = _local_targets(targets, layout)
    # Each rank may leave out its share of a token's budget: its p (against its own log-sum-exp) are
    # upper bounds of the whole vocabulary's, so the ranks' dropped masses add up to at most the budget.
    budget = mass_budget(options.grad_filter_eps, hq.dtype) * layout.size / layout.vocab
    options = dataclasses.replace(options, grad_filter_eps=budget)
    q_taken, value = impl.token_stats(base, sum_grad_across_ranks(hq, layout.group), weight, q_weight, q_bias,
                                      local, options)
    lse_z = (logit_stats(base, weight, logit_softcap=options.logit_softcap, chunk_size=options.chunk_size)[0]
             if options.alpha_0 else torch.zeros_like(value))
    return _MergedTokenStats.apply(q_taken, value, lse_z, owned, options.alpha_tilde, options.alpha_0, layout.group)


def sharded_token_logprobs(hidden, weight, targets, layout: VocabLayout, logit_softcap, chunk_size) -> torch.Tensor:
    """``log_softmax(logits)[target]`` ``[N]`` of one model whose head is split as ``layout`` says
    (gradient-free): the rank's log-sum-exp and held target logits, merged."""
    local, owned = _local_targets(targets, layout)
    lse, taken = logit_stats(hidden, weight, local, owned, logit_softcap=logit_softcap, chunk_size=chunk_size)
    merged, taken = merge_logsumexp(lse.unsqueeze(0), layout.group, summed=taken)
    return taken - merged[0]


def _local_targets(targets: torch.Tensor, layout: VocabLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's row in this rank's shard (0 where the rank does not hold it), and whether it does."""
    local = targets - layout.start
    owned = (local >= 0) & (local < layout.size)
    return torch.where(owned, local, 0), owned


class _ShardedLogSoftmax(torch.autograd.Function):
    """``log_softmax`` over the last dimension of a tensor whose last dimension is split over the
    group: each rank gets its own columns. Backward: ``g - p * sum(g)``, the row sums of ``g`` summed
    over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        lse, _ = merge_logsumexp(torch.logsumexp(x, dim=-1), group)
        out = x - lse.unsqueeze(-1)
        ctx.save_for_backward(out)
        ctx.group = group
        return out

    @staticmethod
    @fused_backward
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        total = grad.sum(dim=-1, keepdim=True)
        dist.all_reduce(total, group=ctx.group)
        return grad - out.exp() * total, None


def log_softmax(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``torch.log_softmax(x, -1)``; with ``group``, of the whole row whose columns the ranks split."""
    return torch.log_softmax(x, dim=-1) if group is None else _ShardedLogSoftmax.apply(x, group)


def agreed_chunk(chunk: int, group: dist.ProcessGroup, device: torch.device) -> int:
    """The smallest of the ranks' chunk sizes: chunked passes with a collective per chunk must take
    the same number of chunks on every rank, whose shards may differ in size."""
    value = torch.tensor([chunk], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return int(value.item())
