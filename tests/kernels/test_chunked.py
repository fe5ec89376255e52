"""What is particular to the chunked pipeline (its agreement with the reference is in test_backends.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_and_grads, make_inputs

from qadapter_kernels import chunked, sizing, steps, tiles
from qadapter_kernels.reference import reference_token_stats
from qadapter_kernels.registry import StatsOptions
from qadapter_kernels.sizing import auto_chunk_size
from qadapter_kernels.tiles import ChunkLogits, chunks


def test_auto_chunk_size_respects_budget():
    assert auto_chunk_size(10_000, 1000, torch.float32, torch.device("cpu"), budget=12_000 * 50) == 50
    assert auto_chunk_size(10, 1000, torch.float32, torch.device("cpu"), budget=2**40) == 10
    assert auto_chunk_size(10, 10**9, torch.bfloat16, torch.device("cpu"), budget=1) == 1


def test_auto_chunk_size_counts_the_copies_only_a_widening_step_makes():
    """The eager step (or a soft cap) holds z, q, their two float32 copies and P; a fused GPU step
    z, q and at most a float32 P: at a Llama-3.1-8B head in bfloat16, 1,046 rows fit 1 GiB, not 597."""
    cuda, vocab, gib = torch.device("cuda"), 128256, 2**30
    assert auto_chunk_size(10**6, vocab, torch.bfloat16, cuda) == gib // (vocab * (3 * 2 + 2 * 4)) == 597
    assert auto_chunk_size(10**6, vocab, torch.bfloat16, cuda, widened=False) == gib // (vocab * (2 * 2 + 4)) == 1046
    # float32 tiles are never copied: both counts are z, q and P.
    for widened in (True, False):
        assert auto_chunk_size(10**6, vocab, torch.float32, cuda, widened=widened) == gib // (vocab * 12)
    assert auto_chunk_size(10**6, 1000, torch.float16, torch.device("cpu"), budget=8000 * 7, widened=False) == 7


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_fused_row_steps_take_the_unwidened_chunk_capped_or_not(monkeypatch, softcap):
    """chunked_token_stats with a fused row step sizes its chunks for a step without copies: the
    fused steps cap as they read (steps.RowStep), so a soft cap adds none."""
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return 3

    monkeypatch.setattr(chunked, "auto_chunk_size", spy)
    x = torch.randn(5, 4)
    w = torch.randn(7, 4)
    chunked.chunked_token_stats(x, x, w, w, None, torch.zeros(5, dtype=torch.long),
                                StatsOptions(alpha_tilde=1.0, alpha_0=0.1, logit_softcap=softcap), row_step=steps.torch_row_step)
    assert seen == {"widened": False}


@pytest.mark.parametrize("step", ["row", "block"])
def test_eager_steps_cap_as_the_contract_says(step):
    """Under a soft cap s the eager steps (the executable spec of steps.RowStep / BlockStep) give the
    capped logits' statistics and p times the slope on Q, 1 - (Q / s)^2, written out in float64;
    the block statistics are of the policy itself."""
    g = torch.Generator().manual_seed(8)
    z, q = (4 * torch.randn(5, 2 * steps.FILTER_BLOCK + 30, generator=g) for _ in range(2))
    targets = torch.randint(0, q.shape[1], (5,), generator=g)
    s, alpha_tilde, alpha_0 = 3.0, 0.8, 0.2
    zc, qc = s * torch.tanh(z.double() / s), s * torch.tanh(q.double() / s)
    c = (qc + alpha_0 * zc) / alpha_tilde
    policy = torch.softmax(c, dim=1)
    if step == "row":
        q_taken, value, p = steps.torch_row_step(z.clone(), q.clone(), targets, alpha_tilde, alpha_0, torch.float32, s)
        torch.testing.assert_close(q_taken.double(), qc.gather(1, targets[:, None])[:, 0], rtol=1e-6, atol=1e-6)
        want = alpha_tilde * torch.logsumexp(c, 1) - alpha_0 * torch.logsumexp(zc, 1)
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-5)
    else:
        stats = torch.empty(5, 3)
        lse_c, lse_z, p = steps.torch_block_step(z.clone(), q.clone(), alpha_tilde, alpha_0, torch.float32, stats, s)
        torch.testing.assert_close(lse_c.double(), torch.logsumexp(c, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse_z.double(), torch.logsumexp(zc, 1), rtol=1e-5, atol=1e-5)
        blocks = torch.nn.functional.pad(policy, (0, 3 * steps.FILTER_BLOCK - policy.shape[1])).view(5, 3, -1)
        torch.testing.assert_close(stats.double(), blocks.sum(2), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.double(), policy * (1 - (qc / s) ** 2), rtol=1e-5, atol=1e-8)


def test_matmul_to_takes_the_float32_result_gemm_only_where_torch_has_it(monkeypatch):
    """torch.mm(out_dtype=) exists from torch 2.8 (pyproject allows 2.4): below it, and on a CPU,
    the product is taken in the operands' dtype and converted."""
    from types import SimpleNamespace

    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    assert tiles.MM_OUT_DTYPE == (version >= (2, 8))
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    monkeypatch.setattr(tiles, "MM_OUT_DTYPE", True)
    assert tiles._float32_result_mm(cuda_bf16, torch.float32)
    assert not tiles._float32_result_mm(cuda_bf16, torch.bfloat16)
    assert not tiles._float32_result_mm(SimpleNamespace(is_cuda=False, dtype=torch.bfloat16), torch.float32)
    assert not tiles._float32_result_mm(SimpleNamespace(is_cuda=True, dtype=torch.float32), torch.float32)
    monkeypatch.setattr(tiles, "MM_OUT_DTYPE", False)
    assert not tiles._float32_result_mm(cuda_bf16, torch.float32)
    a, b = torch.randn(3, 5, dtype=torch.bfloat16), torch.randn(5, 2, dtype=torch.bfloat16)
    got = tiles.matmul_to(torch.float32, a, b)
    assert got.dtype == torch.float32 and torch.equal(got, (a @ b).float())


def test_chunks_are_even_and_cover_every_row():
    for n, chunk in [(1024, 227), (10, 3), (7, 7), (7, 100), (1, 1)]:
        spans = list(chunks(n, chunk))
        sizes = [e - s for s, e in spans]
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and sum(sizes) == n
        assert all(0 < k <= chunk for k in sizes) and max(sizes) - min(sizes) <= 1
    assert list(chunks(0, 5)) == []
    assert [e - s for s, e in chunks(1024, 227)] == [205, 205, 205, 205, 204]
    assert [e - s for s, e in chunks(10, 3)] == [3, 3, 2, 2]


def test_chunk_logits_stack_a_shared_head_and_agree_with_two_gemms():
    g = torch.Generator().manual_seed(3)
    base, hq = torch.randn(2, 11, 8, generator=g)
    weight = torch.randn(13, 8, generator=g)
    separate = ChunkLogits(base, hq, weight, weight.clone(), None, chunk=4)
    shared = ChunkLogits(base, hq, weight.detach(), weight.detach(), None, chunk=4)
    assert shared.shared and not separate.shared
    for s, e in chunks(11, 4):
        for got in (shared(s, e), separate(s, e)):  # each call overwrites the last chunk's buffer
            torch.testing.assert_close(got[0], base[s:e] @ weight.T)
            torch.testing.assert_close(got[1], hq[s:e] @ weight.T)
    bias = torch.randn(13, generator=g)
    with_bias = ChunkLogits(base, hq, weight, weight, bias, chunk=4)
    assert not with_bias.shared
    torch.testing.assert_close(with_bias(4, 8)[1], hq[4:8] @ weight.T + bias)


@pytest.fixture
def vocab_tiles(monkeypatch):
    """Sets the CPU tile width the chunked backend takes (``auto_tiles``), far below the vocabulary."""

    def use(columns: int) -> None:
        monkeypatch.setattr(sizing, "cpu_tile_columns", lambda *args, **options: columns)

    return use


@pytest.mark.parametrize("columns", [1, 7, 50, 202])
@pytest.mark.parametrize("options", [
    dict(alpha_tilde=0.8, alpha_0=0.05),
    dict(alpha_tilde=1.3, alpha_0=0.0, value_at="next"),
    dict(alpha_tilde=0.8, alpha_0=0.4, logit_softcap=0.7),
], ids=["plain", "alpha0=0,next", "softcap"])
@pytest.mark.parametrize("head", ["shared", "q_weight+bias"])
def test_vocabulary_tiles_merge_to_the_reference(vocab_tiles, columns, options, head):
    """Tiles narrower than the vocabulary (203 = 29 x 7, one short tile when 50 or 202 wide) merge
    their log-sum-exps and rescale E_p[Wq] online: loss and every gradient as the reference's."""
    vocab_tiles(columns)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        x = make_inputs(batch=6, seq=11, hidden=40, vocab=203, dtype=dtype, seed=columns,
                        q_head=head != "shared", q_bias=head != "shared")
        ref, ref_grads = loss_and_grads(x, backend="reference", **options)
        got, got_grads = loss_and_grads(x, backend="chunked", chunk_size=5, **options)
        assert _rel_err(got.loss, ref.loss) <= tol
        for name, grad in ref_grads.items():
            assert got_grads[name].dtype == grad.dtype and _rel_err(got_grads[name], grad) <= tol, name


def test_vocabulary_tiles_keep_masked_entries_at_zero(vocab_tiles):
    """Logits of -inf (a masked vocabulary range, whole tiles of it) get p = 0 and finite statistics."""
    vocab_tiles(8)
    g = torch.Generator().manual_seed(9)
    base, hq = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64)
    bias = torch.zeros(40, dtype=torch.float64)
    bias[:20] = -float("inf")  # the first tiles of every row are all -inf in Q
    targets = torch.randint(20, 40, (6,), generator=g)
    hq.requires_grad_()
    got = chunked.chunked_token_stats(base, hq, weight, weight, bias, targets, StatsOptions(alpha_tilde=0.9, alpha_0=0.2))
    q = hq @ weight.T + bias
    c = (q + 0.2 * torch.log_softmax(base @ weight.T, -1)) / 0.9
    torch.testing.assert_close(got[0], q.gather(1, targets[:, None])[:, 0])
    torch.testing.assert_close(got[1], 0.9 * torch.logsumexp(c, -1))
    (grad,) = torch.autograd.grad(got[1].sum(), hq)
    torch.testing.assert_close(grad, torch.softmax(c, -1).nan_to_num(0.0) @ weight)


def test_cpu_tiles_fill_the_cache():
    rows, columns = sizing.auto_tiles(4096, 49152, torch.float32, torch.device("cpu"))
    assert rows == sizing.CPU_TILE_ROWS
    assert sizing.cpu_tile_columns(1024, 49152, torch.float32, 32 * 2**20) == 4096
    assert sizing.cpu_tile_columns(1024, 49152, torch.bfloat16, 32 * 2**20) == 8192
    assert sizing.cpu_tile_columns(1024, 49152, torch.bfloat16, 32 * 2**20, widened=True) == 2730  # fp32 copies
    assert sizing.cpu_tile_columns(1024, 49152, torch.float32, 32 * 2**20, widened=True) == 4096  # none made
    assert sizing.cpu_tile_columns(1024, 1000, torch.float32, 2**40) == 1000  # never wider than V
    assert sizing.cpu_tile_columns(4096, 49152, torch.float32, 2**20) == 256  # nor too thin to vectorise
    assert sizing.auto_tiles(100, 49152, torch.float32, torch.device("cpu"))[0] == 100
    assert sizing.auto_tiles(100, 49152, torch.float32, torch.device("cuda")) == (100, 49152)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_a_fused_row_step_over_whole_rows_gives_the_reference_statistics():
    """A row step passed as ``row_step`` (the GPU backends' way in, here the eager one) serves as one
    whole-row tile (``whole_row_block_step``): its value comes back unchanged at any temperature,
    and ``q_hidden``'s gradient is the reference's."""
    g = torch.Generator().manual_seed(23)
    base, hq = torch.randn(2, 9, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(31, 12, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 31, (9,), generator=g)
    options = StatsOptions(alpha_tilde=0.6, alpha_0=0.3, chunk_size=4)
    got_hq, ref_hq = hq.clone().requires_grad_(), hq.clone().requires_grad_()
    got = chunked.chunked_token_stats(base, got_hq, weight, weight, None, targets, options, row_step=steps.torch_row_step)
    ref = reference_token_stats(base, ref_hq, weight, weight, None, targets, options)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(2, 9, generator=g, dtype=torch.float64)
    (got_grad,) = torch.autograd.grad((got[0] * upstream[0] + got[1] * upstream[1]).sum(), got_hq)
    (ref_grad,) = torch.autograd.grad((ref[0] * upstream[0] + ref[1] * upstream[1]).sum(), ref_hq)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_float16_head_gradient_keeps_products_below_the_smallest_subnormal():
    """``dWq = d_logits^T h`` for float16: ``d_logits`` far below float16's smallest subnormal (6e-8,
    as a real vocabulary's ``g_v p`` is) still gives its float32 product (scaled before the cast)."""
    g = torch.Generator().manual_seed(29)
    d_logits = torch.randn(64, 40, generator=g) * 1e-9  # float32, every entry below float16's range
    h = torch.randn(64, 8, generator=g).to(torch.float16)
    got = tiles._head_weight_grad(d_logits, h)
    want = d_logits.double().T @ h.double()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("width", [2 * steps.FILTER_BLOCK, 2 * steps.FILTER_BLOCK + 1, 7])
def test_eager_block_stats_sum_each_block_whole_or_short(width):
    """``block_stats_`` fills one sum per FILTER_BLOCK columns, a short last block included, and
    nothing past the last block when the width is a whole number of blocks (as 4,096-column CPU tiles are)."""
    p = torch.rand(3, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    blocks = -(-width // steps.FILTER_BLOCK)
    stats = steps.block_stats_(p, torch.empty(3, blocks, dtype=torch.float64))
    want = torch.stack([p[:, b * steps.FILTER_BLOCK:(b + 1) * steps.FILTER_BLOCK].sum(1) for b in range(blocks)], 1)
    torch.testing.assert_close(stats, want, rtol=1e-12, atol=0.0)
