"""Smoke test of the benchmark suite (bench/): the baselines compute the reference loss, and the
report runs end to end on a tiny shape and writes its JSON, markdown and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_inputs

from bench import baselines, harness, report
from bench.common import SHAPES

OPTIONS = [
    {},
    {"value_at": "next", "reward_norm": "mean"},
    {"reward_norm": "sum", "gamma": 0.7, "alpha_tilde": 0.5, "beta": 0.3, "alpha_0": 0.2},
]


def _run(fn, inputs, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items() if v.is_floating_point()}
    out = fn(labels=inputs["labels"], **leaves, **kwargs)
    trainable = {k: v for k, v in leaves.items() if v.requires_grad}
    return out, dict(zip(trainable, torch.autograd.grad(out.loss, list(trainable.values()))))


def _assert_same(out, grads, ref, ref_grads, tol):
    for name, a, b in zip(ref._fields, out, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=tol, atol=tol, msg=lambda m, n=k: f"grad {n}: {m}")


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("head", [False, True], ids=["shared-head", "q-head"])
@pytest.mark.parametrize(
    "name, fn",
    [
        ("eager-authors", baselines.eager_authors_loss),
        ("pairs-1", baselines.chunked_pairs_loss),
        ("pairs-2", lambda **x: baselines.chunked_pairs_loss(**x, chunk_pairs=2)),
        ("pairs-all", lambda **x: baselines.chunked_pairs_loss(**x, chunk_pairs=8)),
    ],
)
def test_baselines_match_reference_float64(name, fn, head, options):
    # 3 pairs with a prompt-only chosen row: chunks of 2 pairs leave a partial last chunk.
    x = make_inputs(batch=6, dtype=torch.float64, q_head=head, q_bias=head)
    ref, ref_grads = _reference(x, options)
    out, grads = _run(fn, x, **options)
    _assert_same(out, grads, ref, ref_grads, 1e-12)


def _reference(x, options):
    from qadapter_kernels import qadapter_loss

    return _run(qadapter_loss, x, backend="reference", **options)


def test_baselines_match_reference_float32():
    x = make_inputs(batch=4, seq=33, hidden=32, vocab=301, dtype=torch.float32)
    ref, ref_grads = _reference(x, {})
    for fn in (baselines.eager_authors_loss, baselines.chunked_pairs_loss):
        out, grads = _run(fn, x)
        _assert_same(out, grads, ref, ref_grads, 2e-5)


def test_chunked_pairs_checks_its_chunk_size():
    x = make_inputs()
    with pytest.raises(ValueError, match="chunk_pairs"):
        baselines.chunked_pairs_loss(**x, chunk_pairs=0)


def test_unknown_candidate_is_an_error():
    with pytest.raises(ValueError, match="unknown candidate"):
        harness.select(["no-such-thing"])


def test_report_runs_on_a_tiny_shape(tmp_path, capsys):
    # Cheap candidates only (the compiled ones spend most of a minute compiling on CPU); chunked-triton
    # and cuda are unavailable here and must be recorded as skipped with the reason.
    names = ["gemm3", "reference", "chunked", "chunked-triton", "cuda", "eager-authors", "chunked-pairs"]
    argv = ["--out", str(tmp_path), "--device", "cpu", "--shapes", "tiny", "--tokens", "32", "128",
            "--dtypes", "float32", "bfloat16", "--candidates", *names, "--repeats", "1", "--e2e-model", "tiny", "--e2e-seq", "16",
            "--recipe-model", "tiny", "--recipe-seq", "16",
            "--decode-tokens", "0"]
    assert report.main(argv) == 0
    (js,) = tmp_path.glob("cpu-*.json")
    (md,) = tmp_path.glob("cpu-*.md")
    pngs = sorted(p.name for p in tmp_path.glob("cpu-*.png"))
    assert [p.rsplit("-", 1)[1] for p in pngs] == ["memory.png", "time.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in pngs)

    results = json.loads(js.read_text())
    meta = results["meta"]
    assert meta["torch"] == torch.__version__ and meta["argv"] == argv and "triton" in meta
    cases = [(c["dtype"], c["tokens"]) for c in results["cases"]]
    assert cases == [("float32", 32), ("float32", 128), ("bfloat16", 32), ("bfloat16", 128)]
    assert meta["copy_bandwidth_bytes_per_s"] > 0
    steps = {(r["dtype"], r["step"]): r for r in results["row_step"]["rows"]}
    assert set(steps) == {(d, s) for d in ("float32", "bfloat16") for s in ("compiled", "compiled, no AVX-512", "eager")}
    for (_, step), r in steps.items():
        assert r["rows"] == 128 and r["vocab"] == SHAPES["tiny"].vocab  # the whole N fits one chunk
        if r["status"] == "ok":
            assert r["bytes_per_s"] > 0 and r["of_copy"] == pytest.approx(r["bytes_per_s"] / meta["copy_bandwidth_bytes_per_s"])
        else:
            assert step.startswith("compiled") and r["reason"]
            assert step == "compiled, no AVX-512" or results["row_step"]["build_s"] is None
    assert steps[("float32", "eager")]["status"] == "ok"
    assert "## The CPU row step alone" in md.read_text()
    for case in results["cases"]:
        rows = {r["name"]: r for r in case["results"]}
        assert list(rows) == names
        assert case["t_gemm3_s"] > 0
        for name in ("reference", "chunked", "eager-authors", "chunked-pairs"):
            assert rows[name]["status"] == "ok", rows[name]
            assert rows[name]["time_s"] > 0 and rows[name]["peak_bytes"] > 0
            assert rows[name]["x_gemm3"] == pytest.approx(rows[name]["time_s"] / case["t_gemm3_s"])
            assert rows[name]["first_call_s"] > 0
        for name in ("chunked-triton", "cuda"):
            if not meta["backends"][name]["available"]:
                assert rows[name]["status"] == "skipped" and rows[name]["reason"]
    e2e = {r["loss"]: r for r in results["e2e"]["results"]}
    assert set(e2e) == {"fused", "eager-authors"}
    assert all(r["status"] == "ok" and r["time_s"] > 0 and r["peak_extra_bytes"] > 0 for r in e2e.values())
    assert any(h["backend"] == "chunked" and "eager-authors" in h["vs"] for h in results["headline"])
    recipes = {r["recipe"]: r for r in results["trl_recipe"]["results"]}
    assert set(recipes) == {"dpo", "dpo-liger", "qadapter"}
    for name, r in recipes.items():  # TRL is in the CI install; Liger may not be
        assert (r["status"] == "ok" and r["time_s"] > 0 and r["peak_bytes"] > 0) or (
            name == "dpo-liger" and "not installed" in r["reason"]), r
    assert any(h["backend"] == "QAdapterDPOTrainer" and "dpo" in h["vs"] for h in results["headline"])

    text = md.read_text()
    assert "| `chunked` | backend |" in text and "Headline ratios" in text and pngs[0] in text
    assert "## One training step inside TRL" in text and "| qadapter |" in text
    assert "Headline:" in capsys.readouterr().out
    # The decoding section, of a result the decode benchmark wrote (its batches, each loop against its mode's base).
    decoded = json.loads((Path(__file__).resolve().parents[2] / "bench/results/decode-cpu-2026-12-05.json").read_text())
    section = report.markdown({**results, "decode": decoded}, pngs).split("## Decoding")[1]
    base = decoded["batches"]["8"]["ms_per_token"]
    assert f"| 8 | policy compiled | {base['policy compiled']:.1f} | " \
           f"{base['policy compiled'] / base['base compiled']:.2f} |" in section
    # Written again the same day: beside the first report, which stays as it was.
    again = report.write(results, tmp_path)
    assert again["json"].name == js.name.replace(".json", "-2.json") and js.read_text() == json.dumps(results, indent=1) + "\n"
    assert again["md"].is_file() and not list(tmp_path.glob(".*"))



def test_headline_ratios_read_the_right_way_round():
    """A ratio of theirs over ours reads as faster/slower and less/more, never as a bare quotient."""
    from bench.report import headline_text

    entry = {"case": "c", "backend": "chunked", "x_gemm3": 0.95,
             "vs": {"cce": {"kind": "peer", "speedup": 0.5, "memory_reduction": 4.0},
                    "eager": {"kind": "baseline", "speedup": 2.0, "memory_reduction": 0.25}}}
    assert headline_text(entry) == ("c: chunked at 0.95x T_gemm3; vs cce (peer): 2.00x slower, 4.0x less peak memory; "
                                    "vs eager: 2.00x faster, 4.0x more peak memory")
