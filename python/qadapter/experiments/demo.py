"""The main job: customize the embedded default model to the built-in preference, on a CPU, and show
in numbers that it learned the preference while keeping what it knew.

Before and after training it measures, on held-out data: preference accuracy of the learned
rewards, the rule's satisfaction rate in greedy generations, knowledge-probe accuracy, and the
mean per-token KL(customized || base); plus training speed and peak memory. The base's preference
accuracy is the step-0 adapter's (LoRA B = 0) under the same rewards, measured in the same pass as
the trained adapter's. It saves the adapter and a JSON report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..evaluation.measures import STEP0_BASELINE, answers, evaluate_pairs
from ..library import atomic
from ..library.data import tokenize_rows
from ..library.defaults import DEFAULT_MODEL
from ..library.model import QAdapterModel
from ..library.quantization import describe
from .options import DemoOptions
from .task import follows_rule, load_task, probe_correct

# Under the table: what the base's preference accuracy is.
BASELINE_NOTE = (
    "* base: the step-0 adapter (untrained: LoRA B = 0, so Q = the base's logits), same rewards and pairs.",
    "  A step-0 reward is about the base's log-likelihood of the response, and each rejected answer is the",
    "  base's own greedy answer, so the base prefers it: a low base accuracy is the base's preference,",
    "  not a floor of the measure.",
)


def _peak_memory_mb() -> float:
    """The GPU's peak allocation, else the process's peak resident memory, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
    except ImportError:  # Windows: no resource module; psutil comes with accelerate
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20  # the peak working set
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux and the BSDs


def _measure(model, tokenizer, task, options: DemoOptions, *, customized: bool) -> dict:
    prompts = [row["prompt"] for row in task["heldout"]]
    probe = task["probe"]
    generated = answers(model, tokenizer, prompts, customized=customized, max_new_tokens=options.answer_tokens)
    probe_answers = answers(model, tokenizer, [p["question"] for p in probe], customized=customized,
                            max_new_tokens=options.answer_tokens)
    return {
        "rule_rate": sum(map(follows_rule, generated)) / len(generated),
        "probe_accuracy": sum(probe_correct(a, p["answers"]) for a, p in zip(probe_answers, probe)) / len(probe),
        "examples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, generated))[:3]],
    }


def _stage(text: str) -> None:
    print(f"[qadapter demo] {text}", file=sys.stderr, flush=True)


def run_demo(options: DemoOptions) -> dict:
    """Trains, measures, saves; returns the report (also written to ``<output>/report.json``)."""
    from ..library.trainer import QAdapterConfig, QAdapterTrainer, logs_on_stderr

    started = time.perf_counter()
    embedded = options.model == DEFAULT_MODEL
    _stage(f"1/4 loading {'the embedded default model (converted to a local cache on first use)' if embedded else options.model}")
    torch.manual_seed(options.seed)
    output = Path(options.output)
    args = QAdapterConfig(
        output_dir=str(output / "trainer"), max_steps=options.max_steps,
        per_device_train_batch_size=options.pairs_per_step, learning_rate=options.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, options.max_steps // 10), logging_steps=10,
        save_strategy="no", report_to=[], seed=options.seed, backend=options.backend,
        max_length=options.max_length, max_prompt_length=options.max_prompt_length, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(),  # a progress bar on a terminal only
    )
    model = QAdapterModel.from_base(options.model, quantization=options.quantization, **args.model_options())
    tokenizer = model.tokenizer
    loaded = time.perf_counter()

    task = load_task()
    if options.heldout_limit is not None:
        task["heldout"] = task["heldout"][: options.heldout_limit]
    if options.probe_limit is not None:
        task["probe"] = task["probe"][: options.probe_limit]
    lengths = dict(max_length=options.max_length, max_prompt_length=options.max_prompt_length,
                   chat_template_kwargs=model.chat_template_kwargs)
    train_features, _ = tokenize_rows(task["train"], tokenizer, **lengths)
    heldout_features, _ = tokenize_rows(task["heldout"], tokenizer, **lengths)

    _stage(f"2/4 measuring the base model ({len(task['heldout'])} held-out prompts, {len(task['probe'])} probe questions)")
    before = _measure(model, tokenizer, task, options, customized=False)

    _stage(f"3/4 training on {len(train_features)} pairs for {options.max_steps} steps")
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train_features, processing_class=tokenizer)
    logs_on_stderr(trainer)  # stdout is the report
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start

    _stage("4/4 measuring the customized model and the step-0 baseline")
    after = _measure(model, tokenizer, task, options, customized=True)
    scores = evaluate_pairs(model, heldout_features, tokenizer.pad_token_id, kl=True, step0=True, progress=True)
    before.update({f"heldout_{k}": v for k, v in scores.pop("step0").items()})
    after["kl_to_base"] = scores.pop("kl_to_base")
    after.update({f"heldout_{k}": v for k, v in scores.items()})
    model.save_pretrained(output / "adapter")
    report = {
        "model": options.model,
        "quantization": model.quantization,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "options": options.__dict__,
        "train_pairs": len(train_features),
        "heldout_pairs": len(heldout_features),
        "probe_questions": len(task["probe"]),
        "before": before,
        "after": after,
        "baseline": f"before.heldout_*: {STEP0_BASELINE}",
        "steps_per_second": options.max_steps / train_seconds,
        "train_seconds": train_seconds,
        "load_seconds": loaded - started,
        "total_seconds": time.perf_counter() - started,
        "peak_memory_mb": _peak_memory_mb(),
        "adapter": str(output / "adapter"),
    }
    atomic.write_json(output / "report.json", report)
    return report


def format_report(report: dict) -> str:
    """The before/after table the demo prints."""
    b, a = report["before"], report["after"]
    rows = [
        ("held-out preference accuracy *", b["heldout_accuracy"], a["heldout_accuracy"]),
        ("rule satisfaction (greedy generations)", b["rule_rate"], a["rule_rate"]),
        ("knowledge-probe accuracy", b["probe_accuracy"], a["probe_accuracy"]),
        ("mean per-token KL(customized || base)", 0.0, a["kl_to_base"]),
    ]
    lines = [f"| {'metric':<40} | {'base':>8} | {'Q-Adapter':>9} |", f"|{'-' * 42}|{'-' * 10}|{'-' * 11}|"]
    lines += [f"| {name:<40} | {x:>8.3f} | {y:>9.3f} |" for name, x, y in rows]
    margin = f"  The step-0 adapter's mean reward margin (chosen - rejected) is {b['heldout_margin']:.3f}."
    lines += ["", *BASELINE_NOTE, margin, ""]
    lines.append(
        f"{report['train_pairs']} training pairs, {report['heldout_pairs']} held-out pairs, "
        f"{report['probe_questions']} probe questions; {report['options']['max_steps']} steps at "
        f"{report['steps_per_second']:.2f} steps/s on {report['device']} ({report['threads']} threads), "
        f"peak memory {report['peak_memory_mb']:.0f} MB, total {report['total_seconds'] / 60:.1f} min"
    )
    if report.get("quantization"):
        lines.append(f"base quantized: {describe(report['quantization'])}")
    example = a["examples"][0]
    lines.append(f"\nexample ({example['prompt']!r}):\n{example['answer']}")
    lines.append(f"\nadapter saved to {report['adapter']}")
    return "\n".join(lines)
