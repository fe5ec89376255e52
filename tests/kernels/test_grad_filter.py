"""Gradient filtering in the chunked backend (``grad_filter_eps``): against the exact backward and an
independent float64 account of what a filter leaves out, for both CPU steps (compiled and eager)."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_and_grads, make_inputs

from qadapter_kernels import _cpu, qadapter_loss, qadapter_token_stats, steps
from qadapter_kernels.grad_filter import grad_filter_report, resolve_eps
from qadapter_kernels.steps import FILTER_BLOCK

VOCAB = 4 * FILTER_BLOCK + 300  # five blocks, the last one partial


@pytest.fixture(params=["compiled", "eager"])
def step(request, monkeypatch):
    """Both CPU block steps: the compiled one reports block maxima from its sweep, the eager one
    computes them."""
    if request.param == "eager":
        monkeypatch.setenv(_cpu.ENV_SWITCH, "0")
    elif not _cpu.status()[0]:
        pytest.skip(f"compiled CPU step unavailable: {_cpu.status()[1]}")
    return request.param


def peaked(dtype=torch.float32, q_head=False, seed=0, zipf=3.0, vocab=VOCAB, scale=1.0):
    """Random inputs (never zeros) with a Zipf tilt: hidden coordinate 0 is 1 and the heads' column 0
    is ``-zipf * log(1 + v)``, so ``p(v)`` falls like ``(1 + v)^-zipf`` in every token and most blocks
    hold next to no probability (as in a peaked language model); targets stay uniform."""
    inputs = make_inputs(batch=4, seq=12, hidden=16, vocab=vocab, dtype=torch.float64, seed=seed,
                         prompt_only_row=False, q_head=q_head, scale=scale)
    tilt = -zipf * torch.log1p(torch.arange(vocab, dtype=torch.float64))
    out = {}
    for name, value in inputs.items():
        value = value.detach().clone()
        if name in ("base_hidden", "q_hidden"):
            value[..., 0] = 1.0
        elif name in ("weight", "q_weight"):
            value[:, 0] = tilt
        if value.is_floating_point():
            value = value.to(dtype).requires_grad_(inputs[name].requires_grad)
        out[name] = value
    return out


def float64_policy(inputs, alpha_tilde=1.0, alpha_0=0.01):
    """``p`` of every scored token in float64, packed in row order, and its ``Q`` head."""
    mask = inputs["labels"][:, 1:] != -100
    hb = inputs["base_hidden"][:, :-1][mask].double()
    hq = inputs["q_hidden"][:, :-1][mask].double()
    w = inputs["weight"].double()
    wq = inputs.get("q_weight", inputs["weight"]).detach().double()
    return torch.softmax((hq @ wq.T + alpha_0 * hb @ w.T) / alpha_tilde, dim=1), wq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_block_stats_match_the_eager_ones(dtype):
    """The compiled step's per-block largest p and mass (from its sweep) against the eager reductions,
    on a tile with a partial last block and a masked (-inf) block."""
    if not _cpu.status()[0]:
        pytest.skip(f"compiled CPU step unavailable: {_cpu.status()[1]}")
    g = torch.Generator().manual_seed(4)
    width = 2 * FILTER_BLOCK + 77
    z, q = (3 * torch.randn(6, width, generator=g) for _ in range(2))
    q[:, FILTER_BLOCK:2 * FILTER_BLOCK] = -float("inf")
    z, q = z.to(dtype), q.to(dtype)
    got, want = (torch.full((6, 3, 2), float("nan")) for _ in range(2))
    _cpu.cpu_block_step(z.clone(), q.clone(), 0.7, 0.1, torch.float32, got)
    steps.torch_block_step(z.clone(), q.clone(), 0.7, 0.1, torch.float32, want)
    assert (want[:, 1] == 0).all() and (want[:, 0, 0] > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_auto_is_the_unit_roundoff_over_the_vocabulary():
    assert resolve_eps("auto", torch.bfloat16, 49152) == 2**-8 / 49152
    assert resolve_eps("auto", torch.float32, 1000) == 2**-24 / 1000
    assert resolve_eps(1e-6, torch.float32, 1000) == 1e-6


def test_a_filter_that_skips_nothing_is_the_exact_backward_bit_for_bit(step):
    """Random inputs of unit-scale logits: no block is negligible, so filtering must take the exact
    path, to the bit, for the q_hidden and the head gradients."""
    inputs = make_inputs(batch=4, seq=10, hidden=16, vocab=VOCAB, q_head=True, q_bias=True, seed=3)
    _, exact = loss_and_grads(inputs, backend="chunked", chunk_size=8)
    with grad_filter_report() as report:
        _, filtered = loss_and_grads(inputs, backend="chunked", chunk_size=8, grad_filter_eps="auto")
    assert report.entries > 0 and report.head_entries > 0 and report.skipped_entries == 0
    for name in exact:
        assert torch.equal(filtered[name], exact[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filtered_gradient_is_exact_minus_what_the_report_says_it_skipped(step, monkeypatch, dtype):
    """One vocabulary tile and one token chunk, so that the skip rule sees the final p: the blocks left
    out are exactly those whose float64 p is below eps in every token; the gradient is the exact one
    less g_v * (sum of p Wq over them); the reported mass and fraction are theirs."""
    inputs = peaked(dtype, zipf=1.5, scale=0.3)  # a heavier tail: what is dropped shows in float32
    eps = 1e-4
    monkeypatch.setattr(_cpu, "last_level_cache_bytes", lambda: 2**30)  # one tile spans the vocabulary
    p, wq = float64_policy(inputs)
    n = p.shape[0]
    upstream = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def hq_grad(**options):
        leaves = {k: v.detach().clone().requires_grad_(k == "q_hidden") for k, v in inputs.items() if k != "labels"}
        stats = qadapter_token_stats(labels=inputs["labels"], **leaves, backend="chunked", chunk_size=n, **options)
        ((stats.q_taken * upstream[0]).sum() + (stats.value * upstream[1]).sum()).backward()
        mask = inputs["labels"][:, 1:] != -100
        return leaves["q_hidden"].grad[:, :-1][mask].double()

    exact = hq_grad()
    with grad_filter_report() as report:
        filtered = hq_grad(grad_filter_eps=eps)
    block = torch.arange(VOCAB) // FILTER_BLOCK
    blocks = int(block[-1]) + 1
    skippable = torch.tensor([bool((p[:, block == b] < eps).all()) for b in range(blocks)])
    assert 0 < int(skippable.sum()) < blocks  # the test is not vacuous: some blocks skipped, some not
    skipped = skippable[block]
    assert report.skipped_entries == n * int(skipped.sum()) and report.entries == n * VOCAB
    assert report.skipped_fraction == pytest.approx(int(skipped.sum()) / VOCAB)
    mass = p[:, skipped].sum(dim=1)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(report.dropped_mass.double(), mass, rtol=tol, atol=0)
    assert (mass <= eps * skipped.sum()).all()
    expected = exact - upstream[1].unsqueeze(1) * (p[:, skipped] @ wq[skipped])
    assert ((filtered - exact).norm() / exact.norm()) > 10 * tol  # filtering changed something
    assert ((filtered - expected).norm() / exact.norm()) < tol


@pytest.mark.parametrize("dtype, softcap", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 20.0)])
def test_filtered_gradient_is_within_the_stated_bound(step, monkeypatch, dtype, softcap):
    """Several vocabulary tiles and token chunks (the skip rule then bounds p against the row's
    log-sum-exp so far): per token, |dL/dh_q - exact| <= |g_v| * dropped mass * max_v |Wq[v]| (plus the
    dtype's rounding), the mass below eps times the entries skipped, and most of p @ Wq skipped; a
    soft cap only multiplies the skipped terms by 1 - tanh^2 <= 1."""
    monkeypatch.setattr(_cpu, "last_level_cache_bytes", lambda: 8 * 2 * FILTER_BLOCK * 2 * 4)  # 2-block tiles
    inputs = peaked(dtype, zipf=1.5, scale=0.3)
    eps = 1e-4
    n = int((inputs["labels"][:, 1:] != -100).sum())
    g_v = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def hq_grad(**options):
        leaves = {k: v.detach().clone().requires_grad_(k == "q_hidden") for k, v in inputs.items() if k != "labels"}
        stats = qadapter_token_stats(labels=inputs["labels"], **leaves, backend="chunked", chunk_size=8,
                                     logit_softcap=softcap, **options)
        (stats.value * g_v.to(stats.value.dtype)).sum().backward()
        mask = inputs["labels"][:, 1:] != -100
        return leaves["q_hidden"].grad[:, :-1][mask].double()

    exact = hq_grad()
    with grad_filter_report() as report:
        filtered = hq_grad(grad_filter_eps=eps)
    assert report.skipped_fraction > 0.5
    assert (report.dropped_mass <= eps * VOCAB).all()
    head_norm = inputs["weight"].double().norm(dim=1).max()
    # Both gradients are rounded to the dtype, and bfloat16 p @ Wq partial products once more on a CPU.
    rounding = (2**-7 if dtype == torch.bfloat16 else 1e-5) * exact.norm(dim=1)
    error = (filtered - exact).norm(dim=1)
    bound = g_v.abs() * report.dropped_mass.double() * head_norm
    assert (error <= bound * 1.01 + rounding).all()
    assert (bound > rounding).any()  # the bound is what the check is about, not the rounding


def test_trainable_head_skips_only_blocks_without_targets(step, monkeypatch):
    """dWq: a skipped block (every p below eps, no target) gets no gradient in a single chunk of tokens;
    what it would have had is below eps * sum_t |g_v| |h_q|; kept rows equal the exact ones."""
    monkeypatch.setattr(_cpu, "last_level_cache_bytes", lambda: 2**30)
    inputs = peaked(q_head=True)
    inputs["labels"][:, 1:] = torch.where(inputs["labels"][:, 1:] == -100, -100, inputs["labels"][:, 1:] % 1500)
    n = int((inputs["labels"][:, 1:] != -100).sum())
    _, exact = loss_and_grads(inputs, backend="chunked", chunk_size=n)
    with grad_filter_report() as report:
        _, filtered = loss_and_grads(inputs, backend="chunked", chunk_size=n, grad_filter_eps=1e-6)
    assert report.head_skipped_fraction > 0.3
    skipped = (filtered["q_weight"] == 0).all(dim=1)
    assert int(skipped.sum()) == report.head_skipped_entries // n
    assert not skipped[:1500].any()  # the targets' blocks are kept
    torch.testing.assert_close(filtered["q_weight"][~skipped], exact["q_weight"][~skipped], rtol=1e-5, atol=1e-7)
    assert 0 < exact["q_weight"][skipped].abs().max() < 1e-6 * inputs["q_hidden"].abs().sum()


def test_filtering_the_loss_output_is_exact():
    """The loss and its metrics do not depend on the filter (only the backward does)."""
    inputs = peaked()
    exact = loss_and_grads(inputs, backend="chunked", chunk_size=8)[0]
    filtered = loss_and_grads(inputs, backend="chunked", chunk_size=8, grad_filter_eps=1e-4)[0]
    for name in ("loss", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(filtered, name), getattr(exact, name))


@pytest.mark.parametrize("value, error, message", [
    (-1e-6, ValueError, "grad_filter_eps must be >= 0"),
    (float("nan"), ValueError, "grad_filter_eps must be finite"),
    ("automatic", ValueError, "grad_filter_eps must be 'auto' or a real number"),
    (True, TypeError, "grad_filter_eps must be a real number"),
    (None, TypeError, "grad_filter_eps must be a real number"),
])
def test_bad_grad_filter_eps_is_refused_naming_it(value, error, message):
    with pytest.raises(error, match=message):
        qadapter_loss(**make_inputs(), backend="chunked", grad_filter_eps=value)


@pytest.mark.parametrize("eps", [1e-6, "auto"])
def test_backends_that_do_not_filter_refuse_it(eps):
    with pytest.raises(ValueError, match="grad_filter_eps=.*does not implement"):
        qadapter_loss(**make_inputs(), backend="reference", grad_filter_eps=eps)
