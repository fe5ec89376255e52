"""``qadapter train`` (an adapter from preference data, resumable from its checkpoints) and
``qadapter plan`` (the memory a training step needs, before anything loads)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from ..library.defaults import DEFAULT_MODEL, MAX_LENGTH
from .arguments import (
    add_dtype_option,
    add_quantization_options,
    dtype_from,
    output_directory,
    positive_int,
    quantization_from,
    result_stdout,
    usage_error,
)


def train_parser(p) -> None:
    p.description = ("Train a Q-Adapter. Data: .json/.jsonl/.ndjson/.parquet files or a hub data set with "
                     "{'chosen': [messages], 'rejected': [messages]} or {'prompt', 'chosen', "
                     "'rejected'} rows. Every QAdapterConfig / TrainingArguments field is accepted "
                     "as --name value: the loss options of qadapter_kernels.LossConfig, --backend, "
                     "LoRA and length settings, and e.g. --num_train_epochs 2 "
                     "--activation_checkpointing true (--gradient_checkpointing before transformers 5.23); "
                     "--push_to_hub true (--hub_model_id owner/name) "
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
    p.add_argument("--curve-steps", type=positive_int, default=None, metavar="N",
                   help="with --eval-data: measure the held-out pairs at step 0, every N steps and at the end "
                        "(accuracy with its 95%% interval, margin, KL to the base) into "
                        "<output>/curve.json and curve.png")
    add_quantization_options(p, "load the frozen base")
    add_dtype_option(p)


def _training_config(args, extra: list[str]):
    from transformers import HfArgumentParser

    from ..library.launch import launched_processes
    from ..library.trainer import QAdapterConfig, has_accelerator

    names = {f.name for f in fields(QAdapterConfig)}
    given = [a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in extra if a.startswith("--")]
    unknown = sorted(set(given) - names)
    if unknown:
        usage_error("train", f"unrecognized arguments: {', '.join('--' + u for u in unknown)}")
    if "output_dir" in given:  # the adapter in one place, its checkpoints in another: --resume would not find them
        usage_error("train", "--output_dir is --output's: the adapter goes there and the trainer's checkpoints "
                             "into <output>/checkpoints")
    if "skip_invalid" in given:
        usage_error("train", "--skip_invalid is --skip-invalid's (the command reads the data itself)")
    parser = HfArgumentParser(QAdapterConfig)
    parser.error = lambda message: usage_error("train", message)  # one line, not the usage of every field
    # Launched as several processes on CPUs: accelerate joins them only with use_cpu (else each trains alone).
    joined = ["--use_cpu", "true"] if launched_processes() > 1 and not has_accelerator() else []
    # Trainer's progress bar on a terminal only: in a log it is hundreds of carriage-returned lines.
    quiet = [] if sys.stderr.isatty() else ["--disable_tqdm", "true"]
    (config,) = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(Path(args.output) / "checkpoints"), "--report_to", "none",
              "--skip_invalid", str(args.skip_invalid), *joined, *quiet, *extra]
    )
    return config


def train_command(args) -> int:
    from ..evaluation.measures import preference_metrics
    from ..library import atomic
    from ..library.data import check_rows, load_preference_data
    from ..library.launch import launched_processes, process_rank
    from ..library.model import QAdapterModel, levels_on, stack_level_at
    from ..library.provenance import data_identity
    from ..library.saved import checkpoint_folders, holds_adapter
    from ..library.trainer import QAdapterTrainer, latest_checkpoint, seed_everything

    if launched_processes() > 1 and process_rank() != 0:
        warnings.simplefilter("ignore")  # the main process warns of what every process would
    config = _training_config(args, args.training_options)
    main = config.process_index == 0  # of a launch's processes, the one that speaks, saves and pushes
    # The saved adapter is pushed once, at the end; Trainer would push its checkpoints' folder instead.
    push_to = (config.hub_model_id or Path(args.output).resolve().name) if config.push_to_hub else None
    config.push_to_hub = False
    if args.curve_steps and not args.eval_data:
        usage_error("train", "--curve-steps needs --eval-data (the held-out pairs it measures)")
    strategy = getattr(config.eval_strategy, "value", config.eval_strategy)  # an IntervalStrategy, a str enum
    if strategy != "no" and not args.eval_data:
        usage_error("train", f"--eval_strategy {strategy} needs --eval-data (the held-out pairs it measures)")
    output = output_directory("train", args.output)
    try:  # before anything loads or writes: a wrong --output costs nothing
        atomic.check_target(output, is_ours=holds_adapter, overwrite=args.overwrite)
    except atomic.OutputDirectoryError as exc:
        usage_error("train", str(exc))
    earlier = checkpoint_folders(output / "checkpoints") if args.resume is None else []
    if earlier and not args.overwrite:  # a new run's checkpoints among them, --resume would mix the two runs
        usage_error("train", f"--output {output} holds checkpoints of an earlier run ({earlier[-1].name}): --resume "
                             "goes on with it; --overwrite starts anew (its checkpoints are removed)")
    resume = None
    if args.resume is not None:  # the checkpoint found before anything loads: none is one line, at once
        resume = latest_checkpoint(output / "checkpoints") if args.resume is True else args.resume
        if resume is None or not Path(resume, "trainer_state.json").is_file():
            where = f"in {output / 'checkpoints'}" if args.resume is True else f"at {args.resume}"
            usage_error("train", f"--resume: no complete checkpoint {where} (train without --resume to start the run)")
    if args.on is not None:  # saving over an adapter of the stack is refused, but only after training
        levels = levels_on(args.on)
        places = [place for level in levels for place in (level.nearby, level.path) if place]
        if stack_level_at(output, places) is not None:  # a level where the stack moved to, or where recorded
            usage_error("train", f"--output {output} holds an adapter the new one is trained on (--on {args.on}): "
                                 "saving there would replace it; choose another --output")
        local = [k for k, level in enumerate(levels, 1) if level.hub is None]
        if push_to and local:
            usage_error("train", f"--push_to_hub: stack level(s) {local} under the new adapter are local folders; "
                                 "push them first and train --on the hub repository")
    # Read and checked before the model loads: bad data fails at once.
    train_rows = check_rows(args.data, skip_invalid=args.skip_invalid)
    eval_rows = check_rows(args.eval_data, split="test", skip_invalid=args.skip_invalid) if args.eval_data else None
    if args.q_on != "parent" and args.on is None:
        usage_error("train", "--q-on applies with --on")
    stacking = {} if args.on is None else {"on": levels, "q_on": args.q_on}  # found once: hashed, located
    # Everything checked, the run holds --output (its checkpoints, its adapter) until it ends: a second
    # run there would write over it, each reporting success.
    try:
        writing = atomic.hold(output) if main else contextlib.nullcontext()
    except (atomic.OutputDirectoryError, OSError) as exc:
        usage_error("train", str(exc))
    with writing, result_stdout() as result:  # stdout: the held-out measures' JSON alone (| jq)
        seed_everything(config)  # --seed governs the adapter's initialization too, as Trainer's model_init would
        model = QAdapterModel.from_base(args.model, quantization=quantization_from(args), torch_dtype=dtype_from(args),
                                        **config.model_options(), **stacking)
        tokenizer = model.tokenizer
        lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                       skip_invalid=args.skip_invalid, chat_template_kwargs=model.chat_template_kwargs)
        train, summary = load_preference_data(train_rows, tokenizer, **lengths)
        if main:
            print(f"training data: {summary}", file=sys.stderr)
        model.provenance["data"] = data_identity(args.data, train_rows, summary)  # saved with the adapter
        evaluation = None
        if args.eval_data:
            evaluation, eval_summary = load_preference_data(eval_rows, tokenizer, split="test", **lengths)
            if main:
                print(f"evaluation data: {eval_summary}", file=sys.stderr)
            model.provenance["eval_data"] = data_identity(args.eval_data, eval_rows, eval_summary)
            if main and model.provenance["eval_data"]["rows_sha256"] == model.provenance["data"]["rows_sha256"]:
                print("qadapter train: warning: --eval-data holds the same rows as --data: its held-out measures "
                      "would overstate what the adapter learned", file=sys.stderr)
        callbacks = []
        if args.curve_steps:
            from ..evaluation.curve import LearningCurve

            meta = {"data": str(args.data), "eval_data": str(args.eval_data),
                    "eval_rows_sha256": model.provenance["eval_data"]["rows_sha256"]}  # a resumed curve's must match
            callbacks.append(LearningCurve(evaluation.to_list(), tokenizer.pad_token_id, output, every=args.curve_steps,
                                           progress=True, meta=meta))
        # --overwrite: the earlier run's checkpoints go before this run writes its own, and a run started
        # anew keeps no learning curve of another (a resumed one goes on with its own). The main process
        # removes them while a launch's others wait.
        with config.main_process_first(local=False, desc="the earlier run's files removed"):
            if main:
                for checkpoint in earlier:
                    shutil.rmtree(checkpoint)
                for name in ("curve.json", "curve.png") if resume is None else ():
                    (output / name).unlink(missing_ok=True)
        trainer = QAdapterTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                                  processing_class=tokenizer, callbacks=callbacks)
        if resume is not None:
            trainer.add_callback(_resume_announced(resume))
        trainer.train(resume_from_checkpoint=resume)
        # Every process measures (ZeRO-3's forward is a collective), before the main one saves and pushes alone.
        metrics = None
        if evaluation is not None:
            metrics = preference_metrics(model, evaluation.to_list(), tokenizer.pad_token_id)
            metrics["pairs"] = len(evaluation)  # as eval's JSON has it
        with trainer.gathered_adapter():  # whole under ZeRO-3; saved and pushed once
            if main:
                model.save_pretrained(output, overwrite=args.overwrite)
                print(f"adapter saved to {args.output}", file=sys.stderr)
                if push_to:
                    commit = model.push_to_hub(push_to, private=config.hub_private_repo, token=config.hub_token,
                                               revision=config.hub_revision)
                    print(f"adapter pushed to the hub: {commit.commit_url}", file=sys.stderr)
        if metrics is not None and main:
            print(json.dumps(metrics, indent=2), file=result)
        _leave_the_launch(trainer)
    return 0


def _leave_the_launch(trainer) -> None:
    """A launch's processes end together and leave their process group before the interpreter exits:
    one that exited while the main one still saved (its gloo and DeepSpeed threads torn down by the
    exit) aborted a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        trainer.accelerator.wait_for_everyone()
        dist.destroy_process_group()


def _resume_announced(checkpoint: str):
    """A callback that says where training resumes, once the trainer has taken the checkpoint."""
    from transformers import TrainerCallback

    class ResumeAnnounced(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if args.should_log:
                print(f"resuming from {checkpoint} (step {state.global_step})", file=sys.stderr)

    return ResumeAnnounced()


def plan_parser(p) -> None:
    p.description = ("Predicts the peak GPU memory of a Q-Adapter training step from the model's "
                     "config alone: base weights by dtype or quantization, LoRA weights with their "
                     "gradients and AdamW state, activations (with or without gradient checkpointing), "
                     "the fused loss's buffers and the CUDA context. With --gpu-memory it says "
                     "whether the step fits, and if not, what would make it fit.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: a local directory, a hub name, or %(default)s")
    p.add_argument("--gpu-memory", help="the GPU's memory, e.g. 12GiB, 24GB, 8000MiB (a bare number: GiB)")
    add_quantization_options(p, "plan for the base", compute_default="--dtype")
    p.add_argument("--max-length", type=positive_int, default=MAX_LENGTH, help="tokens per row (default: %(default)s)")
    p.add_argument("--pairs-per-step", type=positive_int, default=8,
                   help="preference pairs per step, 2 rows each (default: %(default)s, train's "
                        "--per_device_train_batch_size)")
    p.add_argument("--padded", action="store_true",
                   help="plan for rows padded to --max-length (train: --padding_free false); by default packed, "
                        "as train runs them")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="plan with the decoder's activations recomputed in the backward (train: "
                        "--activation_checkpointing true; --gradient_checkpointing true before transformers 5.23)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="the model's dtype (default: %(default)s)")
    p.add_argument("--lora-r", type=positive_int, default=8, help="the LoRA rank (default: %(default)s, train's)")
    p.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                   help="the layers LoRA wraps (default: the attention's query and value projections, as train)")


def plan_command(args) -> int:
    from transformers import AutoConfig

    from ..library.defaults import names_missing_folder, resolve_model
    from ..library.memory_plan import PlanOptions, format_plan, parse_size, plan, suggestions

    try:
        gpu = None if args.gpu_memory is None else parse_size(args.gpu_memory)
    except ValueError as exc:
        usage_error("plan", f"--gpu-memory: {exc}")
    if gpu is not None and gpu <= 0:
        usage_error("plan", f"--gpu-memory must be above 0; got {args.gpu_memory!r}")
    if names_missing_folder(args.model):
        raise FileNotFoundError(f"no model folder at {args.model}")
    options = PlanOptions.of(quantization_from(args), max_length=args.max_length, pairs_per_step=args.pairs_per_step,
                             padding_free=not args.padded,
                             gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, lora_r=args.lora_r,
                             target_modules=args.lora_target_modules and tuple(args.lora_target_modules))
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    config = getattr(config, "get_text_config", lambda: config)()
    predicted = plan(config, options)
    known = predicted.shape.adaptable_layers()
    unknown = [name for name in predicted.options.target_modules if name not in known]
    if unknown:  # a name no layer has would plan no LoRA weights for it; training refuses it
        usage_error("plan", f"--lora-target-modules: {', '.join(unknown)} is not a linear layer of this "
                            f"architecture's decoder layers; choose from {', '.join(known)}")
    advice = suggestions(config, options, gpu) if gpu is not None and not predicted.fits(gpu) else None
    print(format_plan(predicted, gpu, advice))
    return 0 if gpu is None or predicted.fits(gpu) else 1
