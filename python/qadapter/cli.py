"""The ``qadapter`` command: demo (the main job), train, generate, serve, eval, plan, compare, lm-eval, info, check.

Bad arguments exit with code 2 and a message naming the argument (argparse's convention). The
options of ``demo``, ``compare`` and ``train`` are generated from their dataclasses (``DemoOptions``,
``CompareOptions``, ``QAdapterConfig``, whose loss options are ``qadapter_kernels.LossConfig``'s fields).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import typing
import warnings
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from .library.defaults import DEFAULT_MODEL

ADAPTER_HELP = "a saved Q-Adapter: its directory, or a hub repository owner/name[@revision]"


def _usage_error(command: str, message: str):
    print(f"qadapter {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _named(name: str):
    """argparse names a type by its ``__name__`` when a value does not parse ("invalid positive
    integer value: 'abc'"); the helpers below get readable names instead of their own."""
    def rename(parse):
        parse.__name__ = name
        return parse
    return rename


def _ranged(name: str, convert: Callable[[str], float], holds: Callable[[float], bool], expected: str):
    """An argparse type: ``convert`` the text, refuse a value that does not hold, saying what it must be."""
    @_named(name)
    def parse(text: str):
        value = convert(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text}")
        return value
    return parse


_positive_int = _ranged("positive integer", int, lambda v: v > 0, "a positive integer")
_non_negative_int = _ranged("non-negative integer", int, lambda v: v >= 0, "an integer >= 0")
_port = _ranged("port number", int, lambda v: 1 <= v <= 65535, "a TCP port in 1..65535")
_positive_float = _ranged("positive number", float, lambda v: 0 < v < math.inf, "> 0 and finite")
_non_negative_float = _ranged("non-negative number", float, lambda v: 0 <= v < math.inf, ">= 0 and finite")
_probability = _ranged("probability", float, lambda v: 0 < v <= 1, "in (0, 1]")
_unit_fraction = _ranged("number in [0, 1]", float, lambda v: 0 <= v <= 1, "in [0, 1]")
_seed = _ranged("seed", int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64 - 1]")  # torch.manual_seed's range


@_named("non-empty text")
def _text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (an empty stop string would stop at once)")
    return text


def add_dataclass_options(parser: argparse.ArgumentParser, options_class: type) -> None:
    """One ``--field-name`` option per field of a dataclass, with its type, default and metadata
    (``help``, ``choices``; ``positive``: values > 0; ``non_negative``: values >= 0; ``flag``: another
    option name; ``cli=False``: no option of its own, the command sets it from others, as the
    quantization flags set ``quantization``)."""
    types = typing.get_type_hints(options_class)
    for f in fields(options_class):
        if not f.metadata.get("cli", True):
            continue
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        if f.metadata.get("positive"):
            kind = {int: _positive_int, float: _positive_float}[kind]
        if f.metadata.get("non_negative"):
            kind = {int: _non_negative_int, float: _non_negative_float}[kind]
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if kind is bool:  # a switch, off by default
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=f.metadata.get("choices"),
                            metavar=None if "choices" in f.metadata else flag[2:].replace("-", "_").upper(),
                            help=f.metadata["help"] + (" (default: %(default)s)" if f.default is not None else ""))


def _demo_parser(p) -> None:
    from .experiments.demo import DemoOptions

    p.description = ("The main job: customize the embedded default model (or --model) to answer "
                     "with a TL;DR line, then print before/after preference accuracy, rule "
                     "satisfaction, knowledge retention and KL to the base.")
    add_dataclass_options(p, DemoOptions)
    _add_quantization_options(p, "load the base")


def options_from(args: argparse.Namespace, options_class: type, **given):
    """The dataclass ``options_class`` filled from the options :func:`add_dataclass_options` added,
    and the fields without an option of their own from ``given``."""
    return options_class(**{f.name: getattr(args, f.name) for f in fields(options_class) if f.metadata.get("cli", True)},
                         **given)


def _output_directory(command: str, path: str) -> Path:
    """The directory a command writes into at its end: a file there, or above it, is refused now,
    not after the work."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        _usage_error(command, f"--output {path}: {existing} is a file, not a directory")
    return path


def _run_demo(args) -> int:
    from .experiments.demo import DemoOptions, format_report, run_demo
    from .library import atomic
    from .library.saved import holds_adapter

    output = _output_directory("demo", args.output)
    atomic.check_target(output / "adapter", is_ours=holds_adapter, overwrite=False)  # where the adapter goes
    print(format_report(run_demo(options_from(args, DemoOptions, quantization=_quantization(args)))))
    return 0


def _compare_parser(p) -> None:
    from .experiments.compare import CompareOptions

    p.description = ("Train SFT, DPO and a Q-Adapter with the same data, steps, learning rate and "
                     "LoRA rank on the embedded default, then measure each against the base: "
                     "held-out preference accuracy under its own reward, rule satisfaction, a "
                     "knowledge probe, KL to the base on general prompts, general-text perplexity, "
                     "training time and memory. Writes compare.json, compare.md and compare.png.")
    add_dataclass_options(p, CompareOptions)
    _add_quantization_options(p, "load the base of every method")


def _run_compare(args) -> int:
    from .experiments.compare import CompareOptions, format_table, run_compare

    _output_directory("compare", args.output)
    print(format_table(run_compare(options_from(args, CompareOptions, quantization=_quantization(args)))))
    return 0


def _add_quantization_options(p, loads: str, compute_default: str = "bfloat16 on CUDA, float32 on a CPU") -> None:
    """``--load-in-4bit`` / ``--load-in-8bit`` (bitsandbytes, the lm_head dense) and the 4-bit compute
    dtype: every command that loads a base takes the same three options (:func:`_quantization` reads them)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--load-in-4bit", action="store_true",
                       help=f"{loads} quantized by bitsandbytes to 4-bit NF4 with double quantization (QLoRA-style)")
    group.add_argument("--load-in-8bit", action="store_true",
                       help=f"{loads} quantized by bitsandbytes with LLM.int8")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"),
                   help=f"the 4-bit layers' compute dtype (default: {compute_default})")


def _add_base_model_option(p, text: str = "override the base model named in the adapter's config") -> None:
    """The base of a command that loads saved adapters: ``--base-model``, or ``--model`` as train names it."""
    p.add_argument("--base-model", "--model", dest="base_model", help=text)


def _quantization(args, default=None):
    """The quantization the quantization options name (a dict), or ``default`` when none is given;
    for a saved adapter (``default="saved"``), ``--compute-dtype`` alone is its 4-bit base's with
    that compute dtype."""
    if args.load_in_4bit:
        return {"method": "nf4", "compute_dtype": args.compute_dtype}
    if args.compute_dtype and default == "saved" and not args.load_in_8bit:
        return _saved_with_compute_dtype(args)
    if args.compute_dtype:
        _usage_error(args.command, "--compute-dtype applies with --load-in-4bit"
                                   + (" (LLM.int8 takes no compute dtype)" if args.load_in_8bit else ""))
    return "8bit" if args.load_in_8bit else default


def _saved_with_compute_dtype(args) -> dict:
    from .library import quantization as quant
    from .library.saved import locate_adapter, read_adapter_config

    saved = read_adapter_config(locate_adapter(args.adapter))["quantization"]
    if saved is None or saved["method"] == "int8":
        _usage_error(args.command, f"--compute-dtype applies to a 4-bit base; {args.adapter} was trained on a "
                                   f"{quant.describe(saved)} base")
    return {**saved, "compute_dtype": args.compute_dtype}


def _train_parser(p) -> None:
    p.description = ("Train a Q-Adapter. Data: .json/.jsonl/.ndjson/.parquet files or a hub data set with "
                     "{'chosen': [messages], 'rejected': [messages]} or {'prompt', 'chosen', "
                     "'rejected'} rows. Every QAdapterConfig / TrainingArguments field is accepted "
                     "as --name value: the loss options of qadapter_kernels.LossConfig, --backend, "
                     "LoRA and length settings, and e.g. --num_train_epochs 2 "
                     "--activation_checkpointing true; --push_to_hub true (--hub_model_id owner/name) "
                     "uploads the saved adapter once training ends. With --on, the new adapter is trained on top "
                     "of a saved one (a stack: the saved customized policy takes the frozen "
                     "model's place).")
    p.add_argument("--model", help=f"base model: a local directory, a hub name, or (default) {DEFAULT_MODEL}; "
                                   "with --on, the base the saved adapter names")
    p.add_argument("--on", metavar="ADAPTER",
                   help="train on top of this saved Q-Adapter (a directory, or a hub repository owner/name[@revision]: "
                        "continual customization); its own levels come along")
    p.add_argument("--q-on", choices=("parent", "base"), default="parent",
                   help="with --on: the new Q network is the parent's plus the new LoRA (parent), or the base "
                        "plus the new LoRA alone (base) (default: %(default)s)")
    p.add_argument("--data", required=True, help="training preference data")
    p.add_argument("--eval-data", help="held-out preference data (evaluated at the end)")
    p.add_argument("--output", required=True, help="directory for the adapter (and trainer checkpoints)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output that holds no adapter of ours (only the adapter's "
                        "own files are ever replaced; other files stay), or start anew over an earlier run's "
                        "checkpoints there (they are removed)")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted) instead of failing")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the latest checkpoint in --output (or from the given checkpoint)")
    p.add_argument("--curve-steps", type=_positive_int, default=None, metavar="N",
                   help="with --eval-data: measure the held-out pairs at step 0, every N steps and at the end "
                        "(accuracy with its 95%% interval, margin, KL to the base) into "
                        "<output>/curve.json and curve.png")
    _add_quantization_options(p, "load the frozen base")


def _training_config(args, extra: list[str]):
    from transformers import HfArgumentParser

    from .library.trainer import QAdapterConfig

    names = {f.name for f in fields(QAdapterConfig)}
    given = [a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in extra if a.startswith("--")]
    unknown = sorted(set(given) - names)
    if unknown:
        _usage_error("train", f"unrecognized arguments: {', '.join('--' + u for u in unknown)}")
    if "output_dir" in given:  # the adapter in one place, its checkpoints in another: --resume would not find them
        _usage_error("train", "--output_dir is --output's: the adapter goes there and the trainer's checkpoints "
                              "into <output>/checkpoints")
    if "skip_invalid" in given:
        _usage_error("train", "--skip_invalid is --skip-invalid's (the command reads the data itself)")
    parser = HfArgumentParser(QAdapterConfig)
    parser.error = lambda message: _usage_error("train", message)  # one line, not the usage of every field
    (config,) = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(Path(args.output) / "checkpoints"), "--report_to", "none",
              "--skip_invalid", str(args.skip_invalid), *extra]
    )
    return config


def _run_train(args) -> int:
    from .evaluation.measures import preference_metrics
    from .library import atomic
    from .library.data import check_rows, load_preference_data
    from .library.model import QAdapterModel, levels_on, stack_level_at
    from .library.provenance import data_identity
    from .library.saved import checkpoint_folders, holds_adapter
    from .library.trainer import QAdapterTrainer, latest_checkpoint, seed_everything

    config = _training_config(args, args.training_options)
    # The saved adapter is pushed once, at the end; Trainer would push its checkpoints' folder instead.
    push_to = (config.hub_model_id or Path(args.output).resolve().name) if config.push_to_hub else None
    config.push_to_hub = False
    if args.curve_steps and not args.eval_data:
        _usage_error("train", "--curve-steps needs --eval-data (the held-out pairs it measures)")
    output = Path(args.output)
    try:  # before anything loads or writes: a wrong --output costs nothing
        atomic.check_target(output, is_ours=holds_adapter, overwrite=args.overwrite)
    except atomic.OutputDirectoryError as exc:
        _usage_error("train", str(exc))
    earlier = checkpoint_folders(output / "checkpoints") if args.resume is None else []
    if earlier and not args.overwrite:  # a new run's checkpoints among them, --resume would mix the two runs
        _usage_error("train", f"--output {output} holds checkpoints of an earlier run ({earlier[-1].name}): --resume "
                              "goes on with it; --overwrite starts anew (its checkpoints are removed)")
    resume = None
    if args.resume is not None:  # the checkpoint found before anything loads: none is one line, at once
        resume = latest_checkpoint(output / "checkpoints") if args.resume is True else args.resume
        if resume is None or not Path(resume, "trainer_state.json").is_file():
            where = f"in {output / 'checkpoints'}" if args.resume is True else f"at {args.resume}"
            _usage_error("train", f"--resume: no complete checkpoint {where} (train without --resume to start the run)")
    if args.on is not None:  # saving over an adapter of the stack is refused, but only after training
        levels = levels_on(args.on)
        places = [place for level in levels for place in (level.nearby, level.path) if place]
        if stack_level_at(output, places) is not None:  # a level where the stack moved to, or where recorded
            _usage_error("train", f"--output {output} holds an adapter the new one is trained on (--on {args.on}): "
                                  "saving there would replace it; choose another --output")
        local = [k for k, level in enumerate(levels, 1) if level.hub is None]
        if push_to and local:
            _usage_error("train", f"--push_to_hub: stack level(s) {local} under the new adapter are local folders; "
                                  "push them first and train --on the hub repository")
    # Read and checked before the model loads: bad data fails at once.
    train_rows = check_rows(args.data, skip_invalid=args.skip_invalid)
    eval_rows = check_rows(args.eval_data, split="test", skip_invalid=args.skip_invalid) if args.eval_data else None
    if args.q_on != "parent" and args.on is None:
        _usage_error("train", "--q-on applies with --on")
    stacking = {} if args.on is None else {"on": levels, "q_on": args.q_on}  # found once: hashed, located
    seed_everything(config)  # --seed governs the adapter's initialization too, as Trainer's model_init would
    model = QAdapterModel.from_base(args.model, quantization=_quantization(args), **config.model_options(), **stacking)
    tokenizer = model.tokenizer
    lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                   skip_invalid=args.skip_invalid)
    train, summary = load_preference_data(train_rows, tokenizer, **lengths)
    print(f"training data: {summary}")
    model.provenance["data"] = data_identity(args.data, train_rows, summary)  # saved with the adapter
    evaluation = None
    if args.eval_data:
        evaluation, eval_summary = load_preference_data(eval_rows, tokenizer, split="test", **lengths)
        print(f"evaluation data: {eval_summary}")
        model.provenance["eval_data"] = data_identity(args.eval_data, eval_rows, eval_summary)
        if model.provenance["eval_data"]["rows_sha256"] == model.provenance["data"]["rows_sha256"]:
            print("qadapter train: warning: --eval-data holds the same rows as --data: its held-out measures "
                  "would overstate what the adapter learned", file=sys.stderr)
    callbacks = []
    if args.curve_steps:
        from .evaluation.curve import LearningCurve

        callbacks.append(LearningCurve(evaluation.to_list(), tokenizer.pad_token_id, output, every=args.curve_steps,
                                       progress=True, meta={"data": str(args.data), "eval_data": str(args.eval_data)}))
    # --overwrite: the earlier run's checkpoints go before this run writes its own. Every process of a
    # launch removes them (whichever comes first), all before the first step, which they take together.
    for checkpoint in earlier:
        try:
            shutil.rmtree(checkpoint)
        except FileNotFoundError:  # another process's removal
            pass
    trainer = QAdapterTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                              processing_class=tokenizer, callbacks=callbacks)
    if resume is not None:
        trainer.add_callback(_resume_announced(resume))
    trainer.train(resume_from_checkpoint=resume)
    model.save_pretrained(output, overwrite=args.overwrite)
    print(f"adapter saved to {args.output}")
    if push_to:
        commit = model.push_to_hub(push_to, private=config.hub_private_repo, token=config.hub_token,
                                   revision=config.hub_revision)
        print(f"adapter pushed to the hub: {commit.commit_url}")
    if evaluation is not None:
        metrics = preference_metrics(model, evaluation.to_list(), tokenizer.pad_token_id)
        print(json.dumps(metrics, indent=2))
    return 0


def _resume_announced(checkpoint: str):
    """A callback that says where training resumes, once the trainer has taken the checkpoint."""
    from transformers import TrainerCallback

    class ResumeAnnounced(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if args.should_log:
                print(f"resuming from {checkpoint} (step {state.global_step})", file=sys.stderr)

    return ResumeAnnounced()


def _plan_parser(p) -> None:
    p.description = ("Predicts the peak GPU memory of a Q-Adapter training step from the model's "
                     "config alone: base weights by dtype or quantization, LoRA weights with their "
                     "gradients and AdamW state, activations (with or without gradient checkpointing), "
                     "the fused loss's buffers and the CUDA context. With --gpu-memory it says "
                     "whether the step fits, and if not, what would make it fit.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: a local directory, a hub name, or %(default)s")
    p.add_argument("--gpu-memory", help="the GPU's memory, e.g. 12GiB, 24GB, 8000MiB (a bare number: GiB)")
    _add_quantization_options(p, "plan for the base", compute_default="--dtype")
    p.add_argument("--max-length", type=_positive_int, default=512, help="tokens per row (default: %(default)s)")
    p.add_argument("--pairs-per-step", type=_positive_int, default=8,
                   help="preference pairs per step, 2 rows each (default: %(default)s, train's "
                        "--per_device_train_batch_size)")
    p.add_argument("--padded", action="store_true",
                   help="plan for rows padded to --max-length (train: --padding_free false); by default packed, "
                        "as train runs them")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="the model's dtype (default: %(default)s)")
    p.add_argument("--lora-r", type=_positive_int, default=8)
    p.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                   help="the layers LoRA wraps (default: the attention's query and value projections, as train)")


def _run_plan(args) -> int:
    from transformers import AutoConfig

    from .library.defaults import names_missing_folder, resolve_model
    from .library.memory_plan import PlanOptions, format_plan, parse_size, plan, suggestions

    gpu = None if args.gpu_memory is None else parse_size(args.gpu_memory)
    if gpu is not None and gpu <= 0:
        _usage_error("plan", f"--gpu-memory must be above 0; got {args.gpu_memory!r}")
    if names_missing_folder(args.model):
        raise FileNotFoundError(f"no model folder at {args.model}")
    options = PlanOptions.of(_quantization(args), max_length=args.max_length, pairs_per_step=args.pairs_per_step,
                             padding_free=not args.padded,
                             gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, lora_r=args.lora_r,
                             target_modules=args.lora_target_modules and tuple(args.lora_target_modules))
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    config = getattr(config, "get_text_config", lambda: config)()
    predicted = plan(config, options)
    known = predicted.shape.adaptable_layers()
    unknown = [name for name in predicted.options.target_modules if name not in known]
    if unknown:  # a name no layer has would plan no LoRA weights for it; training refuses it
        _usage_error("plan", f"--lora-target-modules: {', '.join(unknown)} is not a linear layer of this "
                             f"architecture's decoder layers; choose from {', '.join(known)}")
    advice = suggestions(config, options, gpu) if gpu is not None and not predicted.fits(gpu) else None
    print(format_plan(predicted, gpu, advice))
    return 0 if gpu is None or predicted.fits(gpu) else 1


def _generate_parser(p) -> None:
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("--prompt", required=True, help="the user message")
    _add_base_model_option(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_positive_float, help="with --sample (default: 1.0)")
    p.add_argument("--top-k", type=_non_negative_int, help="with --sample: keep the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=_probability, help="with --sample (default: 1.0)")
    p.add_argument("--min-p", type=_unit_fraction,
                   help="with --sample: drop tokens below min_p times the top one's probability (0: none)")
    p.add_argument("--repetition-penalty", type=_positive_float, default=None)
    p.add_argument("--num-beams", type=_positive_int, default=1,
                   help="beam search over the customized policy with this many beams (the answer is printed "
                        "when the search ends: beams do not stream)")
    p.add_argument("--stop", action="append", type=_text, default=None, metavar="TEXT",
                   help="stop when the answer contains TEXT (repeatable)")
    p.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                   help="static cache and compiled decode step (auto: on CUDA)")
    p.add_argument("--seed", type=_seed, help="with --sample: the seed of the draws (default: 0)")
    _add_quantization_options(p, "load the base (default: as the adapter was trained)")


# What --sample draws with where its options are not given (no filter).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None}


def _run_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .evaluation.measures import chat_prompts
    from .library.model import QAdapterModel

    given = {name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name) is not None}
    if not args.sample and (given or args.seed is not None):
        named = [f"--{name.replace('_', '-')}" for name in given] + ["--seed"] * (args.seed is not None)
        _usage_error("generate", f"{', '.join(named)} {'applies' if len(named) == 1 else 'apply'} only with "
                                 "--sample (greedy decoding takes no sampling options)")
    model = QAdapterModel.from_pretrained(args.adapter, args.base_model, quantization=_quantization(args, "saved"))
    tokenizer = model.tokenizer
    enc = tokenizer(chat_prompts(tokenizer, [args.prompt]), return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(args.seed or 0)
    sampling = {**SAMPLING_DEFAULTS, **given} if args.sample else {}
    streams = args.num_beams == 1
    out = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         **sampling, repetition_penalty=args.repetition_penalty, stop_strings=args.stop,
                         num_beams=args.num_beams, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if streams else None,
                         compiled={"auto": None, "yes": True, "no": False}[args.compile])
    if not streams:
        print(tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    return 0


def _serve_parser(p) -> None:
    p.description = ("Serves /v1/completions, /v1/chat/completions (streaming by server-sent events), "
                     "/v1/models, /health and /metrics (Prometheus). A request's model names a loaded "
                     "adapter, or 'base' for the frozen base alone; requests to different adapters "
                     "decode in one running batch.")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=ADAPTER",
                   help="serve the saved Q-Adapter ADAPTER (a directory, or a hub repository owner/name[@revision]; "
                        "a stacked one too) as model NAME (repeatable)")
    _add_base_model_option(p, "the base (default: the one the adapters name; without adapters, the embedded default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-batch", type=_positive_int, default=32, help="requests decoded together at most")
    p.add_argument("--max-prefill-tokens", type=_positive_int, metavar="N",
                   help="prompt tokens (times the rows each request runs: 2 for an adapter, 1 + levels for a "
                        "stack) read in one prefill at most, bounding its memory; a longer prompt is read alone "
                        "(default: no bound)")
    p.add_argument("--prefix-cache", metavar="SIZE",
                   help="keep finished requests' KV cache, at most SIZE (e.g. 2GiB, 500MiB), and read a prompt "
                        "that starts the same way under the same model from where it differs (a shared system "
                        "prompt, a chat's next turn); not for sliding-window models (default: off)")
    p.add_argument("--allow-adapter-updates", action="store_true",
                   help="take POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): any client that "
                        "reaches the server can then load adapters from this machine's folders or the hub")
    p.add_argument("--adapter-dir", metavar="DIR",
                   help="a request whose model is a folder of DIR (a saved adapter) loads it on first use")
    p.add_argument("--max-adapters", type=_positive_int, metavar="N",
                   help="with --adapter-dir: at most N adapters from it loaded at once; the least recently used "
                        "idle one is unloaded to make room (default: no bound)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="the HTTP server's log (info: one line per request)")


def _check_listen(host: str, port: int) -> None:
    """Binds ``host:port`` as uvicorn will (asyncio's create_server: every address the host resolves to,
    SO_REUSEADDR) and lets go, so that a port in use is a usage error before the model loads, not a
    bind error after it."""
    import socket

    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        _usage_error("serve", f"--host {host}: {exc.strerror}")
    for family, kind, protocol, _, address in addresses:
        try:
            sock = socket.socket(family, kind, protocol)
        except OSError:  # a family this machine lacks: asyncio passes over it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                _usage_error("serve", f"--host {host} --port {port}: cannot listen there: {exc.strerror}")


def _run_serve(args) -> int:
    from .library.adapter_set import AdapterSet
    from .library.defaults import DEFAULT_MODEL, load_base
    from .library.memory_plan import parse_size
    from .serving.engine import Engine
    from .serving.server import BASE_MODEL, serve

    if args.max_adapters is not None and args.adapter_dir is None:
        _usage_error("serve", "--max-adapters bounds the adapters loaded from --adapter-dir: give --adapter-dir")
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        _usage_error("serve", f"--adapter-dir {args.adapter_dir}: no such directory")
    try:
        prefix_cache = parse_size(args.prefix_cache) if args.prefix_cache else 0
    except ValueError as exc:
        _usage_error("serve", f"--prefix-cache: {exc}")
    _check_listen(args.host, args.port)
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=ADAPTER; got {item!r}")
        if name in adapters or name == BASE_MODEL:
            raise ValueError(f"--adapter: the name {name!r} is {'given twice' if name in adapters else 'reserved for the base'}")
        adapters[name] = path
    if adapters:
        adapter_set = AdapterSet.from_pretrained(adapters, args.base_model)
    else:
        base, tokenizer = load_base(args.base_model or DEFAULT_MODEL)
        adapter_set = AdapterSet(base, tokenizer=tokenizer)
    serve(Engine(adapter_set, adapter_set.tokenizer, max_batch=args.max_batch,
                 max_prefill_tokens=args.max_prefill_tokens, prefix_cache_bytes=prefix_cache),
          args.host, args.port,
          log_level=args.log_level, allow_adapter_updates=args.allow_adapter_updates, adapter_dir=args.adapter_dir,
          max_adapters=args.max_adapters)
    return 0


def _eval_parser(p) -> None:
    p.description = ("Prints a JSON object (and nothing else) on stdout: the adapter's preference "
                     "accuracy, margin and loss, its mean per-token KL to the base, and under "
                     '"step0" the same preference measures of an untrained adapter (LoRA B = 0) '
                     "on the same base: the baseline. The data summary goes to stderr, and a "
                     "progress bar (pairs done, pairs/s) when it is a terminal.")
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("--data", required=True, help="preference data to evaluate on")
    _add_base_model_option(p)
    p.add_argument("--max-length", type=_positive_int, default=512)
    p.add_argument("--max-prompt-length", type=_positive_int, help="default: half of --max-length")
    p.add_argument("--skip-invalid", action="store_true")
    _add_quantization_options(p, "load the base (default: as the adapter was trained)")


def _warn_if_training_data(command: str, adapter, data, rows: list) -> bool:
    """Whether ``data`` (read as ``rows``) is the adapter's training data, by its provenance; a warning
    says so."""
    from .library.provenance import trained_on
    from .library.saved import locate_adapter

    if not trained_on(locate_adapter(adapter), data, rows):
        return False
    print(f"qadapter {command}: warning: {data} is the data this adapter was trained on (its provenance says "
          "so): held-out measures on it overstate what it learned", file=sys.stderr)
    return True


def _run_eval(args) -> int:
    from .evaluation.measures import STEP0_BASELINE, evaluate_pairs
    from .library.data import load_preference_data, read_rows
    from .library.model import QAdapterModel

    _check_lengths("eval", args)
    model = QAdapterModel.from_pretrained(args.adapter, args.base_model, quantization=_quantization(args, "saved"))
    tokenizer = model.tokenizer
    rows = read_rows(args.data, split="test")
    data, summary = load_preference_data(rows, tokenizer, max_length=args.max_length,
                                         max_prompt_length=args.max_prompt_length, skip_invalid=args.skip_invalid)
    print(f"data: {summary}", file=sys.stderr, flush=True)  # stdout is the JSON alone (| jq)
    _warn_if_training_data("eval", args.adapter, args.data, rows)
    features = data.to_list()
    metrics = evaluate_pairs(model, features, tokenizer.pad_token_id, kl=True, step0=True, progress=True)
    metrics["pairs"] = len(features)
    print(f"step0: {STEP0_BASELINE}", file=sys.stderr)
    print(json.dumps(metrics, indent=2))
    return 0


def _info_parser(p) -> None:
    p.description = ("Prints a saved adapter's provenance: the training data (source, content "
                     "hash, rows kept and skipped), the training options, the base model (name, "
                     "fingerprint), the library versions, the final training metrics and the "
                     "creation time. A missing or unreadable provenance record is reported; the "
                     "adapter itself still loads.")
    p.add_argument("adapter", help=ADAPTER_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _run_info(args) -> int:
    from .library.provenance import read_provenance
    from .library.saved import AdapterLoadError, hub_pin, locate_adapter, read_adapter_config, stack_levels_found

    path = locate_adapter(args.adapter)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding a saved adapter")
    pin = hub_pin(args.adapter, path)  # owner/name@commit: which commit of a hub repository this is
    try:
        config, config_problem = read_adapter_config(path), None
    except AdapterLoadError as exc:
        config, config_problem = None, str(exc)
    record, problem = read_provenance(path)
    if config is None and record is None:
        raise ValueError(f"{path} holds no readable Q-Adapter: {config_problem}")
    levels = stack_levels_found(path, config) if config is not None else []
    if args.json:
        print(json.dumps({"adapter": str(path), "hub": pin, "config": config, "config_problem": config_problem,
                          "stack_levels": levels, "provenance": record, "provenance_problem": problem}, indent=2))
        return 0
    print(f"adapter: {path}" if pin is None else f"adapter: {pin} (the hub's; cached at {path})")
    if config_problem:
        print(f"config: PROBLEM: {config_problem}")
    if problem:
        if config is not None:
            print(f"base: {config['base_model'] or '(unnamed)'} (fingerprint {config['base_fingerprint']})")
        print(f"provenance: PROBLEM: {problem}")
    else:
        print(_format_provenance(record))
    for level in levels:  # where loading would find each level now, or why it would refuse it
        print(f"stack level {level['level']}: " + (f"PROBLEM: {level['problem']}" if level["problem"]
                                                    else level["found_at"]))
    return 0


def _format_parent(parent: dict | None) -> str:
    if not parent:
        return "None"
    return (f"{parent.get('path')} (stack depth {parent.get('depth')}, sha256 {str(parent.get('sha256'))[:16]}..., "
            f"alpha_0 {parent.get('alpha_0')}, alpha~ {parent.get('alpha_tilde')}, q_on {parent.get('q_on')})")


def _format_provenance(record: dict) -> str:
    base = record.get("base") or {}
    lines = [f"created: {record.get('created')}",
             f"base: {base.get('name')} (fingerprint {base.get('fingerprint')}, quantization {base.get('quantization')})",
             f"parent adapter: {_format_parent(record.get('parent_adapter'))}"]
    for key in ("data", "eval_data"):
        data = record.get(key)
        if not data:
            continue
        skipped = data.get("skipped_reasons") or {}
        reasons = f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
        lines.append(f"{key.replace('_', ' ')}: {data.get('source') or data.get('kind')}"
                     f"; rows {data.get('rows')}, kept {data.get('kept')}, skipped {data.get('skipped')}{reasons}")
        for digest in ("file_sha256", "rows_sha256", "dataset_fingerprint"):
            if data.get(digest):
                lines.append(f"  {digest}: {data[digest]}")
    adapter = record.get("adapter") or {}
    if adapter:
        lines.append(f"adapter: lora {adapter.get('lora')}; loss {adapter.get('loss')}")
    training = record.get("training")
    if training:
        options = training.get("options") or {}
        shown = {k: options[k] for k in ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                                        "gradient_accumulation_steps", "seed") if k in options}
        lines.append(f"training: step {training.get('global_step')}, completed {training.get('completed')}; "
                     f"{', '.join(f'{k}={v}' for k, v in shown.items())} ({len(options)} options in --json)")
    else:
        lines.append("training: none recorded (an adapter saved outside training)")
    metrics = record.get("metrics")
    if metrics:
        lines.append("final metrics: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    versions = record.get("versions") or {}
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    return "\n".join(lines)


def _check_parser(p) -> None:
    from .evaluation.check import Thresholds

    p.description = ("Measures a saved adapter against its base on preference pairs (accuracy and "
                     "its gain over the step-0 baseline, KL to the base), the knowledge probe "
                     "(log-likelihood accuracy, customized policy vs the base) and general-text "
                     "perplexity (vs the base); compares each with its threshold (flags, or a JSON "
                     "file of them) and with an earlier report (--baseline). Writes check.json and "
                     "check.md, and exits 1 naming each failed threshold.")
    p.add_argument("adapter", help=ADAPTER_HELP)
    p.add_argument("--data", required=True, help="held-out preference pairs")
    _add_base_model_option(p)
    p.add_argument("--output", help="directory for check.json and check.md (default: the adapter's directory)")
    p.add_argument("--baseline", help="an earlier check.json: the report shows the change since")
    p.add_argument("--thresholds", metavar="JSON", help="a JSON object of thresholds (the flags below win)")
    defaults = Thresholds()
    for f in fields(Thresholds):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=float, default=None, metavar="X",
                       help=f"{'lower' if f.name.startswith('min_') else 'upper'} limit "
                            f"(default: {getattr(defaults, f.name)}; null in the thresholds file turns it off)")
    p.add_argument("--max-pairs", type=_positive_int, help="measure at most this many pairs (default: all)")
    p.add_argument("--probe-items", type=_non_negative_int, default=64,
                   help="knowledge probe questions, spread over the probe (default: %(default)s; 0: skip)")
    p.add_argument("--passages", type=_non_negative_int, default=4,
                   help="general-text passages for perplexity (default: %(default)s; 0: skip)")
    p.add_argument("--max-length", type=_positive_int, default=512)
    p.add_argument("--max-prompt-length", type=_positive_int, help="default: half of --max-length")
    p.add_argument("--skip-invalid", action="store_true")


def _check_lengths(command: str, args) -> None:
    """--max-length and --max-prompt-length, checked before a model loads."""
    from .library.data import check_lengths

    try:
        check_lengths(args.max_length, args.max_prompt_length)
    except ValueError as exc:
        _usage_error(command, str(exc).replace("max_prompt_length", "--max-prompt-length")
                     .replace("max_length", "--max-length"))


def _read_option_file(command: str, option: str, read, path: str | None):
    """``read(path)`` (None without a path); a file that cannot be opened is named by its option."""
    if path is None:
        return None
    try:
        return read(path)
    except OSError as exc:
        _usage_error(command, f"{option} {path}: {exc.strerror}")


def _run_check(args) -> int:
    from dataclasses import replace

    from .evaluation.check import Thresholds, format_markdown, read_report, run_check
    from .library import atomic
    from .library.data import load_preference_data, read_rows
    from .library.model import QAdapterModel
    from .library.provenance import read_provenance
    from .library.saved import hub_pin, locate_adapter

    thresholds = _read_option_file("check", "--thresholds", Thresholds.from_file, args.thresholds) or Thresholds()
    given = {f.name: getattr(args, f.name) for f in fields(Thresholds) if getattr(args, f.name) is not None}
    thresholds = replace(thresholds, **given)
    baseline = _read_option_file("check", "--baseline", read_report, args.baseline)  # fails before any work
    _check_lengths("check", args)
    output = _output_directory("check", args.output) if args.output else None
    adapter = locate_adapter(args.adapter)
    pin = hub_pin(args.adapter, adapter)  # owner/name@commit: the report names the commit it judged
    if output is None and pin is not None:
        _usage_error("check", f"--output: {args.adapter} is a hub repository, whose downloaded copy is the hub "
                              "cache's; name a directory for check.json and check.md")
    output = output or adapter
    model = QAdapterModel.from_pretrained(adapter, args.base_model)
    rows = read_rows(args.data, split="test")
    data, summary = load_preference_data(rows, model.tokenizer, max_length=args.max_length,
                                         max_prompt_length=args.max_prompt_length, skip_invalid=args.skip_invalid)
    print(f"data: {summary}", file=sys.stderr, flush=True)
    training_data = _warn_if_training_data("check", adapter, args.data, rows)
    features = data.to_list()[: args.max_pairs]
    if not features:
        raise ValueError(f"--data {args.data} holds no usable pair ({summary})")
    record, problem = read_provenance(adapter)  # which adapter this report is about
    origin = {"created": record.get("created"), "base": record.get("base"), "data": record.get("data")} if record \
        else {"problem": problem}
    report = run_check(model, features, thresholds, probe_items=args.probe_items,
                       passages=args.passages, baseline=baseline,
                       meta={"adapter": pin or str(args.adapter), "data": str(args.data), "data_read": str(summary),
                             "data_is_training_data": training_data,
                             "baseline": str(args.baseline) if args.baseline else None, "provenance": origin})
    markdown = format_markdown(report)
    atomic.write_texts(output, {"check.json": json.dumps(report, indent=2) + "\n", "check.md": markdown})
    print(markdown)
    print(f"written: {output / 'check.json'}, {output / 'check.md'}")
    if not report["passed"]:
        for c in report["checks"]:
            if not c["passed"]:
                print(f"qadapter check: FAILED {c['measure']} = {c['value']:.4g} (needs {c['rule']} {c['limit']}, "
                      f"--{c['threshold'].replace('_', '-')})", file=sys.stderr)
        return 1
    return 0


LM_EVAL_LISTS = ("tasks", "groups", "subtasks", "tags")


@_named("seeds")
def _seeds(text: str) -> list[int | None]:
    """lm-eval's ``--seed``: one integer for all four generators (python, numpy, torch, few-shot),
    or four comma-separated integers or ``None``s."""
    values = [None if v.strip().lower() == "none" else int(v) for v in text.split(",")]
    if len(values) == 1:
        return values * 4
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"one integer or four (python,numpy,torch,fewshot); got {text}")
    return values


@_named("true or false")
def _switch(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false; got {text}")


def _lm_eval_parser(p) -> None:
    p.description = ("Runs lm-evaluation-harness (lm_eval.simple_evaluate) with lm-eval's run options. The "
                     "model is 'qadapter' (--model_args adapter=DIR,base=...,batch_size=8,dtype=bfloat16) unless "
                     "--model names another; the shipped tasks qadapter_knowledge, qadapter_general_text and "
                     "qadapter_tldr (run it with --apply_chat_template) are always included. 'ls [tasks|groups|subtasks|tags]' lists the "
                     "tasks, 'validate --tasks ...' checks that they exist. The results table is printed, and "
                     "with --output_path the results JSON is written as lm-eval writes it.")
    # Checked after parsing (no argparse choices), so that the value of an unknown option is not
    # reported as an invalid action: the unknown option itself is named.
    p.add_argument("action", nargs="?", default="run", metavar="{run,ls,validate}",
                   help="run (the default), ls, or validate")
    p.add_argument("what", nargs="?", metavar="{" + ",".join(LM_EVAL_LISTS) + "}",
                   help="for ls: what to list (default: tasks)")
    p.add_argument("--model", "-M", default="qadapter", help="lm-eval model name (default: %(default)s)")
    p.add_argument("--model_args", "-a", nargs="+", action="extend", metavar="ARGS",
                   help="model arguments: key=value,key=value (or a JSON object); repeatable")
    p.add_argument("--tasks", "-t", nargs="+", action="extend", metavar="TASK",
                   help="task or group names or patterns, comma- or space-separated")
    p.add_argument("--num_fewshot", "-f", type=int, help="examples in the few-shot context")
    p.add_argument("--batch_size", "-b", help="batch size where --model_args gives none (default: the model's)")
    p.add_argument("--max_batch_size", type=_positive_int, help="maximum batch size with --batch_size auto")
    p.add_argument("--device", help="device (default: CUDA when present, else the CPU)")
    p.add_argument("--limit", "-L", type=float, help="examples per task: a count, or a fraction below 1 (testing)")
    p.add_argument("--samples", "-E", metavar="JSON",
                   help='which examples per task, {"task": [0, 1, 2]} or a JSON file of it (not with --limit)')
    p.add_argument("--use_cache", "-c", metavar="PATH", help="sqlite file caching the model's responses")
    p.add_argument("--cache_requests", nargs="?", const="true", choices=("true", "refresh", "delete"),
                   help="cache the prepared requests (a bare flag: true)")
    p.add_argument("--check_integrity", action="store_true", help="run the tasks' test suites")
    p.add_argument("--output_path", "-o", metavar="PATH", help="directory (or .json file) for the results")
    p.add_argument("--log_samples", "-s", action="store_true", help="also write every sample's inputs and outputs")
    p.add_argument("--predict_only", "-x", action="store_true", help="outputs only, no metrics (implies --log_samples)")
    p.add_argument("--apply_chat_template", nargs="?", const=True, default=False, metavar="TEMPLATE",
                   help="format prompts with the tokenizer's chat template (optionally a named one)")
    p.add_argument("--fewshot_as_multiturn", nargs="?", const=True, type=_switch, metavar="BOOL",
                   help="few-shot examples as a multi-turn chat (default: on with --apply_chat_template)")
    p.add_argument("--system_instruction", metavar="TEXT", help="a system instruction for every prompt")
    p.add_argument("--gen_kwargs", nargs="+", action="extend", metavar="ARGS",
                   help="generation options replacing the tasks' own: key=value,key=value")
    p.add_argument("--include_path", action="append", metavar="DIR", help="a directory of your own tasks; repeatable")
    p.add_argument("--seed", type=_seeds, default=[0, 1234, 1234, 1234], metavar="SEEDS",
                   help="python,numpy,torch,fewshot seeds, or one for all (default: 0,1234,1234,1234)")
    p.add_argument("--write_out", "-w", action="store_true", help="print the prompts of the first documents")
    p.add_argument("--show_config", action="store_true", help="print the whole results and task configuration")
    p.add_argument("--metadata", nargs="+", action="extend", metavar="ARGS",
                   help="key=value task metadata (some tasks need it), merged with --model_args")
    p.add_argument("--hf_hub_log_args", nargs="+", action="extend", metavar="ARGS",
                   help="key=value options of lm-eval's EvaluationTracker (pushing results to the hub)")
    p.add_argument("--trust_remote_code", action="store_true", help="let data sets run their own code")
    p.add_argument("--confirm_run_unsafe_code", action="store_true", help="allow tasks that execute generated code")
    _add_quantization_options(p, "--model qadapter: load the base (default: as the adapter was trained)")


def _run_lm_eval(args) -> int:
    try:
        from lm_eval.utils import setup_logging

        from .experiments import lm_eval_run as harness  # importing it registers the model "qadapter"
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("lm_eval"):
            raise
        raise ModuleNotFoundError("qadapter lm-eval needs lm-evaluation-harness: "
                                  "pip install 'qadapter-kernels[lm-eval]'") from exc

    if args.action not in ("run", "ls", "validate"):
        _usage_error("lm-eval", f"argument action: invalid choice: {args.action!r} (choose from run, ls, validate)")
    if args.what is not None and (args.action != "ls" or args.what not in LM_EVAL_LISTS):
        _usage_error("lm-eval", f"unexpected argument {args.what!r} (ls takes one of {', '.join(LM_EVAL_LISTS)})")
    setup_logging()
    if args.action == "ls":
        print(harness.task_manager(args.include_path).list_all_tasks(**harness.LISTS[args.what or "tasks"]))
        return 0
    names = [name for text in args.tasks or [] for name in text.split(",") if name]
    if not names:
        _usage_error("lm-eval", "--tasks is required (qadapter lm-eval ls lists them)")
    if args.action == "validate":
        missing = harness.missing_tasks(harness.task_manager(args.include_path), names)
        print(f"Tasks not found: {', '.join(missing)}" if missing else "All tasks found and valid")
        return 1 if missing else 0
    options = _lm_eval_options(args, harness)
    manager = harness.task_manager(args.include_path, metadata=options["metadata"])
    tasks = harness.resolve_tasks(manager, names)  # an unknown name fails here, before the model loads
    results = harness.evaluate_tasks(tasks=tasks, task_manager=manager, **options)
    if results is not None:
        print(harness.format_results(results, options, show_config=args.show_config))
    return 0


def _lm_eval_options(args, harness) -> dict:
    """The run's options, checked as lm-eval's command line checks them, before anything loads."""
    if args.samples and args.limit is not None:
        _usage_error("lm-eval", "--samples and --limit exclude each other")
    log_samples = args.log_samples or args.predict_only
    if log_samples and not args.output_path:
        _usage_error("lm-eval", "--log_samples and --predict_only need --output_path")
    multiturn = args.fewshot_as_multiturn
    if multiturn is None:
        multiturn = bool(args.apply_chat_template)
    elif multiturn and not args.apply_chat_template:
        _usage_error("lm-eval", "--fewshot_as_multiturn needs --apply_chat_template")
    model_args = harness.key_values(args.model_args)
    quantization = _quantization(args)
    if quantization is not None:
        if args.model != "qadapter":
            _usage_error("lm-eval", f"--load-in-4bit and --load-in-8bit load the model qadapter's base; --model "
                                    f"{args.model} takes its own --model_args")
        if "quantization" in model_args:
            _usage_error("lm-eval", "quantization is given twice: in --model_args and by --load-in-4bit/--load-in-8bit")
        model_args["quantization"] = quantization
    if args.trust_remote_code:
        harness.trust_remote_code()
        if args.model != "qadapter":
            model_args["trust_remote_code"] = True
    batch_size = args.batch_size
    if batch_size is not None and batch_size.isdigit():
        batch_size = int(batch_size)
    cache = args.cache_requests
    return {
        "model": args.model, "model_args": model_args, "num_fewshot": args.num_fewshot, "batch_size": batch_size,
        "max_batch_size": args.max_batch_size, "device": args.device, "limit": args.limit,
        "samples": harness.samples_option(args.samples), "use_cache": args.use_cache,
        "cache_requests": cache in ("true", "refresh"), "rewrite_requests_cache": cache == "refresh",
        "delete_requests_cache": cache == "delete", "check_integrity": args.check_integrity,
        "write_out": args.write_out, "log_samples": log_samples, "predict_only": args.predict_only,
        "system_instruction": args.system_instruction, "apply_chat_template": args.apply_chat_template,
        "fewshot_as_multiturn": multiturn, "gen_kwargs": harness.key_values(args.gen_kwargs) or None,
        "random_seed": args.seed[0], "numpy_random_seed": args.seed[1], "torch_random_seed": args.seed[2],
        "fewshot_random_seed": args.seed[3], "confirm_run_unsafe_code": args.confirm_run_unsafe_code,
        "metadata": model_args | harness.key_values(args.metadata), "output_path": args.output_path,
        "hf_hub_log_args": harness.key_values(args.hf_hub_log_args),
    }


# Each command: its one-line help, the function that adds its description and options, and the one
# that runs it.
COMMANDS = {
    "demo": ("train a Q-Adapter on the built-in task with the embedded default and report", _demo_parser, _run_demo),
    "train": ("train a Q-Adapter on preference data", _train_parser, _run_train),
    "generate": ("generate with the customized policy (streams tokens)", _generate_parser, _run_generate),
    "serve": ("an OpenAI-compatible HTTP server of customized policies (many adapters, one base)", _serve_parser,
              _run_serve),
    "eval": ("preference accuracy, margin, loss and KL to the base on preference data", _eval_parser, _run_eval),
    "plan": ("predict the peak GPU memory of training (no GPU needed)", _plan_parser, _run_plan),
    "compare": ("Q-Adapter against SFT and DPO: preference learned vs knowledge kept", _compare_parser, _run_compare),
    "lm-eval": ("benchmarks with lm-evaluation-harness, on the model 'qadapter' by default", _lm_eval_parser,
                _run_lm_eval),
    "info": ("what a saved adapter is: its provenance", _info_parser, _run_info),
    "check": ("measure an adapter against its base; fail it when it forgets", _check_parser, _run_check),
}


def build_parser(commands: Collection[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The command line, with the options of ``commands`` only: some commands' options come from
    modules that import torch and transformers, which ``qadapter --help`` and ``--version`` need not
    wait for."""
    parser = argparse.ArgumentParser(
        prog="qadapter", description="Q-Adapter: customize a frozen LLM to new preferences without forgetting, "
                                     "with fused no-logits kernels.",
        # The benchmarks are not part of the installed package: they run from a source checkout.
        epilog="Benchmarks: from a source checkout of the repository, run python -m bench.report "
               "(python -m bench.report --help for its options).")
    parser.add_argument("--version", action="version", version=f"qadapter {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (summary, add_options, _) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        if name in commands:
            add_options(p)
    return parser


# What the libraries print on every run about their own versions or this machine, none of it about
# the run (logger or warning category, and the message's start): PEFT calling transformers' renamed
# gradient-checkpointing property; bitsandbytes falling back from a hub-fetched CPU kernel to its own;
# DeepSpeed (imported by transformers when installed) saying it found no GPU, on stdout.
LIBRARY_CHATTER = (
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("DeepSpeed", "Setting accelerator to CPU"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),  # once per 8-bit layer call
)


@functools.cache  # once a process: the loggers' filters would pile up with every main() call
def _quiet_library_chatter() -> None:
    """Keeps the command's output its own (LIBRARY_CHATTER); a library's errors and every other
    warning still show. The command line only: importing qadapter changes no filters."""
    for source, start in LIBRARY_CHATTER:
        if isinstance(source, type):
            warnings.filterwarnings("ignore", message=re.escape(start), category=source)
        else:
            logging.getLogger(source).addFilter(lambda record, start=start: not record.getMessage().startswith(start))


# The extra of the package that installs each optional module a command imports (top-level names).
EXTRAS = {"transformers": "model", "peft": "model", "accelerate": "model", "datasets": "model", "safetensors": "model",
          "gguf": "model", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve",
          "bitsandbytes": "quant", "trl": "trl", "lm_eval": "lm-eval", "deepspeed": "deepspeed", "matplotlib": "plot"}


def _missing_module(exc: ModuleNotFoundError) -> str:
    """One line for a module that is not installed: which, and the extra that installs it (or, where
    the package is there without that module, an older release of it: the upgrade)."""
    import importlib.util

    message = str(exc)
    package = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(package)
    if extra is None or "pip install" in message:
        return message
    try:
        installed = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a finder that refuses the name: not importable either way
        installed = False
    if installed:
        return f'{message} (the installed {package} is older than this needs): pip install -U "qadapter-kernels[{extra}]"'
    return f'{message}: pip install "qadapter-kernels[{extra}]"'


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("qadapter-kernels")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path, not installed
        from qadapter_kernels import __version__
        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_library_chatter()
    try:  # some commands' options come from modules that need the model extra, their --help too
        parser = build_parser(commands=argv[:1])  # the command comes first: the top level has no options but these
    except ModuleNotFoundError as exc:
        _usage_error(argv[0], _missing_module(exc))
    if not argv:  # a command is needed: what there are, as a bad argument exits
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.training_options = extra  # train's TrainingArguments fields (--name value), parsed by HfArgumentParser
    format_warning = warnings.formatwarning  # a warning is one line of the command's own, while it runs
    warnings.formatwarning = lambda message, *_, **__: f"qadapter {args.command}: warning: {message}\n"
    try:
        with _terminated_as_interrupted():
            return _run_command(args)
    finally:
        warnings.formatwarning = format_warning


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or launcher's stop): unwound as a Ctrl-C is, so what is being saved is
    finished or dropped whole (``atomic.save_files``)."""


@contextmanager
def _terminated_as_interrupted():
    """SIGTERM raises :class:`Terminated` inside (in the main thread; the serving command's server
    installs its own handler, which shuts it down gracefully)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends a process stuck in C at once
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def _run_command(args) -> int:
    """The command's run, its expected failures each one line on stderr and an exit code."""
    try:
        return COMMANDS[args.command][2](args)
    except BrokenPipeError:  # the reader stopped reading (`qadapter info DIR | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and nothing for exit's flush to fail on
        return 141  # as a shell reports a command ended by SIGPIPE
    except ModuleNotFoundError as exc:  # an extra not installed: one line, naming it
        _usage_error(args.command, _missing_module(exc))
    except (OSError, ValueError) as exc:  # a path, a value: one line
        _usage_error(args.command, str(exc))
    except FloatingPointError as exc:  # training went non-finite: it says at which step, and what is kept
        print(f"qadapter {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # what is saved is whole (saving is atomic); no traceback for a Ctrl-C
        terminated = isinstance(exc, Terminated)
        print(f"qadapter {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130  # as a shell reports a command ended by SIGTERM or SIGINT


if __name__ == "__main__":
    sys.exit(main())
