"""A training step wrapped in torch.compile runs through qadapter_loss and matches eager."""

from __future__ import annotations

from helpers import assert_compiled_matches_eager, make_inputs

from qadapter_kernels import qadapter_loss


def test_compiled_step_matches_eager():
    x = make_inputs(seed=3, q_head=True, q_bias=True)

    def step(base_hidden, q_hidden, weight, labels, q_weight, q_bias):
        return qadapter_loss(base_hidden, q_hidden, weight, labels, q_weight=q_weight, q_bias=q_bias,
                             backend="chunked", chunk_size=5, value_at="next").loss

    args = [x[k] for k in ("base_hidden", "q_hidden", "weight", "labels", "q_weight", "q_bias")]
    trainable = [x["q_hidden"], x["q_weight"], x["q_bias"]]
    assert_compiled_matches_eager(step, args, trainable, value_tol=(1e-6, 1e-7), grad_tol=(1e-5, 1e-7))


def test_compiled_building_blocks_match_eager():
    """torch.compile traces the building blocks other losses are made of (token statistics, the
    combined policy's log-probs of targets), soft cap included, with their gradients."""
    from qadapter_kernels import combined_logprobs_at, qadapter_token_stats

    x = make_inputs(seed=4, q_head=True)

    def blocks(base_hidden, q_hidden, weight, labels, q_weight):
        stats = qadapter_token_stats(base_hidden, q_hidden, weight, labels, q_weight=q_weight, backend="chunked",
                                     chunk_size=4, logit_softcap=2.0)
        at = combined_logprobs_at(base_hidden[:, :-1], q_hidden[:, :-1], weight, labels[:, 1:], q_weight=q_weight,
                                  backend="chunked", chunk_size=4)
        return stats.rewards.square().sum() + stats.value.sum() + at.combined.sum()

    args = [x[k] for k in ("base_hidden", "q_hidden", "weight", "labels", "q_weight")]
    trainable = [x["q_hidden"], x["q_weight"]]
    assert_compiled_matches_eager(blocks, args, trainable, value_tol=(1e-6, 1e-6), grad_tol=(1e-5, 1e-7))



def test_the_input_checks_break_the_graph_silently():
    """The loss's data-dependent input checks (token ids in range, some token scored) run eagerly
    behind a ``torch.compiler.disable`` break, which dynamo takes silently; traced, their
    ``bool(mask.any())`` broke the graph with a warning printed into every compiled training run."""
    import torch

    x = make_inputs(seed=5)

    def step(base_hidden, q_hidden, weight, labels):
        return qadapter_loss(base_hidden, q_hidden, weight, labels, backend="chunked", chunk_size=5).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x["base_hidden"], x["q_hidden"], x["weight"], x["labels"])
    at_checks = [b.reason for b in explained.break_reasons
                 if b.user_stack and b.user_stack[-1].filename.endswith("inputs.py")]
    assert at_checks and all("disable" in reason for reason in at_checks), at_checks


def test_importing_the_kernels_leaves_dynamo_unloaded():
    """The graph break above is asked for only while compiling: an import that never compiles does
    not pay for loading dynamo (most of a second, more than the rest of the package)."""
    import subprocess
    import sys

    code = "import sys, qadapter_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_an_entry_point_compiles_whole_inside_an_autocast_region():
    """The entry points turn autocast off in a way dynamo traces: ``fullgraph=True`` inside
    ``torch.autocast`` (a bf16 training or decoding step compiled whole) gives the float32 result
    of the call outside the region; regions entered through an ExitStack broke the graph there."""
    import torch

    from qadapter_kernels import combine_logits

    gen = torch.Generator().manual_seed(6)
    base, q = torch.randn(3, 11, generator=gen), torch.randn(3, 11, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(lambda b, v: combine_logits(b, v, alpha_tilde=0.7, alpha_0=0.9) * 2,
                             fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(base, q)
    expected = combine_logits(base, q, alpha_tilde=0.7, alpha_0=0.9) * 2
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
