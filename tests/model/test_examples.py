"""The recipes in examples/ run: a few steps on the tiny random model of examples/toy.py, where the
loss falls, only the adapter is trained and no [B, T, V] tensor is ever allocated."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")
from helpers import LargestTensor  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = ["accelerate_loop", "trainer_subclass", "trl_dpo"]
STEPS = 5


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as when run as `python examples/<recipe>.py`


def recipe(name: str):
    if name == "trl_dpo":
        pytest.importorskip("trl")
    return importlib.import_module(name)


def peft_model(model):
    """The PEFT model inside what a recipe returns (the model itself, or a trainer holding it)."""
    return model.model if hasattr(model, "args") else model


def batch_of(module, owner):
    """One collated batch as the recipe's loss sees it."""
    if hasattr(owner, "get_train_dataloader"):
        return owner._prepare_inputs(next(iter(owner.get_train_dataloader())))
    import toy
    from qadapter import PreferenceCollator

    return PreferenceCollator(pad_token_id=toy.PAD_ID)(toy.tokenized_pairs(n=4))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_the_adapter_without_full_logits(name, examples_path):
    module = recipe(name)
    import toy

    with LargestTensor() as largest:
        owner, losses = module.run(steps=STEPS, chunk_size=8)
    assert len(losses) == STEPS
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.02, losses

    # Nothing near [B, T, V]: 4 pairs of 49 tokens over a 1000-word vocabulary. The largest legitimate
    # tensors are the [V, d] embedding and the [chunk, V] loss buffers.
    batch = batch_of(module, owner)
    full = batch["input_ids"].numel() * toy.VOCAB
    assert largest.largest < full // 4, (largest.largest, full)

    # The base model is bit for bit the one it started as; the adapter moved.
    model = peft_model(owner)
    fresh = toy.tiny_causal_lm().state_dict()
    for key, param in model.named_parameters():
        if "lora_" in key:
            assert param.requires_grad
            continue
        assert not param.requires_grad, key
        assert torch.equal(param.detach(), fresh[key.replace("base_model.model.", "").replace(".base_layer", "")]), key
    assert any(bool(p.abs().sum() > 0) for k, p in model.named_parameters() if "lora_B" in k)

    # One more loss through the recipe's own path: gradients reach the adapter and nothing else.
    model.zero_grad(set_to_none=True)
    if hasattr(owner, "compute_loss"):
        loss = owner.compute_loss(model, batch)
    else:
        from qadapter import frozen_and_adapter_hidden

        from qadapter_kernels import qadapter_loss

        loss = qadapter_loss(*frozen_and_adapter_hidden(model, batch["input_ids"], batch["attention_mask"]),
                             batch["labels"]).loss
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in k for k in grads)
    assert all(bool(g.abs().sum() > 0) for k, g in grads.items() if "lora_B" in k)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_from_its_command_line(name, examples_path, capsys):
    recipe(name).main(["--steps", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"]


def test_vocab_parallel_head_trains_as_one_process(examples_path):
    """Two gloo processes, each holding its rows of the head, take the steps one process takes."""
    module = recipe("vocab_parallel_head")
    (whole,) = module.run(steps=3, chunk_size=8, world=1)
    ranks = module.run(steps=3, chunk_size=8, world=2)
    assert whole[-1] < whole[0]
    for losses in ranks:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole), rtol=1e-5, atol=1e-6)


def _readme_snippets_of_examples() -> list[tuple[str, str]]:
    """(example file name, snippet) for each README python block whose paragraph names one example."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    pieces = re.split(r"^```python\n(.*?)^```\n", readme, flags=re.S | re.M)  # text, code, text, code, ...
    found = []
    for before, code in zip(pieces[0::2], pieces[1::2]):
        names = set(re.findall(r"examples/(\w+\.py)", before.rsplit("```", 1)[-1]))
        if len(names) == 1:
            found.append((names.pop(), code))
    return found


@pytest.mark.parametrize("name, snippet", _readme_snippets_of_examples(), ids=lambda v: v if v.endswith(".py") else "")
def test_readme_snippets_are_lines_of_their_examples(name, snippet):
    """README says its recipe snippets are lines from the examples (`...`: lines left out); CI runs
    the examples, so a snippet that drifts from its file would show code nobody ran."""
    lines = {line.strip() for line in (EXAMPLES / name).read_text(encoding="utf-8").splitlines()}  # snippets dedent
    strays = [line for line in snippet.splitlines() if line.strip() and not line.strip().startswith("...")
              and line.strip() not in lines]
    assert not strays, f"README lines not in examples/{name}: {strays}"


def test_readme_names_the_examples_it_quotes():
    assert {name for name, _ in _readme_snippets_of_examples()} >= {"accelerate_loop.py", "trainer_subclass.py",
                                                                    "trl_dpo.py", "vocab_parallel_head.py"}
