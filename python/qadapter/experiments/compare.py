"""Q-Adapter against SFT and DPO on one preference: how much each learns, and how much each forgets.

The paper's claim is that a Q-Adapter learns a new preference while keeping what the model knew.
:func:`run_compare` trains the three methods on the same pairs, with the same steps, pairs per step,
learning rate and LoRA adapter on the same frozen base, then measures each policy and the base:

- SFT: LoRA, cross-entropy on the chosen responses (TRL's ``SFTTrainer``);
- DPO: LoRA policy, the base (adapter disabled) as the reference, the DPO loss (TRL's ``DPOTrainer``);
- Q-Adapter: :class:`QAdapterTrainer`; its policy is the combined one, ``pi~``.

Alignment: held-out preference accuracy under each method's own reward (SFT and the base: the
log-likelihood margin; DPO: its implicit reward; Q-Adapter: its learned rewards), and on the
built-in task the rule's satisfaction rate in greedy answers to held-out prompts. Retention: the
knowledge probe (:mod:`qadapter.evaluation.knowledge`) by option log-likelihood and by greedy answer, the mean
per-token KL to the base on general chat prompts, the perplexity of a general text. Cost: training
seconds and the peak resident memory added while training.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from qadapter_kernels import LossConfig
from qadapter_kernels.vocabulary import vocabulary_pass

from ..evaluation.measures import (
    answer_tokens,
    answers,
    chat_prompts,
    customized_likelihood,
    likelihood,
    next_token_targets,
    pair_margins,
    perplexity,
)
from ..library import atomic
from ..library.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    check_rows,
    tokenize_rows,
)
from ..library.defaults import load_base
from ..library.hidden import final_hidden, output_head
from ..library.lora import lora_config, lora_targets
from ..library.quantization import model_quantization
from .options import DEFAULT_HELDOUT, METHODS, CompareOptions
from .task import follows_rule, load_task

LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO", "qadapter": "Q-Adapter"}


# ------------------------------------------------------------------------------------------ training
def _release_freed_memory() -> None:
    """Hands the memory an earlier method freed back to the system, so that the next one's growth is
    measured from what is live: glibc's malloc keeps freed blocks resident for reuse, and a method
    that trains after another would otherwise grow into them and read as adding nothing."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows, whose CDLL takes no None (this process's symbols)
        return
    if hasattr(libc, "malloc_trim"):  # glibc only; elsewhere the growth may undercount a later method
        libc.malloc_trim(0)


@contextmanager
def peak_rss_growth():
    """Yields a dict whose ``"mb"`` is, on exit, the peak resident memory above the entry's (sampled)."""
    result = {"mb": 0.0}
    _release_freed_memory()

    if os.path.exists("/proc/self/statm"):
        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    else:  # macOS, Windows: psutil comes with accelerate
        import psutil

        process = psutil.Process()

        def rss() -> int:
            return process.memory_info().rss

    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["mb"] = max(0, max(peak[0], rss()) - start) / 2**20


def _training_args(options: CompareOptions, method: str, steps: int, output: Path, **extra):
    return dict(output_dir=str(output / method), max_steps=steps, per_device_train_batch_size=options.pairs_per_step,
                learning_rate=options.method_learning_rate(method), lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
                logging_steps=max(1, steps // 4), save_strategy="no", report_to=[], seed=options.seed,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
                disable_tqdm=not sys.stderr.isatty(), **extra)  # a progress bar on a terminal only


def checkpointing_off() -> dict:
    """The TrainingArguments setting that turns gradient checkpointing off (TRL's configs turn it on by
    default): ``activation_checkpointing``, its name since transformers 5.23, where the old
    ``gradient_checkpointing`` warns that it is deprecated; ``gradient_checkpointing`` before, where the new
    name is not a field."""
    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def trl_dataset(method: str, features: list[dict]):
    """The pairs as the pre-tokenized columns of TRL's trainers: SFT's ``input_ids`` and ``labels`` of
    the chosen sequences (the prompt's labels ignored: only the chosen response is scored); DPO's
    ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (the prompt is the labels' ignored prefix, the
    same in both sequences of a pair)."""
    from datasets import Dataset

    if method == "sft":
        return Dataset.from_list([{"input_ids": f["chosen_input_ids"], "labels": f["chosen_labels"]}
                                  for f in features])
    rows = []
    for f in features:
        prompt = next(i for i, label in enumerate(f["chosen_labels"]) if label != IGNORE_INDEX)
        if f["rejected_input_ids"][:prompt] != f["chosen_input_ids"][:prompt]:
            raise ValueError("a pair's chosen and rejected sequences do not start with the same prompt")
        rows.append({"prompt_ids": f["chosen_input_ids"][:prompt], "chosen_ids": f["chosen_input_ids"][prompt:],
                     "rejected_ids": f["rejected_input_ids"][prompt:]})
    return Dataset.from_list(rows)


def trl_trainer(method: str, options: CompareOptions, steps: int, train_features: list[dict], work: Path,
                base, tokenizer):
    """TRL's ``SFTTrainer`` or ``DPOTrainer`` for ``base`` (a causal LM without an adapter), LoRA given
    as ``peft_config``: TRL wraps the model itself, so DPO's reference is the base, the adapter disabled
    (a ``PeftModel`` given to TRL 1.16's DPOTrainer would get a second, frozen copy of its adapter as
    the reference). Where TRL's defaults would make the baselines' run differ from the Q-Adapter's, they
    are set back: float32 (no bf16), no gradient checkpointing, DPO keeps the LoRA dropout (TRL
    would zero it), and on a quantized base the LoRA weights stay float32, as the Q-Adapter's do."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        # TRL 1.16's DPOTrainer tokenizes every text dataset itself (its _prepare_dataset has no path for
        # rows that are already prompt_ids/chosen_ids/rejected_ids); the pairs are tokenized by
        # qadapter.library.data, as the Q-Adapter's are, so they are taken as they are.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    # the layers the Q-Adapter's LoRA wraps
    lora = lora_config(base, lora_targets(base, None), r=options.lora_r, lora_alpha=2 * options.lora_r, lora_dropout=0.05)
    shared = {"bf16": False, **checkpointing_off(), "max_length": options.max_length}
    if method == "sft":
        args, trainer_class = SFTConfig(**_training_args(options, method, steps, work, **shared)), SFTTrainer
    else:
        args = DPOConfig(**_training_args(options, method, steps, work, beta=options.dpo_beta, disable_dropout=False,
                                          **shared))
        trainer_class = PreTokenizedDPOTrainer
    trainer = trainer_class(model=base, args=args, train_dataset=trl_dataset(method, train_features),
                            processing_class=tokenizer, peft_config=lora)
    if model_quantization(base) is not None:  # TRL casts a quantized base's LoRA weights to bf16 (QLoRA's recipe)
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return trainer


def train_method(method: str, options: CompareOptions, steps: int, train_features: list[dict], work: Path):
    """A fresh adapter on a fresh copy of the base, trained by ``method``; returns (model, seconds, MB).
    SFT and DPO train with TRL's trainers (:func:`trl_trainer`), the Q-Adapter with its own."""
    from transformers import set_seed

    from ..library.model import QAdapterModel
    from ..library.trainer import QAdapterConfig, QAdapterTrainer, logs_on_stderr

    set_seed(options.seed)
    if method == "qadapter":
        args = QAdapterConfig(**_training_args(options, method, steps, work, max_length=options.max_length,
                                               max_prompt_length=options.prompt_length(), lora_r=options.lora_r,
                                               lora_alpha=2 * options.lora_r, alpha_0=options.alpha_0,
                                               alpha_tilde=options.alpha_tilde))
        model = QAdapterModel.from_base(options.model, quantization=options.quantization, **args.model_options())
        trainer = QAdapterTrainer(model=model, args=args, train_dataset=train_features, processing_class=model.tokenizer)
    else:
        trainer = trl_trainer(method, options, steps, train_features, work,
                              *load_base(options.model, quantization=options.quantization))
        model = trainer.model
    logs_on_stderr(trainer)  # stdout is the table
    for parameter in model.parameters():  # page the (memory-mapped) weights in before measuring
        parameter.data.sum()
    with peak_rss_growth() as memory:
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return model, seconds, memory["mb"]


# ------------------------------------------------------------------------------------------ policies
@dataclass
class Policy:
    """What the measurements need of a method, none of it through ``[B, T, V]`` logits:

    - ``target_logprobs(input_ids, attention_mask, position_ids, targets) -> [targets]``: log-probs
      (float32) of given next tokens (:class:`qadapter.evaluation.measures.Targets`);
    - ``kl_to_base(input_ids, attention_mask) -> [B, T]``: KL(policy || frozen base) per position;
    - ``answer(questions, max_new_tokens)``: greedy answers to chat questions;
    - ``margins(features)``: preference margins of tokenized pairs under its own reward.
    """

    name: str
    target_logprobs: Callable[..., torch.Tensor]
    kl_to_base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    answer: Callable[[list[str], int], list[str]]
    margins: Callable[[list[dict]], torch.Tensor]


def preference(margins: torch.Tensor) -> dict:
    """Accuracy (chosen strictly ahead) and mean margin of per-pair reward margins."""
    return {"heldout_accuracy": float((margins > 0).float().mean()), "heldout_margin": float(margins.mean())}


def _batches(features: list[dict], pad_token_id: int, size: int = 8):
    collate = PreferenceCollator(pad_token_id)
    for start in range(0, len(features), size):
        yield collate(features[start : start + size])


def sequence_logprob_sums(target_logprobs, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability ``[B]`` of each row's scored tokens (labels aligned with the inputs)."""
    targets = next_token_targets(labels)
    return targets.row_sums(target_logprobs(input_ids, attention_mask, None, targets), labels.shape[0])


def _likelihood_margins(target_logprobs, features, pad_token_id) -> torch.Tensor:
    """Summed log-likelihood of chosen minus rejected, per pair."""
    out = []
    for batch in _batches(features, pad_token_id):
        sums = sequence_logprob_sums(target_logprobs, batch["input_ids"], batch["attention_mask"], batch["labels"])
        pairs = sums.shape[0] // 2
        out.append(sums[:pairs] - sums[pairs:])
    return torch.cat(out)


def lora_policy(name: str, peft_model, tokenizer, *, adapter: bool, reference: Policy | None = None,
                beta: float = 1.0) -> Policy:
    """The base (``adapter=False``) or a LoRA-tuned causal LM; with ``reference``, margins are DPO's
    implicit reward (``beta`` times the policy's likelihood margin minus the reference's, as TRL logs
    its ``rewards/margins``)."""
    model = peft_model.get_base_model()
    of_targets = likelihood(model)

    def context():
        return nullcontext() if adapter else peft_model.disable_adapter()

    def target_logprobs(ids, mask, position_ids, targets):
        with context():
            return of_targets(ids, mask, position_ids, targets)

    @torch.no_grad()
    def kl_to_base(ids, mask):
        weight, cap = output_head(model)
        ids, mask = ids.to(weight.device), mask.to(weight.device)
        if not adapter:
            return torch.zeros(ids.shape, device=weight.device)
        with peft_model.disable_adapter():
            frozen = final_hidden(model, ids, mask)
        # A plain model's distribution is the combination with alpha_0 = 0 and alpha~ = 1.
        plain = LossConfig(alpha_0=0.0, alpha_tilde=1.0, logit_softcap=cap)
        return vocabulary_pass(frozen, final_hidden(model, ids, mask), weight, config=plain, measures=("kl",)).kl

    def answer(questions, max_new_tokens):
        with context():
            return answers(peft_model, tokenizer, questions, customized=False, max_new_tokens=max_new_tokens)

    def margins(features):
        own = _likelihood_margins(target_logprobs, features, tokenizer.pad_token_id)
        return own if reference is None else beta * (own - reference.margins(features))

    return Policy(name, target_logprobs, kl_to_base, answer, margins)


def qadapter_policy(model, tokenizer) -> Policy:
    """The combined policy ``pi~`` of a trained :class:`QAdapterModel`; margins from its learned rewards
    (the reward of a sequence as the loss defines it, :func:`qadapter_kernels.sequence_rewards`)."""

    weight = model.lm_head_weight
    target_logprobs = customized_likelihood(model)

    @torch.no_grad()
    def kl_to_base(ids, mask):
        frozen, policy, config = model.policy_hidden(model.stack_hidden(ids.to(weight.device), mask.to(weight.device)))
        return vocabulary_pass(frozen, policy, weight, config=config, measures=("kl",)).kl

    def answer(questions, max_new_tokens):
        return answers(model, tokenizer, questions, customized=True, max_new_tokens=max_new_tokens)

    def margins(features):
        return pair_margins(model, features, tokenizer.pad_token_id)

    return Policy("qadapter", target_logprobs, kl_to_base, answer, margins)


# ------------------------------------------------------------------------------------------ measures
def _chat_batches(tokenizer, prompts: list[str], responses: list[str], size: int = 8):
    """Right-padded ``(ids, mask, response_mask)`` batches of chat prompts followed by responses."""
    if not prompts:
        return
    prompt_ids = tokenizer(chat_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    response_ids = [r or [tokenizer.eos_token_id] for r in answer_tokens(tokenizer, prompts, responses)]
    for start in range(0, len(prompts), size):
        rows = list(zip(prompt_ids[start : start + size], response_ids[start : start + size]))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
            scored[i, len(p) - 1 : len(p) + len(r) - 1] = True  # positions that predict a response token
        yield ids, mask, scored


def mean_kl_to_base(policy: Policy, tokenizer, prompts: list[str], responses: list[str]) -> float:
    """Mean per-token KL(policy || base) at the positions that predict the responses' tokens."""
    total, count = 0.0, 0
    for ids, mask, scored in _chat_batches(tokenizer, prompts, responses):
        total += float(policy.kl_to_base(ids, mask).cpu()[scored].sum())
        count += int(scored.sum())
    return total / count


def measure(policy: Policy, tokenizer, suite: dict) -> dict:
    """Every alignment and retention number of one policy (the base included)."""
    from ..evaluation.knowledge import ANSWER_TOKENS, score_probe

    row = preference(policy.margins(suite["heldout_features"]))
    if suite["rule_prompts"]:
        generated = policy.answer(suite["rule_prompts"], suite["answer_tokens"])
        row["rule_rate"] = sum(map(follows_rule, generated)) / len(generated)
        row["example"] = {"prompt": suite["rule_prompts"][0], "answer": generated[0]}
    probe = score_probe(policy.target_logprobs, lambda questions: policy.answer(questions, ANSWER_TOKENS), tokenizer,
                        suite["probe"])
    row["probe_loglik_accuracy"] = probe["loglik_accuracy"]
    row["probe_greedy_accuracy"] = probe["greedy_accuracy"]
    row["general_kl_to_base"] = mean_kl_to_base(policy, tokenizer, suite["general_prompts"],
                                                suite["general_responses"])
    row["general_perplexity"] = perplexity(policy.target_logprobs, tokenizer, suite["passages"])
    return row


# ------------------------------------------------------------------------------------------ the run
def _rows(options: CompareOptions) -> tuple[list, list, list[str]]:
    """Training rows, held-out rows and the rule's prompts, checked before any model loads: a
    malformed row of --data fails naming the row, unless --skip-invalid."""
    if options.data is None:
        task = load_task()
        return task["train"], task["heldout"], [row["prompt"] for row in task["heldout"]]
    rows = check_rows(options.data, skip_invalid=options.skip_invalid)
    heldout = options.heldout or DEFAULT_HELDOUT
    if len(rows) <= heldout:
        raise ValueError(f"--data {options.data} has {len(rows)} rows; --heldout {heldout} needs more")
    return rows[:-heldout], rows[-heldout:], []


def _suite(options: CompareOptions, tokenizer, rows: tuple[list, list, list[str]]) -> tuple[list[dict], dict]:
    """Training features and what every policy is measured on (``suite["data"]``: what was kept and skipped)."""
    from ..evaluation.knowledge import GENERAL_PROMPTS, general_passages, load_probe

    lengths = dict(max_length=options.max_length, max_prompt_length=options.prompt_length(),
                   skip_invalid=options.skip_invalid)
    train_rows, heldout_rows, rule_prompts = rows
    probe, prompts, passages = load_probe(), list(GENERAL_PROMPTS), general_passages()
    if options.quick:
        train_rows, heldout_rows, rule_prompts = train_rows[:8], heldout_rows[:4], rule_prompts[:2]
        probe, prompts, passages = probe[:6], prompts[:3], passages[:2]
    train, train_summary = tokenize_rows(train_rows, tokenizer, **lengths)
    heldout, heldout_summary = tokenize_rows(heldout_rows, tokenizer, **lengths)
    suite = {"heldout_features": heldout, "rule_prompts": rule_prompts, "probe": probe,
             "general_prompts": prompts, "passages": passages,
             "answer_tokens": min(options.answer_tokens, 8) if options.quick else options.answer_tokens,
             "data": {name: {**vars(summary), "skipped": dict(summary.skipped)}  # asdict would miscopy the Counter
                      for name, summary in (("train", train_summary), ("heldout", heldout_summary))}}
    _stage(f"training data: {train_summary}; held-out data: {heldout_summary}")
    return train, suite


def _stage(text: str) -> None:
    print(f"[qadapter compare] {text}", file=sys.stderr, flush=True)


def run_compare(options: CompareOptions) -> dict:
    """Trains and measures every method at every budget; writes compare.json, .md and .png."""
    import tempfile

    options.check()
    if {"sft", "dpo"} & set(options.method_list()) and importlib.util.find_spec("trl") is None:
        raise ModuleNotFoundError('qadapter compare trains SFT and DPO with TRL: pip install "qadapter-kernels[trl]"')
    rows = _rows(options)
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    output = Path(options.output)
    base_model, tokenizer = load_base(options.model, quantization=options.quantization)
    from peft import get_peft_model

    # The base policy: a LoRA model with its adapter disabled (the same forward as every policy's).
    base_peft = get_peft_model(base_model, lora_config(base_model, lora_targets(base_model, None)[:1], r=1))
    base = lora_policy("base", base_peft, tokenizer, adapter=False)
    train, suite = _suite(options, tokenizer, rows)
    _stage(f"measuring the base ({len(suite['heldout_features'])} held-out pairs, {len(suite['probe'])} probe "
           f"questions, {len(suite['general_prompts'])} general prompts)")
    suite["general_responses"] = base.answer(suite["general_prompts"], suite["answer_tokens"])
    report = {
        "model": options.model,
        "quantization": model_quantization(base_model),
        "data": options.data or "built-in TL;DR task",
        "data_summary": suite["data"],
        "options": {**asdict(options), "max_prompt_length": options.prompt_length()},
        "train_pairs": len(train),
        "heldout_pairs": len(suite["heldout_features"]),
        "probe_questions": len(suite["probe"]),
        "general_prompts": len(suite["general_prompts"]),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "complete": False,
        "rows": [],
    }

    def add_row(row: dict) -> None:  # every row is written at once: a stopped run keeps what it measured
        report["rows"].append(row)
        report["total_seconds"] = time.perf_counter() - started
        write_report(report, output)

    add_row({"method": "base", "steps": 0, **measure(base, tokenizer, suite)})
    with tempfile.TemporaryDirectory(prefix="qadapter-compare-") as work:
        for steps in options.budget_steps():
            for method in options.method_list():
                _stage(f"{LABELS[method]}: {steps} steps on {len(train)} pairs")
                model, seconds, memory_mb = train_method(method, options, steps, train, Path(work))
                if method == "qadapter":
                    policy = qadapter_policy(model, tokenizer)
                else:
                    policy = lora_policy(method, model, tokenizer, adapter=True,
                                         reference=base if method == "dpo" else None, beta=options.dpo_beta)
                model.eval()
                _stage(f"{LABELS[method]}: measuring")
                combination = ({"alpha_0": model.loss.alpha_0, "alpha_tilde": model.loss.alpha_tilde}
                               if method == "qadapter" else {})
                add_row({"method": method, "steps": steps, "learning_rate": options.method_learning_rate(method),
                         **combination, **measure(policy, tokenizer, suite),
                         "train_seconds": seconds, "train_memory_mb": memory_mb})
                del model, policy
    report["complete"] = True
    write_report(report, output)
    return report


def write_report(report: dict, output: Path) -> None:
    """compare.json and compare.md in ``output`` as one save (never a new table beside an old record),
    then compare.png, drawn from them, written atomically."""
    atomic.write_texts(output, {"compare.json": json.dumps(report, indent=2) + "\n",
                                "compare.md": format_table(report) + "\n"})
    plot(report, output / "compare.png")


# ------------------------------------------------------------------------------------------ report
COLUMNS = (
    ("learning_rate", "learning rate", "{:g}"),
    ("alpha_0", "alpha_0", "{:g}"),
    ("alpha_tilde", "alpha~", "{:g}"),
    ("heldout_accuracy", "held-out pref. acc. (own reward)", "{:.3f}"),
    ("rule_rate", "rule satisfaction", "{:.3f}"),
    ("probe_loglik_accuracy", "probe acc. (log-lik.)", "{:.3f}"),
    ("probe_greedy_accuracy", "probe acc. (greedy)", "{:.3f}"),
    ("general_kl_to_base", "KL to base / token", "{:.4f}"),
    ("general_perplexity", "general-text perplexity", "{:.2f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("train_memory_mb", "train memory MB", "{:.0f}"),
)


def format_table(report: dict) -> str:
    """The markdown table: one row per method and budget, the base first."""
    columns = [c for c in COLUMNS if any(c[0] in row for row in report["rows"])]
    lines = ["| method | steps | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for row in report["rows"]:
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns]
        lines.append(f"| {LABELS[row['method']]} | {row['steps']} | " + " | ".join(cells) + " |")
    lines += ["", f"{report['train_pairs']} training pairs, {report['heldout_pairs']} held-out pairs, "
              f"{report['probe_questions']} probe questions, {report['general_prompts']} general prompts; "
              f"{report['device']} ({report['threads']} threads), total {report['total_seconds'] / 60:.1f} min.",
              "Own reward: the log-likelihood margin (base, SFT), the implicit reward (DPO), the learned "
              "rewards (Q-Adapter)."]
    if not report.get("complete", True):
        lines.append("Partial: the run stopped (or is still running) before its last row.")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Alignment gain (x) against knowledge kept (y), relative to the base at the origin; one line per
    method (and learning rate or Q-Adapter combination, where a method ran with several) through its
    budgets. Skipped, with a warning, without matplotlib."""
    plt = atomic.pyplot(path)
    if plt is None:
        return
    rows = report["rows"]
    align = "rule_rate" if "rule_rate" in rows[0] else "heldout_accuracy"
    base = rows[0]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ax.scatter([0], [0], color="black", zorder=3)
    ax.annotate("base", (0, 0), textcoords="offset points", xytext=(5, 5))
    def variant(r):  # the settings that make two runs of one method different lines
        return r.get("learning_rate") or 0, r.get("alpha_0", 0), r.get("alpha_tilde", 0)

    for method in METHODS:
        variants = sorted({variant(r) for r in rows if r["method"] == method})
        for v in variants:
            points = sorted((r for r in rows if r["method"] == method and variant(r) == v), key=lambda r: r["steps"])
            xs = [r[align] - base[align] for r in points]
            ys = [r["probe_loglik_accuracy"] - base["probe_loglik_accuracy"] for r in points]
            notes = [f"lr {v[0]:g}"] if len({u[0] for u in variants}) > 1 else []
            notes += [f"alpha_0 {v[1]:g}, alpha~ {v[2]:g}"] if len({u[1:] for u in variants}) > 1 else []
            ax.plot(xs, ys, marker="o", label=LABELS[method] + (f" ({'; '.join(notes)})" if notes else ""))
            for r, x, y in zip(points, xs, ys):
                ax.annotate(str(r["steps"]), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(("rule satisfaction" if align == "rule_rate" else "held-out preference accuracy") + " - base")
    ax.set_ylabel("knowledge-probe accuracy (log-lik.) - base")
    ax.set_title("learned the preference (right) vs kept knowledge (up)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the points, not over them
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120)
    plt.close(fig)
