"""What the project's backends are measured against, each written here from its published algorithm.

* :func:`eager_authors_loss` -- the Q-Adapter loss the way the method's public code computes it:
  full fp32 logits of the adapter and of the base model at every ``[B, T, V]`` position,
  ``log_softmax``, ``logsumexp``, ``gather`` and masks, autograd through all of it. Several
  ``[B, T, V]`` tensors are alive at once; this is the cost the package exists to remove.
* :func:`compiled_reference_loss` -- ``torch.compile`` of the project's reference (the best an
  off-the-shelf compiler does with the eager formulation).
* :func:`chunked_pairs_loss` -- the chunking pattern of Liger-Kernel's preference losses applied
  to the Q-Adapter loss: chunks of whole pairs, each chunk's loss and gradient at once with
  ``torch.func.grad_and_value``, the gradients accumulated in the forward and handed back by a
  custom autograd Function. Memory is bounded by one *pair* of full sequences times ``V``,
  not by a token chunk.
* peers, which compute *different* losses and are shown only for scale:
  :func:`liger_dpo_loss` (Liger-Kernel's fused-linear DPO with a reference model: the closest
  published fused preference loss, also two heads per token) and :func:`cce_loss`
  (Cut Cross-Entropy: one head, plain next-token cross-entropy).

All return what :func:`qadapter_kernels.qadapter_loss` returns, except the peers (a scalar).
"""

from __future__ import annotations

import importlib.util
from functools import partial

import torch
import torch.nn.functional as F

from qadapter_kernels import LossConfig, QAdapterLossOutput
from qadapter_kernels.config import check_integer
from qadapter_kernels.inputs import stats_dtype
from qadapter_kernels.pairwise import loss_output
from qadapter_kernels.reference import qadapter_loss_reference


def _authors_token_rewards(base_hidden, q_hidden, wq, q_bias, weight, labels, config: LossConfig):
    """Per-token rewards ``[b, T-1]`` (zero where unscored) and the scored mask, over full logits."""
    ct = stats_dtype(q_hidden.dtype)  # the authors upcast with .float(); float64 stays float64 here
    # The frozen model's logits, as its lm_head produces them, then upcast: two [b, T, V] tensors,
    # then log_softmax makes a third. No gradient reaches the base side.
    base_logits = (base_hidden.detach() @ weight.detach().T).to(ct)
    base_logps = base_logits.log_softmax(dim=-1)
    q_values = F.linear(q_hidden, wq, q_bias).to(ct)  # the adapter model's logits are the Q-values
    values = config.alpha_tilde * torch.logsumexp(
        (q_values + config.alpha_0 * base_logps) / config.alpha_tilde, dim=-1
    )
    targets = labels[:, 1:]
    mask = targets != config.ignore_index
    q_taken = torch.gather(q_values[:, :-1], 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if config.value_at == "current":
        soft_value = values[:, :-1]
    else:  # the paper's V_{t+1}, only where t+1 is scored itself
        soft_value = values[:, 1:] * F.pad(mask[:, 1:], (0, 1), value=False)
    return (q_taken - config.gamma * soft_value) * mask, mask


def _pair_terms(rewards, mask, config: LossConfig, n_pairs, n_scored):
    """BT and chi2 of the given rows (chosen half first), normalized by *batch* totals.

    Dividing by the batch's pair and scored-token counts rather than the rows' own makes the terms
    of disjoint row sets add up to the batch loss, which is what pair chunking needs.
    """
    sums = rewards.sum(dim=-1)
    if config.reward_norm == "padded":
        seq_rewards = sums / rewards.shape[-1]
    elif config.reward_norm == "mean":
        seq_rewards = sums / mask.sum(dim=-1).clamp(min=1)
    else:
        seq_rewards = sums
    half = rewards.shape[0] // 2
    chosen, rejected = seq_rewards[:half], seq_rewards[half:]
    bt = -F.logsigmoid(chosen - rejected).sum() / n_pairs
    chi2 = config.beta * rewards.square().sum() / n_scored
    return bt, chi2, chosen, rejected


def eager_authors_loss(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    config: LossConfig | None = None,
    **options,
) -> QAdapterLossOutput:
    """The Q-Adapter loss as the method's public code computes it: every ``[B, T, V]`` logit in fp32.

    Same signature and result as ``qadapter_loss`` (without ``backend``/``chunk_size``).
    """
    config = LossConfig.from_options(config, **options)
    wq = weight.detach() if q_weight is None else q_weight
    rewards, mask = _authors_token_rewards(base_hidden, q_hidden, wq, q_bias, weight, labels, config)
    bt, chi2, chosen, rejected = _pair_terms(rewards, mask, config, rewards.shape[0] // 2, mask.sum())
    return loss_output(bt + chi2, bt, chi2, chosen, rejected)


_COMPILED_REFERENCE: dict[LossConfig, object] = {}


def compiled_reference_loss(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    **options,
) -> QAdapterLossOutput:
    """``torch.compile`` of the project's reference loss (compiled once per option set).

    The first call compiles (and raises if the compiler cannot run on this device).
    """
    config = LossConfig.from_options(**options)
    fn = _COMPILED_REFERENCE.get(config)
    if fn is None:
        fn = _COMPILED_REFERENCE[config] = torch.compile(partial(qadapter_loss_reference, config=config))
    return fn(base_hidden, q_hidden, weight, labels, q_weight, q_bias)


def _chunk_loss(q_hidden, wq, q_bias, base_hidden, weight, labels, n_pairs, n_scored, *, config):
    """One chunk of whole pairs: its share of the batch loss, with the pieces the output reports."""
    rewards, mask = _authors_token_rewards(base_hidden, q_hidden, wq, q_bias, weight, labels, config)
    bt, chi2, chosen, rejected = _pair_terms(rewards, mask, config, n_pairs, n_scored)
    return bt + chi2, (bt, chi2, chosen, rejected)


_CHUNK_FNS: dict[tuple, object] = {}


def _chunk_fn(config: LossConfig, argnums: tuple[int, ...], compiled: bool):
    """``grad_and_value`` of :func:`_chunk_loss` for the trainable arguments, compiled on request."""
    key = (config, argnums, compiled)
    fn = _CHUNK_FNS.get(key)
    if fn is None:
        fn = torch.func.grad_and_value(partial(_chunk_loss, config=config), argnums=argnums, has_aux=True)
        if compiled:
            fn = torch.compile(fn)
        _CHUNK_FNS[key] = fn
    return fn


class _ChunkedPairs(torch.autograd.Function):
    """Runs every chunk's forward and backward inside ``forward``; ``backward`` only scales the result."""

    @staticmethod
    def forward(ctx, q_hidden, q_weight, q_bias, base_hidden, weight, labels, config, chunk_pairs, compiled):
        wq = weight if q_weight is None else q_weight
        trainable = (q_hidden, q_weight, q_bias)
        argnums = tuple(i for i in range(3) if ctx.needs_input_grad[i])
        grads = [torch.zeros_like(trainable[i]) for i in argnums]
        half = q_hidden.shape[0] // 2
        n_scored = (labels[:, 1:] != config.ignore_index).sum()
        loss = bt = chi2 = torch.zeros((), dtype=stats_dtype(q_hidden.dtype), device=q_hidden.device)
        chosen, rejected = [], []
        for s in range(0, half, chunk_pairs):
            e = min(half, s + chunk_pairs)
            rows = lambda t: torch.cat([t[s:e], t[half + s : half + e]])  # noqa: E731 -- chosen, then rejected
            args = (rows(q_hidden), wq, q_bias, rows(base_hidden), weight, rows(labels), half, n_scored)
            if argnums:
                chunk_grads, (value, aux) = _chunk_fn(config, argnums, compiled)(*args)
            else:
                chunk_grads, (value, aux) = (), partial(_chunk_loss, config=config)(*args)
            for acc, i, g in zip(grads, argnums, chunk_grads):
                if i == 0:  # q_hidden: scatter the chunk's rows back
                    acc[s:e], acc[half + s : half + e] = g[: e - s], g[e - s :]
                else:  # the Q head: summed over tokens
                    acc.add_(g)
            loss, bt, chi2 = loss + value, bt + aux[0], chi2 + aux[1]
            chosen.append(aux[2])
            rejected.append(aux[3])
        ctx.argnums = argnums
        ctx.save_for_backward(*grads)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        ctx.mark_non_differentiable(bt, chi2, chosen, rejected)
        return loss, bt, chi2, chosen, rejected

    @staticmethod
    def backward(ctx, grad_loss, *_):
        out = [None] * 9
        for i, g in zip(ctx.argnums, ctx.saved_tensors):
            out[i] = g * grad_loss.to(g.dtype)
        return tuple(out)


def chunked_pairs_loss(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    chunk_pairs: int = 1,
    compiled: bool = False,
    **options,
) -> QAdapterLossOutput:
    """Liger-style pair-chunked Q-Adapter loss (``chunk_pairs`` pairs per chunk; 1 is Liger's default).

    Each chunk's rewards need its rows' full ``[T, V]`` logits, so the peak is set by
    ``2 * chunk_pairs * T * V``: fine for short sequences, large for long ones.
    """
    config = LossConfig.from_options(**options)
    chunk_pairs = check_integer("chunk_pairs", chunk_pairs, least=1)
    if q_hidden.dim() != 3 or q_hidden.shape[0] % 2:
        raise ValueError(f"q_hidden must be [B, T, d] with B even; got shape {tuple(q_hidden.shape)}")
    loss, bt, chi2, chosen, rejected = _ChunkedPairs.apply(
        q_hidden, q_weight, q_bias, base_hidden.detach(), weight.detach(), labels, config, chunk_pairs, compiled
    )
    return loss_output(loss, bt, chi2, chosen, rejected)


def peer_status(module: str, package: str) -> tuple[bool, str]:
    """Whether an optional peer library is importable here and, if not, how to get it."""
    if importlib.util.find_spec(module) is None:
        return False, f"{package} is not installed (pip install {package})"
    return True, ""


def liger_dpo_loss(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    compiled: bool = True,
) -> torch.Tensor:
    """Peer: DPO with the frozen model as reference, by Liger-Kernel's ``LigerFusedLinearDPOLoss``.

    Not the Q-Adapter loss: it needs only the log-probability of the taken tokens (one logsumexp
    per head, no coupled soft value), and it always computes the lm_head gradient too. Inputs
    are shifted here (Liger scores position t with target t).
    """
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(ignore_index=ignore_index, beta=beta, use_ref_model=True, compiled=compiled)
    targets = labels[:, 1:].contiguous()
    return loss_fn(
        weight, q_hidden[:, :-1].contiguous(), targets,
        ref_input=base_hidden[:, :-1].contiguous(), ref_weight=weight,
    )[0]


def cce_loss(q_hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Peer: Cut Cross-Entropy's ``linear_cross_entropy`` (one head, next-token cross-entropy).

    Its Triton kernel on CUDA; elsewhere its ``torch_compile`` implementation.
    """
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if q_hidden.is_cuda else "torch_compile"
    return linear_cross_entropy(q_hidden, weight, labels, ignore_index=ignore_index, shift=True, impl=impl)
