"""The experiments' commands: ``qadapter demo`` (the main job), ``qadapter compare`` (against SFT
and DPO) and ``qadapter lm-eval`` (lm-evaluation-harness on the customized policy)."""

from __future__ import annotations

import argparse

from .arguments import (
    add_dataclass_options,
    add_quantization_options,
    named,
    options_from,
    output_directory,
    positive_int,
    quantization_from,
    result_stdout,
    usage_error,
)


def demo_parser(p) -> None:
    from ..experiments.options import DemoOptions

    p.description = ("The main job: customize the embedded default model (or --model) to answer "
                     "with a TL;DR line, then print before/after preference accuracy, rule "
                     "satisfaction, knowledge retention and KL to the base.")
    add_dataclass_options(p, DemoOptions)
    add_quantization_options(p, "load the base")


def demo_command(args) -> int:
    from ..experiments.demo import format_report, run_demo
    from ..experiments.options import DemoOptions
    from ..library import atomic
    from ..library.saved import holds_adapter

    output = output_directory("demo", args.output)
    atomic.check_target(output / "adapter", is_ours=holds_adapter, overwrite=False)  # where the adapter goes
    with result_stdout():
        report = run_demo(options_from(args, DemoOptions, quantization=quantization_from(args)))
    print(format_report(report))
    return 0


def compare_parser(p) -> None:
    from ..experiments.options import CompareOptions

    p.description = ("Train SFT, DPO and a Q-Adapter with the same data, steps, learning rate and "
                     "LoRA rank on the embedded default, then measure each against the base: "
                     "held-out preference accuracy under its own reward, rule satisfaction, a "
                     "knowledge probe, KL to the base on general prompts, general-text perplexity, "
                     "training time and memory. Writes compare.json, compare.md and compare.png.")
    add_dataclass_options(p, CompareOptions)
    add_quantization_options(p, "load the base of every method")


def compare_command(args) -> int:
    from ..experiments.compare import format_table, run_compare
    from ..experiments.options import CompareOptions

    output_directory("compare", args.output)
    with result_stdout():
        rows = run_compare(options_from(args, CompareOptions, quantization=quantization_from(args)))
    print(format_table(rows))
    return 0


LM_EVAL_LISTS = ("tasks", "groups", "subtasks", "tags")


@named("seeds")
def _seeds(text: str) -> list[int | None]:
    """lm-eval's ``--seed``: one integer for all four generators (python, numpy, torch, few-shot),
    or four comma-separated integers or ``None``s."""
    values = [None if v.strip().lower() == "none" else int(v) for v in text.split(",")]
    if len(values) == 1:
        return values * 4
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"one integer or four (python,numpy,torch,fewshot); got {text}")
    return values


@named("true or false")
def _switch(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false; got {text}")


def lm_eval_parser(p) -> None:
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
    p.add_argument("--max_batch_size", type=positive_int, help="maximum batch size with --batch_size auto")
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
    add_quantization_options(p, "--model qadapter: load the base (default: as the adapter was trained)")


def lm_eval_command(args) -> int:
    try:
        from lm_eval.utils import setup_logging

        from ..experiments import lm_eval_run as harness  # importing it registers the model "qadapter"
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("lm_eval"):
            raise
        raise ModuleNotFoundError("qadapter lm-eval needs lm-evaluation-harness: "
                                  'pip install "qadapter-kernels[lm-eval]"') from exc

    if args.action not in ("run", "ls", "validate"):
        usage_error("lm-eval", f"argument action: invalid choice: {args.action!r} (choose from run, ls, validate)")
    if args.what is not None and (args.action != "ls" or args.what not in LM_EVAL_LISTS):
        usage_error("lm-eval", f"unexpected argument {args.what!r} (ls takes one of {', '.join(LM_EVAL_LISTS)})")
    setup_logging()
    if args.action == "ls":
        print(harness.task_manager(args.include_path).list_all_tasks(**harness.LISTS[args.what or "tasks"]))
        return 0
    names = [name for text in args.tasks or [] for name in text.split(",") if name]
    if not names:
        usage_error("lm-eval", "--tasks is required (qadapter lm-eval ls lists them)")
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
        usage_error("lm-eval", "--samples and --limit exclude each other")
    log_samples = args.log_samples or args.predict_only
    if log_samples and not args.output_path:
        usage_error("lm-eval", "--log_samples and --predict_only need --output_path")
    multiturn = args.fewshot_as_multiturn
    if multiturn is None:
        multiturn = bool(args.apply_chat_template)
    elif multiturn and not args.apply_chat_template:
        usage_error("lm-eval", "--fewshot_as_multiturn needs --apply_chat_template")
    model_args = harness.key_values(args.model_args)
    quantization = quantization_from(args)
    if quantization is not None:
        if args.model != "qadapter":
            usage_error("lm-eval", f"--load-in-4bit and --load-in-8bit load the model qadapter's base; --model "
                                   f"{args.model} takes its own --model_args")
        if "quantization" in model_args:
            usage_error("lm-eval", "quantization is given twice: in --model_args and by --load-in-4bit/--load-in-8bit")
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
