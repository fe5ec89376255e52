"""Consumer GPUs with a quantized base: the Llama-3.1-8B Q-Adapter step on a 4-bit base under 8 to 24
GiB, beside the memory plan's prediction, and the fused loss beside the authors' formulation on
their 8-bit base.

No hub is reachable, so the architecture is built from its configuration with random bf16 weights
on the GPU, and its state dict is loaded back through transformers' ``from_pretrained`` with the
package's own bitsandbytes settings (``qadapter.library.quantization.load_kwargs``: NF4 with double
quantization or LLM.int8, the lm_head dense), as ``QAdapterModel.from_base(name, quantization=...)``
loads a checkpoint. bitsandbytes comes from ``bench/carry`` (``python -m bench.carry``), which
bench/gpu.sh puts on the path.

Rows, each a warm-up and timed training steps (LoRA r=8, gradient checkpointing, AdamW, 2 pairs):

- 4-bit base, LoRA on q_proj/v_proj and on every projection: 2 x 1024 tokens under 8, 12 and
  16 GiB, 2 x 2048 under 16 GiB and 2 x 4096 under 24 GiB, with the fused loss;
- 8-bit base, LoRA on q_proj/v_proj, 2 x 1024: the fused loss and the authors' full-logits
  formulation (no cap: both peaks are the result).

A cap of C GiB limits the allocator to C GiB less the plan's 512 MiB for the CUDA context
(``torch.cuda.set_per_process_memory_fraction``), so a row that fits under 12 GiB fits a 12 GiB
card. Each row records ms per step, the allocator's peak (``max_memory_allocated``, weights
included) and reserved peak, the memory outside the allocator (context, cuBLAS), and the memory
plan's prediction (``qadapter.library.memory_plan``) without its context term, which the allocator
does not see, with the measured / predicted ratio. Each row is guarded: an out-of-memory, an error
or the time budget is recorded and the run goes on.

    python -m bench.quantized_gpu --out bench/results/quantized.json     # CUDA, bitsandbytes importable
    python -m bench.quantized_gpu --dry-run --out /tmp/quantized.json    # CPU, tiny Llama, seconds
"""

from __future__ import annotations

import datetime as dt
import gc
import sys
from dataclasses import asdict, dataclass, replace

import torch

from bench.baselines import eager_authors_loss
from bench.common import GIB, release, versions
from bench.consumer_gpu import finish_run, peak_gib, run_part, start_run, train
from bench.e2e import LORA, MODELS
from qadapter_kernels import qadapter_loss

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"q,v": ("q_proj", "v_proj"), "every projection": PROJECTIONS}


@dataclass(frozen=True)
class Setup:
    model: str  # a key of bench.e2e.MODELS
    dtype: str  # the model's dtype and the 4-bit compute dtype
    pairs: int
    seq: int  # tokens per row of the row being measured (each row replaces it)
    steps: int  # timed training steps after one warm-up
    points: tuple[tuple[int, float], ...]  # (tokens per row, cap GiB) of the 4-bit rows
    int8_seq: int
    capped: bool  # caps apply (CUDA)


GPU = Setup("llama-3.1-8b", "bfloat16", pairs=2, seq=1024, steps=2,
            points=((1024, 8), (1024, 12), (1024, 16), (2048, 16), (4096, 24)), int8_seq=1024, capped=True)
DRY = Setup("tiny", "float32", pairs=2, seq=32, steps=1, points=((32, 8), (64, 24)), int8_seq=32, capped=False)


def quantized_base(setup: Setup, quantization: str, device: torch.device):
    """The configuration's Llama with random weights, loaded quantized by transformers and bitsandbytes."""
    from qadapter.library import quantization as quant
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[setup.model], attn_implementation="sdpa")
    dtype = getattr(torch, setup.dtype)
    with torch.device(device):
        state = AutoModelForCausalLM.from_config(config, dtype=dtype).state_dict()
    q = quant.normalize(quantization, dtype)
    base = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                            **quant.load_kwargs(q, device))
    del state
    release(device)
    return base


def attach(base, targets: tuple[str, ...]):
    """A fresh Q-Adapter (the method's LoRA: r=8, alpha 16, dropout 0.05) on ``targets`` of ``base``,
    with gradient checkpointing."""
    from qadapter.library.model import QAdapterModel

    torch.manual_seed(0)
    model = QAdapterModel.from_base(base, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                    lora_dropout=LORA["lora_dropout"], target_modules=targets)
    model.gradient_checkpointing_enable()
    return model


def predicted(model, setup: Setup, quantization: str, targets: tuple[str, ...]) -> dict:
    """The memory plan of this row, and its prediction of what the allocator holds (no context)."""
    from qadapter.library.memory_plan import CUDA_CONTEXT, PlanOptions, plan

    memory = plan(model.config, PlanOptions.of(quantization, dtype=setup.dtype, max_length=setup.seq,
                                               pairs_per_step=setup.pairs, gradient_checkpointing=True,
                                               lora_r=LORA["r"], target_modules=targets))
    return {"plan_gib": memory.peak / GIB, "plan_allocator_gib": (memory.peak - CUDA_CONTEXT) / GIB,
            "plan_parts_gib": {name: size / GIB for name, size in memory.parts.items()}}


def measure(model, loss_fn, setup: Setup, cap_gib: float | None, device: torch.device) -> dict:
    """:func:`bench.consumer_gpu.train` under ``cap_gib`` (the allocator limited to it less the
    plan's CUDA context), with the reserved peak and the memory outside the allocator."""
    from qadapter.library.memory_plan import CUDA_CONTEXT

    row = {"cap_gib": cap_gib if setup.capped else None, "tokens_per_row": setup.seq}
    if device.type != "cuda":
        return row | train(model, loss_fn, setup, device)
    total = torch.cuda.get_device_properties(device).total_memory
    if setup.capped and cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_gib * GIB - CUDA_CONTEXT) / total), device)
    try:
        row |= train(model, loss_fn, setup, device)
        free, _ = torch.cuda.mem_get_info(device)
        row["reserved_peak_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        row["outside_allocator_gib"] = (total - free - torch.cuda.memory_reserved(device)) / GIB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return row


def with_plan(row: dict, plan_row: dict) -> dict:
    """The row with its plan: the measured peak over the predicted allocator peak, and whether the
    plan said the step fits the cap."""
    ratio = row["peak_gib"] / plan_row["plan_allocator_gib"] if row.get("peak_gib") else None
    fits = plan_row["plan_gib"] <= row["cap_gib"] if row.get("cap_gib") else None
    return row | plan_row | {"peak_over_plan": ratio, "plan_fits_cap": fits}


def markdown(result: dict) -> str:
    lines = [f"## Quantized base: {result['setup']['model']} on {result['versions']['device']}", "",
             "| row | status | ms/step | peak GiB | plan GiB (allocator) | peak / plan | reserved GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["parts"].items():
        status = row["status"] if row["status"] == "ok" else f"{row['status']} {row.get('error', '')}".strip()

        def number(key, fmt="{:.2f}", row=row):
            return fmt.format(row[key]) if row.get(key) is not None else ""

        lines.append(f"| {name} | {status} | {number('ms_per_step', '{:.0f}')} | {number('peak_gib')} | "
                     f"{number('plan_allocator_gib')} | {number('peak_over_plan')} | {number('reserved_peak_gib')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    run = start_run(argv, "python -m bench.quantized_gpu", __doc__.split("\n")[0], 360.0, DRY, GPU)
    if run is None:
        return 2
    args, setup, device, started, budget = run
    result = {"setup": asdict(setup), "versions": versions(device, ("transformers", "peft", "bitsandbytes", "accelerate")),
              "lora": LORA | {"targets": TARGETS}, "gradient_checkpointing": True,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "parts": {}}
    parts, held = result["parts"], {}

    def load(quantization: str) -> dict:
        held.clear()
        gc.collect()
        release(device)
        held["base"] = base = quantized_base(setup, quantization, device)
        head = base.get_output_embeddings()
        return {"head": f"{type(head).__name__} {str(head.weight.dtype).removeprefix('torch.')}",
                "layer": type(base.model.layers[0].mlp.down_proj).__name__, "peak_gib": peak_gib(device),
                "resident_gib": torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None}

    def adapter(targets: tuple[str, ...]) -> dict:
        if "model" in held:  # the previous adapter's LoRA layers out, the base as it was loaded
            held["base"] = held.pop("model").peft_model.unload()
        held["model"] = model = attach(held["base"], targets)
        return {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def row(quantization: str, targets: tuple[str, ...], seq: int, cap: float | None, loss_fn=qadapter_loss):
        step = replace(setup, seq=seq)
        model = held["model"]  # a KeyError when the base or the adapter failed: the row says so
        measured = measure(model, loss_fn, step, cap, device)
        # The plan models the fused loss; the authors' formulation is measured beside it.
        return with_plan(measured, predicted(model, step, quantization, targets)) if loss_fn is qadapter_loss \
            else measured

    run_part(parts, "4-bit base", budget, lambda: load("4bit"))
    for label, targets in TARGETS.items():
        run_part(parts, f"4-bit, LoRA on {label}", budget, lambda t=targets: adapter(t))
        for seq, cap in setup.points:
            run_part(parts, f"4-bit, LoRA on {label}: {setup.pairs} x {seq} under {cap:g} GiB", budget,
                     lambda t=targets, s=seq, c=cap: row("4bit", t, s, c))
    run_part(parts, "8-bit base", budget, lambda: load("8bit"))
    run_part(parts, "8-bit, LoRA on q,v", budget, lambda: adapter(TARGETS["q,v"]))
    for name, loss_fn in (("fused", qadapter_loss), ("eager-authors", eager_authors_loss)):
        run_part(parts, f"8-bit, LoRA on q,v: {setup.pairs} x {setup.int8_seq}, {name}", budget,
                 lambda f=loss_fn: row("8bit", TARGETS["q,v"], setup.int8_seq, None, f))
    return finish_run(result, markdown(result), args.out, started)


if __name__ == "__main__":
    sys.exit(main())
