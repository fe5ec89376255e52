"""Gradient filtering in the chunked backend, measured: the loss's forward + backward with the exact
gradient and with ``grad_filter_eps`` thresholds, beside ``T_gemm3`` in interleaved rounds.

Real hidden states: the embedded default model (SmolLM2-135M-Instruct) over real text, the HH-RLHF
harmless pairs in ``../shared/data`` (relative to the repository root; skipped, with the reason, when
absent): 2 pairs of 1,025-token rows (chosen, rejected), N = 4,096 scored tokens, the frozen pass and
the adapter pass of a fresh adapter, bfloat16, at the model's own head. Random inputs of the same
shape (``bench.common.make_case_inputs``) are the worst case: unit-scale logits, where no block is
negligible; the same with a Zipf tilt (:func:`peaked`) the best. For each threshold: time, ratio to ``T_gemm3``, the skipped fraction, the largest and
median probability mass a token loses, and the gradient's error against the exact backward.

On the real hidden states, offline (:func:`skippable`): how many blocks other tile shapes and a
reordered vocabulary would make skippable. Also the choice of how filtered products run: skipping blocks (one GEMM per run of kept blocks, as
``tiles._spans_product`` does) against compacting the kept columns into one GEMM.

    python -m bench.grad_filter [--rounds 3] [--out bench/results/grad-filter-cpu-DATE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

import torch

import qadapter_kernels
from bench.common import RESULTS, SHAPES, Case, Timer, make_case_inputs, versions
from bench.harness import gemm3_step
from qadapter_kernels.grad_filter import grad_filter_report, resolve_eps

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-2000.jsonl"
ROWS, SEQ = 4, 1025  # 2 pairs; 1,024 scored tokens per row
THRESHOLDS = (0.0, "auto", 1e-6, 1e-5)


def real_inputs(dtype: torch.dtype) -> dict | None:
    """Loss inputs from the embedded model over the HH-RLHF pairs, or None when the data is absent."""
    if not DATA.is_file():
        return None
    from qadapter.library.hidden import frozen_and_adapter_hidden
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    streams = {"chosen": [], "rejected": []}
    with DATA.open() as f:
        for line in f:
            pair = json.loads(line)
            for side, ids in streams.items():
                if len(ids) < 2 * SEQ:
                    text = model.tokenizer.apply_chat_template(pair[side], tokenize=False)
                    ids += model.tokenizer(text)["input_ids"]
            if all(len(ids) >= 2 * SEQ for ids in streams.values()):
                break
    rows = [streams["chosen"][:SEQ], streams["chosen"][SEQ:2 * SEQ],
            streams["rejected"][:SEQ], streams["rejected"][SEQ:2 * SEQ]]
    ids = torch.tensor(rows)
    with torch.no_grad():
        base, q, weight = frozen_and_adapter_hidden(model.peft_model, ids)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"base_hidden": base.to(dtype), "q_hidden": q.to(dtype).requires_grad_(),
            "weight": weight.detach().to(dtype), "labels": labels}


def peaked(inputs: dict, zipf: float = 3.0) -> dict:
    """``inputs`` with a Zipf tilt on every head: hidden coordinate 0 set to 1 and the head's column 0
    to ``-zipf * log(1 + v)``, so ``p(v)`` falls as ``(1 + v)^-zipf`` in every token and most blocks
    are negligible: the case filtering is for (a far more peaked model than SmolLM2)."""
    out = dict(inputs)
    tilt = -zipf * torch.log1p(torch.arange(inputs["weight"].shape[0], dtype=torch.float32))
    for name in ("base_hidden", "q_hidden"):
        h = inputs[name].detach().clone()
        h[..., 0] = 1
        out[name] = h.requires_grad_(inputs[name].requires_grad)
    out["weight"] = inputs["weight"].clone()
    out["weight"][:, 0] = tilt.to(out["weight"].dtype)
    return out


def loss_step(inputs: dict, eps):
    hq = inputs["q_hidden"]

    def step() -> None:
        hq.grad = None
        qadapter_kernels.qadapter_loss(**inputs, backend="chunked", grad_filter_eps=eps).loss.backward()

    return step


def filtered_gradient(inputs: dict, eps) -> tuple[torch.Tensor, dict]:
    """The ``q_hidden`` gradient at ``eps`` and what the filter reported."""
    with grad_filter_report() as report:
        loss_step(inputs, eps)()
    mass = report.dropped_mass
    vocab = inputs["weight"].shape[0]
    return inputs["q_hidden"].grad.clone(), {
        "eps": resolve_eps(eps, inputs["q_hidden"].dtype, vocab) if eps else 0.0,
        "skipped_fraction": report.skipped_fraction,
        "dropped_mass_max": float(mass.max()) if mass.numel() else 0.0,
        "dropped_mass_median": float(mass.median()) if mass.numel() else 0.0,
    }


def measure(name: str, inputs: dict, rounds: int) -> dict:
    """Times, ratios, skipped fractions and gradient errors of every threshold on ``inputs``."""
    hq, weight = inputs["q_hidden"], inputs["weight"]
    tokens = int((inputs["labels"][:, 1:] != -100).sum())
    steps = {"gemm3": gemm3_step(tokens, weight.shape[1], weight.shape[0], hq.dtype, hq.device)}
    steps |= {f"chunked eps={eps}": loss_step(inputs, eps) for eps in THRESHOLDS}
    times = Timer(hq.device, warmup=1).rounds(steps, rounds)
    gemm3 = statistics.median(times["gemm3"])
    scored = inputs["labels"][:, 1:].reshape(-1) != -100
    exact = filtered_gradient(inputs, 0.0)[0][:, :-1].reshape(scored.numel(), -1)[scored].float()
    out = {"inputs": name, "tokens": tokens, "T_gemm3_ms": 1e3 * gemm3, "rounds": rounds, "thresholds": []}
    for eps in THRESHOLDS:
        grad, report = filtered_gradient(inputs, eps)
        got = grad[:, :-1].reshape(scored.numel(), -1)[scored].float()
        per_row = (got - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-30)
        seconds = statistics.median(times[f"chunked eps={eps}"])
        out["thresholds"].append({
            "grad_filter_eps": eps, **report, "time_ms": 1e3 * seconds, "x_T_gemm3": seconds / gemm3,
            "times_ms": [1e3 * t for t in times[f"chunked eps={eps}"]],
            "grad_rel_error": float((got - exact).norm() / exact.norm()),
            "grad_rel_error_max_token": float(per_row.max()),
        })
    out["T_gemm3_times_ms"] = [1e3 * t for t in times["gemm3"]]
    return out


def skippable(inputs: dict, alpha_0: float = 0.01) -> list[dict]:
    """Offline, from the exact ``p`` (alpha~ = 1): the fraction of (tokens x vocabulary) blocks whose
    ``p`` is below a threshold in every token, for other tile heights and block widths than the
    backend's (1,024 x 1,024), in the vocabulary's own order and reordered by each entry's mean ``p``
    over the first half of the tokens (as Cut Cross-Entropy sorts its vocabulary), counted on the
    second half."""
    mask = inputs["labels"][:, 1:] != -100
    hb, hq = inputs["base_hidden"][:, :-1][mask], inputs["q_hidden"][:, :-1][mask].detach()
    weight = inputs["weight"]
    with torch.no_grad():
        p = torch.cat([torch.softmax((hq[s:s + 1024] @ weight.T).float() + alpha_0 * (hb[s:s + 1024] @ weight.T).float(),
                                     dim=1) for s in range(0, hq.shape[0], 1024)])
    half = p.shape[0] // 2
    orders = {"vocabulary": None, "by mean p (first half)": p[:half].mean(dim=0).argsort(descending=True)}
    thresholds = {"auto": resolve_eps("auto", hq.dtype, weight.shape[0]), "1e-6": 1e-6, "1e-5": 1e-5, "1e-4": 1e-4}
    out = []
    for order_name, order in orders.items():
        second = p[half:] if order is None else p[half:, order]
        for rows in (64, 256, 1024):
            for width in (64, 256, 1024):
                usable = second.shape[1] // width * width
                block_max = second[:, :usable].reshape(-1, rows, usable // width, width).amax(dim=(1, 3))
                out.append({"order": order_name, "tokens": rows, "columns": width,
                            **{name: float((block_max < eps).float().mean()) for name, eps in thresholds.items()}})
    return out


def layouts(rounds: int, dtype: torch.dtype) -> dict:
    """A tile's ``p @ W`` with half its blocks kept: one GEMM per run of kept blocks (skip) against
    one GEMM over the gathered kept columns (compact), at the CPU tile of the SmolLM2 head."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(1024, 8192, generator=g).to(dtype)
    w = torch.randn(8192, 576, generator=g).to(dtype)
    patterns = {"alternate blocks": [(a, a + 1024) for a in range(0, 8192, 2048)], "first half": [(0, 4096)]}

    def skip(spans):
        out = torch.zeros(p.shape[0], w.shape[1])
        for a, b in spans:
            out.add_((p[:, a:b] @ w[a:b]).float())

    def compact(spans):
        columns = torch.cat([torch.arange(a, b) for a, b in spans])
        (p.index_select(1, columns) @ w.index_select(0, columns)).float()

    steps = {"whole tile": lambda: (p @ w).float()}
    for label, spans in patterns.items():
        steps[f"skip, {label}"] = lambda spans=spans: skip(spans)
        steps[f"compact, {label}"] = lambda spans=spans: compact(spans)
    times = Timer("cpu", warmup=1).rounds(steps, rounds * 3)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype, device = torch.bfloat16, torch.device("cpu")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(device, ("triton", "transformers")), "threads": torch.get_num_threads(),
              "load_average_before": os.getloadavg(), "dtype": "bfloat16", "cases": []}
    real = real_inputs(dtype)
    if real is None:
        print(f"skipping the real hidden states: {DATA} is absent")
        result["real"] = f"skipped: {DATA.name} is absent"
    else:
        result["cases"].append(measure("SmolLM2-135M-Instruct over HH-RLHF harmless pairs", real, args.rounds))
        result["skippable_blocks"] = skippable(real)
        del real
    random = make_case_inputs(Case(SHAPES["smollm2-135m"], ROWS * (SEQ - 1), dtype, device))
    result["cases"].append(measure("random (bench.common.make_case_inputs), the worst case", random, args.rounds))
    result["cases"].append(measure("random with a Zipf tilt (peaked), the best case", peaked(random), args.rounds))
    result["layouts_ms"] = layouts(args.rounds, dtype)
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    out = args.out or RESULTS / f"grad-filter-cpu-{result['date'][:10]}.json"
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
