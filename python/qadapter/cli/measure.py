"""``qadapter eval`` (preference measures and KL to the base), ``qadapter info`` (an adapter's
provenance) and ``qadapter check`` (an adapter against its base, with thresholds): what a saved
adapter is and what it does."""

from __future__ import annotations

import json
import sys
from dataclasses import fields

from .arguments import (
    ADAPTER_HELP,
    adapter_lengths,
    add_base_model_option,
    add_dtype_option,
    add_length_options,
    add_quantization_options,
    check_length_options,
    dtype_from,
    finite_float,
    non_negative_int,
    output_directory,
    positive_int,
    quantization_from,
    read_option_file,
    result_stdout,
    usage_error,
)


def eval_parser(p) -> None:
    p.description = ("Prints a JSON object (and nothing else) on stdout: the adapter's preference "
                     "accuracy, margin and loss, its mean per-token KL to the base, and under "
                     '"step0" the same preference measures of an untrained adapter (LoRA B = 0) '
                     "on the same base: the baseline. The data summary goes to stderr, and a "
                     "progress bar (pairs done, pairs/s) when it is a terminal.")
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("--data", required=True, help="preference data to evaluate on")
    add_base_model_option(p)
    add_length_options(p)
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted) instead of failing")
    add_quantization_options(p, "load the base (default: as the adapter was trained)")
    add_dtype_option(p)


def _warn_if_training_data(command: str, adapter, data, rows: list) -> bool:
    """Whether ``data`` (read as ``rows``) is the adapter's training data, by its provenance; a warning
    says so."""
    from ..library.provenance import trained_on
    from ..library.saved import locate_adapter

    if not trained_on(locate_adapter(adapter), data, rows):
        return False
    print(f"qadapter {command}: warning: {data} is the data this adapter was trained on (its provenance says "
          "so): held-out measures on it overstate what it learned", file=sys.stderr)
    return True


def eval_command(args) -> int:
    from ..evaluation.measures import STEP0_BASELINE, evaluate_pairs
    from ..library.data import check_rows, load_preference_data
    from ..library.model import QAdapterModel

    check_length_options("eval", args)
    rows = check_rows(args.data, split="test", skip_invalid=args.skip_invalid)  # bad data: before a model loads
    adapter_lengths("eval", args)
    with result_stdout() as result:  # stdout is the JSON alone (| jq)
        model = QAdapterModel.from_pretrained(args.adapter, args.base_model,
                                              quantization=quantization_from(args, "saved"), torch_dtype=dtype_from(args))
        tokenizer = model.tokenizer
        data, summary = load_preference_data(rows, tokenizer, max_length=args.max_length,
                                             max_prompt_length=args.max_prompt_length, skip_invalid=args.skip_invalid,
                                             chat_template_kwargs=model.chat_template_kwargs)
        print(f"data: {summary}", file=sys.stderr, flush=True)
        _warn_if_training_data("eval", args.adapter, args.data, rows)
        features = data.to_list()
        metrics = evaluate_pairs(model, features, tokenizer.pad_token_id, kl=True, step0=True, progress=True)
        metrics["pairs"] = len(features)
        print(f"step0: {STEP0_BASELINE}", file=sys.stderr)
        print(json.dumps(metrics, indent=2), file=result)
    return 0


def info_parser(p) -> None:
    p.description = ("Prints a saved adapter's provenance: the training data (source, content "
                     "hash, rows kept and skipped), the training options, the base model (name, "
                     "fingerprint), the library versions, the final training metrics and the "
                     "creation time. A missing or unreadable provenance record is reported; the "
                     "adapter itself still loads.")
    p.add_argument("adapter", help=ADAPTER_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def info_command(args) -> int:
    from ..library.provenance import read_provenance
    from ..library.saved import AdapterLoadError, hub_pin, locate_adapter, read_adapter_config, stack_levels_found

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
    if config is not None and config.get("stack"):  # which network is the top level's Q: it changes the policy
        print(f"q_on: {config.get('q_on')} (the Q network: the {'parent' if config.get('q_on') == 'parent' else 'base'}"
              "'s plus this level's LoRA)")
    if config is not None and config["chat_template_kwargs"]:  # how its chats are rendered: the prompts it knows
        print(f"chat template options: {json.dumps(config['chat_template_kwargs'])}")
    for level, record in zip(levels, (config or {}).get("stack") or []):  # where loading would find it, or why not
        combination = f" (alpha_0 {record.get('alpha_0')}, alpha~ {record.get('alpha_tilde')}, q_on {record.get('q_on')})"
        print(f"stack level {level['level']}: " + (f"PROBLEM: {level['problem']}" if level["problem"]
                                                    else level["found_at"] + combination))
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
        details = f", {training['processes']} processes" if training.get("processes", 1) > 1 else ""
        kept = training.get("adapter_step", training.get("global_step"))
        if kept != training.get("global_step"):  # load_best_model_at_end kept an earlier checkpoint's
            details += f", the adapter of step {kept} (the best checkpoint)"
        lines.append(f"training: step {training.get('global_step')}, completed {training.get('completed')}{details}; "
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


def check_parser(p) -> None:
    from ..evaluation.check import Thresholds

    p.description = ("Measures a saved adapter against its base on preference pairs (accuracy and "
                     "its gain over the step-0 baseline, KL to the base), the knowledge probe "
                     "(log-likelihood accuracy, customized policy vs the base) and general-text "
                     "perplexity (vs the base); compares each with its threshold (flags, or a JSON "
                     "file of them) and with an earlier report (--baseline). Writes check.json and "
                     "check.md, and exits 1 naming each failed threshold.")
    p.add_argument("adapter", help=ADAPTER_HELP)
    p.add_argument("--data", required=True, help="held-out preference pairs")
    add_base_model_option(p)
    p.add_argument("--output", help="directory for check.json and check.md (default: the adapter's directory)")
    p.add_argument("--baseline", help="an earlier check.json: the report shows the change since")
    p.add_argument("--thresholds", metavar="JSON", help="a JSON object of thresholds (the flags below win)")
    defaults = Thresholds()
    for f in fields(Thresholds):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=finite_float, default=None, metavar="X",
                       help=f"{'lower' if f.name.startswith('min_') else 'upper'} limit "
                            f"(default: {getattr(defaults, f.name)}; null in the thresholds file turns it off)")
    p.add_argument("--max-pairs", type=positive_int, help="measure at most this many pairs (default: all)")
    p.add_argument("--probe-items", type=non_negative_int, default=64,
                   help="knowledge probe questions, spread over the probe (default: %(default)s; 0: skip)")
    p.add_argument("--passages", type=non_negative_int, default=4,
                   help="general-text passages for perplexity (default: %(default)s; 0: skip)")
    add_length_options(p)
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted) instead of failing")


def check_command(args) -> int:
    from dataclasses import replace

    from ..evaluation.check import Thresholds, format_markdown, read_report, run_check
    from ..library import atomic
    from ..library.data import check_rows, load_preference_data
    from ..library.model import QAdapterModel
    from ..library.provenance import read_provenance
    from ..library.saved import hub_pin, locate_adapter

    thresholds = read_option_file("check", "--thresholds", Thresholds.from_file, args.thresholds) or Thresholds()
    given = {f.name: getattr(args, f.name) for f in fields(Thresholds) if getattr(args, f.name) is not None}
    thresholds = replace(thresholds, **given)
    baseline = read_option_file("check", "--baseline", read_report, args.baseline)  # fails before any work
    check_length_options("check", args)
    output = output_directory("check", args.output) if args.output else None
    adapter = locate_adapter(args.adapter)
    pin = hub_pin(args.adapter, adapter)  # owner/name@commit: the report names the commit it judged
    if output is None and pin is not None:
        usage_error("check", f"--output: {args.adapter} is a hub repository, whose downloaded copy is the hub "
                             "cache's; name a directory for check.json and check.md")
    output = output or adapter
    rows = check_rows(args.data, split="test", skip_invalid=args.skip_invalid)  # bad data: before a model loads
    adapter_lengths("check", args)
    model = QAdapterModel.from_pretrained(adapter, args.base_model)
    data, summary = load_preference_data(rows, model.tokenizer, max_length=args.max_length,
                                         max_prompt_length=args.max_prompt_length, skip_invalid=args.skip_invalid,
                                         chat_template_kwargs=model.chat_template_kwargs)
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
