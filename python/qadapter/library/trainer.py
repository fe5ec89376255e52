"""Training a Q-Adapter with transformers.Trainer: the method's options as TrainingArguments,
the fused loss in ``compute_loss``, and the metrics preference trainers log.

Everything else (checkpointing and resume, gradient accumulation, mixed precision, gradient
checkpointing, progress bars, DDP/FSDP through accelerate or torchrun) is Trainer's own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import numbers
import os
import shutil
import sys
import typing
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import TrainOutput

from qadapter_kernels import LossConfig
from qadapter_kernels.config import check_integer
from qadapter_kernels.inputs import check_chunk_size
from qadapter_kernels.registry import BACKEND_NAMES, check_options

from . import atomic
from .data import IGNORE_INDEX, PreferenceCollator, check_lengths, pairs_dataset, parse_template_options, tokenize_rows
from .defaults import MAX_LENGTH
from .hidden import whole_parameters
from .launch import launch_variable, launched_processes
from .provenance import data_identity, read_provenance, rows_hash
from .saved import HUB_FILES, checkpoint_folders, holds_adapter

METRIC_NAMES = {
    "chosen_rewards": "rewards/chosen",
    "rejected_rewards": "rewards/rejected",
    "accuracy": "rewards/accuracies",
    "margin": "rewards/margins",
    "bt_loss": "loss/bt",
    "chi2_loss": "loss/chi2",
}
TOKEN_SHARE = "tokens/run_over_padded"
# What an evaluation logs (under its eval_ prefix): the loss, the preference measures, Trainer's timings.
EVALUATION_NAMES = ("loss", *METRIC_NAMES.values(), TOKEN_SHARE, "runtime", "samples_per_second", "steps_per_second")
logger = logging.getLogger(__name__)


# The training data marks unscored positions with data.IGNORE_INDEX, and the logit soft-capping is
# the model's own (QAdapterModel takes it from the model's config), so neither is a training option.
LOSS_ARGUMENTS = tuple(name for name in LossConfig.names() if name not in ("ignore_index", "logit_softcap"))


def _real_or_word(text: str) -> float | str:
    """A command-line value of an option that takes a number or a word (``grad_filter_eps``: ``auto``);
    LossConfig checks which words it takes."""
    try:
        return float(text)
    except ValueError:
        return text


def _loss_arguments() -> type:
    """A TrainingArguments subclass with one field per LossConfig option: its type, default, help and
    choices (the metadata HfArgumentParser turns into ``--name`` options)."""
    types = {name: _real_or_word if hint == float | str else hint
             for name, hint in typing.get_type_hints(LossConfig).items()}
    specs = [(f.name, types[f.name], field(default=f.default, metadata=dict(f.metadata)))
             for f in dataclasses.fields(LossConfig) if f.name in LOSS_ARGUMENTS]
    cls = dataclasses.make_dataclass("LossArguments", specs, bases=(TrainingArguments,))
    cls.__module__ = __name__
    return cls


LossArguments = _loss_arguments()


@dataclass
class QAdapterConfig(LossArguments):
    """TrainingArguments plus the Q-Adapter loss options (LossConfig's fields and defaults), the
    loss backend, and the LoRA and data options."""

    backend: str = field(default="auto", metadata={"help": "qadapter_kernels backend (loss and decoding)",
                                                  "choices": BACKEND_NAMES})
    chunk_size: int | None = field(default=None, metadata={"help": "tokens per chunk of the chunked backends; "
                                                                   "unset: from a memory budget"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "the linear layers LoRA wraps (default: the attention's query and value projections)"})
    max_length: int = field(default=MAX_LENGTH, metadata={"help": "tokens per sequence, prompt included"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "prompt tokens kept (cut from the left; "
                                                                          "default: half of --max_length)"})
    skip_invalid: bool = field(default=False, metadata={"help": "raw preference rows given to the trainer: skip "
                                                                "malformed ones (counted) instead of failing"})
    learning_rate: float = field(default=3e-4, metadata={"help": "the method's learning rate"})
    padding_free: bool = field(default=True, metadata={"help": "run the model on each batch packed without its "
                                                              "padding, each prompt its sequences share once"})
    chat_template_kwargs: dict | str | None = field(default=None, metadata={
        "help": "the chat template's options as a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3): data "
                "rendered with them, and saved with the adapter, whose prompts are rendered so wherever it "
                "answers (default: none; with --on, the parent adapter's)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "pairs carry their own columns"})

    def __post_init__(self) -> None:
        self.check_training_options()
        _, measure = self.best_metric()
        if self.greater_is_better is None and measure is not None and measure.startswith("loss"):
            self.greater_is_better = False  # Trainer's guess reads a name ending in "loss" only: loss/bt is one too
        super().__post_init__()
        # Integrations transformers lists by whether their package imports (not flyte, which it never
        # lists, nor azure_ml, which it hides beside mlflow): one not installed fails only in Trainer,
        # once the model has loaded.
        listed = set(INTEGRATION_TO_CALLBACK) - {"flyte", "azure_ml"}
        missing = [name for name in self.report_to if name in listed and name not in get_available_reporting_integrations()]
        if missing:
            raise ValueError(f"--report_to {' '.join(missing)}: not installed here (installed: "
                             f"{', '.join(get_available_reporting_integrations()) or 'none'})")
        if self.dataloader_pin_memory and not has_accelerator():
            self.dataloader_pin_memory = False  # nothing to pin memory for: torch's loader would only warn
        # A bad value fails here, naming the option, not when the model is built (nor, for a backend
        # without an option, at the first step's loss).
        check_options(self.backend, self.loss_config().grad_filter_eps)
        self.chunk_size = check_chunk_size(self.chunk_size)
        if self.chat_template_kwargs is not None:  # JSON text as the command line gives it
            self.chat_template_kwargs = parse_template_options(self.chat_template_kwargs, "--chat_template_kwargs")

    def _check_number_types(self) -> None:
        """The counts and rates checked below as numbers, refused naming the option otherwise (from
        Python, a string or None would fail the comparison unnamed, a bool count pass as 0 or 1); a
        numpy or torch scalar taken as the plain number, which the saved options' JSON can hold."""
        for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "lora_r", "seed"):
            setattr(self, name, check_integer(f"--{name}", getattr(self, name)))
        for name in ("learning_rate", "lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            plain = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if isinstance(plain, bool) or not isinstance(plain, numbers.Real):
                raise TypeError(f"--{name} must be a number; got {value!r}")
            if type(value) not in (int, float):
                setattr(self, name, float(plain))

    def best_metric(self) -> tuple[str | None, str | None]:
        """``metric_for_best_model`` read as ``[eval_][<set>_]<measure>`` (a dict of eval sets names its
        set): the set (None without one) and the measure; (None, None) when unset. A name no evaluation
        logs is refused here, else a KeyError at the first evaluation, after training."""
        metric = (self.metric_for_best_model or "").removeprefix("eval_")
        if not metric:
            return None, None
        measure = next((name for name in EVALUATION_NAMES if metric == name or metric.endswith(f"_{name}")), None)
        if measure is None:
            raise ValueError(f"--metric_for_best_model must name a measure the evaluation logs, with or without "
                             f"its eval_ prefix: {', '.join(EVALUATION_NAMES)}; got {self.metric_for_best_model!r}")
        return metric.removesuffix(measure).removesuffix("_") or None, measure

    def check_training_options(self) -> None:
        """Values Trainer takes and fails on only after the model loads (a ZeroDivisionError, numpy's
        seed error), or trains on without a step (an untrained adapter saved): refused here, naming
        the option as ``qadapter train`` spells it."""
        self._check_number_types()
        expectations = {
            "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, "an integer >= 1"),
            "per_device_train_batch_size": (self.per_device_train_batch_size >= 1, "an integer >= 1"),
            "learning_rate": (self.learning_rate >= 0, "a number >= 0"),
            "lora_alpha": (self.lora_alpha > 0, "> 0"),
            "lora_r": (self.lora_r >= 1, "an integer >= 1"),
            "lora_dropout": (0 <= self.lora_dropout < 1, "in [0, 1)"),
            "seed": (0 <= self.seed <= 2**32 - 1, "an integer in [0, 2**32 - 1]"),
            "max_steps": (self.max_steps != 0, "-1 (train --num_train_epochs epochs) or a positive step count"),
        }
        for name, (holds, expected) in expectations.items():
            if not holds:
                raise ValueError(f"--{name} must be {expected}; got {getattr(self, name)}")
        # Trainer's options for a language model's own loss or batches, which the pair loss does not take.
        unused = {"label_smoothing_factor": (self.label_smoothing_factor != 0, "smooths token labels"),
                  "neftune_noise_alpha": (self.neftune_noise_alpha is not None, "adds noise to the input embeddings"),
                  # transformers 5's later releases name it so; the earlier, group_by_length
                  "train_sampling_strategy": (getattr(self, "train_sampling_strategy", "") == "group_by_length",
                                              "groups sequences by length"),
                  "group_by_length": (getattr(self, "group_by_length", False), "groups sequences by length")}
        for name, (given, what) in unused.items():
            if given:
                raise ValueError(f"--{name} (a Trainer option) {what} for a language model's loss; the Q-Adapter's "
                                 f"pairwise loss does not take it (got {getattr(self, name, None)})")
        if getattr(self, "train_sampling_strategy", "") == "batch_rebalance":  # else Trainer's error once the model loaded
            raise ValueError("--train_sampling_strategy batch_rebalance balances the devices' padded tokens by each "
                             "example's input_ids, which a preference pair does not have (its chosen and rejected "
                             "sequences run packed without padding: --padding_free); use random or sequential")
        check_lengths(self.max_length, self.max_prompt_length)
        if self.fp16 and (self.use_cpu or not has_accelerator()):  # accelerate then takes it and casts nothing
            raise ValueError("--fp16 (float16 mixed precision) runs on a GPU only: on a CPU it would change nothing; "
                             "--bf16 true computes in bfloat16 there")
        if self.deepspeed and importlib.util.find_spec("deepspeed") is None:  # else transformers' TypeError
            raise ModuleNotFoundError('--deepspeed needs DeepSpeed: pip install "qadapter-kernels[deepspeed]"',
                                      name="deepspeed")
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs must be > 0 when --max_steps is -1 (its default); "
                             f"got {self.num_train_epochs}")

    def loss_config(self) -> LossConfig:
        return LossConfig.from_options(**{name: getattr(self, name) for name in LOSS_ARGUMENTS})

    def model_options(self) -> dict:
        """Keyword arguments of :class:`qadapter.QAdapterModel` (loss and LoRA settings)."""
        return dict(loss=self.loss_config(), backend=self.backend, chunk_size=self.chunk_size,
                    lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                    target_modules=self.lora_target_modules, padding_free=self.padding_free,
                    chat_template_kwargs=self.chat_template_kwargs)


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (a GPU): without one, Trainer's processes join only with use_cpu."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; older ones pin for CUDA only
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _warn_if_padding_dependent(reward_norm: str, accumulation_steps: int) -> None:
    """reward_norm="padded" divides a sequence's reward by its batch's padded length, so a pair's
    loss depends on the batch it lands in: with accumulation, micro-batches are padded differently
    from the whole batch. Said once, at construction."""
    if reward_norm == "padded" and accumulation_steps > 1:
        warnings.warn(
            'reward_norm="padded" (the authors\' convention) makes each pair\'s reward depend on how far its '
            "batch is padded, so gradient accumulation changes the loss; reward_norm=\"mean\" "
            'or "sum" does not depend on padding', UserWarning, stacklevel=3,
        )


def seed_everything(args: TrainingArguments) -> None:
    """Seeds what a run draws before Trainer starts (the adapter's initialization), as Trainer seeds
    before its ``model_init``: ``args.seed``, fully deterministic with ``args.full_determinism``."""
    from transformers import enable_full_determinism, set_seed

    (enable_full_determinism if args.full_determinism else set_seed)(args.seed)


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint of ``run_dir`` a run can resume from, or None.

    Trainer writes a checkpoint's files one by one, ``trainer_state.json`` last: a process killed
    while checkpointing leaves a newest folder whose state is missing or cut short. That folder is
    passed over (with a warning) for the one before it.
    """
    for path in reversed(checkpoint_folders(run_dir)):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            warnings.warn(f"{path} is incomplete (its trainer_state.json is missing or cut short: the run "
                          "stopped while checkpointing); resuming from an earlier checkpoint", UserWarning, stacklevel=2)
            continue
        return str(path)
    return None


# What a resumed run takes from its checkpoint whatever it is given: the restored optimizer state
# sets its hyperparameters, and the restored schedule its base learning rate.
RESTORED_OPTIONS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args")
# What a resumed run takes as given, changing the course of the run its checkpoint is from (the
# schedule's shape is rebuilt from the options, only its step and base learning rate restored).
COURSE_OPTIONS = ("max_steps", "num_train_epochs", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                  "warmup_ratio", "optim", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                  "data_seed", "max_length", "max_prompt_length", "chat_template_kwargs", "lora_dropout",
                  "padding_free", *LOSS_ARGUMENTS)
# What a run recorded before an option existed ran with: a checkpoint from then, resumed, is compared
# as it ran (padded, no chat template options), not passed over as if it had no value.
UNRECORDED_OPTIONS = {"padding_free": False, "chat_template_kwargs": None}


def resume_point(checkpoint: Path, args: TrainingArguments, data: dict | None) -> dict:
    """Checks that a run given ``args`` (and ``data``, its data identity) can resume from ``checkpoint``
    and returns where it resumes: the checkpoint, its step, and what differs from its run.

    Refused: a checkpoint past ``max_steps``, and options the restored optimizer and schedule would
    override (:data:`RESTORED_OPTIONS`: the run would not use what it is given). Warned of: a
    checkpoint without optimizer state (the optimizer and schedule start afresh), options
    that change the run's course from the checkpoint on (:data:`COURSE_OPTIONS`: a longer
    ``max_steps`` stretches the schedule), and other data than the checkpoint's run read."""
    if not checkpoint.is_dir():
        raise ValueError(f"no checkpoint to resume from at {checkpoint}")
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{checkpoint} is not a complete checkpoint to resume from (its trainer_state.json: "
                         f"{exc})") from None
    step = int(state.get("global_step", 0))
    if args.max_steps > 0 and step > args.max_steps:
        raise ValueError(f"checkpoint {checkpoint} is at step {step}, past max_steps {args.max_steps}: raise "
                         "max_steps to go on from it, or train anew without resuming")
    point = {"checkpoint": str(checkpoint), "global_step": step}
    record, _ = read_provenance(checkpoint)
    saved = (record or {}).get("training", {}).get("options") or {}
    saved = {**UNRECORDED_OPTIONS, **saved} if saved else saved
    given = json.loads(json.dumps(args.to_dict(), default=str))  # as the record holds them (tuples as lists)
    differs = {name: (saved[name], given[name]) for name in (*RESTORED_OPTIONS, *COURSE_OPTIONS)
               if name in saved and name in given and saved[name] != given[name]}
    # Its optimizer's state (Trainer's optimizer.pt; a DeepSpeed or FSDP engine's own files); without it
    # (save_only_model) the optimizer and the schedule start afresh, and every option takes effect.
    restored = any(item.name.startswith(("optimizer", "global_step")) for item in checkpoint.iterdir())
    refused = [f"{name} {new!r} (the checkpoint's: {old!r})" for name, (old, new) in differs.items()
               if name in RESTORED_OPTIONS and restored]
    if refused:
        raise ValueError(f"resuming from {checkpoint} restores its optimizer and learning-rate schedule, so "
                         f"{', '.join(refused)} would not take effect: resume with the checkpoint's values, or "
                         "train anew without resuming")
    if differs:
        point["changed"] = {name: {"checkpoint": old, "given": new} for name, (old, new) in differs.items()}
    if not restored:
        point["fresh_optimizer"] = True
        if args.should_log:
            warnings.warn(f"{checkpoint} holds no optimizer state (saved with save_only_model): resuming from it, "
                          f"the optimizer and the learning-rate schedule start afresh at step {step}", UserWarning,
                          stacklevel=3)
    if differs and args.should_log:  # one process of a launch says it
        warnings.warn(f"resuming from {checkpoint} (step {step}) with "
                      f"{', '.join(f'{name} {new!r} (the checkpoint run: {old!r})' for name, (old, new) in differs.items())}"
                      ": the run goes on with the values given", UserWarning, stacklevel=3)
    earlier = (record or {}).get("data") or {}
    if data and earlier.get("rows_sha256") and data.get("rows_sha256") and earlier["rows_sha256"] != data["rows_sha256"]:
        point["data"] = earlier
    if "data" in point and args.should_log:
        warnings.warn(f"resuming from {checkpoint} (step {step}) on other data than its run read "
                      f"({earlier.get('source') or 'rows in memory'}): steps 1-{step} were trained on that, the "
                      "rest on this", UserWarning, stacklevel=3)
    return point


def logs_on_stderr(trainer: Trainer) -> None:
    """Writes ``trainer``'s logs (the dicts of losses and rates) to stderr, as its progress bar is:
    Trainer prints them on stdout (``PrinterCallback``'s print, or ``ProgressCallback``'s ``tqdm.write``),
    where a command's result goes (``qadapter train --eval-data ... | jq``, the demo's report)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, (PrinterCallback, ProgressCallback)):
            def on_log(*args, _on_log=callback.on_log, **kwargs):
                with contextlib.redirect_stdout(sys.stderr):
                    return _on_log(*args, **kwargs)

            callback.on_log = on_log


class StepTotals(NamedTuple):
    """Pairs and scored tokens of one optimizer step: every micro-batch, every process."""

    pairs: int
    tokens: int


class NonFiniteTrainingError(FloatingPointError):
    """Training produced a non-finite loss or gradient: it stops before the optimizer step takes it,
    so the adapter saved last (and every complete checkpoint) stays as it was."""


def _stop(step: int, what: str, output_dir: str) -> NonFiniteTrainingError:
    return NonFiniteTrainingError(
        f"step {step}: {what}; training stopped before the optimizer step, the last saved adapter and "
        f"checkpoints in {output_dir} are untouched (a lower learning rate, or --max_grad_norm, may help)")


class _FiniteGradients(TrainerCallback):
    """Checks the trainable parameters' gradients before each optimizer step (after clipping)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not bool(torch.stack([g.detach().isfinite().all() for g in grads]).all()):
            raise _stop(state.global_step + 1, "a gradient is not finite", args.output_dir)


class _CheckpointAdapterPushed(TrainerCallback):
    """Completes Trainer's push of a checkpoint (``push_to_hub`` with ``hub_strategy="every_save"``, its
    default): Trainer uploads the output directory after copying into it the checkpoint's model files,
    PEFT's among them, but not the Q-Adapter's own (``qadapter_config.json``, ``provenance.json``),
    so until the final push the repository would not load as a Q-Adapter. Just before such a push
    (``on_push_begin``), the checkpoint's adapter files are copied there as one save. ``checkpoint``:
    the folder the trainer saved last, when that save was a checkpoint (a final save clears it, so the
    final push never brings back an older checkpoint's adapter)."""

    def __init__(self) -> None:
        self.checkpoint: Path | None = None

    def on_push_begin(self, args, state, control, **kwargs):
        checkpoint, self.checkpoint = self.checkpoint, None
        if checkpoint is None or not args.should_save:
            return

        def write(staging: Path) -> None:
            for name in HUB_FILES:
                if (checkpoint / name).is_file():
                    shutil.copy2(checkpoint / name, staging / name)

        atomic.save_files(args.output_dir, write, is_ours=lambda _: True)


def _adapter_parameters(model) -> list[torch.nn.Parameter]:
    """What a checkpoint holds of the model: its trainable (LoRA) parameters."""
    return [p for p in model.parameters() if p.requires_grad]


def _check_model_options(args: QAdapterConfig, model) -> None:
    """The model carries its loss and LoRA settings (``QAdapterModel(base, **args.model_options())``):
    an option the config sets to other than its default, and the model has otherwise, would be
    silently not applied, so it is refused, naming both values."""
    if not hasattr(model, "adapter_config"):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(QAdapterConfig)}
    lora = model.adapter_config()["lora"]
    loss = args.loss_config()
    has = {**{name: (getattr(loss, name), getattr(model.loss, name)) for name in LOSS_ARGUMENTS},
           "backend": (args.backend, model.backend), "chunk_size": (args.chunk_size, model.chunk_size),
           "padding_free": (args.padding_free, model.padding_free), "lora_r": (args.lora_r, lora["r"]),
           "lora_alpha": (args.lora_alpha, lora["lora_alpha"]), "lora_dropout": (args.lora_dropout, lora["lora_dropout"]),
           "lora_target_modules": (sorted(args.lora_target_modules or lora["target_modules"]), lora["target_modules"]),
           "chat_template_kwargs": (args.chat_template_kwargs, model.chat_template_kwargs)}
    differ = [f"{name} {asked!r} (the model's: {own!r})" for name, (asked, own) in has.items()
              if getattr(args, name) != defaults[name] and asked != own]
    if differ:
        raise ValueError(f"the config asks for {', '.join(differ)}, which the model was not built with: the model "
                         "carries its loss and LoRA settings; build it with them, "
                         "QAdapterModel(base, **config.model_options()) (or QAdapterModel.from_base)")


def _check_best_metric_set(args: QAdapterConfig, eval_dataset) -> None:
    """The best-model metric's eval set, where the sets are known: a dict's key by name, none for
    one set (else a KeyError at the first evaluation, after a run's steps)."""
    named, measure = args.best_metric()
    if measure is None or eval_dataset is None:
        return
    sets = list(eval_dataset) if isinstance(eval_dataset, dict) else [None]
    if named not in sets:
        expected = (f"one of the eval sets {', '.join(map(str, sets))} before the measure (eval_<set>_{measure})"
                    if sets != [None] else f"no eval set (one is given): eval_{measure}")
        raise ValueError(f"--metric_for_best_model {args.metric_for_best_model!r} must name {expected}")


def _tokenized(dataset, tokenizer, args: QAdapterConfig, name: str, read: dict, model=None):
    """``dataset`` as the collator takes it: raw preference rows (``chosen`` and ``rejected``, with or
    without ``prompt``, as ``qadapter train`` reads them) tokenized with ``args``' lengths (malformed
    ones skipped and counted with ``args.skip_invalid``) and ``model``'s chat template options, as
    TRL's trainers tokenize theirs; tokenized
    pairs, streams and anything else pass as they are. ``read[name]``: the raw rows read and their
    :class:`~.data.DataSummary`."""
    if isinstance(dataset, dict):
        return {key: _tokenized(part, tokenizer, args, f"{name}[{key!r}]", read, model) for key, part in dataset.items()}
    if dataset is not None and not hasattr(dataset, "__len__"):  # a stream: passed on as it is
        columns = getattr(dataset, "column_names", None)
        if columns is None and hasattr(dataset, "column_names"):  # a datasets stream of unknown columns (from a
            first = next(iter(dataset), None)  # generator, after a map): its first row, as it starts again each pass
            columns = first.keys() if isinstance(first, dict) else ()
        columns = set(columns or ())
        if {"prompt", "chosen", "rejected"} & columns and "chosen_input_ids" not in columns:
            raise ValueError(f"{name} is a stream (an IterableDataset) of raw preference rows ({', '.join(sorted(columns))}), "
                             "which the trainer does not tokenize (it tokenizes a data set whole, before training): "
                             "give the rows as a datasets.Dataset or a list, or stream tokenized pairs "
                             "(qadapter.library.data.tokenize_rows)")
        return dataset
    if dataset is None or len(dataset) == 0:
        return dataset
    first = dataset[0]  # raw rows if it holds any of their keys: a malformed first row is then named, not passed on
    if not isinstance(first, dict) or "chosen_input_ids" in first or not {"prompt", "chosen", "rejected"} & first.keys():
        return dataset
    if tokenizer is None:
        raise ValueError(f"{name} holds raw preference rows (chosen, rejected): pass processing_class= (the "
                         "tokenizer) to tokenize them, or tokenized pairs (qadapter.library.data.load_preference_data)")
    rows = dataset if isinstance(dataset, list) else (  # a list of rows read from a file knows their lines
        dataset.to_list() if hasattr(dataset, "to_list") else list(dataset))
    features, summary = tokenize_rows(rows, tokenizer, max_length=args.max_length,
                                      max_prompt_length=args.max_prompt_length, skip_invalid=args.skip_invalid,
                                      chat_template_kwargs=getattr(model, "chat_template_kwargs", None))
    (logger.warning if summary.truncated else logger.info)("%s: %s (max_length %d)", name, summary, args.max_length)
    read[name] = rows, summary
    if hasattr(dataset, "column_names"):  # a datasets.Dataset stays one (select, shuffle, save_to_disk)
        return pairs_dataset(features)
    return features


def may_skip_trainable(model: torch.nn.Module) -> bool:
    """Whether a step can leave one of the model's trainable parameters without a gradient: DDP's
    ``find_unused_parameters``, which Trainer sets for any model that is not a ``PreTrainedModel``
    (an extra walk of the autograd graph every step, and a warning from every process). A Q-Adapter's
    loss reaches every LoRA weight of its adapter pass, except those of a mixture-of-experts base's
    routed experts, to which a batch may send no token."""
    return any(".experts." in f".{name}." for name, param in model.named_parameters() if param.requires_grad)


class QAdapterTrainer(Trainer):
    """Trainer for a :class:`qadapter.QAdapterModel` on preference pairs: tokenized, or raw rows
    (``chosen``/``rejected`` messages, or ``prompt``/``chosen``/``rejected``) that it tokenizes with the
    config's ``max_length`` and ``max_prompt_length``.

    With ``reward_norm`` "mean" or "sum", each micro-batch's loss is its exact share of the step's
    loss (the step's pair and token counts come from :meth:`get_batch_samples`, Trainer's
    ``num_items_in_batch``), so accumulating k micro-batches gives the gradient of their
    concatenation. "padded" depends on padding: its micro-batch losses are averaged, as Trainer does.

    A non-finite loss or gradient stops training with :class:`NonFiniteTrainingError` naming the step,
    before the optimizer step takes it: the adapter on disk stays the last good one. (Not with several
    processes under DeepSpeed, whose optimizer steps inside the backward, before the gradient check.)
    """

    def __init__(self, model=None, args: QAdapterConfig | None = None, data_collator=None, processing_class=None, **kwargs):
        if args is None:  # Trainer's own default, with the loss and LoRA options' defaults
            args = QAdapterConfig(output_dir="trainer_output")
        elif not isinstance(args, QAdapterConfig):
            raise TypeError(f"args must be a QAdapterConfig (a TrainingArguments with the loss and LoRA options); "
                            f"got {type(args).__name__}")
        for name in ("compute_metrics", "compute_loss_func"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: the Q-Adapter trainer computes its own loss and metrics (the pairwise loss, "
                                 f"{', '.join(METRIC_NAMES.values())}); it would never call this one")
        if launched_processes() > 1 and args.world_size == 1:  # accelerate joins CPU processes only with use_cpu
            raise ValueError(f"this process is one of {launched_processes()} a launcher started ({launch_variable()}), "
                             "but trains alone: each would train on all the data and write the same files; on a CPU, "
                             "use_cpu=True (--use_cpu true) joins them")
        if args.ddp_find_unused_parameters is None and model is not None:
            args = copy.copy(args)  # the caller's args stay as given (they may serve another model)
            args.ddp_find_unused_parameters = may_skip_trainable(model)
        train_dataset = kwargs.get("train_dataset")
        if isinstance(train_dataset, dict):  # a DatasetDict too: Trainer would index it by row number (a KeyError)
            raise TypeError(f"train_dataset must be one split of pairs (a datasets.Dataset, a list, an IterableDataset); "
                            f"got a {type(train_dataset).__name__} of the splits {list(train_dataset)}: pass one of "
                            f"them, e.g. train_dataset=data['train'] (eval_dataset takes a dict: named eval sets)")
        _check_best_metric_set(args, kwargs.get("eval_dataset"))
        _check_model_options(args, model)
        tokenizer = processing_class if processing_class is not None else getattr(model, "tokenizer", None)
        read: dict[str, tuple] = {}
        for name in ("train_dataset", "eval_dataset"):
            kwargs[name] = _tokenized(kwargs.get(name), tokenizer, args, name, read, model)
        record = getattr(model, "provenance", None)
        if record is not None:  # raw rows given here: theirs is the data's identity (hashed only for a record)
            for name, key in (("train_dataset", "data"), ("eval_dataset", "eval_data")):
                if name in read:
                    record[key] = data_identity(None, *read[name])
        if data_collator is None:  # the pairs' own collator, padding with the tokenizer's (or the model's) pad id
            skipped = getattr(getattr(model, "loss", None), "ignore_index", IGNORE_INDEX)
            if skipped != IGNORE_INDEX:  # else every step's loss refuses the collator's labels
                raise ValueError(f"the model's loss skips the labels equal to its ignore_index {skipped}, and the pairs' "
                                 f"collator marks unscored positions with {IGNORE_INDEX}: build the model with the "
                                 "default ignore_index, or give a data_collator that marks them as the model does")
            if tokenizer is None:
                raise ValueError("processing_class (the tokenizer) is needed to pad the pairs, unless the model carries "
                                 "one (QAdapterModel(..., tokenizer=...)) or a data_collator is given")
            pad = tokenizer.pad_token_id
            data_collator = PreferenceCollator(pad_token_id=pad if pad is not None else tokenizer.eos_token_id)
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs)
        self._metrics = {"train": defaultdict(lambda: [0.0, 0]), "eval": defaultdict(lambda: [0.0, 0])}
        self.add_callback(_FiniteGradients())
        self._checkpoint_pushed = _CheckpointAdapterPushed()
        self.add_callback(self._checkpoint_pushed)
        # The model's, which computes the loss (the config's where the model carries none: checked above).
        self.reward_norm = getattr(getattr(model, "loss", None), "reward_norm", args.reward_norm)
        # The label of unscored positions the loss skips: the step's token counts and the metrics' weights
        # count the tokens it scores (a data_collator of the caller's may mark them as the model does).
        self.ignore_index = getattr(getattr(model, "loss", None), "ignore_index", IGNORE_INDEX)
        _warn_if_padding_dependent(self.reward_norm, self.args.gradient_accumulation_steps)
        # Trainer must not divide exact shares again; transformers before loss_is_scaled_for_ga decide by the other.
        self.loss_is_scaled_for_ga = self.model_accepts_loss_kwargs = self.reward_norm != "padded"

    def evaluate(self, eval_dataset=None, *args, **kwargs) -> dict[str, float]:
        """Trainer's ``evaluate``; raw preference rows given here are tokenized as the constructor's are."""
        return super().evaluate(_tokenized(eval_dataset, self.processing_class, self.args, "eval_dataset", {}, self.model),
                                *args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        """Trainer's. With persistent workers Trainer keeps each evaluation's loader by its eval set's
        name, and a data set given to ``evaluate`` under the name "eval", the trainer's own set's: the
        next set given, or the trainer's own after one, was measured on that loader. A set given gets
        a loader of its own, kept by none."""
        if eval_dataset is None or isinstance(eval_dataset, str) or eval_dataset is self.eval_dataset \
                or not self.args.dataloader_persistent_workers:
            return super().get_eval_dataloader(eval_dataset)
        kept = getattr(self, "_eval_dataloaders", {}).pop("eval", None)
        loader = super().get_eval_dataloader(eval_dataset)
        loaders = getattr(self, "_eval_dataloaders", {})
        loaders.pop("eval", None)
        if kept is not None:
            loaders["eval"] = kept
        return loader

    def predict(self, test_dataset, *args, **kwargs):
        """Trainer's ``predict`` (the measures, under ``test_``); raw preference rows tokenized as above."""
        return super().predict(_tokenized(test_dataset, self.processing_class, self.args, "test_dataset", {}, self.model),
                               *args, **kwargs)

    def call_model_init(self, trial=None):
        """Trainer's, after letting go of the model an earlier call made: a ``model_init`` that builds a
        fresh Q-Adapter on one base object it keeps (each run of a hyperparameter search) finds that
        base given back, not lent to a model the trainer no longer uses (:mod:`.lent`)."""
        if getattr(self, "model", None) is not None:
            self.model = self.model_wrapped = self.callback_handler.model = None
            self.accelerator.free_memory()  # the prepared model of an earlier run, and a garbage collection
        return super().call_model_init(trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """Trainer's ``train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir} (train "
                                 "without resuming to start the run)")
        record = getattr(self.accelerator.unwrap_model(self.model), "provenance", None)  # (a model_init's is remade)
        self._resumed = None
        if resume_from_checkpoint:
            self._resumed = resume_point(Path(resume_from_checkpoint), self.args, (record or {}).get("data"))
            logger.info("resuming from %s (step %d)", resume_from_checkpoint, self._resumed["global_step"])
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._record_provenance(output.metrics)
        return output

    def _record_provenance(self, final: dict | None = None) -> None:
        """Puts what this trainer knows into the model's provenance (saved with every adapter and
        checkpoint): every training option, the step reached, where a resumed run resumed (its
        checkpoint, step, and what differed), the last logged training metrics (with ``final``, the
        run's summary: a resumed run's covers the steps it took) and, unless the caller named the
        data, the training set's size and ``datasets`` fingerprint."""
        model = self.accelerator.unwrap_model(self.model)
        record = getattr(model, "provenance", None)
        if record is None:
            return
        logged = [entry for entry in self.state.log_history if "loss" in entry and "eval_loss" not in entry]
        # The adapter the model holds: at the end of a run that loads its best checkpoint, that checkpoint's.
        best = self.state.best_model_checkpoint if final is not None and self.args.load_best_model_at_end else None
        adapter_step = (getattr(self.state, "best_global_step", None) or int(Path(best).name.rpartition("-")[2])
                        if best else self.state.global_step)
        evaluated = [entry for entry in self.state.log_history if "eval_loss" in entry
                     and (best is None or entry.get("step") == adapter_step)]
        resumed = getattr(self, "_resumed", None)
        if final and resumed and resumed["global_step"] == self.state.global_step:
            final = {k: v for k, v in final.items() if not k.startswith("train_")}  # no step taken: nothing to sum up
        metrics = {**(logged[-1] if logged else {}), **(evaluated[-1] if evaluated else {}), **(final or {})}
        record["training"] = {"options": self.args.to_dict(), "processes": self.args.world_size,
                              "global_step": self.state.global_step, "adapter_step": adapter_step,
                              "epoch": self.state.epoch, "completed": final is not None,
                              **({"resumed_from": resumed} if resumed else {})}
        record["metrics"] = metrics
        if "data" not in record and self.train_dataset is not None:
            data = self.train_dataset
            record["data"] = {"kind": "dataset", "source": None,
                              "dataset_fingerprint": getattr(data, "_fingerprint", None),
                              "rows_sha256": rows_hash(data) if isinstance(data, list) else None,
                              "rows": len(data) if hasattr(data, "__len__") else None}

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The step's micro-batches and, where the loss has exact shares, their :class:`StepTotals`.

        None once the run has taken its last step: Trainer checks for the end only after a step, so a
        run resumed from the checkpoint of its last step (killed while saving the final adapter) would
        otherwise train one step past ``max_steps``, unless that step ended an epoch."""
        if self.state.global_step >= self.state.max_steps > 0:
            return [], None
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        if self.reward_norm == "padded" or not batch_samples:
            return batch_samples, None
        counts = torch.tensor([[batch["labels"].shape[0] // 2, int((batch["labels"][:, 1:] != self.ignore_index).sum())]
                               for batch in batch_samples]).sum(dim=0)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts.to(self.args.device)).view(-1, 2).sum(dim=0).cpu()
        return batch_samples, StepTotals(int(counts[0]), max(int(counts[1]), 1))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        totals = {}
        if isinstance(num_items_in_batch, StepTotals):
            totals = dict(total_pairs=num_items_in_batch.pairs, total_tokens=num_items_in_batch.tokens)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    **totals)
        loss = out.loss
        # One process: stop at the loss. Several: every rank must stop together, which the gradient
        # check does after the all-reduce (a non-finite loss anywhere makes every rank's gradient so).
        if model.training and self.accelerator.num_processes == 1 and not bool(torch.isfinite(loss.detach())):
            raise _stop(self.state.global_step + 1, f"the loss is {loss.item()}", self.args.output_dir)
        if totals and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages the processes' gradients of their shares
        self._record_metrics("train" if model.training else "eval", out, inputs)
        return (loss, out) if return_outputs else loss

    def _record_metrics(self, split: str, out, inputs: dict) -> None:
        """Adds the batch's metrics to ``split``'s running sums, each weighted by what it is a mean
        over (the batch's pairs; its scored tokens for the chi2 term; its padded tokens for the token
        share), so that batches of unequal size average as their concatenation."""
        input_ids = inputs["input_ids"]
        pairs, scored = input_ids.shape[0] // 2, int((inputs["labels"][:, 1:] != self.ignore_index).sum())
        weights = [scored if name == "chi2_loss" else pairs for name in METRIC_NAMES] + [input_ids.numel()]
        sums = [getattr(out, name).detach().float().mean() * weight for name, weight in zip(METRIC_NAMES, weights)]
        # The tokens each pass ran over the padded batch's: what padding-free training saved (1 without it).
        sums += [torch.tensor(float(out.pass_tokens), device=input_ids.device)]
        totals = torch.stack([torch.stack(sums).float(), torch.tensor(weights, device=input_ids.device).float()])
        totals = self.accelerator.gather(totals[None]).view(-1, 2, len(weights)).sum(dim=0)
        for key, value, weight in zip([*METRIC_NAMES.values(), TOKEN_SHARE], *totals.tolist()):
            self._metrics[split][key][0] += value
            self._metrics[split][key][1] += weight

    def _averages(self, split: str) -> dict[str, float]:
        averages = {key: value / weight for key, (value, weight) in self._metrics[split].items() if weight}
        self._metrics[split].clear()
        return averages

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        """Trainer's loop, with the evaluated batches' reward and loss metrics under its prefix
        (``eval``, ``eval_<name>`` for a dict of eval sets, ``test`` from ``predict``). Its loss is
        their two terms' sum, the BT term a mean over all pairs and chi2 over all scored tokens, as one
        batch of the whole set has it (Trainer's would weight each batch's token mean by its pairs,
        so that ``load_best_model_at_end`` chose by ``per_device_eval_batch_size``)."""
        self._metrics["eval"].clear()
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        averages = self._averages("eval")
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in averages.items()})
        if METRIC_NAMES["bt_loss"] in averages:
            output.metrics[f"{metric_key_prefix}_loss"] = averages[METRIC_NAMES["bt_loss"]] + averages[METRIC_NAMES["chi2_loss"]]
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the adapter (never a copy of the frozen base: a few MB), its ``qadapter_config.json``
        with the base fingerprint, the tokenizer and the training arguments into ``output_dir``.

        Trainer's checkpoints come through here too, so every checkpoint loads with
        :meth:`QAdapterModel.from_pretrained`. The files are staged and renamed into place
        (``atomic.save_files``): only these files are replaced, and a crash leaves the old set or the
        new one. A checkpoint folder is Trainer's own and is written over (a run killed while
        checkpointing may have left part of one); a directory given by the caller follows
        :meth:`QAdapterModel.save_pretrained`'s rule: a non-empty one that holds no adapter or
        checkpoint of ours is refused.

        This overrides Trainer's public ``save_model`` rather than its private ``_save``: Trainer
        hands to ``save_pretrained`` only a ``PreTrainedModel`` or a ``PeftModel``, and writes any
        other module (this wrapper, whose forward is the loss) as its whole state dict.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        with whole_parameters(_adapter_parameters(model)):  # ZeRO-3: every process gathers, the main one writes
            if self.args.should_save:
                if _internal_call:  # a checkpoint: its record says how far training had come
                    self._record_provenance()

                def write(staging: Path) -> None:
                    model.write_adapter(staging)
                    if self.processing_class is not None:
                        self.processing_class.save_pretrained(staging)
                    torch.save(self.args, staging / TRAINING_ARGS_NAME)

                atomic.save_files(output_dir, write, is_ours=holds_adapter, overwrite=_internal_call)
        self._checkpoint_pushed.checkpoint = Path(output_dir) if _internal_call else None
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    @contextlib.contextmanager
    def gathered_adapter(self):
        """The trained :class:`QAdapterModel`, its adapter whole inside: under ZeRO-3 every process
        gathers it (a collective, so every process enters), and the main one (``args.should_save``)
        saves or pushes it; called outside, its ``save_pretrained`` and ``push_to_hub`` would write
        each process's empty partitions."""
        model = self.accelerator.unwrap_model(self.model)
        with whole_parameters(_adapter_parameters(model)):
            yield model

    # Trainer.train calls these two to load a checkpoint's weights (resume; load_best_model_at_end).
    # Their adapter path is taken only for a peft.PeftModel: for any other module they look for a
    # full state dict (model.safetensors or a sharded index) and fail on an adapter-only checkpoint.
    # No public hook runs in their place, so they stay overridden, and only to load the adapter
    # (under ZeRO-3 into the gathered adapter, every process reading the same files).
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    @staticmethod
    def _load_adapter(model, path: str) -> None:
        with whole_parameters(_adapter_parameters(model), modifier_rank=0):
            model.load_adapter_weights(path)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs or "train_runtime" in logs:  # a training step's log, or the run's summary
            logs.update(self._averages("train"))
        super().log(logs, *args, **kwargs)
