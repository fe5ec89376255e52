"""One training step inside TRL: the Q-Adapter recipe against stock DPO, on the same model and batch.

    python -m bench.trl_recipe [--model smollm2-135m] [--seq 128] [--repeats 3]

Three trainers, each a TRL ``DPOTrainer`` on the same PEFT LoRA model (``bench.e2e.MODELS``: a real
configuration with random weights; LoRA r=8 on q_proj and v_proj), the same preference pairs and
the same batch (2 pairs, prompt plus responses of ``seq`` tokens):

- ``dpo``: stock TRL DPO; the reference pass is the model with the adapter disabled (TRL 1.16
  computes both passes' per-token log-probs with its own chunked fused LM head);
- ``dpo-liger``: the same with ``use_liger_kernel=True`` (in TRL 1.16: Liger's layer kernels,
  such as RMSNorm and SwiGLU; the LM head stays TRL's), where liger-kernel is installed;
- ``qadapter``: ``examples/trl_dpo.py``'s ``QAdapterDPOTrainer``, the Q-Adapter loss from hidden
  states (the fused op; no logits).

A step is ``Trainer.training_step`` on one collated batch (both forwards, the loss, the backward;
the optimizer step is the same for all and left out). Time: the median of ``repeats`` steps after
a warm-up; memory: the peak extra bytes one step allocates (bench/memory.py). The data is the
examples' toy task (word-level tokens, no download), so the vocabulary's cost is the model's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import Timer, first_line, package_version
from bench.e2e import MODELS, build_model
from bench.memory import peak_extra_memory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = ("dpo", "dpo-liger", "qadapter")
PAIRS = 2


def _example(name: str):
    """``examples/NAME.py`` as a module: the examples are scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _examples():
    """examples/toy.py and examples/trl_dpo.py."""
    return _example("toy"), _example("trl_dpo")


def _trainer(recipe: str, model_name: str, seq: int, output_dir: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    toy, trl_dpo = _examples()
    words, vocab = seq // 2, min(toy.VOCAB, MODELS[model_name]["vocab_size"])
    data = Dataset.from_list(toy.text_pairs(n=2 * PAIRS, prompt_len=seq - words, response_len=words, vocab=vocab))
    args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=PAIRS, max_steps=1, report_to="none",
                     save_strategy="no", disable_tqdm=True, bf16=False, max_length=2 * seq,
                     use_liger_kernel=recipe == "dpo-liger")
    model = build_model(model_name, torch.device("cpu"), torch.float32, checkpointing=False)
    cls = trl_dpo.QAdapterDPOTrainer if recipe == "qadapter" else DPOTrainer
    return cls(model=model, args=args, train_dataset=data, processing_class=toy.tokenizer(vocab))


def measure(model_name: str = "smollm2-135m", *, seq: int = 128, repeats: int = 3) -> dict:
    """Step time and peak extra memory of every recipe (or why one could not run), with the versions.
    The recipes' steps take turns within each round, so that a drift in the machine's load biases none."""
    rows, steps = {}, {}
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    with contextlib.ExitStack() as stack:
        for recipe in RECIPES:
            row = rows[recipe] = {"recipe": recipe, "status": "ok", "reason": "", "time_s": None, "peak_bytes": None}
            if missing:
                row |= {"status": "skipped", "reason": f"not installed: {', '.join(missing)}"}
                continue
            if recipe == "dpo-liger" and importlib.util.find_spec("liger_kernel") is None:
                row |= {"status": "skipped", "reason": "liger-kernel is not installed"}
                continue
            print(f"[bench] TRL recipe {recipe}: {model_name}, {PAIRS} pairs x {seq} tokens", flush=True)
            try:
                trainer = _trainer(recipe, model_name, seq, stack.enter_context(tempfile.TemporaryDirectory()))
                inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
                trainer.model.train()
                trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by training_step
                steps[recipe] = functools.partial(trainer.training_step, trainer.model, inputs)
                steps[recipe]()  # a recipe that fails does so here, before the rounds
                row["tokens"] = int(inputs["input_ids"].numel())
            except Exception as exc:  # noqa: BLE001 -- a recipe that fails is a recorded result
                steps.pop(recipe, None)
                row |= {"status": "skipped", "reason": f"failed: {first_line(exc)}"}
        times = Timer("cpu", warmup=1, repeats=repeats).rounds(steps, repeats)
        for recipe, step in steps.items():
            rows[recipe]["time_s"] = statistics.median(times[recipe])
            rows[recipe]["peak_bytes"] = peak_extra_memory(step)[1]
    return {"model": model_name, "vocab": MODELS[model_name]["vocab_size"], "pairs": PAIRS, "seq": seq,
            "repeats": repeats, "trl": package_version("trl"), "liger-kernel": package_version("liger-kernel"),
            "results": list(rows.values())}


def markdown(result: dict) -> list[str]:
    """The report's section: one row per recipe, and its ratios against the Q-Adapter recipe."""
    ok = {r["recipe"]: r for r in result["results"] if r["status"] == "ok"}
    ours = ok.get("qadapter")
    out = [
        f"## One training step inside TRL: {result['model']} (random weights, V={result['vocab']:,}), "
        f"{result['pairs']} pairs x about {result['seq']} tokens",
        "",
        f"TRL {result['trl']}, liger-kernel {result['liger-kernel']}; `Trainer.training_step` (both forwards, loss, "
        f"backward) on one batch, median of {result['repeats']} rounds in turns after a warm-up (bench/trl_recipe.py).",
        "",
        "| recipe | time (s) | peak extra (MiB) | x time of qadapter | x memory of qadapter | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["results"]:
        if r["status"] != "ok":
            out.append(f"| {r['recipe']} |  |  |  |  | {r['status']}: {r['reason']} |")
            continue
        ratio_t = f"{r['time_s'] / ours['time_s']:.2f}" if ours else ""
        ratio_m = f"{r['peak_bytes'] / ours['peak_bytes']:.2f}" if ours and ours["peak_bytes"] else ""
        out.append(f"| {r['recipe']} | {r['time_s']:.2f} | {r['peak_bytes'] / 2**20:,.0f} | {ratio_t} | {ratio_m} | ok |")
    return out + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (prompt and response halves)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("\n".join(markdown(measure(args.model, seq=args.seq, repeats=args.repeats))))


if __name__ == "__main__":
    main()
