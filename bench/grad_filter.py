"""Gradient filtering in the chunked backend, measured: the loss's forward + backward with the exact
gradient and with ``grad_filter_eps`` thresholds, beside ``T_gemm3`` in interleaved rounds.

Real hidden states: the embedded default model (SmolLM2-135M-Instruct) over real text, the HH-RLHF
harmless pairs of ``bench.common.HH_DATA`` (skipped, with the reason, when absent): 2 pairs of
1,025-token rows (chosen, rejected), N = 4,096 scored tokens, the frozen pass and the adapter pass
of a fresh adapter, bfloat16, at the model's own head. Random inputs of the same shape
(``bench.common.make_case_inputs``) are the worst case: unit-scale logits, where no block is
negligible; the same with a Zipf tilt (:func:`peaked`) the best. For each budget: time, ratio to
``T_gemm3``, the skipped fraction, the largest and median probability mass a token loses, and the
gradient's error against the exact backward and against the float64 one (beside the exact bfloat16
backward's own error against float64: the tolerance bfloat16 gives).

On the real hidden states, offline (:func:`skippable`): how much other block widths and a reordered
vocabulary would let each token leave out.

On a GPU (``--device cuda --backend chunked-triton --shape llama-3.1-8b``, part 2 of ``bench/gpu.sh``)
the random and peaked cases at that head (the real hidden states are the embedded model's, SmolLM2's
head, and are taken at that shape only). On either device, the product alone (:func:`product_timings`):
the dense GEMM, the gathered GEMMs per block and, on a GPU, the one-launch kept-blocks kernel, at
three shares of blocks left out.

    python -m bench.grad_filter [--device cpu|cuda] [--backend chunked|chunked-triton|cuda]
                                [--shape smollm2-135m] [--tokens 4096] [--rounds 3] [--out FILE]
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
from bench.common import HH_DATA, RESULTS, SHAPES, Case, Timer, make_case_inputs, versions, write_result
from bench.harness import gemm3_step
from qadapter_kernels.grad_filter import grad_filter_report, mass_budget

ROWS, SEQ = 4, 1025  # 2 pairs; 1,024 scored tokens per row
THRESHOLDS = (0.0, "auto", 2**-6)


def real_inputs(dtype: torch.dtype) -> dict | None:
    """Loss inputs from the embedded model over the HH-RLHF pairs, or None when the data is absent."""
    if not HH_DATA.is_file():
        return None
    from qadapter.library.hidden import frozen_and_adapter_hidden
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    streams = {"chosen": [], "rejected": []}
    with HH_DATA.open() as f:
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
    tilt = -zipf * torch.log1p(torch.arange(inputs["weight"].shape[0], dtype=torch.float32,
                                            device=inputs["weight"].device))
    for name in ("base_hidden", "q_hidden"):
        h = inputs[name].detach().clone()
        h[..., 0] = 1
        out[name] = h.requires_grad_(inputs[name].requires_grad)
    out["weight"] = inputs["weight"].clone()
    out["weight"][:, 0] = tilt.to(out["weight"].dtype)
    return out


def loss_step(inputs: dict, eps, backend: str = "chunked"):
    hq = inputs["q_hidden"]

    def step() -> None:
        hq.grad = None
        qadapter_kernels.qadapter_loss(**inputs, backend=backend, grad_filter_eps=eps).loss.backward()

    return step


def filtered_gradient(inputs: dict, eps, backend: str = "chunked") -> tuple[torch.Tensor, dict]:
    """The ``q_hidden`` gradient at ``eps`` and what the filter reported."""
    with grad_filter_report() as report:
        loss_step(inputs, eps, backend)()
    mass = report.dropped_mass
    return inputs["q_hidden"].grad.clone(), {
        "eps": mass_budget(eps, inputs["q_hidden"].dtype) if eps else 0.0,
        "skipped_fraction": report.skipped_fraction,
        "dropped_mass_max": float(mass.max()) if mass.numel() else 0.0,
        "dropped_mass_median": float(mass.median()) if mass.numel() else 0.0,
    }


def measure(name: str, inputs: dict, rounds: int, backend: str = "chunked") -> dict:
    """Times, ratios, skipped fractions and gradient errors of every budget on ``inputs``."""
    hq, weight = inputs["q_hidden"], inputs["weight"]
    tokens = int((inputs["labels"][:, 1:] != -100).sum())
    steps = {"gemm3": gemm3_step(tokens, weight.shape[1], weight.shape[0], hq.dtype, hq.device)}
    steps |= {f"eps={eps}": loss_step(inputs, eps, backend) for eps in THRESHOLDS}
    times = Timer(hq.device, warmup=1).rounds(steps, rounds)
    gemm3 = statistics.median(times["gemm3"])
    scored = inputs["labels"][:, 1:].reshape(-1) != -100
    exact = filtered_gradient(inputs, 0.0, backend)[0][:, :-1].reshape(scored.numel(), -1)[scored].float()
    truth = float64_gradient(inputs)[:, :-1].reshape(scored.numel(), -1)[scored]
    out = {"inputs": name, "backend": backend, "tokens": tokens, "T_gemm3_ms": 1e3 * gemm3, "rounds": rounds,
           "thresholds": []}
    for eps in THRESHOLDS:
        grad, report = filtered_gradient(inputs, eps, backend)
        got = grad[:, :-1].reshape(scored.numel(), -1)[scored].float()
        per_row = (got - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-30)
        seconds = statistics.median(times[f"eps={eps}"])
        out["thresholds"].append({
            "grad_filter_eps": eps, **report, "time_ms": 1e3 * seconds, "x_T_gemm3": seconds / gemm3,
            "times_ms": [1e3 * t for t in times[f"eps={eps}"]],
            "grad_rel_error": float((got - exact).norm() / exact.norm()),
            "grad_rel_error_max_token": float(per_row.max()),
            "grad_rel_error_vs_float64": float((got.double() - truth).norm() / truth.norm()),
            # Per token, against float64 (the exact bfloat16 backward has its own: budget 0).
            "grad_rel_error_vs_float64_median_token": float(
                ((got.double() - truth).norm(dim=1) / truth.norm(dim=1).clamp_min(1e-300)).median()),
        })
    out["T_gemm3_times_ms"] = [1e3 * t for t in times["gemm3"]]
    return out


def float64_gradient(inputs: dict) -> torch.Tensor:
    """The exact ``q_hidden`` gradient of the same inputs in float64: what both bfloat16 gradients
    are measured against."""
    wide = {k: v.detach().double() if v.is_floating_point() else v for k, v in inputs.items()}
    wide["q_hidden"].requires_grad_()
    loss_step(wide, 0.0)()
    return wide["q_hidden"].grad


def skippable(inputs: dict, alpha_0: float = 0.01) -> list[dict]:
    """Offline, from the exact ``p`` (alpha~ = 1): the share of (token, block) pairs a token may leave
    out within its budget (its lightest blocks, as the backend picks them, but against the final
    ``p`` rather than a bound of it), for other block widths than the backend's 1,024 columns, in the
    vocabulary's own order and reordered by each entry's mean ``p`` over the first half of the tokens
    (as Cut Cross-Entropy sorts its vocabulary), counted on the second half."""
    mask = inputs["labels"][:, 1:] != -100
    hb, hq = inputs["base_hidden"][:, :-1][mask], inputs["q_hidden"][:, :-1][mask].detach()
    weight = inputs["weight"]
    with torch.no_grad():
        p = torch.cat([torch.softmax((hq[s:s + 1024] @ weight.T).float() + alpha_0 * (hb[s:s + 1024] @ weight.T).float(),
                                     dim=1) for s in range(0, hq.shape[0], 1024)])
    half = p.shape[0] // 2
    orders = {"vocabulary": None, "by mean p (first half)": p[:half].mean(dim=0).argsort(descending=True)}
    budgets = {"auto": mass_budget("auto", hq.dtype), "2^-6": 2**-6}
    out = []
    for order_name, order in orders.items():
        second = p[half:] if order is None else p[half:, order]
        for width in (256, 1024):
            usable = second.shape[1] // width * width
            ordered = second[:, :usable].reshape(second.shape[0], -1, width).sum(dim=2).sort(dim=1).values
            out.append({"order": order_name, "columns": width,
                        **{name: float((ordered.cumsum(dim=1) <= budget).float().mean())
                           for name, budget in budgets.items()}})
    return out


def product_timings(case: Case, rounds: int) -> list[dict]:
    """The filtered backward's product alone, ``p @ Wq`` at ``case``'s shape with each token leaving
    out a random share of its blocks (0: the dense GEMM's work; 2/3: the share a token of real text
    leaves out at the auto budget; 98%: a peaked policy's), three ways: one dense GEMM (nothing
    left out), the gathered GEMMs per block (``tiles.gathered_product``, a CPU's way) and, on a GPU,
    the one-launch kernel (``triton/kept_product.py``): which way a device should take."""
    from qadapter_kernels.steps import FILTER_BLOCK
    from qadapter_kernels.tiles import gathered_product, matmul_to

    shape, device = case.shape, case.device
    generator = torch.Generator(device=device).manual_seed(0)
    p = (torch.rand(case.tokens, shape.vocab, generator=generator, device=device) / shape.vocab).to(case.dtype)
    w = (torch.randn(shape.vocab, shape.hidden, generator=generator, device=device) / shape.hidden**0.5).to(case.dtype)
    blocks = -(-shape.vocab // FILTER_BLOCK)
    kernel = _kept_blocks_kernel(device)
    out = []
    for share in (0.0, 2 / 3, 0.98):
        drop = torch.rand(case.tokens, blocks, generator=generator, device=device) < share
        ways = {"dense GEMM": lambda: matmul_to(torch.float32, p, w),
                "gathered GEMMs": lambda drop=drop: gathered_product(torch.float32, p, w, drop)}
        if kernel is not None:
            ways["kept-blocks kernel"] = lambda drop=drop: kernel(p, w, drop)
        times = Timer(device, warmup=1).rounds(ways, rounds)
        dense = statistics.median(times["dense GEMM"])
        out.append({"left_out_share": float(drop.float().mean()), "tokens": case.tokens, "vocab": shape.vocab,
                    "hidden": shape.hidden, **{f"{name} ms": 1e3 * statistics.median(t) for name, t in times.items()},
                    **{f"{name} x dense": statistics.median(t) / dense for name, t in times.items()}})
    return out


def _kept_blocks_kernel(device: torch.device):
    """The Triton kept-blocks product where it runs: a GPU, or Triton's interpreter (the dry run)."""
    try:
        from qadapter_kernels.triton._common import INTERPRET
        from qadapter_kernels.triton.kept_product import kept_blocks_product
    except ImportError:
        return None
    return kept_blocks_product if device.type == "cuda" or INTERPRET else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("chunked", "chunked-triton", "cuda"), default="chunked")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=ROWS * (SEQ - 1), help="scored tokens of the random cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype, device = torch.bfloat16, torch.device(args.device)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(device, ("triton", "transformers")), "threads": torch.get_num_threads(),
              "load_average_before": os.getloadavg(), "dtype": "bfloat16", "shape": args.shape, "cases": []}
    real = real_inputs(dtype) if args.shape == "smollm2-135m" else None
    if real is None:
        reason = f"{HH_DATA.name} is absent" if args.shape == "smollm2-135m" else "taken at the smollm2-135m head only"
        print(f"skipping the real hidden states: {reason}")
        result["real"] = f"skipped: {reason}"
    else:
        real = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in real.items()}
        result["cases"].append(measure("SmolLM2-135M-Instruct over HH-RLHF harmless pairs", real, args.rounds,
                                       args.backend))
        result["skippable_blocks"] = skippable(real)
        del real
    random = make_case_inputs(Case(SHAPES[args.shape], args.tokens, dtype, device))
    result["cases"].append(measure("random (bench.common.make_case_inputs), the worst case", random, args.rounds,
                                   args.backend))
    result["cases"].append(measure("random with a Zipf tilt (peaked), the best case", peaked(random), args.rounds,
                                   args.backend))
    del random
    result["product"] = product_timings(Case(SHAPES[args.shape], args.tokens, dtype, device), args.rounds)
    result["load_average_after"] = os.getloadavg()
    out = args.out or RESULTS / f"grad-filter-{device.type}-{result['date'][:10]}.json"
    write_result(result, out.parent, out.stem, fresh=args.out is None)  # a file named by --out is that file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
