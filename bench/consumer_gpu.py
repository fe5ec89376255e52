"""Consumer-GPU step: a Llama-3.1-8B Q-Adapter trained and decoded within 24 GiB of GPU memory.

A 24 GB card holds the 16 GB of bf16 weights of an 8B model and little else. This measures, in one
run on one model, whether a Q-Adapter training step of 2 preference pairs x 1024 tokens (LoRA r=8
on q_proj/v_proj, gradient checkpointing, AdamW) fits under that cap with the package's fused loss
and with the authors' full-logits formulation, and what decoding from the customized policy costs
per token next to the base model alone (batch 1 and 8, greedy, eager, under the same cap), and, last, a
batch of 8 rows over 8 adapters beside 8 rows over one adapter (``AdapterSet``, ``bench.adapter_set``)
and the serving engine's 8 requests at once beside one at a time (``bench.serve``, without HTTP).
``--decoding compiled`` runs the decoding parts alone with the static cache and the compiled step
(CUDA graphs; ``generate``'s default on CUDA): each batch compiles two 32-layer steps (the policy's
and the base's), minutes that get a run of their own.

No hub is reachable: the architecture is built from its configuration with random bf16 weights.
Each part is guarded: an out-of-memory, an error or the time budget is recorded and the run goes on;
``--limit-s`` cuts a part short at that many seconds from the start (SIGALRM, and SIGTERM as the
step's ``timeout`` sends it), recorded as timed out, so the parts measured are written either way.

From the repository root, with the model layer (``python/``, the ``qadapter`` package) importable:
installed, or ``PYTHONPATH=python`` as bench/gpu.sh sets it::

    python -m bench.consumer_gpu --out bench/results/consumer-gpu.json       # CUDA
    python -m bench.consumer_gpu --decoding compiled --out bench/results/consumer-gpu-compiled.json
    python -m bench.consumer_gpu --dry-run --out /tmp/consumer-gpu.json      # CPU, tiny Llama, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.baselines import eager_authors_loss
from bench.common import (
    GIB,
    CutShort,
    RowTimeout,
    Timer,
    error_text,
    is_oom,
    release,
    stop_on_sigterm,
    sync,
    time_limit,
    versions,
)
from bench.decode import frozen_generate, generation, interleaved
from bench.e2e import LORA, MODELS, make_batch
from qadapter_kernels import qadapter_loss
from qadapter_kernels.registry import resolve


@dataclass(frozen=True)
class Setup:
    model: str  # a key of bench.e2e.MODELS
    dtype: str
    pairs: int
    seq: int
    steps: int  # timed training steps after one warm-up
    prompt: int
    new_tokens: int
    batches: tuple[int, ...]
    compiled_batches: tuple[int, ...]  # --decoding compiled: each batch compiles its own steps
    rounds: int  # timed decoding rounds after one warm-up
    cap_gib: float | None


GPU = Setup("llama-3.1-8b", "bfloat16", pairs=2, seq=1024, steps=3, prompt=64, new_tokens=32, batches=(1, 8),
            compiled_batches=(1, 8), rounds=3, cap_gib=24.0)
DRY = Setup("tiny", "float32", pairs=2, seq=32, steps=1, prompt=16, new_tokens=8, batches=(1, 8),
            compiled_batches=(1,), rounds=1, cap_gib=None)


def build_model(setup: Setup, device: torch.device):
    """The configuration's Llama with random weights built on ``device``, wrapped as a QAdapterModel."""
    from qadapter.library.model import QAdapterModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[setup.model], attn_implementation="sdpa")
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, setup.dtype))
    model = QAdapterModel.from_base(base, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                    lora_dropout=LORA["lora_dropout"], target_modules=LORA["target_modules"])
    model.gradient_checkpointing_enable()
    return model


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train(model, loss_fn: Callable, setup: Setup, device: torch.device) -> dict:
    """A warm-up and ``setup.steps`` timed training steps: the model's hidden states (as its own
    forward makes them), then ``loss_fn`` (``qadapter_loss``'s signature) with the model's options."""
    model.train()
    ids, attention_mask, labels = make_batch(model.config.vocab_size, setup.pairs, setup.seq, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        base_hidden, q_hidden = model.hidden_states(ids, attention_mask)
        loss_fn(base_hidden, q_hidden, model.lm_head_weight, labels, config=model.loss).loss.backward()
        optimizer.step()
        sync(device)

    reset_peak(device)
    try:
        step()  # warm-up
        times = Timer(device).times_s(step, setup.steps)
    finally:
        optimizer.zero_grad(set_to_none=True)
    return {"ms_per_step": statistics.median(times) * 1e3, "all_ms": [t * 1e3 for t in times],
            "peak_gib": peak_gib(device)}


def decode(model, batch: int, decoding: str, setup: Setup, device: torch.device) -> dict:
    """ms/token of the customized policy and of the base alone (adapter disabled), both through
    transformers' generate, eager or compiled, interleaved rounds; with the weights' size, from which
    the weight-read floor of a decode step follows (divided by the memory bandwidth)."""
    model.eval()
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, setup.prompt), generator=g).to(device)
    compiled = decoding == "compiled"
    reset_peak(device)
    runs = interleaved({"base": generation(frozen_generate(model), ids, setup.new_tokens, compiled),
                        "customized": generation(model.generate, ids, setup.new_tokens, compiled)}, setup.rounds)
    ms = {name: statistics.median(t) for name, t in runs.items()}
    weights = sum(p.numel() * p.element_size() for p in model.base_model.parameters())
    return {"decoding": decoding, "base_ms_per_token": ms["base"], "customized_ms_per_token": ms["customized"],
            "customized_over_base": ms["customized"] / ms["base"], "weights_gib": weights / GIB,
            "peak_gib": peak_gib(device)}


def many_adapters(model, adapters: int, setup: Setup, device: torch.device) -> dict:
    """ms/token of ``adapters`` rows over one adapter and over ``adapters`` adapters (each row another)
    in one AdapterSet on the model's base, greedy, eager; and the serving engine's tokens/s with
    ``adapters`` requests over half as many adapters, at once and one at a time. The model's own LoRA layers are taken out
    (the part runs last): one set first holds one adapter, then all, so "one adapter" is the same
    code path over a one-adapter bank."""
    import tempfile

    from qadapter.library.adapter_set import AdapterSet
    from qadapter.serving.engine import Engine

    from bench.adapter_set import save_adapters
    from bench.serve import TokenIdText, engine_throughput

    g = torch.Generator().manual_seed(adapters)
    ids = torch.randint(0, model.config.vocab_size, (adapters, setup.prompt), generator=g).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(model, Path(tmp), adapters)
        adapter_set = AdapterSet.from_pretrained(dict(list(paths.items())[:1]), base_model=model.peft_model.unload())
        names = list(paths)

        def rows_over(assigned):
            return generation(lambda *a, **k: adapter_set.generate(*a, adapters=assigned, **k), ids,
                              setup.new_tokens, compiled=False)

        one = interleaved({"one": rows_over([names[0]] * adapters)}, setup.rounds)["one"]
        for name in names[1:]:
            adapter_set.load(name, paths[name])
    mixed = interleaved({"mixed": rows_over(names)}, setup.rounds)["mixed"]
    one_ms, mixed_ms = statistics.median(one), statistics.median(mixed)
    # The serving engine (bench.serve, without HTTP) on the same set: the requests at once, and one at a time.
    engine = Engine(adapter_set, TokenIdText(model.config.eos_token_id), max_batch=adapters).start()
    try:
        prompts = [row.tolist() for row in ids.cpu()]
        served = [names[i % (adapters // 2)] for i in range(adapters)]
        runs = {mode: [] for mode in ("one at a time", "at once")}
        engine_throughput(engine, prompts[:2], served[:2], setup.new_tokens, concurrent=True)  # warm-up
        for _ in range(max(1, setup.rounds // 3)):  # each round decodes every request twice: one is enough on a GPU
            for mode in runs:
                runs[mode].append(engine_throughput(engine, prompts, served, setup.new_tokens, mode == "at once"))
    finally:
        engine.stop()
    tps = {mode: statistics.median(v) for mode, v in runs.items()}
    return {"adapters": adapters, "one_adapter_ms_per_token": one_ms, "many_adapters_ms_per_token": mixed_ms,
            "many_over_one": mixed_ms / one_ms, "served_adapters": adapters // 2, "engine_tokens_per_s": tps,
            "engine_at_once_over_one_at_a_time": tps["at once"] / tps["one at a time"], "peak_gib": peak_gib(device)}


@dataclass(frozen=True)
class Budget:
    """A guarded run's times (``time.monotonic()``): no part starts after ``deadline``; a running part
    is cut short at ``limit`` (None: never)."""

    deadline: float
    limit: float | None


def run_part(parts: dict, name: str, budget: Budget, fn: Callable[[], dict]) -> None:
    """Stores ``fn()``'s row under ``parts[name]``, or why there is none (skipped, out of memory,
    error, timed out: cut short at the budget's limit or by SIGTERM)."""
    start = time.monotonic()
    if start > budget.deadline:
        parts[name] = {"status": "skipped: time budget"}
        return
    try:
        with time_limit(budget.limit - start) if budget.limit is not None else contextlib.nullcontext():
            row = {"status": "ok", **fn()}
    except (RowTimeout, CutShort) as exc:
        row = {"status": "timed out", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 -- every failure is a result of this part
        row = {"status": "out of memory" if is_oom(exc) else "error", "error": error_text(exc)}
    gc.collect()  # the failed part's tensors, held by the traceback until now
    if torch.cuda.is_available():
        release("cuda")
    parts[name] = row | {"seconds": time.monotonic() - start}


def no_model() -> dict:
    raise RuntimeError("the model was not built")


def markdown(result: dict) -> str:
    cap = result["memory_cap_gib"]
    lines = [f"## Consumer-GPU step: {result['setup']['model']} on {result['versions']['device']}, "
             f"{f'memory capped at {cap:g} GiB, decoding included' if cap else 'no memory cap'}", "",
             "| part | status | time | peak GiB | customized / base |", "|---|---|---|---|---|"]
    for name, row in result["parts"].items():
        status = row["status"] if row["status"] == "ok" else f"{row['status']} {row.get('error', '')}".strip()
        time_, ratio = "", ""
        if "ms_per_step" in row:
            time_ = f"{row['ms_per_step']:.0f} ms/step"
        elif "base_ms_per_token" in row:
            time_ = f"{row['base_ms_per_token']:.1f} / {row['customized_ms_per_token']:.1f} ms/token"
            ratio = f"{row['customized_over_base']:.2f}"
        elif "many_over_one" in row:
            time_ = f"{row['one_adapter_ms_per_token']:.1f} / {row['many_adapters_ms_per_token']:.1f} ms/token"
            ratio = (f"{row['many_over_one']:.2f} (many / one adapter); serving "
                     f"{row['engine_at_once_over_one_at_a_time']:.2f} (at once / one at a time)")
        peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else ""
        lines.append(f"| {name} | {status} | {time_} | {peak} | {ratio} |")
    return "\n".join(lines)


def start_run(argv: list[str] | None, prog: str, description: str, budget_s: float, dry, gpu,
              add_options: Callable[[argparse.ArgumentParser], None] | None = None):
    """A guarded GPU run's start: its options (the JSON path, the CPU dry run, the time budget, a
    part's hard limit; ``add_options`` adds the run's own) and ``(args, setup, device, started,
    budget)``: ``dry`` on the CPU for a dry run, else ``gpu`` on the current CUDA device; None
    (said) when there is none. SIGTERM cuts the running part short from here on."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, required=True, help="JSON result path")
    parser.add_argument("--dry-run", action="store_true", help="tiny Llama on CPU: checks the script in seconds")
    parser.add_argument("--budget-s", type=float, default=budget_s, help="skip the parts left after this many seconds")
    parser.add_argument("--limit-s", type=float, default=None,
                        help="cut a running part short this many seconds from the start (default: no limit)")
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()
    stop_on_sigterm()
    if args.dry_run:
        setup, device = dry, torch.device("cpu")
    elif torch.cuda.is_available():
        setup, device = gpu, torch.device("cuda", torch.cuda.current_device())
    else:
        print("no CUDA device: use --dry-run to check the script on CPU")
        return None
    limit = None if args.limit_s is None else started + args.limit_s
    return args, setup, device, started, Budget(started + args.budget_s, limit)


def write_json(result: dict, out: Path) -> None:
    """The result as it stands, written beside and renamed over ``out`` (never half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.tmp")
    staged.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    staged.replace(out)


def finish_run(result: dict, table: str, out: Path, started: float) -> int:
    """Prints the table, writes the result JSON; exit status 1 when a part failed."""
    result["seconds"] = time.monotonic() - started
    print(table)
    write_json(result, out)
    print(f"\nwrote {out} in {result['seconds']:.0f} s")
    return 1 if any(row["status"] == "error" for row in result["parts"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    def decoding_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--decoding", choices=("eager", "compiled"), default="eager",
                            help="eager: training, eager decoding and many adapters; compiled: the decoding "
                                 "parts alone, static cache and compiled step")

    run = start_run(argv, "python -m bench.consumer_gpu", __doc__.split("\n")[0], 240.0, DRY, GPU, decoding_option)
    if run is None:
        return 2
    args, setup, device, started, budget = run
    if setup.cap_gib:  # the GPU setup only
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, setup.cap_gib * GIB / total), device)
    result = {"setup": asdict(setup), "versions": versions(device, ("transformers", "peft", "triton")),
              "memory_cap_gib": setup.cap_gib,
              "decode_under_cap": setup.cap_gib is not None,
              "decoding": args.decoding, "lora": LORA, "gradient_checkpointing": True,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "parts": {}}
    parts, holder = result["parts"], {}

    def build() -> dict:
        holder["model"] = model = build_model(setup, device)
        weight = model.base_model.get_decoder().layers[0].mlp.down_proj.weight
        return {"parameters": sum(p.numel() for p in model.parameters()),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "weight_std": float(weight.float().std()), "resident_gib": allocated_gib(device),
                "peak_gib": peak_gib(device)}

    run_part(parts, "build", budget, build)
    model = holder.get("model")
    backend = resolve("auto", device, getattr(torch, setup.dtype)).name
    batches = setup.batches if args.decoding == "eager" else setup.compiled_batches
    todo = {f"decode: batch {b} {args.decoding}": (lambda b=b: decode(model, b, args.decoding, setup, device))
            for b in batches}
    if args.decoding == "eager":
        todo = {"train: fused": lambda: {"backend": backend, **train(model, qadapter_loss, setup, device)},
                "train: eager-authors": lambda: train(model, eager_authors_loss, setup, device), **todo}
        todo["decode: batch 8 over 8 adapters"] = lambda: many_adapters(model, 8, setup, device)  # last: unloads the LoRA
    for name, fn in todo.items():
        run_part(parts, name, budget, fn if model is not None else no_model)
        write_json(result, args.out)  # a step killed at its time limit keeps the parts measured
    return finish_run(result, markdown(result), args.out, started)


if __name__ == "__main__":
    sys.exit(main())
