"""The compiled CPU row step (qadapter_kernels/_cpu.py, csrc/cpu_row_step.c) against the eager one."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import loss_and_grads, make_inputs

from qadapter_kernels import _cpu, sizing
from qadapter_kernels.chunked import chunked_token_stats
from qadapter_kernels.registry import StatsOptions
from qadapter_kernels.steps import FILTER_BLOCK, torch_block_step, torch_row_step

needs_cc = pytest.mark.skipif(not _cpu.status()[0], reason=f"compiled CPU row step: {_cpu.status()[1]}")
TOL = {torch.float64: dict(rtol=0, atol=0), torch.float32: dict(rtol=1e-6, atol=1e-6),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-3)}
# The float32 value from bfloat16 inputs: their exp polynomial errs by up to 2.7e-6, so each
# log-sum-exp by as much (a single-element row shows the worst case); the inputs' own rounding is ~1e-2.
VALUE_TOL = TOL | {torch.bfloat16: dict(rtol=1e-6, atol=4e-6)}


def _logits(rows, vocab, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z, q = (scale * torch.randn(rows, vocab, generator=g) + 0.5 for _ in range(2))
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[0], targets[-1] = 0, vocab - 1  # first and last column
    return z.to(dtype), q.to(dtype), targets


def _check(z, q, targets, p_dtype, alpha_tilde=0.7, alpha_0=0.3):
    want = torch_row_step(z.clone(), q.clone(), targets, alpha_tilde, alpha_0, p_dtype)
    q_buffer = q.clone()
    got = _cpu.cpu_row_step(z.clone(), q_buffer, targets, alpha_tilde, alpha_0, p_dtype)
    assert (got[2].data_ptr() == q_buffer.data_ptr()) == (p_dtype == q.dtype)  # p aliases q when it can
    assert torch.equal(got[0], want[0])  # Q[t, a_t], read before p overwrites q
    for g_, w in zip(got[1:], want[1:]):
        assert g_.dtype == w.dtype and g_.shape == w.shape
        assert not g_.isnan().any()
    torch.testing.assert_close(got[1], want[1], **VALUE_TOL[z.dtype])
    torch.testing.assert_close(got[2], want[2], **TOL[p_dtype])
    return got


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 511, 4099, 49157])
@pytest.mark.parametrize("p_out", ["in_place", "float32"])
def test_matches_eager(dtype, vocab, p_out):
    z, q, targets = _logits(5, vocab, dtype, seed=vocab)
    _check(z, q, targets, dtype if p_out == "in_place" else torch.float32)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_entries_at_minus_inf(dtype):
    """Whole blocks of -inf (the first one, a middle one) and scattered -inf never give NaN."""
    z, q, targets = _logits(4, 4099, dtype, seed=1)
    q[0, :1024] = float("-inf")  # the whole first block of c
    z[1, 1024:2048] = float("-inf")
    q[2, ::3] = float("-inf")
    z[3, 5:4000] = float("-inf")
    targets[:] = 4098
    q_taken, value, p = _check(z, q, targets, dtype, alpha_0=0.01)
    assert torch.isfinite(value).all() and (p[0, :1024] == 0).all()


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_alpha_0_zero_with_short_tails(dtype):
    """alpha_0 = 0 makes 0 * -inf = NaN in the padding lanes of a short last block: they stay out."""
    for vocab in (17, 1024 + 19, 2048 + 31):
        z, q, targets = _logits(3, vocab, dtype, seed=vocab)
        q[1, ::5] = float("-inf")
        for p_dtype in (dtype, torch.float32):
            _check(z, q, targets, p_dtype, alpha_0=0.0)


@needs_cc
def test_many_rows_parallel_and_float64_fallback():
    z, q, targets = _logits(301, 2053, torch.float32, seed=2, scale=1.0)
    _check(z, q, targets, torch.float32, alpha_tilde=1.0, alpha_0=0.01)
    _check(z.double(), q.double(), targets, torch.float64)  # float64 keeps float64 statistics (eager)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_accuracy_against_float64(dtype):
    """Both steps err by ~|c - max| float32 roundings; the C step is no worse than the eager one,
    bfloat16 inputs (a shorter exp polynomial) included. p in bfloat16 is within its rounding."""
    z, q, targets = _logits(16, 49157, dtype, seed=3)
    exact = torch_row_step(z.double(), q.double(), targets, 0.7, 0.3, torch.float64)
    for step in (torch_row_step, _cpu.cpu_row_step):
        for p_dtype, p_rtol in ((torch.float32, 1e-5), (dtype, 1e-5 if dtype == torch.float32 else 2 ** -8)):
            _, value, p = step(z.clone(), q.clone(), targets, 0.7, 0.3, p_dtype)
            torch.testing.assert_close(value.double(), exact[1], rtol=1e-6, atol=0)
            torch.testing.assert_close(p.double(), exact[2], rtol=p_rtol, atol=1e-12)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_step_matches_eager(dtype):
    """A vocabulary tile's log-sum-exps and own softmax; a row all -inf in the tile gives lse -inf, p 0."""
    z, q, _ = _logits(6, 1100, dtype, seed=11)
    q[0] = float("-inf")
    z[1, :600] = float("-inf")
    for p_dtype in (dtype, torch.float32):
        want = torch_block_step(z.clone(), q.clone(), 0.7, 0.3, p_dtype)
        q_buffer = q.clone()
        got = _cpu.cpu_block_step(z.clone(), q_buffer, 0.7, 0.3, p_dtype)
        assert (got[2].data_ptr() == q_buffer.data_ptr()) == (p_dtype == dtype)
        assert got[0][0] == -float("inf") and (got[2][0] == 0).all()
        for g_, w, tol in zip(got, want, (VALUE_TOL[dtype], VALUE_TOL[dtype], TOL[p_dtype])):
            assert g_.dtype == w.dtype and g_.shape == w.shape
            torch.testing.assert_close(g_, w, **tol)


SOFTCAP = 2.5  # on logits of scale 3 (_logits): the cap bends most of them, its slope is far from 1
# p of a capped step: TOL's atol for bfloat16 is above every p of a wide row, so there p's own
# rounding (a bfloat16 ulp is 2^-8 to 2^-7 of it) and the eager slope's absolute error (1 - tanh^2
# near |tanh| = 1 keeps about 1e-7 of it) bound the difference.
CAP_TOL = TOL | {torch.bfloat16: dict(rtol=2**-7, atol=1e-7)}


def _capped_logits(rows, vocab, dtype, seed):
    """Raw logits with the edge cases: whole blocks of -inf (capped to -s, so no longer masked: in q
    the slope, 0 there, still gives p = 0, in z not), a NaN entry (its row's statistics and p are
    NaN in every step)."""
    z, q, targets = _logits(rows, vocab, dtype, seed)
    q[0, :FILTER_BLOCK] = float("-inf")
    z[1, 3] = float("nan")
    z[2, -FILTER_BLOCK:] = float("-inf")
    return z, q, targets


def _assert_the_cap_bends(q, p, p_uncapped):
    """The inputs exercise the cap and its slope: a step that left out either (p_uncapped, or p
    divided by the slope) would be outside the tolerance the capped tests allow."""
    slope = 1 - torch.tanh(q.float() / SOFTCAP) ** 2
    assert slope[slope.isfinite()].median() < 0.7
    kept = p.isfinite() & (slope > 0.1)
    p, tol = p.float()[kept], CAP_TOL[p.dtype]
    assert not torch.allclose(p_uncapped.float()[kept], p, **tol)
    assert not torch.allclose(p / slope[kept], p, **tol)


def _check_capped(z, q, targets, p_dtype, alpha_tilde=0.7, alpha_0=0.3):
    want = torch_row_step(z.clone(), q.clone(), targets, alpha_tilde, alpha_0, p_dtype, softcap=SOFTCAP)
    q_buffer = q.clone()
    got = _cpu.cpu_row_step(z.clone(), q_buffer, targets, alpha_tilde, alpha_0, p_dtype, softcap=SOFTCAP)
    assert (got[2].data_ptr() == q_buffer.data_ptr()) == (p_dtype == q.dtype)
    for g_, w in zip(got, want):
        assert g_.dtype == w.dtype and g_.shape == w.shape
        assert torch.equal(g_.isnan(), w.isnan())
    torch.testing.assert_close(got[0], want[0], rtol=2e-7, atol=0)  # tanhf and torch's tanh, each within an ulp
    torch.testing.assert_close(got[1], want[1], **VALUE_TOL[z.dtype], equal_nan=True)
    torch.testing.assert_close(got[2], want[2], **CAP_TOL[p_dtype], equal_nan=True)
    return got


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [7, 4099])
@pytest.mark.parametrize("p_out", ["in_place", "float32"])
def test_soft_cap_matches_eager(dtype, vocab, p_out):
    """Under a soft cap the C step caps z, q and the target's Q as it reads them and writes p times
    the slope on Q, as the eager step does: -inf capped to -s, a NaN row NaN."""
    z, q, targets = _capped_logits(5, vocab, dtype, seed=vocab)
    p_dtype = dtype if p_out == "in_place" else torch.float32
    _, value, p = _check_capped(z, q, targets, p_dtype)
    assert value[1].isnan() and value[[0, 2, 3, 4]].isfinite().all()
    assert (p[0, :FILTER_BLOCK] == 0).all() and (p[2, -FILTER_BLOCK:] > 0).all()
    _assert_the_cap_bends(q, p, torch_row_step(z.clone(), q.clone(), targets, 0.7, 0.3, p_dtype)[2])


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_cap_block_step_matches_eager(dtype):
    """The capped block step: the tile's log-sum-exps of the capped logits, p times the slope, and
    block statistics of the policy itself (not weighted by the slope), over an odd width of four
    blocks, the last one partial."""
    width = 3 * FILTER_BLOCK + 77
    z, q, _ = _capped_logits(6, width, dtype, seed=12)
    for p_dtype in (dtype, torch.float32):
        got_stats, want_stats = (torch.full((6, 4), -1.0) for _ in range(2))
        want = torch_block_step(z.clone(), q.clone(), 0.7, 0.3, p_dtype, want_stats, softcap=SOFTCAP)
        q_buffer = q.clone()
        got = _cpu.cpu_block_step(z.clone(), q_buffer, 0.7, 0.3, p_dtype, got_stats, softcap=SOFTCAP)
        assert (got[2].data_ptr() == q_buffer.data_ptr()) == (p_dtype == dtype)
        for g_, w, tol in zip(got, want, (VALUE_TOL[dtype], VALUE_TOL[dtype], CAP_TOL[p_dtype])):
            assert g_.dtype == w.dtype and g_.shape == w.shape and torch.equal(g_.isnan(), w.isnan())
            torch.testing.assert_close(g_, w, **tol, equal_nan=True)
        torch.testing.assert_close(got_stats, want_stats, rtol=1e-5, atol=1e-9, equal_nan=True)
        assert got_stats[1].isnan().all() and got_stats[[0, 2, 3, 4, 5]].isfinite().all()
        assert (got[2][0, :FILTER_BLOCK] == 0).all() and got_stats[0, 0] > 1e-3  # the policy's mass at q = -s
        # The sums of p over the blocks are the policy's (1 per row), which p itself is not.
        torch.testing.assert_close(got_stats[[0, 2, 3, 4, 5]].sum(1), torch.ones(5), rtol=1e-5, atol=0)
        assert (got[2][[0, 2, 3, 4, 5]].float().sum(1) < 0.9).all()
        uncapped = torch_block_step(z.clone(), q.clone(), 0.7, 0.3, p_dtype)[2]
        _assert_the_cap_bends(q, got[2], uncapped)


@needs_cc
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=str)
def test_soft_capped_chunked_loss_takes_the_compiled_step(monkeypatch, dtype, tol):
    """qadapter_loss(backend="chunked", logit_softcap=s) with the compiled step (never the eager
    one): loss and every gradient as the reference's, over a vocabulary of several blocks."""
    monkeypatch.setattr(_cpu, "torch_block_step", lambda *a, **k: pytest.fail("took the eager step"))
    monkeypatch.setattr(_cpu, "torch_row_step", lambda *a, **k: pytest.fail("took the eager step"))
    x = make_inputs(batch=4, seq=9, hidden=32, vocab=2 * FILTER_BLOCK + 301, dtype=dtype, seed=6,
                    q_head=True, q_bias=True, scale=3.0)
    options = dict(alpha_tilde=0.8, alpha_0=0.2, logit_softcap=SOFTCAP)
    ref, ref_grads = loss_and_grads(x, backend="reference", **options)
    got, got_grads = loss_and_grads(x, backend="chunked", **options)
    uncapped, _ = loss_and_grads(x, backend="reference", alpha_tilde=0.8, alpha_0=0.2)

    def rel_err(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    assert rel_err(uncapped.loss, ref.loss) > 10 * tol  # the cap changes the loss
    assert rel_err(got.loss, ref.loss) <= tol
    for name, grad in ref_grads.items():
        assert got_grads[name].dtype == grad.dtype and rel_err(got_grads[name], grad) <= tol, name


@needs_cc
def test_chunked_uses_it_by_default_on_cpu():
    assert sizing.default_block_step(torch.device("cpu")) is _cpu.cpu_block_step
    assert sizing.default_block_step(torch.device("cuda")) is torch_block_step


def _stats(x, row_step):
    scored = x["labels"][:, 1:] != -100
    base, hq = x["base_hidden"][:, :-1][scored], x["q_hidden"][:, :-1][scored]
    targets = x["labels"][:, 1:][scored]
    out = chunked_token_stats(base, hq, x["weight"], x["weight"], None, targets,
                              StatsOptions(alpha_tilde=0.8, alpha_0=0.1, chunk_size=4), row_step=row_step)
    return torch.stack(out)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(_cpu.ENV_SWITCH, "0")
    assert _cpu.status() == (False, "switched off (QADAPTER_CPU_KERNELS=0)")
    assert sizing.default_block_step(torch.device("cpu")) is torch_block_step
    x = make_inputs(seed=4, vocab=97)
    torch.testing.assert_close(_stats(x, None), _stats(x, torch_row_step), rtol=1e-6, atol=1e-6)


def test_the_backend_report_says_when_the_eager_step_runs(monkeypatch):
    from qadapter_kernels import backends

    monkeypatch.setenv(_cpu.ENV_SWITCH, "0")
    chunked = backends()["chunked"]
    assert chunked.available and chunked.reason == ""  # it runs: the note says how
    assert chunked.note == "on CPU the eager row step runs: the compiled one is unavailable (switched off " \
                           "(QADAPTER_CPU_KERNELS=0))"


def test_a_compiler_failing_without_a_word_is_reported_by_its_status(monkeypatch, tmp_path):
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or pytest.skip("no false command"))
    _cpu._load.cache_clear()
    try:
        available, reason = _cpu.status()
        assert not available and reason.startswith("building csrc/cpu_row_step.c failed: ")
        assert "false exited with status 1" in reason
    finally:
        _cpu._load.cache_clear()


def test_no_compiler_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path))  # an empty cache: it would have to build
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    _cpu._load.cache_clear()
    try:
        available, reason = _cpu.status()
        assert not available and "no C compiler" in reason
        x = make_inputs(seed=5, vocab=97)
        torch.testing.assert_close(_stats(x, None), _stats(x, torch_row_step), rtol=1e-6, atol=1e-6)
        z, q, targets = _logits(3, 50, torch.float32, seed=5)
        got = _cpu.cpu_row_step(z.clone(), q.clone(), targets, 1.0, 0.01, torch.float32)
        for g_, w in zip(got, torch_row_step(z.clone(), q.clone(), targets, 1.0, 0.01, torch.float32)):
            assert torch.equal(g_, w)
    finally:
        _cpu._load.cache_clear()


@needs_cc
def test_a_cache_that_cannot_be_written_is_the_reason_once(monkeypatch, tmp_path):
    """A read-only home or cache (here a file where the folder would be): the eager step runs, and the
    reason says which folder and what to set, not one failed build per set of flags."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "file"))
    _cpu._load.cache_clear()
    try:
        available, reason = _cpu.status()
        assert not available and reason.startswith(f"the cache folder {tmp_path / 'file' / 'cpu'} cannot be written")
        assert reason.endswith(": set QADAPTER_CACHE to a writable folder") and reason.count("cache folder") == 1
    finally:
        _cpu._load.cache_clear()


@needs_cc
def test_build_is_cached(monkeypatch, tmp_path):
    """The first load builds into the cache; a second (a new process) loads it without building."""
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path))
    _cpu._load.cache_clear()
    try:
        assert _cpu.status() == (True, "")
        built = sorted((tmp_path / "cpu").glob("*.so"))  # the cache's folder for C builds
        assert len(built) == 1 and not list((tmp_path / "cpu").glob("tmp*"))  # built aside, then renamed
        mtime = os.stat(built[0]).st_mtime_ns
        _cpu._load.cache_clear()
        monkeypatch.setattr(_cpu.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached library"))
        assert _cpu.status() == (True, "")
        assert sorted((tmp_path / "cpu").glob("*.so")) == built and os.stat(built[0]).st_mtime_ns == mtime
    finally:
        _cpu._load.cache_clear()


@needs_cc
@pytest.mark.skipif(not any(line.startswith("flags") and " avx512f" in line for line in open("/proc/cpuinfo")),
                    reason="the CPU has no AVX-512: the native build is already the portable one")
def test_portable_build_matches_eager(monkeypatch, tmp_path):
    """Without AVX-512 the C step's plain loops (auto-vectorised vexp and vtanh) run: the same
    contract, capped or not."""
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu, "FLAG_SETS", (("-march=native", "-mno-avx512f", "-fopenmp"),))
    _cpu._load.cache_clear()
    try:
        assert _cpu.status() == (True, "")
        for dtype in (torch.float32, torch.bfloat16):
            for vocab in (7, 4099):
                z, q, targets = _logits(5, vocab, dtype, seed=vocab)
                _check(z, q, targets, dtype)
                _check(z, q, targets, torch.float32)
            z, q, targets = _logits(2, 2100, dtype, seed=2)
            q[0, :1024] = float("-inf")
            z[1, 5:2000] = float("-inf")
            assert (_check(z, q, targets, dtype, alpha_0=0.01)[2][0, :1024] == 0).all()
            z, q, targets = _capped_logits(5, 4099, dtype, seed=3)
            for p_dtype in (dtype, torch.float32):
                _check_capped(z, q, targets, p_dtype)
    finally:
        _cpu._load.cache_clear()


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_target_outside_the_row_gives_nan_not_a_neighbour(dtype):
    """Q[t, a_t] of a target outside ``[0, V)`` is NaN, never the next row's first entry or the
    previous row's last; the row's value and policy are what they are with any target."""
    z, q, targets = _logits(4, 37, dtype, seed=9)
    outside = targets.clone()
    outside[1], outside[2] = 37, -1  # one past the row, one before it
    got = _cpu.cpu_row_step(z.clone(), q.clone(), outside, 0.7, 0.3, torch.float32)
    want = torch_row_step(z.clone(), q.clone(), targets, 0.7, 0.3, torch.float32)
    assert got[0][1:3].isnan().all(), got[0]
    assert torch.equal(got[0][[0, 3]], want[0][[0, 3]])
    torch.testing.assert_close(got[1], want[1], **VALUE_TOL[dtype])
    torch.testing.assert_close(got[2], want[2], **TOL[torch.float32])
