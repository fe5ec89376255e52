"""The Triton kernels: what is particular to them (agreement with the reference: test_backends.py).

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, which must be
set before triton is first imported by anything: tests/conftest.py is the safe place, since other
test modules import packages that import triton; if it comes too late, this module is skipped
with the reason). Shapes are chosen so
that V, d and N are not multiples of the interpreter's tile sizes (16 x 32 x 16) or row block (64).
The kernels have no ``tl.dot`` (whose bfloat16 the interpreter gets wrong), so bfloat16 runs there too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import loss_and_grads, make_inputs  # noqa: E402

from qadapter_kernels import backends, combine_logits, qadapter_loss  # noqa: E402
from qadapter_kernels.chunked import chunked_token_stats  # noqa: E402
from qadapter_kernels.registry import StatsOptions  # noqa: E402
from qadapter_kernels.steps import torch_row_step  # noqa: E402
from qadapter_kernels.triton import (  # noqa: E402
    backend_status,
    chunked_triton_token_stats,
    triton_row_step,
)
from qadapter_kernels.triton import combine_logits as triton_combine_logits  # noqa: E402

if not backend_status()[0]:
    pytest.skip(f"Triton backend unavailable: {backend_status()[1]}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_backend_is_registered_and_available():
    assert backends()["chunked-triton"].available


def _packed(seed=11, dtype=torch.float32, n=37, hidden=40, vocab=203):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, hidden, generator=g)
    hq = (base + 0.5 * torch.randn(n, hidden, generator=g)).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    q_weight = (weight + 0.1 * torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    q_bias = (0.3 * torch.randn(vocab, generator=g)).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    grads = torch.randn(2, n, generator=g)
    cast = lambda t: t.detach().to(dtype=dtype, device=DEVICE).requires_grad_(t.requires_grad)  # noqa: E731
    return [cast(t) for t in (base, hq, weight, q_weight, q_bias)] + [targets.to(DEVICE), grads.to(DEVICE)]


def _stats_and_grads(fn, base, hq, weight, q_weight, q_bias, targets, upstream, **options):
    """Token statistics and the gradients of ``upstream``; ``options``: StatsOptions' besides alpha~, alpha_0."""
    leaves = [t.detach().clone().requires_grad_() for t in (hq, q_weight, q_bias)]
    options = StatsOptions(alpha_tilde=0.7, alpha_0=0.2, **options)
    q_taken, value = fn(base, leaves[0], weight, leaves[1], leaves[2], targets, options)
    (q_taken * upstream[0] + value * upstream[1]).sum().backward()
    return [q_taken, value] + [t.grad for t in leaves]


def test_chunked_pipeline_with_triton_row_step():
    args = _packed(seed=13)
    want = _stats_and_grads(chunked_token_stats, *args, chunk_size=5)
    got = _stats_and_grads(chunked_triton_token_stats, *args, chunk_size=5)
    for w, g in zip(want, got):
        assert rel_err(g, w) <= 1e-5


def test_float64_is_refused_with_a_reason():
    x = make_inputs(seed=1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        qadapter_loss(**x, backend="chunked-triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 64, 203])
@pytest.mark.parametrize("p_dtype", ["same", torch.float32])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_row_step_matches_torch(dtype, vocab, p_dtype, softcap):
    """Against the eager step, a soft cap included (logits of scale 3 against a cap of 2.5: the cap
    bends most of them)."""
    g = torch.Generator().manual_seed(vocab)
    z = (3 * torch.randn(9, vocab, generator=g)).to(dtype).to(DEVICE)
    q = (3 * torch.randn(9, vocab, generator=g)).to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, (9,), generator=g).to(DEVICE)
    p_dtype = dtype if p_dtype == "same" else p_dtype
    want = torch_row_step(z.clone(), q.clone(), targets, 0.7, 0.3, p_dtype, softcap)
    q_buffer = q.clone()
    got = triton_row_step(z.clone(), q_buffer, targets, 0.7, 0.3, p_dtype, softcap)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # bfloat16: one rounding of p
    for w, g_ in zip(want, got):
        assert g_.dtype == w.dtype
        torch.testing.assert_close(g_, w, rtol=tol, atol=tol)
    # The policy reuses q's buffer when it can (the contract allows the step to overwrite it).
    assert (got[2].data_ptr() == q_buffer.data_ptr()) == (p_dtype == dtype)


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("vocab", [203, 2 * 1024 + 77])
def test_row_step_block_stats_match_torch(softcap, vocab):
    """The block statistics for gradient filtering (each 1,024 columns' sum of p, of the policy itself
    under a cap), written by the pass that writes p, against the eager step's."""
    g = torch.Generator().manual_seed(vocab)
    z, q = ((3 * torch.randn(6, vocab, generator=g)).to(DEVICE) for _ in range(2))
    targets = torch.randint(0, vocab, (6,), generator=g).to(DEVICE)
    blocks = -(-vocab // 1024)
    want_stats, got_stats = (torch.full((6, blocks), float("nan"), device=DEVICE) for _ in range(2))
    want = torch_row_step(z.clone(), q.clone(), targets, 0.7, 0.3, torch.float32, softcap, want_stats)
    got = triton_row_step(z.clone(), q.clone(), targets, 0.7, 0.3, torch.float32, softcap, got_stats)
    torch.testing.assert_close(got_stats, want_stats, rtol=1e-5, atol=1e-7)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [1e4, 1e8])
def test_a_large_soft_cap_keeps_the_logits_digits(softcap):
    """Under a cap far above the logits, ``cap * tanh(x / cap)`` is ``x`` to float32's precision: the
    tanh keeps a small argument's relative precision (a form through ``exp(2y) - 1`` kept only its
    absolute one, every logit off by about ``cap * 2**-24``)."""
    g = torch.Generator().manual_seed(7)
    z, q = ((3 * torch.randn(9, 203, generator=g)).to(DEVICE) for _ in range(2))
    targets = torch.randint(0, 203, (9,), generator=g).to(DEVICE)
    want = torch_row_step(z.double(), q.double(), targets, 0.7, 0.3, torch.float64, softcap)
    got = triton_row_step(z.clone(), q.clone(), targets, 0.7, 0.3, torch.float32, softcap)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_.double(), w, rtol=1e-6, atol=1e-6)


def test_row_step_strided_rows():
    z = torch.randn(5, 300, device=DEVICE)[:, :203]
    q = torch.randn(5, 300, device=DEVICE)[:, :203]
    targets = torch.tensor([0, 202, 7, 100, 64], device=DEVICE)
    want = torch_row_step(z.clone(), q.clone(), targets, 1.0, 0.01, torch.float32)
    got = triton_row_step(z, q, targets, 1.0, 0.01, torch.float32)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 203), (2, 2, 70), (1, 1)])
def test_triton_combine_matches_combine_logits(dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    z = (4 * torch.randn(shape, generator=g)).to(dtype).to(DEVICE)
    q = (4 * torch.randn(shape, generator=g)).to(dtype).to(DEVICE)
    got = triton_combine_logits(z, q, alpha_tilde=0.6, alpha_0=0.1)
    assert got.dtype == torch.float32 and got.shape == z.shape
    torch.testing.assert_close(got, combine_logits(z, q, alpha_tilde=0.6, alpha_0=0.1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q_values must have base_logits' shape"):
        triton_combine_logits(z, q[..., :-1])


def test_triton_combine_of_large_combined_logits_sums_to_one():
    """Combined logits of magnitude 3,000 (a small alpha~): each log-prob is taken from the row's
    maximum first, so the largest keep their digits and the policy sums to one."""
    g = torch.Generator().manual_seed(3)
    z, q = (30 + 4 * torch.randn(4, 203, generator=g)).to(DEVICE), (4 * torch.randn(4, 203, generator=g)).to(DEVICE)
    got = triton_combine_logits(z, q, alpha_tilde=0.01, alpha_0=1.0)
    want = torch.log_softmax((q.double() + z.double()) / 0.01, dim=-1)
    torch.testing.assert_close(got.exp().sum(-1).double(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.double().exp(), want.exp(), rtol=0, atol=1e-6)


def _drop_mask(rows: int, blocks: int, seed: int) -> torch.Tensor:
    """A random drop mask with the edge cases: a row that drops every block, one that keeps all but
    one, a block that every row drops, one that every row but the first keeps."""
    dropped = torch.rand(rows, blocks, generator=torch.Generator().manual_seed(seed)) < 0.5
    dropped[1], dropped[:, 2] = False, False
    dropped[0], dropped[:, 1] = True, True
    return dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=gpu)])  # the interpreter's bf16 tl.dot is wrong
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_kept_blocks_product_matches_the_masked_product(dtype, layout):
    """Gradient filtering's grouped product on a GPU: ``p @ w`` with each row's dropped blocks of
    ``FILTER_BLOCK`` columns left out, against the float64 product of the masked ``p``; a partial last
    block, ``d`` and the rows not multiples of the tiles, ``p`` as rows of a wider buffer."""
    from qadapter_kernels.steps import FILTER_BLOCK
    from qadapter_kernels.triton.kept_product import kept_blocks_product

    rows, width, d = 37, 3 * FILTER_BLOCK + 77, 40
    g = torch.Generator().manual_seed(3)
    p = torch.rand(rows, width + (13 if layout == "strided" else 0), generator=g)[:, :width]
    w = torch.randn(width, d, generator=g)
    dropped = _drop_mask(rows, 4, seed=4)
    p, w = p.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    got = kept_blocks_product(p, w, dropped.to(DEVICE))
    keep = (~dropped).repeat_interleave(FILTER_BLOCK, dim=1)[:, :width]
    want = (p.double().cpu() * keep) @ w.double().cpu()
    assert got.dtype == torch.float32 and got.shape == (rows, d)
    assert got[0].abs().max() == 0  # a row that drops everything gets nothing
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # half precision: the products are exact, the sums float32
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_kept_blocks_product_refuses_what_it_cannot_take():
    from qadapter_kernels.triton.kept_product import kept_blocks_product

    p, w = torch.rand(5, 2000, device=DEVICE), torch.rand(2000, 8, device=DEVICE)
    mask = torch.zeros(5, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"dropped must be a bool \[5, 2\] mask"):
        kept_blocks_product(p, w, mask[:, :1])
    with pytest.raises(ValueError, match=r"w must be \[2000, d\]"):
        kept_blocks_product(p, w.half(), mask)
    with pytest.raises(TypeError, match="float64"):
        kept_blocks_product(p.double(), w.double(), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kept_blocks_head_product_matches_the_masked_product(dtype):
    """A trainable head's filtered dWq on a GPU: ``out += g^T @ h`` with each row's dropped blocks of
    ``g`` left out, added to what ``out`` held, against float64; a partial last block, a block no row
    keeps, odd sizes, ``h`` in the model's dtype (the product float32: TF32 on a GPU's tensor cores
    for half-precision ``h``)."""
    from qadapter_kernels.steps import FILTER_BLOCK
    from qadapter_kernels.triton.kept_product import kept_blocks_head_product_

    rows, width, d = 37, 3 * FILTER_BLOCK + 77, 40
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(rows, width, generator=g)
    h = torch.randn(rows, d, generator=g).to(dtype)
    before = torch.randn(width, d, generator=g)
    dropped = _drop_mask(rows, 4, seed=6)
    out = before.clone().to(DEVICE)
    kept_blocks_head_product_(out, grad.to(DEVICE), h.to(DEVICE), dropped.to(DEVICE))
    keep = (~dropped).repeat_interleave(FILTER_BLOCK, dim=1)[:, :width]
    want = before.double() + (grad.double() * keep).T @ h.double()
    assert torch.equal(out[FILTER_BLOCK:2 * FILTER_BLOCK].cpu(), before[FILTER_BLOCK:2 * FILTER_BLOCK])  # nobody keeps it
    tol = 1e-5 if dtype == torch.float32 or not torch.cuda.is_available() else 2e-3  # TF32 on a GPU
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_filtered_gradients_on_gpu_take_the_kept_blocks_kernels(monkeypatch, dtype):
    """On a GPU the tile engine's filtered products are the Triton kernels (``p @ Wq`` and a trainable
    head's ``dWq``): the same gradients as the gathered GEMMs they replace there, and the kernels are
    what ran; with deterministic algorithms asked for, ``p @ Wq`` (atomics) takes the gathered GEMMs."""
    from qadapter_kernels import tiles
    from qadapter_kernels.grad_filter import grad_filter_report
    from qadapter_kernels.triton import kept_product

    g = torch.Generator().manual_seed(7)
    n, hidden, vocab = 96, 64, 5 * 1024 + 300
    tilt = -1.5 * torch.log1p(torch.arange(vocab, dtype=torch.float32))  # a peaked policy, as a model's
    weight = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    weight[:, 0] = tilt
    q_weight = weight + 0.1 * torch.randn(vocab, hidden, generator=g) / hidden**0.5
    base, hq = torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g)
    base[:, 0] = hq[:, 0] = 1.0
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    upstream = torch.randn(2, n, generator=g).to(DEVICE)
    base, hq, weight, q_weight = (t.to(dtype).to(DEVICE) for t in (base, hq, weight, q_weight))

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (hq, q_weight)]
        q_taken, value = chunked_triton_token_stats(base, leaves[0], weight, leaves[1], None, targets,
                                                    StatsOptions(grad_filter_eps=0.02))
        (q_taken * upstream[0] + value * upstream[1]).sum().backward()
        return [t.grad.double() for t in leaves]

    assert tiles._gpu_kernels() is kept_product
    calls = []
    counting = types.SimpleNamespace(
        kept_blocks_product=lambda *a: calls.append("p @ Wq") or kept_product.kept_blocks_product(*a),
        kept_blocks_head_product_=lambda *a: calls.append("dWq") or kept_product.kept_blocks_head_product_(*a))
    monkeypatch.setattr(tiles, "_gpu_kernels", lambda: counting)
    with grad_filter_report() as report:
        kernels = grads()
    assert {"p @ Wq", "dWq"} <= set(calls) and report.skipped_fraction > 0.3 and report.head_skipped_fraction > 0.3
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    calls.clear()
    grads()
    assert "p @ Wq" not in calls
    monkeypatch.setattr(tiles, "_gpu_kernels", lambda: None)
    gathered = grads()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(kernels, gathered):
        assert (got - want).norm() / want.norm() < tol


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles for GPUs on machines without one")
def test_kernels_compile_for_gpus():
    """The interpreter accepts code the compiler rejects: build real sm_86 and consumer-Blackwell
    sm_120 binaries (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "qadapter_kernels.toolchain.aot_check", "--mode", "smoke", "--arch", "86", "120"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # 4 row-step variants (cap, stats), the combine, the kept-blocks products (p @ Wq and dWq; 16-divisible
    # sizes or not); 2 archs
    assert run.stdout.count(" ok") == 18, run.stdout


def test_aot_check_covers_blackwell_and_the_soft_capped_row_step():
    """sm_100 and sm_120 have shared-memory limits, and the full check compiles the row step plain and
    soft-capped (Gemma-2), with and without block statistics, for every input dtype."""
    from qadapter_kernels.toolchain import aot_check

    assert aot_check.SMEM_LIMIT[100] == aot_check.SMEM_LIMIT[90] and aot_check.SMEM_LIMIT[120] == 99 * 1024
    assert {100, 120} <= set(aot_check.DEFAULT_ARCHS)
    variants = {(v.dtype, v.constexprs["SOFTCAP"], v.constexprs["STATS"]) for v in aot_check._variants("full")
                if v.name == "row_step"}
    assert variants == {(d, cap, stats) for d in ("bfloat16", "float16", "float32") for cap in (False, True)
                        for stats in (False, True)}


@pytest.mark.gpu
@gpu
def test_bfloat16_row_step_and_combine_on_gpu():
    z = torch.randn(33, 5003, device="cuda", dtype=torch.bfloat16) * 4
    q = torch.randn(33, 5003, device="cuda", dtype=torch.bfloat16) * 4
    targets = torch.randint(0, 5003, (33,), device="cuda")
    want = torch_row_step(z.clone(), q.clone(), targets, 1.0, 0.01, torch.bfloat16)
    got = triton_row_step(z.clone(), q.clone(), targets, 1.0, 0.01, torch.bfloat16)
    for w, g in zip(want, got):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(triton_combine_logits(z, q), combine_logits(z, q), rtol=1e-5, atol=1e-5)


def test_inf_bias_block():
    """A Q bias of -inf over the whole first vocabulary block (a banned-token range) gives the
    reference's loss and gradients, not NaN: the online logsumexp must not compute -inf - -inf."""
    from qadapter_kernels.triton import row_step

    block = row_step.MAX_BLOCK_V  # the row step's first block
    vocab = 2 * block + 37
    x = make_inputs(batch=4, seq=9, hidden=24, vocab=vocab, seed=17, q_bias=True, device=DEVICE)
    with torch.no_grad():
        x["q_bias"][:block] = float("-inf")
    scored = x["labels"] != -100
    x["labels"][scored] = block + x["labels"][scored] % (vocab - block)  # targets avoid the banned range
    ref, ref_grads = loss_and_grads(x, backend="reference")
    got, got_grads = loss_and_grads(x, backend="chunked-triton")
    assert torch.isfinite(got.loss)
    assert rel_err(got.loss, ref.loss) <= 1e-5
    for name, grad in ref_grads.items():
        assert torch.isfinite(got_grads[name]).all(), name
        assert rel_err(got_grads[name], grad) <= 1e-5, name


def test_float16_head_gradient_does_not_underflow():
    """dWq = sum_t g_v[t] p[t]^T h_q[t]: with a small upstream gradient, g_v * p sits far below
    float16's smallest subnormal. It must be scaled before the half-precision GEMM, not flushed."""
    base, hq, weight, q_weight, q_bias, targets, upstream = _packed(seed=18)
    upstream = torch.stack([torch.zeros_like(upstream[0]), 1e-5 * upstream[1]])
    want = _stats_and_grads(chunked_triton_token_stats, base, hq, weight, q_weight, q_bias, targets, upstream)
    half = [t.detach().half().requires_grad_(t.requires_grad) for t in (base, hq, weight, q_weight, q_bias)]
    got = _stats_and_grads(chunked_triton_token_stats, *half, targets, upstream)
    # Against the float32 result rounded once to float16 (the gradient's own dtype): flushing
    # g_v * p to zero gave 6e-2 here; scaled, what is left is float16 input rounding (< 1e-2).
    assert rel_err(got[3], want[3].half()) <= 2e-2
    assert rel_err(got[4], want[4].half()) <= 2e-2


def test_every_launch_is_guarded_on_the_tensors_device(monkeypatch):
    """Triton launches on the current device: each launch site enters launch_guard(its tensors)."""
    import contextlib
    import types

    from qadapter_kernels.triton import _common, decode, row_step

    seen = []

    def recording_guard(tensor):
        seen.append(tensor.device)
        return contextlib.nullcontext()

    for module in (decode, row_step):
        monkeypatch.setattr(module, "launch_guard", recording_guard)
    base, hq, weight, q_weight, q_bias, targets, upstream = _packed(seed=19)
    triton_row_step(base @ weight.T, hq.detach() @ weight.T, targets, 1.0, 0.01, torch.float32)
    triton_combine_logits(base @ weight.T, hq.detach() @ weight.T)
    assert len(seen) == 2 and all(d == hq.device for d in seen)

    class FakeCudaDevice:  # a CUDA device index without a GPU: what the guard would switch to
        def __init__(self, device):
            self.idx = torch.device(device).index

    assert isinstance(_common.launch_guard(torch.empty(0)), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    on_second_gpu = types.SimpleNamespace(device=torch.device("cuda", 1))  # all the guard reads
    assert _common.launch_guard(on_second_gpu).idx == 1


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_in_place_row_step_reads_the_target_before_writing_p(dtype):
    """p overwrites q in place; Q[t, a_t] must be the logit, never a probability written by another
    warp. Real vocabulary, thousands of rows, targets spread over the row (first and last block too)."""
    vocab, rows = 128256, 4096
    g = torch.Generator(device="cuda").manual_seed(23)
    z = torch.randn(rows, vocab, device="cuda", generator=g).to(dtype)
    q = (4 * torch.randn(rows, vocab, device="cuda", generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    targets[:64] = torch.arange(64, device="cuda")
    targets[64:128] = vocab - 1 - torch.arange(64, device="cuda")
    want = q.gather(1, targets[:, None]).squeeze(1).float()
    q_taken, value, p = triton_row_step(z, q, targets, 1.0, 0.01, dtype)
    assert p.data_ptr() == q.data_ptr()
    torch.testing.assert_close(q_taken, want, rtol=0, atol=0)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(p.float().sum(1), torch.ones(rows, device="cuda"), rtol=2e-2, atol=2e-2)


def test_auto_on_cuda_picks_the_measured_fastest():
    """On a CUDA device "auto" takes the chunked pipeline with the Triton row step (fastest in the
    H200 run, no compiled extension needed), and keeps float64 off the float32 kernels."""
    from qadapter_kernels import registry

    cuda = torch.device("cuda")
    assert registry.resolve("auto", cuda, torch.bfloat16).name == "chunked-triton"
    assert registry.resolve("auto", cuda, torch.float32).name == "chunked-triton"
    assert registry.resolve("auto", cuda, torch.float64).name in ("cuda", "chunked")
    assert registry.resolve("auto", torch.device("cpu"), torch.float32).name == "chunked"


def test_interpreter_numpy_guard():
    """triton < 3.7's interpreter breaks on numpy >= 2.4: reported with the fix, not as failures."""
    from qadapter_kernels.triton._common import interpreter_numpy_problem

    assert "numpy < 2.4" in interpreter_numpy_problem("3.6.0", "2.4.0")
    assert "numpy < 2.4" in interpreter_numpy_problem("3.5.1", "2.5.2")
    assert interpreter_numpy_problem("3.6.0", "2.3.5") == ""
    assert interpreter_numpy_problem("3.7.0", "2.4.6") == ""
    assert interpreter_numpy_problem("3.9.0", "2.5.0rc1") == ""
