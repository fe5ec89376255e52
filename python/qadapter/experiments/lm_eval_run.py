"""Running lm-evaluation-harness on the customized policy: ``qadapter lm-eval``'s machinery, on
lm-eval's public interface (TaskManager, simple_evaluate, EvaluationTracker for its results files,
make_table), with the shipped offline tasks of :data:`TASKS_DIR` (the knowledge probe and the
built-in task's TL;DR rule) beside lm-eval's own. The model it scores is
:class:`qadapter.evaluation.lm_eval_model.QAdapterLM` (lm-eval model ``"qadapter"``, registered on import).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table, simple_parse_args_string

from ..evaluation import lm_eval_model  # noqa: F401 - registers the lm-eval model "qadapter"
from ..library.atomic import read_json

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")

LISTS = {  # ``ls`` choices: TaskManager.list_all_tasks's switches
    "tasks": {},
    "groups": {"list_subtasks": False, "list_tags": False},
    "subtasks": {"list_groups": False, "list_tags": False},
    "tags": {"list_groups": False, "list_subtasks": False},
}


def task_manager(include_path: list[str] | None = None, metadata: dict | None = None) -> TaskManager:
    """lm-eval's tasks, the shipped ones (:data:`TASKS_DIR`) and those in ``include_path``."""
    return TaskManager(include_path=[str(TASKS_DIR), *(include_path or [])], metadata=metadata or {})


def missing_tasks(manager: TaskManager, names: list[str]) -> list[str]:
    """The names (or patterns) that match no task, group or tag."""
    return [name for name in names if not manager.match_tasks([name])]


def resolve_tasks(manager: TaskManager, names: list[str]) -> list[str]:
    """Task, group and tag names matching ``names`` (patterns expanded, each once); an unknown
    name is a ValueError naming it."""
    missing = missing_tasks(manager, names)
    if missing:
        raise ValueError(f"Tasks not found: {', '.join(missing)} (qadapter lm-eval ls lists them)")
    return list(dict.fromkeys(task for name in names for task in manager.match_tasks([name])))


def key_values(texts: list[str] | None) -> dict:
    """``key=value,key=value`` strings (values typed as lm-eval types them) or JSON objects, merged."""
    merged: dict = {}
    for text in texts or []:
        if text.strip().startswith("{"):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object; got {text}")
            merged.update(value)
        else:
            for item in text.split(","):
                if item and "=" not in item:
                    raise ValueError(f"expected key=value; got {item!r}")
            merged.update(simple_parse_args_string(text))
    return merged


def samples_option(text: str | None) -> dict | None:
    """``--samples``: a JSON object ``{"task": [indices]}``, or the path of a file holding one (read as
    every JSON file is: a byte-order mark is no part of it, and one that is not JSON is named)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if Path(text).is_file():
            return read_json(text, "--samples file")
        raise ValueError(f"--samples: neither a JSON object nor a file: {text}") from None


def trust_remote_code() -> None:
    """Lets data sets run their own loading code (``datasets`` read its setting when imported)."""
    import datasets

    datasets.config.HF_DATASETS_TRUST_REMOTE_CODE = True


def evaluate_tasks(*, tasks: list, task_manager: TaskManager, output_path: str | None = None,
                   hf_hub_log_args: dict | None = None, **options) -> dict | None:
    """:func:`lm_eval.simple_evaluate` (``options`` are its arguments), the results written under
    ``output_path`` by lm-eval's ``EvaluationTracker`` (``<output_path>/<model>/results_<date>.json``,
    and with ``log_samples`` each task's samples), as lm-eval's own command line writes them.
    Returns the results, without the samples; None on processes other than the first."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    tracker_options = dict(hf_hub_log_args or {})
    if output_path:
        tracker_options["output_path"] = output_path
    if os.environ.get("HF_TOKEN"):
        tracker_options["token"] = os.environ["HF_TOKEN"]
    tracker = EvaluationTracker(**tracker_options)
    results = lm_eval.simple_evaluate(tasks=tasks, task_manager=task_manager, evaluation_tracker=tracker, **options)
    if results is None:
        return None
    samples = results.pop("samples", None) if options.get("log_samples") else None
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"] if samples is not None else ():
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    if tracker.push_results_to_hub or tracker.push_samples_to_hub:
        tracker.recreate_metadata_card()
    return results


def format_results(results: dict, options: dict, *, show_config: bool = False) -> str:
    """What lm-eval's command line prints: the run's settings and the results table (and the
    groups'); with ``show_config``, the whole results first."""
    parts = []
    if show_config:
        parts.append(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    batch_sizes = ",".join(map(str, results["config"].get("batch_sizes", [])))
    model_args = {k: v for k, v in options.get("model_args", {}).items() if k != "trust_remote_code"}
    parts.append(f"{options.get('model')} ({model_args}), gen_kwargs: ({options.get('gen_kwargs')}), "
                 f"limit: {options.get('limit')}, num_fewshot: {options.get('num_fewshot')}, "
                 f"batch_size: {options.get('batch_size')}{f' ({batch_sizes})' if batch_sizes else ''}")
    parts.append(make_table(results))
    if "groups" in results:
        parts.append(make_table(results, "groups"))
    return "\n".join(parts)
