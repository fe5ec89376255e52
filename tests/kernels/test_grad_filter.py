"""Gradient filtering in the chunked backend (``grad_filter_eps``, a probability budget per token):
against the exact backward and an independent float64 account of what each token leaves out, for
both CPU steps (compiled and eager)."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_and_grads, make_inputs

from qadapter_kernels import _cpu, qadapter_loss, qadapter_token_stats, sizing, steps, tiles
from qadapter_kernels.grad_filter import dropped_blocks, grad_filter_report, mass_budget
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


def varied(inputs, seed=5):
    """``inputs`` with each token's tilt scaled by its own factor in [0.5, 2): tokens whose tails
    differ, so each leaves out a different number of blocks."""
    hq = inputs["q_hidden"].detach().clone()
    factor = 0.5 + 1.5 * torch.rand(hq.shape[:2], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    hq[..., 0] = (hq[..., 0].double() * factor).to(hq.dtype)
    return {**inputs, "q_hidden": hq.requires_grad_()}


def float64_policy(inputs, alpha_tilde=1.0, alpha_0=0.01, softcap=None):
    """``p`` of every scored token in float64, packed in row order, its ``Q`` head, and the soft cap's
    slope on ``Q`` (ones without a cap)."""
    mask = inputs["labels"][:, 1:] != -100
    hb = inputs["base_hidden"][:, :-1][mask].double()
    hq = inputs["q_hidden"][:, :-1][mask].double()
    w = inputs["weight"].double()
    wq = inputs.get("q_weight", inputs["weight"]).detach().double()
    with torch.no_grad():
        z, q = hb @ w.T, hq @ wq.T
        if softcap is not None:
            z, q = softcap * torch.tanh(z / softcap), softcap * torch.tanh(q / softcap)
        slope = torch.ones_like(q) if softcap is None else 1 - (q / softcap) ** 2
        return torch.softmax((q + alpha_0 * z) / alpha_tilde, dim=1), wq, slope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_block_stats_match_the_eager_ones(dtype):
    """The compiled step's per-block mass (from its sweep) against the eager sums,
    on a tile with a partial last block and a masked (-inf) block."""
    if not _cpu.status()[0]:
        pytest.skip(f"compiled CPU step unavailable: {_cpu.status()[1]}")
    g = torch.Generator().manual_seed(4)
    width = 2 * FILTER_BLOCK + 77
    z, q = (3 * torch.randn(6, width, generator=g) for _ in range(2))
    q[:, FILTER_BLOCK:2 * FILTER_BLOCK] = -float("inf")
    z, q = z.to(dtype), q.to(dtype)
    got, want = (torch.full((6, 3), float("nan")) for _ in range(2))
    _cpu.cpu_block_step(z.clone(), q.clone(), 0.7, 0.1, torch.float32, got)
    steps.torch_block_step(z.clone(), q.clone(), 0.7, 0.1, torch.float32, want)
    assert (want[:, 1] == 0).all() and (want[:, 0] > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_auto_is_the_unit_roundoff_of_the_dtype():
    assert mass_budget("auto", torch.bfloat16) == 2**-8
    assert mass_budget("auto", torch.float32) == 2**-24
    assert mass_budget(1e-3, torch.float32) == 1e-3


def test_a_filter_that_skips_nothing_is_the_exact_backward_bit_for_bit(step):
    """Random inputs of unit-scale logits: every block holds far more than the float32 budget, so
    filtering must take the exact path, to the bit, for the q_hidden and the head gradients."""
    inputs = make_inputs(batch=4, seq=10, hidden=16, vocab=VOCAB, q_head=True, q_bias=True, seed=3)
    _, exact = loss_and_grads(inputs, backend="chunked", chunk_size=8)
    with grad_filter_report() as report:
        _, filtered = loss_and_grads(inputs, backend="chunked", chunk_size=8, grad_filter_eps="auto")
    assert report.entries > 0 and report.head_entries > 0 and report.skipped_entries == 0
    for name in exact:
        assert torch.equal(filtered[name], exact[name]), name


def lightest_blocks(p: torch.Tensor, budget: float, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, V]`` bool, from float64 ``p``: per token, the columns of its lightest FILTER_BLOCK blocks
    while their summed mass stays within ``budget`` (``kept``: ``[n, blocks]`` blocks never left out),
    written out independently of the backend's vectorized rule. Asserts that no token's running sum
    lies within 1e-4 of the budget, where float32 and float64 masses could choose differently."""
    block = torch.arange(p.shape[1]) // FILTER_BLOCK
    blocks = int(block[-1]) + 1
    mass = torch.stack([p[:, block == b].sum(dim=1) for b in range(blocks)], dim=1)
    dropped = torch.zeros(p.shape, dtype=torch.bool)
    for t in range(p.shape[0]):
        total = 0.0
        last = kept[t] if kept is not None else torch.zeros(blocks, dtype=torch.bool)
        for b in sorted(range(blocks), key=lambda b: float("inf") if last[b] else float(mass[t, b])):
            if last[b]:
                break
            total += float(mass[t, b])
            assert abs(total - budget) > 1e-4 * budget, "budget too close to a token's running sum"
            if total > budget:
                break
            dropped[t, block == b] = True
    return dropped


def token_stats_grads(inputs, upstream, backend="chunked", **options):
    """The q_hidden (and, with a Q head, Wq) gradients of ``qadapter_token_stats`` under the upstream
    ``(g_a, g_v)``, in float64, q_hidden packed in token order."""
    trainable = ("q_hidden", "q_weight")
    leaves = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in inputs.items() if k != "labels"}
    stats = qadapter_token_stats(labels=inputs["labels"], **leaves, backend=backend, **options)
    ((stats.q_taken * upstream[0].to(stats.value.dtype)).sum()
     + (stats.value * upstream[1].to(stats.value.dtype)).sum()).backward()
    mask = inputs["labels"][:, 1:] != -100
    grad_wq = leaves["q_weight"].grad.double() if "q_weight" in leaves else None
    return leaves["q_hidden"].grad[:, :-1][mask].double(), grad_wq


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_region_reports_its_backward_once(reentrant):
    """Activation checkpointing runs the forward again for the backward: the report counts the
    backward's filtering once, as without checkpointing, with each token's dropped mass once."""
    from torch.utils.checkpoint import checkpoint

    inputs = varied(peaked(q_head=True))
    reports = []
    for checkpointed in (False, True):
        leaves = {k: v.detach().clone().requires_grad_(k == "q_hidden") for k, v in inputs.items() if k != "labels"}

        def loss(q_hidden, leaves=leaves):
            return qadapter_loss(labels=inputs["labels"], **{**leaves, "q_hidden": q_hidden}, backend="chunked",
                                 chunk_size=8, grad_filter_eps=0.02).loss

        with grad_filter_report() as report:
            value = (checkpoint(loss, leaves["q_hidden"], use_reentrant=reentrant) if checkpointed
                     else loss(leaves["q_hidden"]))
            value.backward()
        reports.append(report)
    plain, checkpointed = reports
    assert plain.skipped_entries > 0 and plain.dropped_mass.shape == (int((inputs["labels"][:, 1:] != -100).sum()),)
    assert (checkpointed.entries, checkpointed.skipped_entries) == (plain.entries, plain.skipped_entries)
    assert torch.equal(checkpointed.dropped_mass, plain.dropped_mass)


def scored_targets(inputs) -> torch.Tensor:
    return inputs["labels"][:, 1:][inputs["labels"][:, 1:] != -100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filtered_gradient_is_exact_minus_each_tokens_lightest_blocks(step, monkeypatch, dtype):
    """One vocabulary tile and one token chunk, so that the rule sees the final p: each token leaves
    out exactly its lightest blocks within the budget (a float64 account); the gradient is the exact
    one less g_v * (sum of p Wq over them); the reported entries and masses are theirs."""
    inputs = varied(peaked(dtype, zipf=1.5, scale=0.3))  # a heavier tail: what is dropped shows in float32
    budget = 0.02
    monkeypatch.setattr(_cpu, "last_level_cache_bytes", lambda: 2**30)  # one tile spans the vocabulary
    p, wq, _ = float64_policy(inputs)
    n = p.shape[0]
    upstream = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact, _ = token_stats_grads(inputs, upstream, chunk_size=n)
    with grad_filter_report() as report:
        filtered, _ = token_stats_grads(inputs, upstream, chunk_size=n, grad_filter_eps=budget)
    dropped = lightest_blocks(p, budget)
    # Not vacuous: most tokens leave blocks out, none all of them, and they differ in how many.
    assert dropped.any(dim=1).float().mean() > 0.5 and not dropped.all(dim=1).any()
    assert len(set(dropped.sum(dim=1).tolist())) > 1
    assert report.entries == n * VOCAB and report.skipped_entries == int(dropped.sum())
    mass = (p * dropped).sum(dim=1)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(report.dropped_mass.double(), mass, rtol=tol, atol=0)
    assert (mass <= budget).all()
    expected = exact - upstream[1].unsqueeze(1) * ((p * dropped) @ wq)
    assert ((filtered - exact).norm() / exact.norm()) > 10 * tol  # filtering changed something
    assert ((filtered - expected).norm() / exact.norm()) < tol


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_whole_row_steps_filter_as_the_float64_account_says(softcap):
    """chunked-triton (its row step under Triton's interpreter) tiles whole rows, so its rule sees the
    final p: each token leaves out its lightest blocks within the budget, by the block statistics
    its row step writes, and the gradient is the exact one less g_v * (1 - tanh^2) p Wq over them."""
    from qadapter_kernels import backends

    if not backends()["chunked-triton"].available:
        pytest.skip(f"chunked-triton unavailable: {backends()['chunked-triton'].reason}")
    inputs = varied(peaked(torch.float32, zipf=1.5, scale=0.3))
    budget = 0.02
    p, wq, slope = float64_policy(inputs, softcap=softcap)
    n = p.shape[0]
    upstream = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact, _ = token_stats_grads(inputs, upstream, "chunked-triton", chunk_size=n, logit_softcap=softcap)
    with grad_filter_report() as report:
        filtered, _ = token_stats_grads(inputs, upstream, "chunked-triton", chunk_size=n, logit_softcap=softcap,
                                        grad_filter_eps=budget)
    dropped = lightest_blocks(p, budget)
    assert dropped.any(dim=1).float().mean() > 0.5 and report.skipped_entries == int(dropped.sum())
    torch.testing.assert_close(report.dropped_mass.double(), (p * dropped).sum(dim=1), rtol=1e-5, atol=0)
    expected = exact - upstream[1].unsqueeze(1) * ((p * slope * dropped) @ wq)
    assert ((filtered - exact).norm() / exact.norm()) > 1e-4
    assert ((filtered - expected).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize("dtype, softcap", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 20.0)])
def test_filtered_gradient_is_within_the_stated_bound(step, monkeypatch, dtype, softcap):
    """Several vocabulary tiles and token chunks (the rule then bounds p against the row's
    log-sum-exp so far and spends a token's budget tile by tile): per token, the dropped mass is
    within the budget and |dL/dh_q - exact| <= |g_v| * dropped mass * max_v |Wq[v]| (plus the dtype's
    rounding), with much of p @ Wq skipped; a soft cap only multiplies the skipped terms by
    1 - tanh^2 <= 1."""
    monkeypatch.setattr(_cpu, "last_level_cache_bytes", lambda: 8 * 2 * FILTER_BLOCK * 2 * 4)  # 2-block tiles
    inputs = varied(peaked(dtype, zipf=1.5, scale=0.3))
    budget = 0.02
    n = int((inputs["labels"][:, 1:] != -100).sum())
    upstream = torch.stack([torch.zeros(n, dtype=torch.float64),
                            torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)])
    exact, _ = token_stats_grads(inputs, upstream, chunk_size=8, logit_softcap=softcap)
    with grad_filter_report() as report:
        filtered, _ = token_stats_grads(inputs, upstream, chunk_size=8, logit_softcap=softcap, grad_filter_eps=budget)
    assert report.skipped_fraction > 0.3
    assert (report.dropped_mass <= budget * (1 + 1e-6)).all()
    head_norm = inputs["weight"].double().norm(dim=1).max()
    # Both gradients are rounded to the dtype, and bfloat16 p @ Wq partial products once more on a CPU.
    rounding = (2**-7 if dtype == torch.bfloat16 else 1e-5) * exact.norm(dim=1)
    error = (filtered - exact).norm(dim=1)
    bound = upstream[1].abs() * report.dropped_mass.double() * head_norm
    assert (error <= bound * 1.01 + rounding).all()
    assert (bound > rounding).any()  # the bound is what the check is about, not the rounding


def test_trainable_head_leaves_out_each_tokens_lightest_blocks_but_its_target(step, monkeypatch):
    """dWq in one tile: each token leaves out its lightest blocks within the budget, never its target's
    block (a float64 account): dWq is the exact one less sum_t g_v[t] p_t[v] h_q[t] over them."""
    monkeypatch.setattr(_cpu, "last_level_cache_bytes", lambda: 2**30)
    inputs = varied(peaked(torch.float64, q_head=True, zipf=1.5, scale=0.3))
    budget = 0.02
    p, _, _ = float64_policy(inputs)
    n = p.shape[0]
    upstream = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, exact = token_stats_grads(inputs, upstream, chunk_size=n)
    with grad_filter_report() as report:
        _, filtered = token_stats_grads(inputs, upstream, chunk_size=n, grad_filter_eps=budget)
    target_block = torch.zeros(n, -(-VOCAB // FILTER_BLOCK), dtype=torch.bool)
    target_block[torch.arange(n), scored_targets(inputs) // FILTER_BLOCK] = True
    dropped = lightest_blocks(p, budget, kept=target_block)
    assert 0 < int(dropped.sum()) and report.head_skipped_entries == int(dropped.sum())
    assert not (dropped & target_block.repeat_interleave(FILTER_BLOCK, dim=1)[:, :VOCAB]).any()
    mask = inputs["labels"][:, 1:] != -100
    hq = inputs["q_hidden"][:, :-1][mask].double()
    expected = exact - ((upstream[1].unsqueeze(1) * p * dropped).T @ hq)
    assert (filtered - exact).norm() / exact.norm() > 1e-8
    torch.testing.assert_close(filtered, expected, rtol=1e-9, atol=1e-12)


def test_filtering_the_loss_output_is_exact():
    """The loss and its metrics do not depend on the filter (only the backward does)."""
    inputs = peaked()
    exact = loss_and_grads(inputs, backend="chunked", chunk_size=8)[0]
    filtered = loss_and_grads(inputs, backend="chunked", chunk_size=8, grad_filter_eps=0.02)[0]
    for name in ("loss", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(filtered, name), getattr(exact, name))


@pytest.mark.parametrize("value, error, message", [
    (-1e-6, ValueError, "grad_filter_eps must be >= 0"),
    (float("nan"), ValueError, "grad_filter_eps must be finite"),
    ("automatic", ValueError, r"grad_filter_eps must be 'auto' or a probability budget in \[0, 1\)"),
    (1.0, ValueError, r"grad_filter_eps must be 'auto' or a probability budget in \[0, 1\), got 1.0"),
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


def test_blocks_holding_exactly_the_allowance_are_left_out():
    """As many blocks as hold at most m: lightest blocks whose masses add up to the allowance exactly
    (dyadic masses, exact sums) are all left out, and nothing heavier."""
    mass = torch.tensor([[0.5, 0.125, 0.25, 0.125], [0.375, 0.0625, 0.5, 0.0625]], dtype=torch.float64)
    drop = dropped_blocks(mass, torch.tensor([0.25, 0.5], dtype=torch.float64))
    assert drop.tolist() == [[False, True, False, True], [True, True, False, True]]


def test_reported_mass_is_what_the_gradient_lost_across_vocabulary_tiles(step, monkeypatch):
    """Several vocabulary tiles: masses left out of earlier tiles are carried over to the row's final
    log-sum-exp, so each token's reported dropped mass is the probability its gradient lost. A head
    column that is 1 everywhere (no change to p) turns that column of ``E_p[Wq]`` into ``sum p``."""
    inputs = varied(peaked(zipf=1.5, scale=0.3))
    inputs["weight"][:, 1] = 1.0
    monkeypatch.setattr(sizing, "cpu_tile_columns", lambda *args, **options: 2 * FILTER_BLOCK)  # three tiles
    n = len(scored_targets(inputs))
    upstream = torch.stack([torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)])
    exact, _ = token_stats_grads(inputs, upstream, chunk_size=n)
    with grad_filter_report() as report:
        filtered, _ = token_stats_grads(inputs, upstream, chunk_size=n, grad_filter_eps=0.02)
    lost = exact[:, 1] - filtered[:, 1]
    assert (lost > 1e-4).float().mean() > 0.5  # not vacuous
    torch.testing.assert_close(report.dropped_mass.double(), lost, rtol=1e-4, atol=1e-6)
    assert (lost <= 0.02 + 1e-6).all()


def test_the_budget_is_spent_across_the_vocabulary_tiles(step, monkeypatch):
    """A tile ending at column v1 may leave out at most ``m * v1 / V`` of a token's probability, so
    the first tile cannot spend the whole budget. A head column that is 1 over the first tile and 0
    elsewhere makes that column of the gradient's loss the probability left out of the first tile."""
    inputs = varied(peaked(zipf=1.5, scale=0.3))
    monkeypatch.setattr(sizing, "cpu_tile_columns", lambda *args, **options: 2 * FILTER_BLOCK)  # three tiles
    first_end = next(iter(tiles.chunks(VOCAB, 2 * FILTER_BLOCK)))[1]
    inputs["weight"][:, 1] = (torch.arange(VOCAB) < first_end).to(inputs["weight"].dtype)
    n = len(scored_targets(inputs))
    upstream = torch.stack([torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)])
    budget = 0.008
    exact, _ = token_stats_grads(inputs, upstream, chunk_size=n)
    filtered, _ = token_stats_grads(inputs, upstream, chunk_size=n, grad_filter_eps=budget)
    lost = exact[:, 1] - filtered[:, 1]
    assert (lost > 1e-4).any()  # the first tile leaves something out
    assert (lost <= budget * first_end / VOCAB + 1e-6).all()
