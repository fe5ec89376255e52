"""Stacked adapters: a Q-Adapter trained on a saved customized policy (docs/design.md, "Stacked adapters").

Every check compares with the explicit combination of full logits: log pi~1 from the parent's
frozen and adapter logits, then pi~2 = softmax((Q2 + alpha_0' log pi~1) / alpha~'), with the Q
networks run through PEFT's own ``set_adapter``, not the stack's row and pass selection."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("peft")
from helpers import left_padded_prompts, preference_batch, tiny_causal_lm  # noqa: E402
from qadapter.library.hidden import activate_adapters  # noqa: E402
from qadapter.library.model import AdapterLoadError, QAdapterModel  # noqa: E402

from qadapter_kernels import qadapter_loss  # noqa: E402

PARENT = dict(alpha_0=0.3, alpha_tilde=0.7)
CHILD = dict(alpha_0=0.6, alpha_tilde=1.3)


def perturb(model, seed: int, scale: float = 0.5) -> None:
    """The trained adapter's LoRA B random (its parents' stay as saved)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def saved_adapter(path, on=None, seed=1, base_seed=0, family="llama", **options):
    model = QAdapterModel(tiny_causal_lm(family, seed=base_seed), on=on, **options)
    perturb(model, seed)
    model.save_pretrained(path)
    return model


def network_logits(model, names, ids, mask, **kwargs):
    """Logits ``[B, T, V]`` of the base with the adapters ``names`` (none: the frozen model), through
    PEFT's own adapter selection."""
    peft = model.peft_model
    with torch.no_grad():
        if not names:
            with peft.disable_adapter():
                return peft(input_ids=ids, attention_mask=mask, **kwargs).logits.double()
        with peft_adapters(model, names):
            return peft(input_ids=ids, attention_mask=mask, **kwargs).logits.double()


@contextmanager
def peft_adapters(model, names):
    """PEFT's own ``set_adapter(names)`` inside; after it, the new adapter alone trainable and the
    model's Q network active again."""
    model.peft_model.base_model.set_adapter(list(names))
    try:
        yield
    finally:
        model.peft_model.base_model.set_adapter("default")
        activate_adapters(model.peft_model, model.q_networks[-1])


def explicit_logprobs(model, ids, mask, **kwargs):
    """log pi~_L from full logits, level by level: log_softmax((Q_k + alpha_0_k log pi~_{k-1}) / alpha~_k)."""
    logp = torch.log_softmax(network_logits(model, (), ids, mask, **kwargs), dim=-1)
    for names, (alpha_0, alpha_tilde) in zip(model.q_networks, model.level_alphas):
        q = network_logits(model, names, ids, mask, **kwargs)
        logp = torch.log_softmax((q + alpha_0 * logp) / alpha_tilde, dim=-1)
    return logp


@pytest.fixture
def parent_dir(tmp_path):
    saved_adapter(tmp_path / "parent", **PARENT)
    return tmp_path / "parent"


def test_a_stack_renders_its_chats_as_its_parent_unless_told_otherwise(tmp_path):
    quiet = {"enable_thinking": False}
    saved_adapter(tmp_path / "parent", chat_template_kwargs=quiet)
    assert QAdapterModel(tiny_causal_lm("llama"), on=tmp_path / "parent").chat_template_kwargs == quiet
    assert QAdapterModel(tiny_causal_lm("llama"), on=tmp_path / "parent", chat_template_kwargs={}).chat_template_kwargs == {}
    # Saved, the stack's options keep it from a reader that would ignore them; it loads back whole.
    saved_adapter(tmp_path / "child", on=tmp_path / "parent")
    assert json.loads((tmp_path / "child" / "qadapter_config.json").read_text())["format_version"] not in (1, 2)
    child = QAdapterModel.from_pretrained(tmp_path / "child", tiny_causal_lm("llama"))
    assert len(child.stack) == 1 and child.chat_template_kwargs == quiet


def test_a_stacked_checkpoint_loads_back_into_a_fresh_stack(tmp_path, parent_dir):
    """Resuming (and best-model loading) puts a checkpoint's weights into a model built anew on the
    same parent: the file holds the new LoRA only, and the levels' weights, loaded from their own
    folders, are no missing part of it."""
    saved_adapter(tmp_path / "child", on=parent_dir, seed=2, **CHILD)
    trained = QAdapterModel.from_pretrained(tmp_path / "child", tiny_causal_lm())
    fresh = QAdapterModel(tiny_causal_lm(), on=parent_dir, **CHILD)
    fresh.load_adapter_weights(tmp_path / "child")
    want = {k: v for k, v in trained.peft_model.state_dict().items() if "lora_" in k}
    got = fresh.peft_model.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.parametrize("q_on", ["parent", "base"])
def test_effective_hidden_gives_the_explicit_combination(parent_dir, q_on):
    model = QAdapterModel(tiny_causal_lm(), on=parent_dir, q_on=q_on, **CHILD).eval()
    perturb(model, seed=2)
    assert model.q_networks == ([("level1",), ("level1", "default")] if q_on == "parent" else [("level1",), ("default",)])
    ids, mask = left_padded_prompts()
    hidden = model.stack_hidden(ids, mask)
    _, h_eff, _ = model.policy_hidden(hidden)
    got = torch.log_softmax(h_eff.double() @ model.lm_head_weight.double().T, dim=-1)
    want = explicit_logprobs(model, ids, mask)
    scored = mask.bool()
    torch.testing.assert_close(got[scored], want[scored], rtol=0, atol=1e-5)
    # What the likelihood measures (knowledge probe, lm-eval) take: log pi~2 of given targets.
    from qadapter.evaluation.measures import Targets, customized_likelihood

    rows, positions = scored.nonzero(as_tuple=True)
    targets = Targets(rows, positions, torch.randint(0, want.shape[-1], rows.shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(customized_likelihood(model)(ids, mask, None, targets).double(),
                               want[rows, positions, targets.ids], rtol=0, atol=1e-5)
    # The parent's own policy: its hidden states combine to what it computes as a single adapter.
    parent = QAdapterModel.from_pretrained(parent_dir, tiny_causal_lm()).eval()
    base_hidden, q_hidden = parent.hidden_states(ids, mask)
    h_eff1, _ = model.loss_hidden(hidden)
    parent_logp = torch.log_softmax((q_hidden.double() + PARENT["alpha_0"] * base_hidden.double())
                                    / PARENT["alpha_tilde"] @ parent.lm_head_weight.double().T, dim=-1)
    torch.testing.assert_close(torch.log_softmax(h_eff1.double() @ model.lm_head_weight.double().T, dim=-1)[scored],
                               parent_logp[scored], rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_on", ["parent", "base"])
def test_stacked_loss_and_gradient_equal_the_reference_from_full_logits(parent_dir, q_on):
    """The level's loss through the fused path with base_hidden = h_eff, against the reference loss
    on explicit full logits (log pi~1 as the frozen side, Q2 as the adapter's; an identity head)."""
    model = QAdapterModel(tiny_causal_lm(), on=parent_dir, q_on=q_on, lora_dropout=0.0, **CHILD)
    perturb(model, seed=3)
    ids, mask, labels = preference_batch()
    out = model(ids, mask, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".default." in n for n, p in model.named_parameters() if p.requires_grad)
    grads = torch.autograd.grad(out.loss, params)

    logp_parent = torch.log_softmax(network_logits(model, (), ids, mask), dim=-1)
    logp_parent = torch.log_softmax((network_logits(model, ("level1",), ids, mask) + PARENT["alpha_0"] * logp_parent)
                                    / PARENT["alpha_tilde"], dim=-1)
    with peft_adapters(model, model.q_networks[-1]):
        q = model.peft_model(input_ids=ids, attention_mask=mask).logits.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    want = qadapter_loss(logp_parent, q, eye, labels, config=model.loss, backend="reference")
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-6)
    want_grads = torch.autograd.grad(want.loss, params)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)
    # Gradient checkpointing recomputes the adapter pass in the backward: the same network.
    model.gradient_checkpointing_enable()
    model.train()
    checkpointed = torch.autograd.grad(model(ids, mask, labels).loss, params)
    for g, w in zip(checkpointed, want_grads):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


def test_save_and_load_round_trip_three_levels(tmp_path, parent_dir):
    child = saved_adapter(tmp_path / "child", on=parent_dir, seed=2, **CHILD)
    config = json.loads((tmp_path / "child" / "qadapter_config.json").read_text())
    assert config["format_version"] == 2 and config["q_on"] == "parent" and len(config["stack"]) == 1
    assert config["stack"][0]["alpha_0"] == PARENT["alpha_0"]
    grandchild = saved_adapter(tmp_path / "grandchild", on=tmp_path / "child", seed=4, q_on="base", alpha_0=0.9)
    assert [level.path for level in grandchild.stack] == [str(parent_dir.resolve()), str((tmp_path / "child").resolve())]
    assert grandchild.q_networks == [("level1",), ("level1", "level2"), ("default",)]

    ids, mask = left_padded_prompts()
    for model, path in ((child, "child"), (grandchild, "grandchild")):
        loaded = QAdapterModel.from_pretrained(tmp_path / path, tiny_causal_lm()).eval()
        assert loaded.stack == model.stack and loaded.q_on == model.q_on
        model.eval()
        for got, want in zip(loaded.stack_hidden(ids, mask), model.stack_hidden(ids, mask)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        want = explicit_logprobs(loaded, ids, mask)
        _, h_eff, _ = loaded.policy_hidden(loaded.stack_hidden(ids, mask))
        got = torch.log_softmax(h_eff.double() @ loaded.lm_head_weight.double().T, dim=-1)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)
    # Only the new adapter's weights are in its directory; its provenance names its parent.
    assert not any(p.is_dir() and p.name.startswith("level") for p in (tmp_path / "child").iterdir())
    record = json.loads((tmp_path / "child" / "provenance.json").read_text())
    assert record["parent_adapter"]["path"] == str(parent_dir.resolve()) and record["parent_adapter"]["depth"] == 1

    # A level whose files changed since is refused, naming it.
    saved_adapter(parent_dir, seed=9, **PARENT)
    with pytest.raises(AdapterLoadError, match="stack level 1.*has changed"):
        QAdapterModel.from_pretrained(tmp_path / "grandchild", tiny_causal_lm())


def test_a_level_is_recorded_by_the_sha256_of_its_files_names_and_contents(tmp_path, parent_dir):
    """The recorded sha256 is of the level's weights and config, each file's name then its bytes, in that
    order: a stack saved by one version is found by another only if every version hashes alike."""
    import hashlib

    saved_adapter(tmp_path / "child", on=parent_dir, seed=2, **CHILD)
    config = json.loads((tmp_path / "child" / "qadapter_config.json").read_text())
    digest = hashlib.sha256()
    for name in ("adapter_model.safetensors", "qadapter_config.json"):
        digest.update(name.encode() + (parent_dir / name).read_bytes())
    assert config["stack"][0]["sha256"] == digest.hexdigest()


def test_trainer_trains_only_the_new_adapter(tmp_path, parent_dir):
    from helpers import rows, tiny_chat_tokenizer
    from qadapter.library.data import tokenize_rows
    from qadapter.library.trainer import QAdapterConfig, QAdapterTrainer

    tokenizer = tiny_chat_tokenizer()
    parent = QAdapterModel(tiny_causal_lm(vocab=len(tokenizer)), tokenizer=tokenizer, **PARENT)
    perturb(parent, seed=1)
    parent.save_pretrained(tmp_path / "p")
    args = QAdapterConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                          learning_rate=5e-3, save_strategy="no", report_to=[], use_cpu=True, seed=0, lora_dropout=0.1)
    model = QAdapterModel(tiny_causal_lm(vocab=len(tokenizer)), tokenizer=tokenizer, on=tmp_path / "p",
                          **args.model_options())
    before = {n: p.detach().clone() for n, p in model.peft_model.state_dict().items()}
    assert any(".level1." in n for n in before)  # the level's weights are there (as buffers)
    train, _ = tokenize_rows(rows(16, seed=0), tokenizer, max_length=48)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    for name, value in model.peft_model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == ("lora_B.default" in name or "lora_A.default" in name), name


def test_soft_capped_model_is_refused(tmp_path):
    saved_adapter(tmp_path / "gemma2", family="gemma2")
    with pytest.raises(ValueError, match="logit_softcap"):
        QAdapterModel(tiny_causal_lm("gemma2"), on=tmp_path / "gemma2")


@pytest.mark.parametrize("case, options, error, match", [
    ("other-base", dict(base_seed=1), AdapterLoadError, "on: stack level 1: .*another base model"),
    ("q_on", dict(q_on="top"), ValueError, "q_on must be one of"),
    ("missing", dict(on="missing"), AdapterLoadError, "on: .*missing.*no such folder"),
])
def test_bad_stacks_are_refused_by_name(parent_dir, case, options, error, match):
    options = {"on": parent_dir, **options}
    if options["on"] == "missing":
        options["on"] = parent_dir.parent / "missing"
    base_seed = options.pop("base_seed", 0)
    with pytest.raises(error, match=match):
        QAdapterModel(tiny_causal_lm(seed=base_seed), **options)


def test_saving_over_a_level_is_refused(parent_dir):
    model = QAdapterModel(tiny_causal_lm(), on=parent_dir)
    with pytest.raises(ValueError, match="holds stack level 1"):
        model.save_pretrained(parent_dir)


@pytest.mark.parametrize("q_on", ["parent", "base"])
def test_generation_of_a_stack_is_greedy_decoding_of_the_explicit_combination(tmp_path, parent_dir, q_on):
    """Greedy tokens of the stack's policy (one forward over the frozen, parent and child blocks, KV
    cached) equal a loop that re-runs the explicit level-by-level combination of full logits."""
    model = QAdapterModel(tiny_causal_lm(), on=parent_dir, q_on=q_on, **CHILD).eval()
    perturb(model, seed=5)
    ids, mask = left_padded_prompts()
    out = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], compiled=False)
    want, want_mask = ids, mask
    for _ in range(8):
        position = (want_mask.cumsum(-1) - 1).clamp(min=0)
        logp = explicit_logprobs(model, want, want_mask, position_ids=position)[:, -1]
        want = torch.cat([want, logp.argmax(-1, keepdim=True)], dim=1)
        want_mask = torch.cat([want_mask, torch.ones_like(want_mask[:, :1])], dim=1)
    assert torch.equal(out, want)
    # The policy's log-probs of a step are the explicit ones.
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model.policy(input_ids=ids, attention_mask=mask, position_ids=position, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(got.double(), explicit_logprobs(model, ids, mask, position_ids=position)[:, -1],
                               rtol=0, atol=1e-5)


def test_command_line_trains_evaluates_and_generates_a_stack(tmp_path, capsys):
    from helpers import save_tiny_base
    from qadapter.cli import main

    save_tiny_base(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"})
                            + "\n" for i in range(6)))
    common = ["--data", str(data), "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true",
              "--save_strategy", "no"]
    assert main(["train", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "parent"), *common]) == 0
    # --model defaults to the base the parent names.
    assert main(["train", "--on", str(tmp_path / "parent"), "--q-on", "base", "--alpha_0", "0.5",
                 "--output", str(tmp_path / "child"), *common]) == 0
    config = json.loads((tmp_path / "child" / "qadapter_config.json").read_text())
    assert config["q_on"] == "base" and config["loss"]["alpha_0"] == 0.5
    assert config["stack"][0]["path"] == str((tmp_path / "parent").resolve())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "child"), "--data", str(data)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairs"] == 6 and metrics["kl_to_base"] > 0 and 0 <= metrics["step0"]["accuracy"] <= 1
    assert main(["info", str(tmp_path / "child")]) == 0
    out = capsys.readouterr().out
    assert f"parent adapter: {(tmp_path / 'parent').resolve()} (stack depth 1, sha256 " in out
    assert f"stack level 1: {(tmp_path / 'parent').resolve()} (alpha_0 " in out
    assert main(["generate", "--adapter", str(tmp_path / "child"), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    with pytest.raises(SystemExit) as info:
        main(["train", "--q-on", "base", "--output", str(tmp_path / "x"), *common])
    assert info.value.code == 2 and "--q-on applies with --on" in capsys.readouterr().err


@pytest.mark.parametrize("q_on", ["parent", "base"])
def test_evaluation_of_a_stack_gives_the_explicit_numbers(parent_dir, q_on):
    """evaluate_pairs' loss is the training loss; its KL is KL(pi~2 || pi1) from the explicit full
    logits; its step-0 numbers are those of a fresh adapter on the same stack."""
    from qadapter.evaluation.measures import evaluate_pairs
    from qadapter.library.data import IGNORE_INDEX, PreferenceCollator

    g = torch.Generator().manual_seed(7)
    features = []
    for _ in range(5):
        prompt, chosen, rejected = (torch.randint(3, 97, (int(n),), generator=g).tolist()
                                    for n in torch.randint(2, 9, (3,), generator=g))
        features.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen,
                         "rejected_input_ids": prompt + rejected,
                         "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected})
    model = QAdapterModel(tiny_causal_lm(), on=parent_dir, q_on=q_on, **CHILD).eval()
    fresh = QAdapterModel(tiny_causal_lm(), on=parent_dir, q_on=q_on, **CHILD).eval()
    perturb(model, seed=6)
    got = evaluate_pairs(model, features, 0, kl=True, step0=True)

    batch = PreferenceCollator(pad_token_id=0)(features)
    with torch.no_grad():
        for result, which in ((got, model), (got["step0"], fresh)):
            out = which(**batch)
            assert result["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
            assert result["accuracy"] == (out.chosen_rewards > out.rejected_rewards).float().mean().item()
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    logp = explicit_logprobs(model, batch["input_ids"], batch["attention_mask"])[:, :-1][scored]
    base = torch.log_softmax(network_logits(model, (), batch["input_ids"], batch["attention_mask"]), dim=-1)
    kl = (logp.exp() * (logp - base[:, :-1][scored])).sum(-1).mean().item()
    assert got["kl_to_base"] == pytest.approx(kl, rel=1e-4)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("stack"), "'stack' must be a non-empty list exactly when format_version is 2"),
    (lambda c: c["stack"][0].pop("sha256"), "a stack level must be an object with path, sha256"),
    (lambda c: c.update(q_on="top"), "q_on must be one of"),
    (lambda c: c["stack"][0].update(q_on="sideways"), "a stack level.s q_on must be one of"),
    (lambda c: c["stack"][0].update(alpha_tilde=0), "a stack level.s alpha_tilde"),
    (lambda c: c["stack"][0].update(relative_path=3), "a stack level.s relative_path must be a string or null"),
])
def test_a_damaged_stack_record_is_refused_before_loading(tmp_path, parent_dir, edit, match):
    saved_adapter(tmp_path / "child", on=parent_dir, seed=2)
    file = tmp_path / "child" / "qadapter_config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=match):
        QAdapterModel.from_pretrained(tmp_path / "child", tiny_causal_lm())


def test_compiled_generation_of_a_stack_matches_eager(parent_dir):
    """The static cache and compiled step (the default on CUDA) decode a stack as eager decoding does."""
    model = QAdapterModel(tiny_causal_lm(), on=parent_dir, **CHILD).eval()
    perturb(model, seed=5)
    ids, mask = left_padded_prompts()
    eager = model.generate(ids, mask, max_new_tokens=5, eos_token_id=[], compiled=False)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5, eos_token_id=[], compiled=True), eager)


def test_an_adapter_set_serves_stacks_beside_single_adapters(tmp_path):
    """Stacks (two levels, and three with a ``q_on="base"`` top) in a mixed batch with their own
    parent and the base: each row's next-token log-probs, its echoed prompt's and its greedy decoding
    are its own model's (the explicit level-by-level formula; ``generate`` of the stack alone)."""
    from qadapter.library.adapter_set import AdapterSet
    from transformers import DynamicCache

    saved_stack(tmp_path)
    paths = {"one": tmp_path / "level1", "two": tmp_path / "level2", "three.v3": tmp_path / "level3"}
    adapter_set = AdapterSet.from_pretrained(paths, tiny_causal_lm())
    assert [adapter_set.depth(n) for n in (None, "one", "two", "three.v3")] == [0, 1, 2, 3]
    assert len(adapter_set.loras) == 3  # the three LoRAs, each once: a stack shares its served parents
    solo = {name: QAdapterModel.from_pretrained(path, tiny_causal_lm()).eval() for name, path in paths.items()}
    ids, mask = left_padded_prompts(lengths=(7, 4, 9, 5, 6))
    names = ["three.v3", None, "two", "one", "two"]
    logprobs, scores = adapter_set.read_prompts(ids, mask, names, DynamicCache(), top=[2, None, 1, None, 3])
    for row, name in enumerate(names):
        real = mask[row].bool()
        one = (ids[row:row + 1, real], mask[row:row + 1, real])
        if name is None:
            want = torch.log_softmax(tiny_causal_lm()(input_ids=one[0]).logits.double(), -1)[0]
        else:
            want = explicit_logprobs(solo[name], *one)[0]
        torch.testing.assert_close(logprobs[row].double().log_softmax(-1), want[-1], rtol=1e-5, atol=1e-5,
                                   msg=f"row {row} ({name})")  # a base row's scores are its logits
        if scores[row] is not None:
            taken = want[:-1].gather(1, one[0][0, 1:, None])[:, 0]
            torch.testing.assert_close(scores[row].combined.double(), taken, rtol=1e-5, atol=1e-5)
    # Greedy decoding of the mixed batch: each row as its stack decodes alone.
    out = adapter_set.generate(ids, mask, adapters=names, max_new_tokens=4, eos_token_id=[], do_sample=False)
    for row, name in enumerate(names):
        if name is None:
            continue
        real = mask[row].bool()
        alone = solo[name].generate(ids[row:row + 1, real], mask[row:row + 1, real], max_new_tokens=4, eos_token_id=[],
                                    do_sample=False)
        assert out[row, ids.shape[1]:].tolist() == alone[0, real.sum():].tolist(), f"row {row} ({name})"
    # Beam search: each prompt row's frozen row and level rows (none to three) move together.
    beams = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=1, num_beams=4)
    assert torch.equal(adapter_set.generate(ids, mask, adapters=names, compiled=False, **beams),
                       adapter_set.generate(ids, mask, adapters=names, compiled=False, use_cache=False, **beams))
    adapter_set.unload("three.v3")  # level 3 goes; levels 1 and 2 stay, "two" runs them
    assert adapter_set.names == ["one", "two"] and len(adapter_set.loras) == 2
    after = adapter_set.read_prompts(ids, mask, ["one", None, "two", "one", "two"], DynamicCache(), top=[None] * 5)[0]
    torch.testing.assert_close(after[1:], logprobs[1:], rtol=1e-5, atol=1e-5)


def saved_stack(folder):
    """level1, level2 on it and level3 on that, side by side in ``folder`` (as README's example makes them)."""
    saved_adapter(folder / "level1", **PARENT)
    saved_adapter(folder / "level2", on=folder / "level1", seed=2, **CHILD)
    saved_adapter(folder / "level3", on=folder / "level2", seed=4, q_on="base", alpha_0=0.9)


def stack_outputs(path):
    model = QAdapterModel.from_pretrained(path, tiny_causal_lm()).eval()
    ids, mask = left_padded_prompts()
    return model, model.stack_hidden(ids, mask)


def assert_same_outputs(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_stack_moved_as_a_whole_loads_from_its_new_place(tmp_path):
    """Each level is recorded relative to the adapter on it too (the staging directory of a save is
    not what it is relative to); a moved stack finds its levels there, the inherited ones as well."""
    saved_stack(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "level3" / "qadapter_config.json").read_text())
    assert [level["relative_path"] for level in config["stack"]] == ["../level1", "../level2"]
    _, want = stack_outputs(tmp_path / "a" / "level3")
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved, got = stack_outputs(tmp_path / "b" / "level3")
    assert [level.path for level in moved.stack] == [str((tmp_path / "b" / n).resolve()) for n in ("level1", "level2")]
    assert_same_outputs(got, want)
    # A save of it records where the levels are now; saving over one of them is refused there.
    moved.save_pretrained(tmp_path / "elsewhere" / "level3")
    config = json.loads((tmp_path / "elsewhere" / "level3" / "qadapter_config.json").read_text())
    assert [level["path"] for level in config["stack"]] == [level.path for level in moved.stack]
    assert config["stack"][0]["relative_path"] == "../../b/level1"
    with pytest.raises(ValueError, match="holds stack level 2"):
        moved.save_pretrained(tmp_path / "b" / "level2")
    # A new level on the moved stack finds the levels its parent records, relative to the parent.
    on_moved = QAdapterModel(tiny_causal_lm(), on=tmp_path / "b" / "level3")
    assert [level.path for level in on_moved.stack] == [str((tmp_path / "b" / n).resolve())
                                                         for n in ("level1", "level2", "level3")]


def test_a_stack_saved_on_windows_loads_moved_elsewhere(tmp_path):
    """Windows' relative paths are joined with "\\", which names no folder on Linux or macOS: a stack
    trained on Windows and copied to a server did not find its levels there. Each is read with "/"."""
    saved_stack(tmp_path / "a")
    _, want = stack_outputs(tmp_path / "a" / "level3")
    config_file = tmp_path / "a" / "level3" / "qadapter_config.json"
    config = json.loads(config_file.read_text())
    for level in config["stack"]:
        level["relative_path"] = level["relative_path"].replace("/", "\\")  # as os.path.relpath writes it there
    config_file.write_text(json.dumps(config))
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved, got = stack_outputs(tmp_path / "b" / "level3")
    assert [level.path for level in moved.stack] == [str((tmp_path / "b" / n).resolve()) for n in ("level1", "level2")]
    assert_same_outputs(got, want)


def test_train_on_a_moved_stack_refuses_an_output_of_its_levels_before_loading(tmp_path, capsys):
    """`qadapter train --on` checks --output against the levels where the moved stack has them, before
    anything loads (the --model given does not exist)."""
    from qadapter.cli import main

    saved_stack(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["train", "--on", str(tmp_path / "b" / "level3"), "--output", str(tmp_path / "b" / "level1"),
              "--data", str(data), "--model", str(tmp_path / "no-model")])
    assert info.value.code == 2 and "holds an adapter the new one is trained on" in capsys.readouterr().err


def test_info_says_where_each_level_is_and_what_loading_would_refuse(tmp_path, capsys):
    """`qadapter info` on a stacked adapter: its Q network, each level where loading would find it (a
    moved stack: at its new place) with its combination, the parent in words, and a level gone or
    changed named as a problem."""
    from qadapter.cli import main

    saved_stack(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "b" / "level3")]) == 0
    out = capsys.readouterr().out
    assert f"stack level 1: {(tmp_path / 'b' / 'level1').resolve()} (alpha_0 0.3, alpha~ 0.7, q_on None)\n" in out
    assert f"stack level 2: {(tmp_path / 'b' / 'level2').resolve()} (alpha_0 0.6, alpha~ 1.3, q_on parent)\n" in out
    assert "q_on: base (the Q network: the base's plus this level's LoRA)\n" in out
    assert "parent adapter: " in out and "(stack depth 2, sha256 " in out
    saved_adapter(tmp_path / "b" / "level1", seed=9, **PARENT)  # level 1 changes under the stack
    shutil.rmtree(tmp_path / "b" / "level2")
    assert main(["info", "--json", str(tmp_path / "b" / "level3")]) == 0
    levels = json.loads(capsys.readouterr().out)["stack_levels"]
    assert levels[0]["found_at"] == str((tmp_path / "b" / "level1").resolve())
    assert "has changed since" in levels[0]["problem"]
    assert levels[1]["found_at"] is None and "no adapter at" in levels[1]["problem"]


def test_a_copied_stack_uses_its_own_levels_not_the_originals(tmp_path):
    saved_stack(tmp_path / "a")
    _, want = stack_outputs(tmp_path / "a" / "level3")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    saved_adapter(tmp_path / "a" / "level1", seed=9, **PARENT)  # the original changes; the copy does not
    with pytest.raises(AdapterLoadError, match="stack level 1.*has changed"):
        QAdapterModel.from_pretrained(tmp_path / "a" / "level3", tiny_causal_lm())
    copy, got = stack_outputs(tmp_path / "b" / "level3")
    assert copy.stack[0].path == str((tmp_path / "b" / "level1").resolve())
    assert_same_outputs(got, want)
    # What is found first must still be the level recorded: a changed copy is refused, not passed over,
    # and where the level's recorded path holds it as trained, the refusal says so.
    saved_adapter(tmp_path / "b" / "level1", seed=9, **PARENT)
    with pytest.raises(AdapterLoadError, match=f"stack level 1, the adapter in {re.escape(str(tmp_path / 'b'))}.*has changed"):
        QAdapterModel.from_pretrained(tmp_path / "b" / "level3", tiny_causal_lm())
    saved_adapter(tmp_path / "a" / "level1", **PARENT)  # the original as it was trained
    recorded = re.escape(str((tmp_path / "a" / "level1").resolve()))
    with pytest.raises(AdapterLoadError, match=f"has changed .*; its recorded path {recorded} holds it as trained"):
        QAdapterModel.from_pretrained(tmp_path / "b" / "level3", tiny_causal_lm())


def test_a_level_in_neither_place_is_refused_naming_both(tmp_path):
    saved_adapter(tmp_path / "a" / "level1", **PARENT)
    saved_adapter(tmp_path / "a" / "level2", on=tmp_path / "a" / "level1", seed=2, **CHILD)
    shutil.move(tmp_path / "a" / "level2", tmp_path / "b" / "level2")  # the child alone
    QAdapterModel.from_pretrained(tmp_path / "b" / "level2", tiny_causal_lm())  # the recorded path still holds it
    shutil.rmtree(tmp_path / "a")
    tried = (re.escape(str((tmp_path / where / "level1").resolve())) for where in ("b", "a"))
    with pytest.raises(AdapterLoadError, match=f"stack level 1: no adapter at {next(tried)} .* nor at {next(tried)} "
                                               r"\(its recorded path\): a stack's levels must be moved or copied along"):
        QAdapterModel.from_pretrained(tmp_path / "b" / "level2", tiny_causal_lm())


def test_an_adapter_set_checks_a_stacks_levels_before_loading(tmp_path):
    """``AdapterSet.check`` (what a server runs before it unloads an adapter to make room) finds a stack's
    levels as ``load`` would: a level in neither place is refused by it, with nothing loaded; a level the
    set holds already (its parent served) is shared, not looked for."""
    from qadapter.library.adapter_set import AdapterSet

    saved_adapter(tmp_path / "a" / "level1", **PARENT)
    saved_adapter(tmp_path / "a" / "level2", on=tmp_path / "a" / "level1", seed=2, **CHILD)
    shutil.copytree(tmp_path / "a" / "level1", tmp_path / "parent")
    shutil.move(tmp_path / "a" / "level2", tmp_path / "b" / "level2")
    shutil.rmtree(tmp_path / "a")
    adapter_set = AdapterSet(tiny_causal_lm())
    with pytest.raises(AdapterLoadError, match="level2: stack level 1: no adapter at"):
        adapter_set.check(tmp_path / "b" / "level2")
    assert adapter_set.names == [] and adapter_set.peft_model is None
    adapter_set.load("parent", tmp_path / "parent")  # the same files: level 1 is held now
    _, _, located = adapter_set.check(tmp_path / "b" / "level2")
    assert [where for _, where in located] == [None]
    adapter_set.load("child", tmp_path / "b" / "level2")
    assert adapter_set.depth("child") == 2 and len(adapter_set.loras) == 2


def test_an_older_record_without_relative_paths_loads(tmp_path):
    """Records saved before relative paths have the absolute one only: loaded from there as before,
    and refused naming it when it is gone."""
    saved_stack(tmp_path / "a")
    _, want = stack_outputs(tmp_path / "a" / "level3")
    file = tmp_path / "a" / "level3" / "qadapter_config.json"
    config = json.loads(file.read_text())
    for level in config["stack"]:
        del level["relative_path"]
    file.write_text(json.dumps(config))
    old, got = stack_outputs(tmp_path / "a" / "level3")
    assert [level.path for level in old.stack] == [str((tmp_path / "a" / n).resolve()) for n in ("level1", "level2")]
    assert_same_outputs(got, want)
    shutil.move(tmp_path / "a", tmp_path / "b")
    with pytest.raises(AdapterLoadError, match=f"stack level 1: no adapter at {re.escape(str((tmp_path / 'a' / 'level1').resolve()))}, "
                                               "its recorded path .an older record"):
        QAdapterModel.from_pretrained(tmp_path / "b" / "level3", tiny_causal_lm())
