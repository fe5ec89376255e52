"""The compiled CUDA extension: compile checks that run on any machine with nvcc, the backend
status on a CPU build of torch, and (``-m gpu``) every kernel against the torch reference."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import loss_and_grads, make_inputs

from qadapter_kernels import _cuda, combine_logits, cuda_backend, steps
from qadapter_kernels.config import LossConfig
from qadapter_kernels.pairwise import ScoredTokens, pairwise_loss, token_rewards
from qadapter_kernels.registry import StatsOptions
from qadapter_kernels.steps import FILTER_BLOCK, torch_row_step
from qadapter_kernels.toolchain import cuda_archs

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)

def _gencode(nvcc: str | None) -> list[str]:
    """nvcc flags for every default architecture (qadapter_kernels.toolchain.cuda_archs), PTX for the newest."""
    archs = [a.replace(".", "") for a in cuda_archs.default_archs(cuda_archs.nvcc_version(nvcc) if nvcc else None)]
    flags = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    return flags + ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


GENCODE = _gencode(NVCC)
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _run_all(commands):
    """Runs the commands concurrently; returns [(command, returncode, output)]."""
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for cmd in commands]
    return [(cmd, proc.wait(timeout=600), proc.stdout.read()) for cmd, proc in procs]


def _binding_syntax_command(scratch: Path):
    """g++ -fsyntax-only on binding.cpp against this torch's headers, or None if they are not here.

    A CPU build of torch ships c10/cuda without its generated cuda_cmake_macros.h; an empty
    stand-in is enough to parse the binding (it only configures export macros).
    """
    gxx = shutil.which("g++")
    include = Path(torch.__file__).parent / "include"
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", str(Path(NVCC).resolve().parent.parent)]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").is_file()), None)
    if gxx is None or cuda_include is None or not (include / "torch" / "extension.h").is_file():
        return None
    stub = scratch / "include"
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        macros.parent.mkdir(parents=True, exist_ok=True)
        macros.write_text("#pragma once\n")
    return [
        gxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-Wno-error=deprecated-declarations",
        f"-I{stub}", f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", f"-I{CSRC}",
        "-DTORCH_EXTENSION_NAME=_C", str(CSRC / "binding.cpp"),
    ]  # fmt: skip


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compile-checked here")
def test_cuda_sources_compile(tmp_path):
    """Every kernel compiles for every default architecture (consumer parts included, PTX for the
    newest) with plain nvcc (no torch header), warning-free, and the binding parses against this
    torch's headers."""
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no .cu file in csrc/"
    commands = [
        [NVCC, "-c", "-O3", "-std=c++17", *GENCODE, "-Werror", "all-warnings", f"-I{CSRC}", str(src),
         "-o", str(tmp_path / f"{src.stem}.o")]
        for src in sources
    ]  # fmt: skip
    binding = _binding_syntax_command(tmp_path)
    if binding is not None:
        commands.append(binding)
    failures = [f"$ {' '.join(cmd)}\n{out}" for cmd, rc, out in _run_all(commands) if rc != 0]
    assert not failures, "\n\n".join(failures)
    for src in sources:
        assert (tmp_path / f"{src.stem}.o").stat().st_size > 0


LSE_HOST_PROGRAM = r"""
#include <stdio.h>
#include "common.cuh"

// The row's log-sum-exp as the kernels take it: `threads` states, each adding runs of `width`
// consecutive values (whole runs round-robin, then a scalar tail), merged as block_lse does.
template <int W>
float row_lse(const float* x, int n, int threads) {
  qak::Lse states[4];
  const int runs = n / W;
  for (int r = 0; r < runs; ++r) states[r % threads].add<W>(x + r * W);
  for (int col = runs * W; col < n; ++col) states[col % threads].add<1>(x + col);
  qak::Lse total;
  for (int t = 0; t < threads; ++t) total.merge(states[t].max, states[t].sum);
  return total.value();
}

int main() {
  int rows, n;
  if (scanf("%d %d", &rows, &n) != 2) return 1;
  for (int r = 0; r < rows; ++r) {
    float x[64];
    for (int j = 0; j < n; ++j) {
      char word[32];
      if (scanf("%31s", word) != 1) return 1;
      sscanf(word, "%f", &x[j]);
    }
    printf("%.9g %.9g %.9g %.9g\n", row_lse<1>(x, n, 1), row_lse<8>(x, n, 1), row_lse<1>(x, n, 3),
           row_lse<8>(x, n, 4));
  }
  return 0;
}
"""


def _non_finite_rows(vocab: int) -> torch.Tensor:
    """Rows of finite logits with NaN, +inf or -inf put first, mid-row, last, or everywhere."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(vocab, generator=g) * 3 for _ in range(12)]
    nan, inf = float("nan"), float("inf")
    rows[1][0] = nan                      # before any finite value of its thread
    rows[2][:9] = -inf
    rows[2][9] = nan                      # a NaN after -inf only
    rows[3][vocab // 2] = nan
    rows[4][-1] = nan
    rows[5][:] = nan
    rows[6][3] = inf
    rows[7][:] = -inf
    rows[8][:] = -inf
    rows[8][5] = inf
    rows[9][::2] = -inf
    rows[10][:] = -inf
    rows[10][-1] = nan
    rows[11][0], rows[11][1] = inf, -inf
    return torch.stack(rows)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_lse_non_finite_rows_match_the_reference_on_host(tmp_path):
    """The kernels' running log-sum-exp (csrc/common.cuh's Lse, host-callable) against the
    reference's rule, whatever the thread count and vector width: a NaN anywhere (even before a
    thread's first finite value, or in a row of -inf) or a +inf gives NaN, a row of -inf gives -inf."""
    from qadapter_kernels.reference import _logsumexp

    source = tmp_path / "lse.cu"
    source.write_text(LSE_HOST_PROGRAM)
    binary = tmp_path / "lse"
    build = subprocess.run([NVCC, "-O2", "-std=c++17", f"-I{CSRC}", str(source), "-o", str(binary)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    rows = _non_finite_rows(37)
    text = f"{rows.shape[0]} {rows.shape[1]}\n" + "\n".join(" ".join(repr(float(v)) for v in row) for row in rows)
    run = subprocess.run([str(binary)], input=text, capture_output=True, text=True, check=True, timeout=60)
    got = torch.tensor([[float(v) for v in line.split()] for line in run.stdout.splitlines()])
    want = _logsumexp(rows)
    for variant in range(got.shape[1]):
        torch.testing.assert_close(got[:, variant], want, rtol=1e-5, atol=1e-5, equal_nan=True,
                                   msg=lambda m, v=variant: f"variant {v}: {m}")


def test_header_declares_every_launcher():
    header = (CSRC / "qadapter_kernels.h").read_text()
    for name in ("qak_row_step", "qak_pairwise_bt", "qak_decode_combine", "qak_kernel_image"):
        assert f"int {name}(" in header
        assert any(f'extern "C" int {name}(' in src.read_text() for src in CSRC.glob("*.cu")), name


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build here")
def test_backend_status_on_cpu_torch():
    available, reason = _cuda.backend_status()
    assert not available
    assert "torch is a CPU build" in reason
    with pytest.raises(RuntimeError, match="CPU build"):
        _cuda.extension()


def test_a_build_cache_that_cannot_be_written_is_the_reason(monkeypatch, tmp_path):
    """A just-in-time build into a read-only cache (a container image, a read-only home) is refused
    naming the folder and QADAPTER_CACHE, before torch's build is asked for anything."""
    import shutil

    import torch.utils.cpp_extension as cpp_extension

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "file"))  # a file where the folder would go
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("built into an unwritable cache"))
    module, reason = _cuda.jit_build()
    assert module is None
    assert reason.startswith(f"the cache folder {tmp_path / 'file' / 'cuda'} cannot be written")
    assert reason.endswith("set QADAPTER_CACHE to a writable folder")


def test_float64_row_step_keeps_float64_statistics():
    """float64 never reaches the float32 kernels (so this runs on CPU too)."""
    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(3, 11, generator=g, dtype=torch.float64), torch.randn(3, 11, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 5, 10])
    got = cuda_backend.cuda_row_step(z.clone(), q.clone(), targets, 0.8, 0.1, torch.float64)
    want = torch_row_step(z.clone(), q.clone(), targets, 0.8, 0.1, torch.float64)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- GPU: kernels vs torch reference


@pytest.fixture(scope="module")
def ext():
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    available, reason = _cuda.backend_status()
    if not available:
        pytest.fail(f"a GPU is here but the CUDA extension is not available: {reason}")
    return _cuda.extension()


def _logits(rows, vocab, dtype, *, seed, misalign=False, neg_inf=False, scales=(3.0, 2.0)):
    """z, q on the GPU (normal, of standard deviations ``scales``); misalign puts them one element
    past an aligned allocation (contiguous, not 16-byte aligned: the all-scalar path); neg_inf masks
    every 7th vocabulary entry of q."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for scale in scales:
        values = (torch.randn(rows, vocab, generator=g, device="cuda") * scale).to(dtype)
        if misalign:
            values = torch.empty(rows * vocab + 1, dtype=dtype, device="cuda")[1:].view(rows, vocab).copy_(values)
            assert values.data_ptr() % 16
        out.append(values)
    z, q = out
    if neg_inf:
        q[:, ::7] = float("-inf")
    return z, q


def _tol(dtype):
    """float32: rounding of the float32 math; half types: one ulp of the stored p."""
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-6}


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [53, 50257, 4099])
@pytest.mark.parametrize("p_out", ["float32", "in_place"])
@pytest.mark.parametrize("layout", ["aligned", "misaligned", "neg_inf"])
def test_row_step_matches_torch(ext, dtype, vocab, p_out, layout):
    rows, alpha_tilde, alpha_0 = 7, 0.7, 0.3
    z, q = _logits(rows, vocab, dtype, seed=vocab, misalign=layout == "misaligned", neg_inf=layout == "neg_inf")
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    p_dtype = torch.float32 if p_out == "float32" else dtype
    want_qa, want_v, want_p = torch_row_step(z.clone(), q.clone(), targets, alpha_tilde, alpha_0, p_dtype)
    # Poisoned outputs prove every element is written; in place, p overwrites q.
    q_taken = torch.full((rows,), float("nan"), device="cuda")
    value = torch.full((rows,), float("nan"), device="cuda")
    p = torch.full((rows, vocab), float("nan"), device="cuda") if p_out == "float32" else q
    ext.row_step(z, q, targets, alpha_tilde, alpha_0, 0.0, q_taken, value, p)
    assert torch.equal(q_taken, want_qa)
    torch.testing.assert_close(value, want_v, rtol=1e-5, atol=1e-5)
    assert not p.isnan().any(), "an element of p was never written"
    torch.testing.assert_close(p.float(), want_p.float(), **_tol(p_dtype))


@gpu
@needs_gpu
def test_row_step_alias_z_and_bad_target(ext):
    z, q = _logits(3, 1000, torch.bfloat16, seed=1)
    want = torch_row_step(z.clone(), q.clone(), torch.tensor([1, 2, 3], device="cuda"), 1.0, 0.01, torch.bfloat16)
    q_taken, value = torch.empty(3, device="cuda"), torch.empty(3, device="cuda")
    ext.row_step(z, q, torch.tensor([1, 2, 1000], device="cuda"), 1.0, 0.01, 0.0, q_taken, value, z)
    torch.testing.assert_close(z.float(), want[2].float(), **_tol(torch.bfloat16))
    assert q_taken[:2].equal(want[0][:2]) and q_taken[2].isnan(), "an out-of-range target gives NaN, never a stray read"


def _no_eager_step(*args, **kwargs):
    raise AssertionError("cuda_row_step fell back to the eager step")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [53, 4099])
@pytest.mark.parametrize("p_out", ["float32", "same"])
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
def test_capped_row_step_matches_torch(ext, monkeypatch, dtype, vocab, p_out, layout):
    """Under a soft cap the kernel caps z and q as it reads them (logits of scale 3 against a cap of
    2.5: the cap bends most of them) and writes p times the slope on Q, as the eager step does."""
    rows, alpha_tilde, alpha_0, softcap = 7, 0.7, 0.3, 2.5
    z, q = _logits(rows, vocab, dtype, seed=vocab + 5, misalign=layout == "misaligned", scales=(3.0, 3.0))
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    p_dtype = torch.float32 if p_out == "float32" else dtype
    want_qa, want_v, want_p = torch_row_step(z.clone(), q.clone(), targets, alpha_tilde, alpha_0, p_dtype, softcap)
    plain_v = torch_row_step(z.clone(), q.clone(), targets, alpha_tilde, alpha_0, p_dtype)[1]
    assert (want_v - plain_v).abs().min() > 0.1, "the cap must bite"
    monkeypatch.setattr(cuda_backend, "torch_row_step", _no_eager_step)
    q_taken, value, p = cuda_backend.cuda_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap)
    assert p.dtype == p_dtype and (p.data_ptr() == q.data_ptr()) == (p_dtype == dtype), "in place when it can"
    torch.testing.assert_close(q_taken, want_qa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(value, want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.float(), want_p.float(), **_tol(p_dtype))


def _block_stats_buffer(rows, vocab):
    """NaN-poisoned ``[rows, ceil(vocab / FILTER_BLOCK)]`` float32 block statistics, and the
    sentinel elements just past them (in the same allocation): a block past the end of the last row
    would land there."""
    blocks = -(-vocab // FILTER_BLOCK)
    buffer = torch.full((rows * blocks + 2,), float("nan"), device="cuda")
    buffer[-2:] = -7.0
    return buffer[: rows * blocks].view(rows, blocks), buffer[-2:]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [53, 3 * FILTER_BLOCK + 77])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("p_out", ["float32", "in_place"])
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
def test_row_step_block_stats_match_torch(ext, monkeypatch, dtype, vocab, softcap, p_out, layout):
    """Gradient filtering's block statistics from the kernel's write pass: each FILTER_BLOCK columns'
    sum of p, of the policy itself even under a cap (the written p carries the slope),
    as the eager step's; every block written, none past the last (a partial one included), rows of
    every alignment (an odd vocabulary puts each aligned row's head elsewhere); p unchanged."""
    rows, alpha_tilde, alpha_0 = 7, 0.7, 0.3
    z, q = _logits(rows, vocab, dtype, seed=vocab + 11, misalign=layout == "misaligned", scales=(3.0, 3.0))
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    p_dtype = torch.float32 if p_out == "float32" else dtype
    blocks = -(-vocab // FILTER_BLOCK)
    want_stats = torch.full((rows, blocks), float("nan"), device="cuda")
    want_qa, want_v, want_p = torch_row_step(z.clone(), q.clone(), targets, alpha_tilde, alpha_0, p_dtype, softcap,
                                             want_stats)
    assert not want_stats.isnan().any()
    stats, sentinel = _block_stats_buffer(rows, vocab)
    monkeypatch.setattr(cuda_backend, "torch_row_step", _no_eager_step)
    q_taken, value, p = cuda_backend.cuda_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap, stats)
    assert p.dtype == p_dtype and (p.data_ptr() == q.data_ptr()) == (p_dtype == dtype)
    assert not stats.isnan().any(), "a block's statistics were never written"
    assert sentinel.eq(-7.0).all(), "a block past the end of the last row was written"
    torch.testing.assert_close(stats, want_stats, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(q_taken, want_qa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(value, want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.float(), want_p.float(), **_tol(p_dtype))
    # Not vacuous: the blocks differ, and under the cap the statistics of the written p would not do.
    assert (stats.amax(dim=1) > 2 * stats.amin(dim=1)).all() or blocks == 1
    written = torch.full_like(want_stats, float("nan"))
    steps.block_stats_(p.float(), written)
    if softcap is not None:
        assert ((written - want_stats).abs() > 0.05 * want_stats).all()


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_row_step_block_stats_carry_nan(ext, dtype, softcap):
    """A NaN logit makes its row's p NaN, hence every block's sum (the filter then keeps the blocks),
    as in the eager step; the other rows' statistics are untouched by it."""
    rows, vocab = 4, 2 * FILTER_BLOCK + 3
    z, q = _logits(rows, vocab, dtype, seed=21)
    z[1, 5] = float("nan")
    q[2, FILTER_BLOCK + 7] = float("nan")
    targets = torch.zeros(rows, dtype=torch.long, device="cuda")
    want = torch.empty(rows, 3, device="cuda")
    torch_row_step(z.clone(), q.clone(), targets, 0.8, 0.2, torch.float32, softcap, want)
    stats, sentinel = _block_stats_buffer(rows, vocab)
    stats[:] = 0.0
    q_taken, value = (torch.empty(rows, device="cuda") for _ in range(2))
    p = torch.empty(rows, vocab, device="cuda")
    ext.row_step(z, q, targets, 0.8, 0.2, softcap or 0.0, q_taken, value, p, stats)
    assert stats[1:3].isnan().all() and not stats[[0, 3]].isnan().any() and sentinel.eq(-7.0).all()
    torch.testing.assert_close(stats, want, rtol=2e-5, atol=1e-7, equal_nan=True)


@gpu
@needs_gpu
def test_binding_checks_block_stats(ext):
    z, q = _logits(2, FILTER_BLOCK + 1, torch.bfloat16, seed=2)
    t = torch.zeros(2, dtype=torch.long, device="cuda")
    out = [torch.empty(2, device="cuda"), torch.empty(2, device="cuda"), torch.empty(z.shape, device="cuda")]
    for bad, message in [
        (torch.empty(2, 1, device="cuda"), "block_stats must have shape"),
        (torch.empty(2, 2, device="cuda", dtype=torch.bfloat16), "block_stats must be Float"),
        (torch.empty(2, 2), "block_stats must be a CUDA tensor"),
        (torch.empty(2, 2, device="cuda").transpose(0, 1), "block_stats must be contiguous"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            ext.row_step(z, q, t, 1.0, 0.01, 0.0, *out, bad)
    ext.row_step(z, q, t, 1.0, 0.01, 0.0, *out, None)


@gpu
@needs_gpu
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_cuda_backend_filters_as_the_float64_account_says(ext, monkeypatch, softcap):
    """qadapter_token_stats(backend="cuda", grad_filter_eps=...) tiles whole rows through the kernel
    (never the eager step), so its rule sees the final p by the block statistics the kernel writes:
    each token leaves out its lightest blocks within the budget (test_grad_filter's float64
    account), and the q_hidden gradient is the exact one less g_v * (1 - tanh^2) p Wq over them."""
    from test_grad_filter import float64_policy, lightest_blocks, peaked, token_stats_grads, varied

    from qadapter_kernels.grad_filter import grad_filter_report

    monkeypatch.setattr(cuda_backend, "torch_row_step", _no_eager_step)
    inputs = varied(peaked(torch.float32, zipf=1.5, scale=0.3))
    on_gpu = {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    budget = 0.02
    p, wq, slope = float64_policy(inputs, softcap=softcap)
    n = p.shape[0]
    upstream = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = dict(chunk_size=n, logit_softcap=softcap)
    exact, _ = token_stats_grads(on_gpu, upstream.cuda(), "cuda", **options)
    with grad_filter_report() as report:
        filtered, _ = token_stats_grads(on_gpu, upstream.cuda(), "cuda", grad_filter_eps=budget, **options)
    exact, filtered = exact.cpu(), filtered.cpu()
    dropped = lightest_blocks(p, budget)
    assert dropped.any(dim=1).float().mean() > 0.5 and report.skipped_entries == int(dropped.sum())
    torch.testing.assert_close(report.dropped_mass.double().cpu(), (p * dropped).sum(dim=1), rtol=1e-5, atol=0)
    expected = exact - upstream[1].unsqueeze(1) * ((p * slope * dropped) @ wq)
    assert ((filtered - exact).norm() / exact.norm()) > 1e-4
    assert ((filtered - expected).norm() / exact.norm()) < 1e-5


def _same_non_finite(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """Elementwise: NaN where ``want`` is NaN, the same infinities, close finite values."""
    got, want = got.float().cpu(), want.float().cpu()
    where = f"NaN at {got.isnan().nonzero().tolist()}, reference {want.isnan().nonzero().tolist()}"
    assert torch.equal(got.isnan(), want.isnan()), f"{msg}: {where}"
    finite = want.isfinite()
    assert torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0)) and torch.equal(got.isfinite(), finite), msg
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5, msg=msg)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [37, 4099])
@pytest.mark.parametrize("where", ["z", "q"])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_row_step_and_decode_non_finite_rows_match_the_reference(ext, dtype, vocab, where, softcap):
    """NaN, +inf and -inf rows (first element, mid-row, whole row) through the CUDA row step and
    the decode kernel give the reference's NaN / inf (a NaN met before a thread's first finite
    value was lost before, and an all-NaN row gave -inf). Under a soft cap, +-inf is capped to +-s
    and NaN stays NaN, as in the eager step."""
    rows = _non_finite_rows(vocab).to("cuda", dtype)
    z, q = _logits(rows.shape[0], vocab, dtype, seed=3)
    if where == "z":
        z = rows.contiguous()
    else:
        q = rows.contiguous()
    targets = torch.arange(rows.shape[0], device="cuda") % vocab
    # p of a row whose combined logits are all -inf is 0 / 0: the eager step says 0 (it is written for
    # masked vocabulary tiles), the fused steps NaN, as the reference's gradient there. Compared elsewhere.
    # Capped logits are never -inf.
    defined = ~((q.float() + 0.3 * z.float()) == -float("inf")).all(dim=1) | (softcap > 0)
    for p_dtype in (torch.float32, dtype):
        want_qa, want_v, want_p = torch_row_step(z.clone(), q.clone(), targets, 0.7, 0.3, p_dtype, softcap or None)
        q_taken, value = (torch.empty(rows.shape[0], device="cuda") for _ in range(2))
        qq = q.clone()
        p = torch.empty(qq.shape, dtype=torch.float32, device="cuda") if p_dtype == torch.float32 else qq
        ext.row_step(z, qq, targets, 0.7, 0.3, softcap, q_taken, value, p)
        _same_non_finite(q_taken, want_qa, f"q_taken ({p_dtype})")
        _same_non_finite(value, want_v, f"value ({p_dtype})")
        _same_non_finite(p[defined], want_p[defined], f"p ({p_dtype})")
    if softcap:
        assert value.isfinite().any() and not want_v.isinf().any(), "capped: +-inf logits give finite values"
        return
    logprobs = torch.empty(z.shape, device="cuda")
    ext.decode_combine(z, q, 0.7, 0.3, 1.0, 0, 1.0, 0, logprobs, None)
    want = combine_logits(z, q, alpha_tilde=0.7, alpha_0=0.3)
    assert torch.equal(logprobs.isnan().any(dim=1).cpu(), want.isnan().any(dim=1).cpu()), "rows holding NaN"


@gpu
@needs_gpu
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("site", ["weight", "q_hidden", "base_hidden"])
def test_cuda_token_stats_non_finite_logits_match_the_reference(ext, value, site):
    """A non-finite head row or hidden state through the cuda backend's token statistics: each
    token's Q[a] and V are NaN, +inf, -inf or finite as the reference's."""
    from qadapter_kernels.reference import reference_token_stats

    g = torch.Generator().manual_seed(1)
    n, d, vocab = 9, 16, 300
    base, hq = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) / d**0.5
    if site == "weight":
        weight[7] = value  # one vocabulary row: every token's logit there
    elif site == "q_hidden":
        hq[3, 0] = value  # one token's adapter state
    else:
        base[5, 1] = value  # one token's base state
    targets = torch.randint(0, vocab, (n,), generator=g)
    args = [t.cuda() for t in (base, hq, weight, weight)] + [None, targets.cuda()]
    want = reference_token_stats(*args, StatsOptions(alpha_tilde=0.8, alpha_0=0.2))
    got = cuda_backend.cuda_token_stats(*args, StatsOptions(alpha_tilde=0.8, alpha_0=0.2, chunk_size=4))
    for name, a, b in zip(("q_taken", "value"), got, want):
        _same_non_finite(a, b, name)


@gpu
@needs_gpu
def test_extension_reports_the_image_it_runs(ext):
    """The loaded extension runs this GPU from a cubin of its major version or from PTX."""
    binary, ptx = ext.kernel_image()
    major, minor = torch.cuda.get_device_capability()
    assert binary // 10 == major or 0 < ptx <= 10 * major + minor, (binary, ptx)
    assert _cuda.image_status(ext) == (True, "")


@gpu
@needs_gpu
def test_binding_errors_name_the_argument(ext):
    z, q = _logits(2, 64, torch.float32, seed=2)
    t = torch.zeros(2, dtype=torch.long, device="cuda")
    out = [torch.empty(2, device="cuda"), torch.empty(2, device="cuda"), torch.empty(2, 64, device="cuda")]
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.row_step(z, q.cpu(), t, 1.0, 0.01, 0.0, *out)
    with pytest.raises(RuntimeError, match="z must be contiguous"):
        ext.row_step(z.t().contiguous().t(), q, t, 1.0, 0.01, 0.0, *out)
    with pytest.raises(RuntimeError, match="q must be Float"):
        ext.row_step(z, q.half(), t, 1.0, 0.01, 0.0, *out)
    with pytest.raises(RuntimeError, match="targets must be Long"):
        ext.row_step(z, q, t.int(), 1.0, 0.01, 0.0, *out)
    with pytest.raises(RuntimeError, match="z must be float32, float16 or bfloat16"):
        ext.row_step(z.double(), q.double(), t, 1.0, 0.01, 0.0, *out)
    with pytest.raises(RuntimeError, match="p must be float32 or z's dtype"):
        ext.row_step(z.half(), q.half(), t, 1.0, 0.01, 0.0, out[0], out[1], out[2].bfloat16())
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
            ext.row_step(z, q, t, 1.0, 0.01, bad, *out)


def _rewards(batch, width, *, seed, scale):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(batch, width, generator=g, device="cuda") < 0.7
    mask[1 % batch] = False  # a row that scores nothing
    mask[0, 0] = True
    rewards = torch.randn(batch, width, generator=g, device="cuda") * scale
    return rewards[mask], ScoredTokens.from_mask(mask)


@gpu
@needs_gpu
@pytest.mark.parametrize("reward_norm", ["padded", "mean", "sum"])
@pytest.mark.parametrize(("batch", "width", "scale"), [(2, 5, 1.0), (8, 33, 0.5), (40, 257, 3.0), (6, 1000, 10.0)])
def test_pairwise_matches_contract(ext, reward_norm, batch, width, scale):
    """Forward stats and dL/dr_t against pairwise.pairwise_loss + autograd (scale 10: softplus > 20)."""
    rewards, tokens = _rewards(batch, width, seed=batch + width, scale=scale)
    config = LossConfig(beta=0.3, reward_norm=reward_norm)
    r_ref = rewards.clone().requires_grad_()
    want = pairwise_loss(r_ref, tokens, config)
    (want_grad,) = torch.autograd.grad(want.loss, r_ref)

    r_cuda = rewards.clone().requires_grad_()
    got = cuda_backend.pairwise_loss(r_cuda, tokens, config)
    (got_grad,) = torch.autograd.grad(got.loss, r_cuda)
    for field in got._fields:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=2e-5, atol=1e-6, msg=field)
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-5, atol=1e-7)

    # Raw op with poisoned outputs: every output element is written.
    seq, stats, grad = (torch.full((n,), float("nan"), device="cuda") for n in (batch, 5, rewards.numel()))
    ext.pairwise_bt(rewards, tokens.counts, width, 0.3, ("padded", "mean", "sum").index(reward_norm), seq, stats, grad)
    assert not (seq.isnan().any() or stats.isnan().any() or grad.isnan().any())
    torch.testing.assert_close(grad, want_grad, rtol=2e-5, atol=1e-7)


@gpu
@needs_gpu
def test_pairwise_mismatched_counts_flag_nan(ext):
    stats = torch.zeros(5, device="cuda")
    counts = torch.tensor([3, 4], device="cuda")  # 7 tokens claimed, 5 given
    ext.pairwise_bt(torch.ones(5, device="cuda"), counts, 4, 0.1, 0, torch.empty(2, device="cuda"), stats,
                    torch.empty(5, device="cuda"))  # fmt: skip
    assert stats.isnan().all()


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [50257, 128256, 31])
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
def test_decode_logprobs_match_combine(ext, dtype, vocab, layout):
    rows = 3
    z, q = _logits(rows, vocab, dtype, seed=vocab + 1, misalign=layout == "misaligned")
    want = combine_logits(z, q, alpha_tilde=0.8, alpha_0=0.2)
    logprobs = torch.full((rows, vocab), float("nan"), device="cuda")
    sampled = torch.full((rows,), -1, dtype=torch.long, device="cuda")
    ext.decode_combine(z, q, 0.8, 0.2, 1.0, 0, 1.0, 7, logprobs, sampled)
    assert not logprobs.isnan().any()
    torch.testing.assert_close(logprobs, want, rtol=1e-5, atol=2e-5)
    assert ((sampled >= 0) & (sampled < vocab)).all()
    lp, ids = cuda_backend.decode_combine(z, q, alpha_tilde=0.8, alpha_0=0.2, top_k=1, seed=3)
    assert lp.gather(1, ids[:, None]).squeeze(1).equal(lp.amax(dim=1)), "top_k=1 is greedy (any of tied maxima)"
    _, numpy_ids = cuda_backend.decode_combine(z, q, alpha_tilde=0.8, alpha_0=0.2, top_k=np.int64(1), seed=np.uint64(3))
    assert numpy_ids.equal(ids), "numpy's integers are the same counts"


def _hf_filtered_probs(logprobs, temperature, top_k, top_p):
    """Hugging Face's temperature, top-k then top-p warpers on one row, as probabilities."""
    x = logprobs / temperature
    if 0 < top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x)
        cum = sorted_x.softmax(0).cumsum(0)
        remove = cum <= 1 - top_p
        remove[-1] = False
        x = x.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return x.softmax(0)


@gpu
@needs_gpu
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.7)])
def test_decode_sampling_distribution(ext, temperature, top_k, top_p):
    """Many rows of one distribution: empirical frequencies match the filtered policy, and no
    filtered-out token is ever drawn. Same seed, same ids."""
    vocab, rows = 24, 40000
    z, q = _logits(1, vocab, torch.float32, seed=11)
    z, q = z.expand(rows, vocab).contiguous(), q.expand(rows, vocab).contiguous()
    kwargs = dict(alpha_tilde=1.0, alpha_0=0.5, temperature=temperature, top_k=top_k, top_p=top_p, seed=1234)
    logprobs, ids = cuda_backend.decode_combine(z, q, **kwargs)
    _, again = cuda_backend.decode_combine(z, q, **kwargs)
    assert ids.equal(again)
    want = _hf_filtered_probs(logprobs[0].double(), temperature, top_k, top_p)
    freq = torch.bincount(ids, minlength=vocab).double() / rows
    assert freq[want == 0].sum() == 0, "a filtered-out token was sampled"
    torch.testing.assert_close(freq, want, rtol=0, atol=0.012)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_filters_on_large_vocab(ext, dtype):
    vocab, rows = 50257, 4
    z, q = _logits(rows, vocab, dtype, seed=5)
    for seed in range(20):
        lp, ids = cuda_backend.decode_combine(z, q, temperature=0.8, top_k=40, top_p=0.9, seed=seed)
        for r in range(rows):
            kept = _hf_filtered_probs(lp[r].double(), 0.8, 40, 0.9) > 0
            assert lp[r, ids[r]] >= lp[r][kept].min(), "sampled outside the top-k / top-p set (ties kept)"


@gpu
@needs_gpu
def test_pairwise_kernel_in_the_loss_path(ext):
    """token_rewards -> the CUDA pairwise loss equals token_rewards -> pairwise_loss on real token stats."""
    inputs = make_inputs(batch=4, seq=30, hidden=32, vocab=1000, device="cuda", seed=9)
    config = LossConfig(value_at="next")
    tokens = ScoredTokens.from_labels(inputs["labels"], config.ignore_index)
    mask = tokens.mask
    base, hq = inputs["base_hidden"][:, :-1][mask], inputs["q_hidden"][:, :-1][mask]
    w = inputs["weight"]
    qa, v = cuda_backend.cuda_token_stats(base, hq, w, w, None, inputs["labels"][:, 1:][mask],
                                          StatsOptions(alpha_tilde=1.0, alpha_0=0.01))
    rewards = token_rewards(qa, v, tokens, config)
    got, want = cuda_backend.pairwise_loss(rewards, tokens, config), pairwise_loss(rewards, tokens, config)
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-5, atol=1e-6)
    g_got, g_want = (torch.autograd.grad(o.loss, inputs["q_hidden"], retain_graph=True)[0] for o in (got, want))
    torch.testing.assert_close(g_got, g_want, rtol=2e-5, atol=1e-6)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_capped_loss_and_gradients_match_the_reference(ext, monkeypatch, dtype):
    """qadapter_loss(backend="cuda") under Gemma-2's soft cap (one that bites) against the
    reference: loss and every gradient, each chunk through the capping kernel, never the eager step."""
    from qadapter_kernels import _cuda_ops

    caps = []

    def spy(kernel):
        def step(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats):
            caps.append(softcap)
            return kernel(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats)

        return step

    for name in ("row_step_", "row_step"):  # in place (p in q's dtype) or into a float32 p
        monkeypatch.setattr(_cuda_ops, name, spy(getattr(_cuda_ops, name)))
    monkeypatch.setattr(cuda_backend, "torch_row_step", _no_eager_step)
    x = make_inputs(batch=6, seq=17, hidden=40, vocab=1001, dtype=dtype, seed=8, device="cuda", q_head=True,
                    q_bias=True)
    kwargs = dict(chunk_size=16, alpha_tilde=0.8, alpha_0=0.05, logit_softcap=0.7)
    got, got_grads = loss_and_grads(x, backend="cuda", **kwargs)
    want, want_grads = loss_and_grads(x, backend="reference", **kwargs)
    assert caps and set(caps) == {0.7}
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # test_backends.TOL

    def rel_err(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm())

    for field in ("loss", "chosen_rewards", "rejected_rewards"):
        assert rel_err(getattr(got, field), getattr(want, field)) <= tol, field
    assert got_grads.keys() == want_grads.keys() == {"q_hidden", "q_weight", "q_bias"}
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= tol, name


def test_cuda_row_step_hands_the_cap_to_the_kernel(monkeypatch):
    """cuda_row_step passes a soft cap to the kernel ops (0.0 for none) instead of taking the eager
    step, in place or into a float32 p; float64 alone stays eager (ops faked: runs without a GPU)."""
    from qadapter_kernels import _cuda_ops

    seen = []

    def row_step_(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats):
        seen.append(("row_step_", softcap))
        return targets.float(), targets.float()

    def row_step(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats):
        seen.append(("row_step", softcap))
        return targets.float(), targets.float(), q.float()

    monkeypatch.setattr(_cuda_ops, "row_step_", row_step_)
    monkeypatch.setattr(_cuda_ops, "row_step", row_step)
    monkeypatch.setattr(cuda_backend, "torch_row_step", _no_eager_step)
    z, q, targets = torch.randn(3, 11), torch.randn(3, 11).bfloat16(), torch.tensor([0, 5, 10])
    assert cuda_backend.cuda_row_step(z, q, targets, 0.8, 0.1, torch.bfloat16, 2.5)[2] is q
    cuda_backend.cuda_row_step(z, q, targets, 0.8, 0.1, torch.float32, 2.5)
    cuda_backend.cuda_row_step(z, q, targets, 0.8, 0.1, torch.float32)
    assert seen == [("row_step_", 2.5), ("row_step", 2.5), ("row_step", 0.0)]
    assert all(type(cap) is float for _, cap in seen)
    with pytest.raises(AssertionError, match="eager"):
        cuda_backend.cuda_row_step(z.double(), q.double(), targets, 0.8, 0.1, torch.float64, 2.5)


def test_cuda_row_step_hands_block_stats_to_the_kernel(monkeypatch):
    """Gradient filtering's block statistics go to the kernel ops (the very tensor, in place or into
    a float32 p, with or without a cap), not to the eager step; None when not asked for; a tensor of
    the wrong shape or dtype is refused before any launch; float64 alone stays eager (ops faked)."""
    from qadapter_kernels import _cuda_ops

    seen = []

    def row_step_(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats):
        seen.append(("row_step_", softcap, block_stats))
        return targets.float(), targets.float()

    def row_step(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats):
        seen.append(("row_step", softcap, block_stats))
        return targets.float(), targets.float(), q.float()

    monkeypatch.setattr(_cuda_ops, "row_step_", row_step_)
    monkeypatch.setattr(_cuda_ops, "row_step", row_step)
    monkeypatch.setattr(cuda_backend, "torch_row_step", _no_eager_step)
    vocab = 2 * FILTER_BLOCK + 5
    z, q, targets = torch.randn(3, vocab), torch.randn(3, vocab).bfloat16(), torch.tensor([0, 5, 10])
    stats = torch.empty(3, 3)
    assert cuda_backend.cuda_row_step(z, q, targets, 0.8, 0.1, torch.bfloat16, 2.5, stats)[2] is q
    cuda_backend.cuda_row_step(z, q, targets, 0.8, 0.1, torch.float32, None, stats)
    cuda_backend.cuda_row_step(z, q, targets, 0.8, 0.1, torch.float32)
    assert [(name, cap) for name, cap, _ in seen] == [("row_step_", 2.5), ("row_step", 0.0), ("row_step", 0.0)]
    assert seen[0][2] is stats and seen[1][2] is stats and seen[2][2] is None
    for bad in (torch.empty(3, 2), torch.empty(3, 3, dtype=torch.float64), torch.empty(3, 3, 2), torch.empty(3, 3).T):
        with pytest.raises(ValueError, match="block_stats must be a contiguous float32"):
            cuda_backend.cuda_row_step(z, q, targets, 0.8, 0.1, torch.float32, None, bad)
    assert len(seen) == 3
    with pytest.raises(AssertionError, match="eager"):
        cuda_backend.cuda_row_step(z.double(), q.double(), targets, 0.8, 0.1, torch.float64, None,
                                   torch.empty(3, 3, dtype=torch.float64))


def test_pairwise_kernel_falls_back_off_gpu():
    """CPU or float64 rewards take the shared torch path: same object fields, same numbers."""
    mask = torch.rand(4, 6) < 0.6
    mask[0, 0] = True
    tokens = ScoredTokens.from_mask(mask)
    rewards = torch.randn(int(mask.sum()), dtype=torch.float64)
    got, want = cuda_backend.pairwise_loss(rewards, tokens, LossConfig()), pairwise_loss(rewards, tokens, LossConfig())
    for field in want._fields:
        assert torch.equal(getattr(got, field), getattr(want, field))


def test_decode_combine_checks_arguments():
    z = torch.zeros(2, 5)
    for kwargs, message in [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"seed": -1}, "seed must be an integer in [0, 9223372036854775807]"),
        ({"top_k": np.bool_(True)}, "top_k must be an integer >= 0"),
        ({"seed": True}, "seed must be an integer in"),
    ]:
        with pytest.raises((TypeError, ValueError), match=re.escape(message)):
            cuda_backend.decode_combine(z, z, **kwargs)
    with pytest.raises(TypeError, match="float64: use combine_logits"):
        cuda_backend.decode_combine(z.double(), z.double())
    with pytest.raises(ValueError, match="q_values must have base_logits' shape"):
        cuda_backend.decode_combine(z, z[:1])
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="not available"):
            cuda_backend.decode_combine(z, z)
        with pytest.raises(RuntimeError, match="not available"):  # numpy's integers pass the checks
            cuda_backend.decode_combine(z, z, top_k=np.int64(2), seed=np.uint64(3))


def test_custom_ops_trace_without_a_gpu():
    """The extension's kernels are torch.library ops whose fake implementations give the output
    shapes and dtypes, so torch.compile traces a step through them (checked here with fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qadapter_kernels import _cuda_ops  # noqa: F401 - registers the ops

    with FakeTensorMode():
        z, q = torch.empty(3, 11), torch.empty(3, 11, dtype=torch.bfloat16)
        targets = torch.zeros(3, dtype=torch.long)
        q_taken, value, p = torch.ops.qadapter.row_step(z, q, targets, 1.0, 0.01, 0.0)
        assert (q_taken.shape, value.dtype, p.shape, p.dtype) == ((3,), torch.float32, (3, 11), torch.float32)
        assert torch.ops.qadapter.row_step_(z, q, targets, 1.0, 0.01, 2.5)[0].shape == (3,)
        stats = torch.empty(3, 1)
        assert torch.ops.qadapter.row_step(z, q, targets, 1.0, 0.01, 0.0, stats)[2].shape == (3, 11)
        assert torch.ops.qadapter.row_step_(z, q, targets, 1.0, 0.01, 2.5, stats)[1].shape == (3,)
        seq, stats, grad = torch.ops.qadapter.pairwise_bt(torch.empty(7), torch.zeros(4, dtype=torch.long), 5, 0.1, 0)
        assert (seq.shape, stats.shape, grad.shape) == ((4,), (5,), (7,))
        logprobs, sampled = torch.ops.qadapter.decode_combine(z, z, 1.0, 0.01, 1.0, 0, 1.0, 0, True)
        assert (logprobs.shape, sampled.shape, sampled.dtype) == ((3, 11), (3,), torch.int64)
        assert torch.ops.qadapter.decode_combine(z, z, 1.0, 0.01, 1.0, 0, 1.0, 0, False)[1].shape == (0,)


@gpu
@needs_gpu
def test_custom_ops_pass_opcheck(ext):
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with the kernels."""
    from qadapter_kernels import _cuda_ops  # noqa: F401

    z, q = _logits(4, 1000, torch.bfloat16, seed=1)
    targets = torch.randint(0, 1000, (4,), device="cuda")
    torch.library.opcheck(torch.ops.qadapter.row_step.default, (z, q, targets, 1.0, 0.01, 0.0))
    torch.library.opcheck(torch.ops.qadapter.row_step_.default, (z, q.clone(), targets, 1.0, 0.01, 2.5))
    stats = torch.empty(4, 1, 2, device="cuda")
    torch.library.opcheck(torch.ops.qadapter.row_step.default, (z, q, targets, 1.0, 0.01, 0.0, stats))
    torch.library.opcheck(torch.ops.qadapter.row_step_.default, (z, q.clone(), targets, 1.0, 0.01, 2.5, stats))
    rewards, tokens = _rewards(4, 33, seed=2, scale=1.0)
    torch.library.opcheck(torch.ops.qadapter.pairwise_bt.default, (rewards, tokens.counts, 33, 0.1, 0))
    torch.library.opcheck(torch.ops.qadapter.decode_combine.default, (z, q, 1.0, 0.01, 0.8, 50, 0.9, 7, True))


# ---------------------------------------------------------------- architectures: which build runs on which GPU


@pytest.mark.parametrize(("archs", "capability", "runs"), [
    ("9.0", (9, 0), True),
    ("9.0", (8, 6), False),            # the first GPU run's default on an sm_86 card
    ("9.0", (12, 0), False),           # no PTX: nothing the driver can compile for sm_120
    ("9.0+PTX", (12, 0), True),        # PTX at or below the device's capability
    ("9.0+PTX", (8, 9), False),        # PTX above it
    ("8.0", (8, 6), True),             # a cubin runs on later minors of its major version
    ("8.0", (8, 9), True),
    ("8.6", (8, 0), False),
    ("8.0;8.6;8.9;9.0;10.0;12.0+PTX", (12, 0), True),
    ("8.0 8.6 9.0", (10, 0), False),   # space-separated, as torch also reads it
    ("9.0a", (9, 0), True),
    ("9.0a+PTX", (10, 0), False),      # architecture-specific: no later device, PTX included
    ("8.6+PTX", (9, 0), True),
])
def test_arch_list_covers_a_device(archs, capability, runs):
    fits, why = cuda_archs.covers(archs, capability)
    assert fits == runs
    assert fits or f"{capability[0]}.{capability[1]}" in why and archs in why


def test_arch_list_parsing_and_flags():
    assert cuda_archs.parse_arch_list("8.0;9.0a 12.0+PTX") == [(8, 0, "", False), (9, 0, "a", False),
                                                                (12, 0, "", True)]
    assert cuda_archs.parse_arch_list("Ampere") is None and cuda_archs.parse_arch_list("native") is None
    assert cuda_archs.covers("Hopper", (8, 6))[0], "a list torch names but this module cannot read is not refused"
    assert cuda_archs.gencode_flags("8.6;12.0+PTX") == [
        "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120"]
    assert cuda_archs.gencode_flags("Hopper") == []


def test_device_arch_list_is_the_device_with_ptx():
    assert cuda_archs.device_arch_list((8, 6)) == "8.6+PTX"
    assert cuda_archs.device_arch_list((12, 0), (12, 8)) == "12.0+PTX"
    # nvcc 12.4 cannot target sm_120: PTX of the newest capability it can, which the driver compiles.
    assert cuda_archs.device_arch_list((12, 0), (12, 4)) == "9.0+PTX"
    assert cuda_archs.covers(cuda_archs.device_arch_list((12, 0), (12, 4)), (12, 0))[0]
    for capability in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (12, 1)]:
        assert cuda_archs.covers(cuda_archs.device_arch_list(capability), capability)[0]


def test_cuda_archs_prints_a_list_without_a_gpu():
    run = subprocess.run([sys.executable, "-m", "qadapter_kernels.toolchain.cuda_archs"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert cuda_archs.parse_arch_list(run.stdout.strip()), run.stdout


class _FakeExtension:
    """A loaded extension: what it was built for, and what the CUDA runtime says of its image."""

    def __init__(self, archs=None, image_error=None):
        if archs is not None:
            self.built_archs = archs
        self.image_error = image_error

    def kernel_image(self):
        if self.image_error:
            raise RuntimeError(self.image_error)
        return 90, 90


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA build of torch with one GPU of a chosen capability; _load's cache emptied around the test."""
    state = {"capability": (8, 6)}
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    _cuda._load.cache_clear()
    yield state
    _cuda._load.cache_clear()


def test_image_status_refuses_a_build_for_other_architectures(fake_gpu):
    """The first GPU run built for 9.0 only: on an sm_86 card the backend said "available" and
    failed at its first launch. Now it says why not, before any launch."""
    fits, why = _cuda.image_status(_FakeExtension("9.0"))
    assert not fits and "8.6" in why and "'9.0'" in why and "Test GPU" in why
    assert _cuda.image_status(_FakeExtension("8.6+PTX")) == (True, "")
    fits, why = _cuda.image_status(_FakeExtension(None, "no kernel image is available for execution on the device"))
    assert not fits and "no kernel image" in why, "an unrecorded build is asked of the CUDA runtime"


def test_prebuilt_extension_without_an_image_gives_way_to_a_jit_build(fake_gpu, monkeypatch, tmp_path):
    import types

    prebuilt = types.ModuleType("qadapter_kernels._C")
    prebuilt.__file__ = str(tmp_path / "_C.so")
    prebuilt.kernel_image = lambda: (90, 90)
    (tmp_path / _cuda.ARCHS_FILE).write_text("9.0\n")  # what setup.py records beside it
    monkeypatch.setitem(sys.modules, "qadapter_kernels._C", prebuilt)
    assert _cuda.built_archs(prebuilt) == "9.0"
    built = _FakeExtension("8.6+PTX")
    monkeypatch.setattr(_cuda, "jit_build", lambda *a, **k: (built, ""))
    assert _cuda._load() == (built, "")

    _cuda._load.cache_clear()
    monkeypatch.setattr(_cuda, "jit_build", lambda *a, **k: (None, "ninja not found"))
    ext, why = _cuda._load()
    assert ext is None and "8.6" in why and "ninja not found" in why
    _cuda._load.cache_clear()
    fake_gpu["capability"] = (9, 0)
    assert _cuda._load() == (prebuilt, "")


def test_jit_build_targets_the_device(fake_gpu, monkeypatch):
    """Without TORCH_CUDA_ARCH_LIST the just-in-time build is for the device (with PTX), passed to
    nvcc as flags (torch's build cache keys on them); a list that misses the device is refused."""
    import types

    import torch.utils.cpp_extension as cpp

    seen = {}

    def load(**kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace()

    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(cpp, "CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(_cuda.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(_cuda.cuda_archs, "nvcc_version", lambda nvcc=None: (12, 8))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    module, why = _cuda.jit_build()
    assert why == "" and module.built_archs == "8.6+PTX"
    assert "-gencode=arch=compute_86,code=sm_86" in seen["extra_cuda_cflags"]
    assert "-gencode=arch=compute_86,code=compute_86" in seen["extra_cuda_cflags"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    seen.clear()
    module, why = _cuda.jit_build()
    assert module is None and "does not cover this GPU" in why and not seen


@gpu
def test_the_backends_decode_combine_is_the_kernels(ext):
    """generate on CUDA with the cuda backend combines through the compiled kernel: the record's
    combine equals combine_logits in every kernel dtype and stays eager for float64."""
    from qadapter_kernels import registry

    combine = registry.get("cuda").combine
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        z = torch.randn(3, 1000, device="cuda", generator=g).to(dtype)
        q = torch.randn(3, 1000, device="cuda", generator=g).to(dtype)
        torch.testing.assert_close(combine(z, q, alpha_tilde=0.8, alpha_0=0.2),
                                   combine_logits(z, q, alpha_tilde=0.8, alpha_0=0.2), rtol=1e-4, atol=1e-4)
