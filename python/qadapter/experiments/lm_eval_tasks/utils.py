"""Data and scoring of the shipped lm-eval tasks: the package's own data, no download, no hub."""

from __future__ import annotations

import datasets
from qadapter.evaluation.knowledge import general_passages, load_probe
from qadapter.experiments.task import follows_rule, load_task


def knowledge_probe(**metadata) -> datasets.DatasetDict:
    """``qadapter_knowledge``'s documents: the shipped knowledge probe (``metadata``: what lm-eval
    passes every custom dataset; unused)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_probe())})


def general_text(**metadata) -> datasets.DatasetDict:
    """``qadapter_general_text``'s documents: the shipped general passages, one document each."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": t} for t in general_passages()])})


def tldr_prompts(**metadata) -> datasets.DatasetDict:
    """``qadapter_tldr``'s documents: the built-in task's held-out pairs (prompt, chosen, rejected)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_task()["heldout"])})


def follows_tldr_rule(doc: dict, results: list[str]) -> dict:
    """1 when the answer opens with a ``TL;DR:`` line (:func:`qadapter.experiments.task.follows_rule`), else 0."""
    return {"follows_rule": float(follows_rule(results[0]))}
