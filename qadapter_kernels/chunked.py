"""Memory-bounded Q-Adapter token statistics: per chunk of tokens, two GEMMs, one row step, P @ Wq.

For the scored tokens only (packed to ``[N, d]``), each chunk computes the base logits ``z``
and the Q-values with matmuls, then the *row step* turns them into the per-token values the loss
needs (``Q[t, a_t]`` and the soft value ``V_t``) and the combined policy ``p_t``; finally
``E_p[Wq] = p @ Wq`` is stored (``[N, d]``). With it, the backward for ``q_hidden`` is
elementwise (docs/design.md, "The gradient in closed form"): no logits are kept or recomputed. Only a trainable
``q_weight`` / ``q_bias`` needs a second chunked pass. Peak extra memory: ``O(chunk * V + N * d)``.

The row step is pluggable: the eager PyTorch one below runs everywhere; the Triton and CUDA
backends pass fused single-pass versions of the same contract.
"""

from __future__ import annotations

from typing import Callable

import torch

from .registry import Backend
from .inputs import stats_dtype

# row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype) -> (q_taken, value, p)
#   z, q:     [C, V] base logits and Q-values as produced by the GEMMs; the step may overwrite them.
#   targets:  [C] int64 token ids (the scored tokens' labels).
#   q_taken:  [C] Q[t, a_t];  value: [C] alpha~ * lse((Q + alpha_0 * log_softmax(z)) / alpha~);
#             both in float32 (float64 for float64 inputs).
#   p:        [C, V] softmax((Q + alpha_0 * z) / alpha~) in p_dtype (may alias z or q).
RowStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float, torch.dtype], tuple]

DEFAULT_CPU_BUDGET = 128 * 2**20
DEFAULT_CUDA_BUDGET = 1 * 2**30


def _logsumexp_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row log-sum-exp that overwrites ``x`` with ``exp(x - max)`` (no temporary ``[C, V]`` buffer)."""
    row_max = x.amax(dim=1, keepdim=True)
    exps = x.sub_(row_max).exp_()
    sums = exps.sum(dim=1, keepdim=True)
    return (row_max + sums.log()).squeeze(1), sums


def torch_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype):
    """Eager row step: reuses the GEMM buffers in place, no ``[C, V]`` temporaries beyond them."""
    sd = stats_dtype(q.dtype)
    q, z = q.to(sd), z.to(sd)
    q_taken = q.gather(1, targets.unsqueeze(1)).squeeze(1)
    combined = q.add_(z, alpha=alpha_0)  # alpha_0 * lse(z) cancels inside the softmax
    if alpha_tilde != 1.0:
        combined.div_(alpha_tilde)
    lse_c, sums = _logsumexp_(combined)
    p = combined.div_(sums)
    lse_z, _ = _logsumexp_(z)
    value = alpha_tilde * lse_c - alpha_0 * lse_z
    return q_taken, value, p.to(p_dtype)


def default_row_step(device: torch.device) -> RowStep:
    """The compiled single-sweep step (``_cpu.py``) for CPU tensors when it builds, else the eager one."""
    if device.type == "cpu":
        from . import _cpu  # imported late: _cpu imports this module

        if _cpu.status()[0]:
            return _cpu.cpu_row_step
    return torch_row_step


def auto_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, budget: int | None = None) -> int:
    """Largest chunk whose ``[chunk, V]`` buffers (GEMM outputs, fp32 copies, P) fit the budget."""
    if budget is None:
        budget = DEFAULT_CUDA_BUDGET if device.type == "cuda" else DEFAULT_CPU_BUDGET
    esize = torch.finfo(dtype).bits // 8
    stats = torch.finfo(stats_dtype(dtype)).bits // 8
    per_row = vocab * (3 * esize + (2 * stats if stats != esize else 0))
    return max(1, min(n_tokens, budget // per_row))


def _chunks(n: int, chunk: int):
    """``(start, end)`` of at most ``chunk`` rows each, sizes within one row of each other: no short
    last chunk, whose GEMMs would run far below the others' speed."""
    count = -(-n // chunk)
    size, extra = divmod(n, max(count, 1))
    start = 0
    for i in range(count):
        end = start + size + (i < extra)
        yield start, end
        start = end


class ChunkLogits:
    """The base logits ``z`` and Q-values ``q`` of one chunk, written into one buffer reused by every chunk.

    A fresh ``[chunk, V]`` GEMM output per chunk would cost its allocation (page faults on a CPU)
    every time; the row step may overwrite the buffer, as the ``RowStep`` contract allows. A shared
    head (``q_weight`` is ``weight``, no bias: adapters below the lm_head) takes one GEMM over the
    stacked ``[base; hq]`` rows, which runs closer to peak than two half-height ones.

    With ``softcap`` s both are capped in place, ``s * tanh(logits / s)`` (in float32 at least), and
    with ``derivative`` the chunk's ``dQ_capped / dQ = 1 - tanh^2`` is kept in :attr:`derivative`:
    the gradients' factor, read after the row step has overwritten ``q``.
    """

    def __init__(self, base, hq, weight, q_weight, q_bias, chunk: int, softcap: float | None = None,
                 derivative: bool = False):
        self.base, self.hq, self.weight, self.q_weight, self.q_bias = base, hq, weight, q_weight, q_bias
        rows = max(1, min(chunk, hq.shape[0]))
        self.shared = q_bias is None and _same_tensor(weight, q_weight)
        self.out = torch.empty(2 * rows, weight.shape[0], dtype=hq.dtype, device=hq.device)
        self.stacked = torch.empty(2 * rows, hq.shape[1], dtype=hq.dtype, device=hq.device) if self.shared else None
        self.softcap = softcap
        self.derivative = (torch.empty(rows, weight.shape[0], dtype=stats_dtype(hq.dtype), device=hq.device)
                           if softcap is not None and derivative else None)

    def __call__(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = e - s
        z, q = self.out[:n], self.out[n : 2 * n]
        if self.shared:
            torch.cat((self.base[s:e], self.hq[s:e]), out=self.stacked[: 2 * n])
            torch.mm(self.stacked[: 2 * n], self.weight.T, out=self.out[: 2 * n])
        else:
            torch.mm(self.base[s:e], self.weight.T, out=z)
            torch.mm(self.hq[s:e], self.q_weight.T, out=q)
            if self.q_bias is not None:
                q.add_(self.q_bias)
        if self.softcap is not None:
            self._cap(z, None)
            self._cap(q, None if self.derivative is None else self.derivative[:n])
        return z, q

    def _cap(self, x: torch.Tensor, derivative: torch.Tensor | None) -> None:
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        tanh = wide.div_(self.softcap).tanh_()
        if derivative is not None:
            torch.mul(tanh, tanh, out=derivative).neg_().add_(1)
        if wide is x:
            x.mul_(self.softcap)
        else:
            x.copy_(tanh.mul_(self.softcap))


def softcap_slope(capped: torch.Tensor, softcap: float) -> torch.Tensor:
    """``d capped / d raw = 1 - tanh^2 = 1 - (capped / softcap)^2`` of soft-capped logits."""
    return 1 - (capped / softcap).square()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` view the same memory the same way (``detach()`` makes a new object)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def matmul_to(out_dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for operands of one dtype, its result in ``out_dtype`` (float32 statistics).

    On CUDA, float16/bfloat16 products go straight from the tensor cores' float32 accumulator to
    a float32 result (``out_dtype``), with no rounding to half precision on the way; the CPU has
    no such kernel and rounds the product once.
    """
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and out_dtype == torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(out_dtype)


def _head_weight_grad(d_logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d_logits^T @ h`` in ``d_logits``' float32, with the GEMM in ``h``'s dtype (tensor cores).

    ``d_logits = g_v * p (+ g_a at the targets)`` is mostly far below float16's smallest
    subnormal (6e-8 at real vocabulary sizes): for float16 it is divided by its largest magnitude
    before the cast and the product multiplied back in float32, so nothing is flushed to zero.
    """
    if h.dtype != torch.float16:
        return matmul_to(d_logits.dtype, d_logits.to(h.dtype).T, h)
    scale = d_logits.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return matmul_to(d_logits.dtype, (d_logits / scale).to(h.dtype).T, h).mul_(scale)


class ChunkedTokenStats(torch.autograd.Function):
    """``(q_taken, value)`` for packed scored tokens, with the elementwise ``q_hidden`` backward."""

    @staticmethod
    def forward(ctx, base, hq, weight, q_weight, q_bias, targets, chunk, row_step, cfg):
        alpha_tilde, alpha_0, softcap = cfg
        n = hq.shape[0]
        sd = stats_dtype(hq.dtype)
        q_taken = torch.empty(n, dtype=sd, device=hq.device)
        value = torch.empty(n, dtype=sd, device=hq.device)
        want_hq_grad = ctx.needs_input_grad[1]
        expected_w = torch.empty(n, hq.shape[1], dtype=sd, device=hq.device) if want_hq_grad else None
        with torch.no_grad():
            logits = ChunkLogits(base, hq, weight, q_weight, q_bias, chunk, softcap, derivative=want_hq_grad)
            for s, e in _chunks(n, chunk):
                z, q = logits(s, e)
                q_taken[s:e], value[s:e], p = row_step(z, q, targets[s:e], alpha_tilde, alpha_0, q_weight.dtype)
                del z, q
                if want_hq_grad:
                    if logits.derivative is not None:  # E_p[(1 - tanh^2) Wq]: still one GEMM
                        p.mul_(logits.derivative[: e - s])
                    expected_w[s:e] = matmul_to(sd, p, q_weight)
        # base and weight are only needed again to recompute p for a trainable Q head.
        head = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.save_for_backward(base if head else None, hq, weight if head else None, q_weight, q_bias, targets, expected_w,
                              q_taken if softcap is not None else None)
        ctx.chunk, ctx.row_step, ctx.cfg = chunk, row_step, cfg
        return q_taken, value

    @staticmethod
    def backward(ctx, grad_q_taken, grad_value):
        base, hq, weight, q_weight, q_bias, targets, expected_w, capped_q_taken = ctx.saved_tensors
        sd = grad_q_taken.dtype
        softcap = ctx.cfg[2]
        if softcap is not None:  # Q[a] = s * tanh(raw / s): d/d raw = 1 - (Q[a] / s)^2
            grad_q_taken = grad_q_taken * softcap_slope(capped_q_taken, softcap)
        grad_hq = grad_qw = grad_qb = None
        if ctx.needs_input_grad[1]:
            # dL/dh_q[t] = g_qa[t] * Wq[a_t] + g_v[t] * E_p[Wq]   (d V / d Q = p; capped: both times 1 - tanh^2)
            grad_hq = torch.addcmul(
                grad_value.unsqueeze(1) * expected_w, grad_q_taken.unsqueeze(1), q_weight[targets].to(sd)
            ).to(hq.dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_qw, grad_qb = _head_grads(ctx, base, hq, weight, q_weight, q_bias, targets, grad_q_taken, grad_value)
        return None, grad_hq, None, grad_qw, grad_qb, None, None, None, None


def _head_grads(ctx, base, hq, weight, q_weight, q_bias, targets, grad_q_taken, grad_value):
    """Second chunked pass: dL/dQ = g_qa * onehot(a) + g_v * p (times 1 - tanh^2 under a soft cap;
    ``grad_q_taken`` has its factor already), summed over tokens into Wq and bq."""
    alpha_tilde, alpha_0, softcap = ctx.cfg
    sd = grad_q_taken.dtype
    want_w, want_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    grad_qw = torch.zeros(q_weight.shape, dtype=sd, device=q_weight.device) if want_w else None
    grad_qb = torch.zeros(q_weight.shape[0], dtype=sd, device=q_weight.device) if want_b else None
    with torch.no_grad():
        logits = ChunkLogits(base, hq, weight, q_weight, q_bias, ctx.chunk, softcap, derivative=True)
        for s, e in _chunks(hq.shape[0], ctx.chunk):
            z, q = logits(s, e)
            _, _, p = ctx.row_step(z, q, targets[s:e], alpha_tilde, alpha_0, sd)
            del z, q
            d_logits = p.mul_(grad_value[s:e].unsqueeze(1))
            if logits.derivative is not None:
                d_logits.mul_(logits.derivative[: e - s])
            rows = torch.arange(e - s, device=p.device)
            d_logits.index_put_((rows, targets[s:e]), grad_q_taken[s:e], accumulate=True)
            if want_w:
                grad_qw.add_(_head_weight_grad(d_logits, hq[s:e]))
            if want_b:
                grad_qb.add_(d_logits.sum(dim=0))
    return (
        grad_qw.to(q_weight.dtype) if want_w else None,
        grad_qb.to(q_bias.dtype) if want_b else None,
    )


def chunked_token_stats(
    base: torch.Tensor,
    hq: torch.Tensor,
    weight: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    alpha_tilde: float,
    alpha_0: float,
    chunk_size: int | None = None,
    row_step: RowStep | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``Q[t, a_t]`` and ``V_t`` for packed tokens ``[N, d]``; differentiable in hq, q_weight, q_bias.

    ``base``/``hq``: ``[N, d]``; ``weight``/``q_weight``: ``[V, d]``; ``q_bias``: ``[V]`` or None;
    ``targets``: ``[N]`` int64 in ``[0, V)``. Returns two ``[N]`` tensors in :func:`stats_dtype`.
    ``row_step=None``: :func:`default_row_step` for ``hq``'s device. ``softcap`` s: both heads'
    logits are ``s * tanh(logits / s)`` (Gemma-2); the row step is unchanged, the gradients gain
    the factor ``1 - tanh^2`` (one more ``[chunk, V]`` buffer).
    """
    row_step = row_step or default_row_step(hq.device)
    chunk = chunk_size or auto_chunk_size(hq.shape[0], weight.shape[0], hq.dtype, hq.device)
    return ChunkedTokenStats.apply(
        base.detach(), hq, weight.detach(), q_weight, q_bias, targets, chunk, row_step, (alpha_tilde, alpha_0, softcap)
    )


BACKEND = Backend(
    name="chunked",
    summary="per token chunk: 2 GEMMs, the row step (compiled C on CPU), P @ Wq; elementwise backward",
    token_stats=chunked_token_stats,
    availability=lambda: (True, ""),
)
