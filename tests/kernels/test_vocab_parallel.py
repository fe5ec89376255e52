"""A vocabulary-parallel head (qadapter_kernels/vocab_parallel.py): 2 and 3 gloo processes, each
holding its rows of the head, compute what one process holding the whole head computes: the loss
(function and module) and its metrics, the token statistics, the gradients of ``q_hidden`` and of a
sharded Q head and bias, the combined log-probs (and their gradient), those of targets and ``combine_logits``; uneven
splits, a soft cap, float32 and bfloat16; a head of DTensors; gradient filtering's budget shared
among the ranks. Bad layouts get errors naming the argument. The collectives hold at their edges
(one row a rank, chunk sizes that differ by rank, infinite log-sum-exp parts).

Each world is spawned once (module fixture) and runs every case, saving what it got; the tests
compare that with the same calls in this process over the whole head."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import exit_worker, init_gloo, make_inputs, run_workers

from qadapter_kernels import (
    LossConfig,
    QAdapterLoss,
    combine_logits,
    combined_logprobs,
    combined_logprobs_at,
    grad_filter_report,
    qadapter_loss,
    qadapter_token_stats,
    vocab_shard,
)
from qadapter_kernels.steps import FILTER_BLOCK
from qadapter_kernels.vocab_parallel import agreed_chunk, merge_logsumexp

TIMEOUT_S = 60
WORLDS = (2, 3)
CASES = {  # V = 37 splits unevenly over 2 and 3 ranks (19 + 18, 13 + 12 + 12); 36 evenly
    "float32": dict(dtype=torch.float32, vocab=37, options=dict(chunk_size=4, grad_filter_eps="auto")),
    "float32-q-head-softcap": dict(dtype=torch.float32, vocab=37, q_head=True,
                                   options=dict(alpha_tilde=0.7, alpha_0=0.5, logit_softcap=2.0, value_at="next",
                                                reward_norm="mean")),
    "float32-even-reference": dict(dtype=torch.float32, vocab=36, options=dict(backend="reference", gamma=0.9)),
    "float32-alpha0-zero": dict(dtype=torch.float32, vocab=37, q_head=True, options=dict(alpha_0=0.0, chunk_size=3)),
    "bfloat16-q-head": dict(dtype=torch.bfloat16, vocab=37, q_head=True, options=dict(logit_softcap=3.0)),
}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
HEAD = ("weight", "q_weight", "q_bias")
FILTER_VOCAB = 4 * FILTER_BLOCK + 300  # two or more filter blocks on every rank
FILTER_BUDGET = 0.02
PER_VOCAB = ("q_weight_grad", "q_bias_grad", "logprobs", "combined")  # a rank holds its columns of these


def run_case(name: str, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Every vocabulary-parallel entry point on case ``name``: over the whole head (``group`` None),
    or over this rank's rows of it."""
    case = CASES[name]
    inputs = make_inputs(vocab=case["vocab"], hidden=16, dtype=case["dtype"], seed=7,
                         q_head=case.get("q_head", False), q_bias=case.get("q_head", False))
    rows = slice(None) if group is None else vocab_shard(case["vocab"], group)
    parallel = {} if group is None else {"group": group}
    head = {k: inputs[k][rows].detach().requires_grad_(inputs[k].requires_grad) for k in HEAD if k in inputs}
    return {**loss_results(inputs, head, dict(case["options"]), rows, parallel),
            **logprob_results(inputs, head, dict(case["options"]), rows, parallel, case["vocab"])}


def loss_results(inputs, head, options, rows, parallel) -> dict[str, torch.Tensor]:
    """The loss (function and module), its metrics and gradients, the token statistics."""
    q_head = {k: head[k] for k in ("q_weight", "q_bias") if k in head}
    base, labels = inputs["base_hidden"], inputs["labels"]
    hq = inputs["q_hidden"].detach().requires_grad_()
    out = qadapter_loss(base, hq, head["weight"], labels, **q_head, **options, **parallel, vocab_start=rows.start)
    out.loss.backward()
    got = {f"metric_{k}": v.detach() for k, v in out._asdict().items()}
    got["q_hidden_grad"] = hq.grad
    got.update({f"{k}_grad": head[k].grad for k in q_head})
    with torch.no_grad():
        stats = qadapter_token_stats(base, hq, head["weight"], labels, **q_head, **options, **parallel,
                                     vocab_start=rows.start)
        module = QAdapterLoss(**options, **parallel, vocab_start=rows.start)
        got["module_loss"] = module(base, hq, head["weight"], labels, **q_head).loss
    got["q_taken"], got["value"] = stats.q_taken, stats.value
    return got


def logprob_results(inputs, head, options, rows, parallel, vocab) -> dict[str, torch.Tensor]:
    """The combined log-probs (whole rows and of targets, with their ``q_hidden`` gradients) and
    ``combine_logits``."""
    config = LossConfig.from_options(**{k: v for k, v in options.items() if k not in ("backend", "chunk_size")})
    combination = dict(alpha_tilde=config.alpha_tilde, alpha_0=config.alpha_0)
    q_head = {k: head[k].detach() for k in ("q_weight", "q_bias") if k in head}
    base, labels = inputs["base_hidden"], inputs["labels"]
    got = {}
    # Differentiable where the logits are not capped in place, as in one process.
    hq = inputs["q_hidden"].detach().requires_grad_(config.logit_softcap is None)
    logprobs = combined_logprobs(base, hq, head["weight"], **q_head, **combination,
                                 logit_softcap=config.logit_softcap, chunk_size=5, **parallel)
    g = torch.Generator().manual_seed(11)
    got["logprobs"] = logprobs.detach()
    if hq.requires_grad:
        probe = torch.randn(*base.shape[:-1], vocab, generator=g)[..., rows]  # a loss on every log-prob
        (logprobs * probe).sum().backward()
        got["logprobs_grad"] = hq.grad

    hq = inputs["q_hidden"].detach().requires_grad_()
    at = combined_logprobs_at(base[:, :-1], hq[:, :-1], head["weight"], labels[:, 1:], **q_head, **combination,
                              logit_softcap=config.logit_softcap, chunk_size=options.get("chunk_size"), **parallel,
                              vocab_start=rows.start)
    at.combined.sum().backward()
    got["combined_at"], got["base_at"], got["combined_at_grad"] = at.combined.detach(), at.base, hq.grad

    z, q = (3 * torch.randn(5, vocab, generator=g, dtype=torch.float64).to(base.dtype) for _ in range(2))
    got["combined"] = combine_logits(z[..., rows], q[..., rows], **combination, **parallel)
    return got


def expect_error(got: dict, key: str, error: type, call) -> None:
    """Records the error ``call`` raises (every rank raises it, or the ranks would hang)."""
    try:
        call()
    except error as exc:
        got[key] = str(exc)
    else:
        got[key] = "no error"


def bad_layouts(group: dist.ProcessGroup) -> dict[str, str]:
    """A whole head on every rank, a missing ``vocab_start``, a gap between the ranks' rows, a rank
    with no rows, labels beyond the whole vocabulary, a whole Q head beside a sharded frozen one."""
    inputs = make_inputs(vocab=37, hidden=16, seed=3)
    rows = vocab_shard(37, group)
    base, hq, weight, labels = (inputs[k] for k in ("base_hidden", "q_hidden", "weight", "labels"))
    got = {}
    expect_error(got, "whole_head", ValueError,
                 lambda: qadapter_loss(base, hq, weight, labels, group=group, vocab_start=rows.start))
    expect_error(got, "no_start", TypeError, lambda: qadapter_loss(base, hq, weight[rows], labels, group=group))
    last = dist.get_rank(group) == dist.get_world_size(group) - 1
    expect_error(got, "gap", ValueError, lambda: qadapter_loss(base, hq, weight[rows], labels, group=group,
                                                               vocab_start=rows.start + last))
    expect_error(got, "empty", ValueError, lambda: qadapter_loss(base, hq, weight[:0] if last else weight[rows],
                                                                 labels, group=group, vocab_start=rows.start))
    beyond = labels.clone()
    beyond[0, -1] = 37
    expect_error(got, "labels", ValueError,
                 lambda: qadapter_loss(base, hq, weight[rows], beyond, group=group, vocab_start=rows.start))
    expect_error(got, "q_weight", ValueError,
                 lambda: qadapter_loss(base, hq, weight[rows], labels, q_weight=weight, group=group,
                                       vocab_start=rows.start))
    # torch.func's transforms cannot run the merges' autograd Functions: refused by name, whatever the backend.
    for backend in ("reference", "chunked"):
        expect_error(got, f"func_{backend}", RuntimeError, lambda backend=backend: torch.func.grad(
            lambda h: qadapter_loss(base, h, weight[rows], labels, group=group, vocab_start=rows.start,
                                    backend=backend).loss)(hq))
    expect_error(got, "func_rows", RuntimeError, lambda: torch.func.grad(
        lambda h: combined_logprobs(base, h, weight[rows], group=group).exp().sum())(hq))
    return got


def numpy_counts(group: dist.ProcessGroup) -> dict:
    """``vocab_shard``'s ``vocab`` and the loss's ``vocab_start`` given as numpy integers: the rows and
    the loss plain ints give, or the error that refused them."""
    inputs = make_inputs(vocab=37, hidden=16, seed=3)
    base, hq, weight, labels = (inputs[k] for k in ("base_hidden", "q_hidden", "weight", "labels"))
    rows = vocab_shard(37, group)
    got = {"want_rows": (rows.start, rows.stop),
           "want_loss": qadapter_loss(base, hq, weight[rows], labels, group=group, vocab_start=rows.start).loss}
    try:
        shard = vocab_shard(np.int64(37), group)
        got["rows"] = (shard.start, shard.stop)
        got["loss"] = qadapter_loss(base, hq, weight[rows], labels, group=group, vocab_start=np.int64(rows.start)).loss
    except ValueError as exc:
        got["error"] = str(exc)
    return got


def dtensor_head(world: int | None = None) -> dict[str, torch.Tensor]:
    """The loss, its gradients and the combined log-probs with the head given as DTensors sharded on
    their rows (``Shard(0)`` over a 1-D mesh of ``world`` ranks; None: plain tensors, one process).
    The head's gradients are gathered whole; the log-probs are the rank's columns."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    inputs = make_inputs(vocab=37, hidden=16, seed=5, q_head=True, q_bias=True)
    head = {k: inputs[k].detach() for k in HEAD}
    if world is not None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        head = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in head.items()}
    head["q_weight"].requires_grad_()
    head["q_bias"].requires_grad_()
    base, hq = inputs["base_hidden"], inputs["q_hidden"].detach().requires_grad_()
    out = qadapter_loss(base, hq, head["weight"], inputs["labels"], q_weight=head["q_weight"], q_bias=head["q_bias"],
                        alpha_0=0.3, logit_softcap=2.5)
    out.loss.backward()
    whole = {k: v.full_tensor() if isinstance(v, DTensor) else v
             for k, v in (("q_weight_grad", head["q_weight"].grad), ("q_bias_grad", head["q_bias"].grad))}
    with torch.no_grad():
        logprobs = combined_logprobs(base, hq, head["weight"], q_weight=head["q_weight"], q_bias=head["q_bias"],
                                     alpha_0=0.3, logit_softcap=2.5)
    return {"loss": out.loss.detach(), "q_hidden_grad": hq.grad, **whole, "logprobs": logprobs}


def filtered_gradients(group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor | float]:
    """The ``q_hidden`` gradient of the token statistics without and with a filter budget, on
    test_grad_filter's peaked inputs over a vocabulary of several filter blocks per rank, what was
    left out here, the upstream gradients and the largest row of the head."""
    from test_grad_filter import peaked, token_stats_grads, varied

    inputs = varied(peaked(torch.float32, zipf=1.5, scale=0.3, vocab=FILTER_VOCAB))
    rows = slice(None) if group is None else vocab_shard(FILTER_VOCAB, group)
    parallel = {} if group is None else {"group": group, "vocab_start": rows.start}
    local = {**inputs, "weight": inputs["weight"][rows]}
    n = int((inputs["labels"][:, 1:] != -100).sum())
    upstream = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact, _ = token_stats_grads(local, upstream, chunk_size=8, **parallel)
    with grad_filter_report() as report:
        filtered, _ = token_stats_grads(local, upstream, chunk_size=8, grad_filter_eps=FILTER_BUDGET, **parallel)
    return {"exact": exact, "filtered": filtered, "dropped_mass": report.dropped_mass.double(),
            "skipped_fraction": report.skipped_fraction, "upstream": upstream,
            "head_norm": inputs["weight"].double().norm(dim=1).max()}


def collectives(group: dist.ProcessGroup) -> dict:
    """The helpers' collectives on their edge cases: ``vocab_shard`` of the smallest head (one row a
    rank), ``agreed_chunk`` of chunk sizes that differ by rank, and ``merge_logsumexp`` of random parts
    with -inf on every rank (stays -inf), on one rank, and +inf on one (NaN), summing a tensor alongside."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = vocab_shard(world, group)
    g = torch.Generator().manual_seed(41 + rank)
    parts = 4 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    parts[1, 0] = float("-inf")  # every rank
    parts[1, 1] = float("-inf") if rank == 0 else parts[1, 1]
    parts[2, 2] = float("inf") if rank == world - 1 else parts[2, 2]
    summed = torch.randn(2, 3, generator=g, dtype=torch.float64)
    lse, total = merge_logsumexp(parts, group, summed=summed)
    return {"rows": (shard.start, shard.stop), "chunk": agreed_chunk(9 - 2 * rank, group, torch.device("cpu")),
            "parts": parts, "summed": summed, "lse": lse, "total": total}


def _worker(rank, world, init_file, out_dir):
    init_gloo(rank, world, init_file, TIMEOUT_S)
    group = dist.group.WORLD
    results = {name: run_case(name, group) for name in CASES}
    results["bad"] = bad_layouts(group)
    results["numpy"] = numpy_counts(group)
    results["dtensor"] = dtensor_head(world)
    results["filtered"] = filtered_gradients(group)
    results["collectives"] = collectives(group)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    exit_worker()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """What each rank of each world got: ``worlds[world][rank][case]``."""
    got = {}
    for world in WORLDS:
        directory = tmp_path_factory.mktemp(f"world{world}")
        run_workers(_worker, world, directory, timeout_s=TIMEOUT_S)
        got[world] = [torch.load(directory / f"rank{rank}.pt") for rank in range(world)]
    return got


def shard_sizes(vocab: int, world: int) -> list[int]:
    return [t.shape[0] for t in torch.tensor_split(torch.arange(vocab), world)]


def rank_columns(key: str, whole: torch.Tensor, rows: slice) -> torch.Tensor:
    """What a rank holds of a one-process result: its rows of the head's gradients, its columns of
    the log-probs; everything else whole."""
    if key not in PER_VOCAB:
        return whole
    return whole[rows] if key in ("q_weight_grad", "q_bias_grad") else whole[..., rows]


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_shard_splits_as_tensor_split(worlds, world):
    assert [ranks["float32"]["logprobs"].shape[-1] for ranks in worlds[world]] == shard_sizes(37, world)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", CASES)
def test_ranks_compute_what_one_process_computes(worlds, world, name):
    want = run_case(name)
    tolerance = TOLERANCE[CASES[name]["dtype"]]
    sizes = shard_sizes(CASES[name]["vocab"], world)
    for rank, ranks in enumerate(worlds[world]):
        got = ranks[name]
        assert set(got) == set(want)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        for key, whole in want.items():
            torch.testing.assert_close(got[key], rank_columns(key, whole, rows), **tolerance,
                                       msg=lambda m, k=key, r=rank: f"{k}, rank {r}: {m}")


@pytest.mark.parametrize("world", WORLDS)
def test_ranks_share_each_tokens_filter_budget(worlds, world):
    """Gradient filtering over a split head: each rank leaves out blocks within its share of a token's
    budget (``budget * V_r / V``) by masses against its own log-sum-exp (upper bounds of the whole
    row's), so the ranks' dropped masses add up to at most the budget; the rank holding the head of
    the peaked policy leaves some out (the others' own softmax over a tail is far flatter than the
    whole row's); the gradient, the same on every rank, is within the bound of test_grad_filter of
    the exact one, which is one process's."""
    one = filtered_gradients()
    ranks = [got["filtered"] for got in worlds[world]]
    assert ranks[0]["skipped_fraction"] > 0.1, [got["skipped_fraction"] for got in ranks]
    shares = [FILTER_BUDGET * size / FILTER_VOCAB for size in shard_sizes(FILTER_VOCAB, world)]
    for got, share in zip(ranks, shares):
        assert (got["dropped_mass"] <= share * (1 + 1e-6)).all()
    assert (ranks[0]["dropped_mass"] > 0.5 * shares[0]).any()  # the share is what bounds it
    total = sum(got["dropped_mass"] for got in ranks)
    assert (total > 0).float().mean() > 0.5
    exact, filtered = ranks[0]["exact"], ranks[0]["filtered"]
    torch.testing.assert_close(exact, one["exact"], rtol=1e-5, atol=1e-6)
    for got in ranks[1:]:
        torch.testing.assert_close(got["filtered"], filtered, rtol=1e-5, atol=1e-6)
    error = (filtered - exact).norm(dim=1)
    bound = one["upstream"][1].abs() * total * one["head_norm"]
    assert (error <= bound * 1.01 + 1e-5 * exact.norm(dim=1)).all()
    assert (error > 1e-5 * exact.norm(dim=1)).any()  # filtering changed the gradient


@pytest.mark.parametrize("world", WORLDS)
def test_a_dtensor_head_brings_its_own_layout(worlds, world):
    """A head of DTensors sharded on their rows, split as torch.chunk splits (13 + 13 + 11 rows of 37
    over three ranks, not tensor_split's 13 + 12 + 12)."""
    want = dtensor_head()
    for rank, ranks in enumerate(worlds[world]):
        ids = torch.chunk(torch.arange(37), world)[rank]
        for key, expected in want.items():
            expected = expected[..., ids] if key == "logprobs" else expected
            torch.testing.assert_close(ranks["dtensor"][key], expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=key, r=rank: f"{k}, rank {r}: {m}")


@pytest.mark.parametrize("world", WORLDS)
def test_bad_layouts_name_the_argument(worlds, world):
    for bad in (ranks["bad"] for ranks in worlds[world]):
        assert "vocab_start" in bad["whole_head"] and "overlaps" in bad["whole_head"], bad["whole_head"]
        assert "vocab_start must be an integer >= 0 with group" in bad["no_start"], bad["no_start"]
        assert "vocab_start" in bad["gap"] and "leaves a gap" in bad["gap"], bad["gap"]
        assert bad["empty"].startswith(f"weight must be [V_r, d] with V_r >= 1 rows on every rank of group; on ranks "
                                       f"[{world - 1}]"), bad["empty"]
        assert bad["labels"].startswith("labels must lie in [0, 37)"), bad["labels"]
        assert bad["q_weight"].startswith("q_weight must be [V, d]"), bad["q_weight"]
        for key in ("func_reference", "func_chunked", "func_rows"):
            assert bad[key].startswith("a vocabulary-parallel head (group=) merges the ranks' statistics"), bad[key]


@pytest.mark.parametrize("world", WORLDS)
def test_numpy_integers_are_counts(worlds, world):
    for got in (ranks["numpy"] for ranks in worlds[world]):
        assert "error" not in got, got["error"]
        assert got["rows"] == got["want_rows"]
        torch.testing.assert_close(got["loss"], got["want_loss"], rtol=0, atol=0)


@pytest.mark.parametrize("world", WORLDS)
def test_collectives_at_their_edges(worlds, world):
    """One row a rank is a valid split; the agreed chunk is the ranks' smallest; the merged log-sum-exp
    is the whole row's (-inf where every rank's part is -inf, NaN where one is +inf, as one process's
    max-shifted form gives), and ``summed`` comes back summed over the ranks."""
    got = [ranks["collectives"] for ranks in worlds[world]]
    assert [r["rows"] for r in got] == [(rank, rank + 1) for rank in range(world)]
    assert [r["chunk"] for r in got] == [9 - 2 * (world - 1)] * world
    parts = torch.stack([r["parts"] for r in got])
    want = torch.logsumexp(parts, dim=0)
    want[2, 2] = float("nan")
    assert want[1, 0] == float("-inf") and torch.isfinite(want[1, 1])
    total = torch.stack([r["summed"] for r in got]).sum(0)
    for r in got:
        torch.testing.assert_close(r["lse"], want, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(r["total"], total, rtol=1e-12, atol=1e-12)


def test_a_group_needs_torch_distributed_and_a_start_needs_a_group(inputs):
    args = (inputs["base_hidden"], inputs["q_hidden"], inputs["weight"], inputs["labels"])
    with pytest.raises(ValueError, match="vocab_start is given without group"):
        qadapter_loss(*args, vocab_start=0)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="group needs torch.distributed initialized"):
            qadapter_loss(*args, group=object(), vocab_start=0)
        with pytest.raises(RuntimeError, match="vocab_shard needs torch.distributed initialized"):
            vocab_shard(37)
    with pytest.raises(TypeError, match=re.escape("vocab must be an integer >= 1 (the whole head's rows); got")):
        vocab_shard(np.bool_(True))
    with pytest.raises(ValueError, match=re.escape("vocab must be an integer >= 1 (the whole head's rows); got 0")):
        vocab_shard(0)
