"""qadapter compare: TRL's SFT and DPO trainers on the comparison's pairs against the losses' formulas,
the measures against plain loops, and the whole comparison (quick mode) reproducible from its seed."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("peft")
from helpers import default_model_available, save_tiny_base, tiny_causal_lm, tiny_chat_tokenizer  # noqa: E402
from qadapter.evaluation.measures import next_token_targets  # noqa: E402
from qadapter.experiments.compare import (  # noqa: E402
    Policy,
    format_table,
    lora_policy,
    mean_kl_to_base,
    peak_rss_growth,
    perplexity,
    qadapter_policy,
    run_compare,
    trl_dataset,
    trl_trainer,
)
from qadapter.experiments.options import CompareOptions  # noqa: E402
from qadapter.library.data import IGNORE_INDEX, PreferenceCollator  # noqa: E402


def _tiny_lora(seed=0):
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm("llama", vocab=97, seed=seed)
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))
    return peft


def _pairs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, 97, (5,), generator=g).tolist()
        chosen, rejected = (torch.randint(3, 97, (int(k),), generator=g).tolist()
                            for k in torch.randint(2, 6, (2,), generator=g))
        out.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [IGNORE_INDEX] * 5 + chosen,
                    "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE_INDEX] * 5 + rejected})
    return out


def _sequence_logprobs(model, batch):
    """Summed log-probability of each row's scored tokens, from the model's own (full) logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    taken = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (taken * (targets != IGNORE_INDEX)).sum(-1)


def test_trl_dataset_keeps_the_tokenized_pairs():
    """SFT's rows are the chosen sequences with their labels; DPO's split each pair at its prompt."""
    pytest.importorskip("datasets")
    pairs = _pairs(3)
    sft, dpo = trl_dataset("sft", pairs), trl_dataset("dpo", pairs)
    assert sft.to_list() == [{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"]} for p in pairs]
    for row, pair in zip(dpo.to_list(), pairs):
        assert len(row["prompt_ids"]) == 5
        assert row["prompt_ids"] + row["chosen_ids"] == pair["chosen_input_ids"]
        assert row["prompt_ids"] + row["rejected_ids"] == pair["rejected_input_ids"]
    bad = dict(pairs[0], rejected_input_ids=[1] + pairs[0]["rejected_input_ids"][1:])
    with pytest.raises(ValueError, match="do not start with the same prompt"):
        trl_dataset("dpo", [bad])


def _trl_trainer(method, tmp_path, beta=0.1):
    pytest.importorskip("trl")
    tokenizer = tiny_chat_tokenizer()
    options = CompareOptions(pairs_per_step=3, lora_r=4, dpo_beta=beta)
    trainer = trl_trainer(method, options, 2, _pairs(), tmp_path, tiny_causal_lm("llama", vocab=len(tokenizer)),
                          tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


def _perturb_adapter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_trl_baselines_run_without_checkpointing_and_no_deprecated_argument(method, tmp_path):
    """The baselines turn TRL's default gradient checkpointing off by the name this transformers takes
    (activation_checkpointing since 5.23, gradient_checkpointing before): no deprecation warning of
    ours (PEFT's own read of transformers' renamed property aside)."""
    import warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        trainer, _ = _trl_trainer(method, tmp_path)
    ours = [str(w.message) for w in shown if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and "is_gradient_checkpointing" not in str(w.message)]
    assert ours == []
    assert trainer.args.gradient_checkpointing is False
    assert getattr(trainer.args, "activation_checkpointing", False) is False


def test_checkpointing_is_turned_off_by_the_old_name_before_transformers_5_23(monkeypatch):
    """transformers before 5.23 has no activation_checkpointing field (an unknown argument there)."""
    import dataclasses

    from qadapter.experiments import compare

    monkeypatch.setattr(compare, "fields", lambda cls: [f for f in dataclasses.fields(cls)
                                                       if f.name != "activation_checkpointing"])
    assert compare.checkpointing_off() == {"gradient_checkpointing": False}


def test_trl_dpo_is_the_papers_loss_against_the_base(tmp_path):
    """TRL's DPO on the pairs: log 2 for the untrained adapter (the policy is its reference); with a
    trained-looking adapter, -log sigmoid(beta * ((pc - rc) - (pr - rr))) over the pairs, the reference
    the base (the adapter disabled: no second adapter), the scored tokens the responses'."""
    beta = 0.3
    trainer, batch = _trl_trainer("dpo", tmp_path, beta)
    model = trainer.model
    assert list(model.peft_config) == ["default"]
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        assert float(trainer.compute_loss(model, batch)) == pytest.approx(math.log(2), abs=1e-6)
    _perturb_adapter(model)
    pairs = PreferenceCollator(pad_token_id=0)(_pairs())  # the same pairs, stacked by qadapter's own collator
    assert trainer.train_dataset.to_list() == trl_dataset("dpo", _pairs()).to_list()  # taken as tokenized
    with torch.no_grad():
        policy = _sequence_logprobs(model, pairs)
        with model.disable_adapter():
            reference = _sequence_logprobs(model, pairs)
    margins = (policy[:3] - reference[:3]) - (policy[3:] - reference[3:])
    assert margins.abs().max() > 0.1  # the adapter matters
    # The loss is the mean over pairs: the batch's order (the loader shuffles) does not change it.
    expected = -torch.nn.functional.logsigmoid(beta * margins).mean()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), expected, rtol=1e-5, atol=1e-6)


def test_trl_sft_is_the_chosen_responses_mean_nll(tmp_path):
    """TRL's SFT on the pairs: the mean negative log-likelihood of the chosen responses' tokens (the
    prompt and the rejected responses not scored)."""
    trainer, batch = _trl_trainer("sft", tmp_path)
    model = trainer.model
    model.eval()
    _perturb_adapter(model)
    assert batch["input_ids"].shape[0] == 3
    chosen = PreferenceCollator(pad_token_id=0)(_pairs())
    with torch.no_grad():
        nll = -_sequence_logprobs(model, chosen)[:3].sum()
        scored = sum(len(p["chosen_input_ids"]) - 5 for p in _pairs())
        torch.testing.assert_close(trainer.compute_loss(model, batch), nll / scored, rtol=1e-5, atol=1e-6)


def test_dpo_margins_are_the_implicit_reward():
    """DPO's own reward is beta times the policy's likelihood margin minus the reference's (TRL's
    rewards/margins)."""
    tokenizer = tiny_chat_tokenizer()
    peft = _tiny_lora()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.eval()
    base = lora_policy("base", peft, tokenizer, adapter=False)
    sft = lora_policy("sft", peft, tokenizer, adapter=True)
    dpo = lora_policy("dpo", peft, tokenizer, adapter=True, reference=base, beta=0.1)
    pairs = _pairs(4, seed=2)
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    with torch.no_grad():
        policy = _sequence_logprobs(peft, batch)
        with peft.disable_adapter():
            reference = _sequence_logprobs(peft, batch)
    torch.testing.assert_close(sft.margins(pairs), policy[:4] - policy[4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpo.margins(pairs), 0.1 * ((policy[:4] - reference[:4]) - (policy[4:] - reference[4:])),
                               rtol=1e-5, atol=1e-6)


def _table(seed: int, vocab: int) -> torch.Tensor:
    """Next-token log-probs that depend on the current token only: ``table[token]`` (no model)."""
    return torch.log_softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2, -1)


def _fixed_policy(seed: int, vocab: int, base_seed: int) -> Policy:
    """A policy whose next-token distribution is ``_table(seed)[token]``, its base's ``_table(base_seed)``."""
    table, base = _table(seed, vocab), _table(base_seed, vocab)

    def target_logprobs(ids, mask, position_ids, targets):
        return table[ids[targets.rows, targets.positions], targets.ids]

    def kl_to_base(ids, mask):
        return (table[ids].exp() * (table[ids] - base[ids])).sum(-1)

    return Policy(f"fixed{seed}", target_logprobs, kl_to_base, lambda qs, n: ["" for _ in qs],
                  lambda f: torch.zeros(len(f)))


def test_qadapter_policy_scores_packed_probe_rows_as_single_rows():
    """The combined policy's log-probs of packed probe rows (each prompt once) are those of padded rows."""
    from qadapter.evaluation.knowledge import candidates, option_scores
    from qadapter.library.model import QAdapterModel

    tokenizer = tiny_chat_tokenizer()
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer, lora_r=4,
                          alpha_tilde=0.7, alpha_0=0.3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # an adapter that differs from the base
                parameter.copy_(torch.randn(parameter.shape, generator=g))
    model.eval()  # no LoRA dropout
    policy = qadapter_policy(model, tokenizer)
    items = candidates(0)[:8]
    one = option_scores(policy.target_logprobs, tokenizer, items)
    model.padding_free = False  # each option's row padded, its prompt run once per option
    torch.testing.assert_close(torch.tensor(option_scores(policy.target_logprobs, tokenizer, items)),
                               torch.tensor(one), rtol=1e-5, atol=1e-5)
    model.padding_free = True
    base = lora_policy("base", model.peft_model, tokenizer, adapter=False)
    assert not torch.allclose(torch.tensor(option_scores(base.target_logprobs, tokenizer, items)), torch.tensor(one))


def test_a_soft_capped_qadapter_policy_is_the_models_own_distribution():
    """On Gemma-2 (its logits capped by its own forward), an untrained Q-Adapter with alpha_0 = 0 and
    alpha~ = 1 is the base: its log-probs, margins and KL are those of the model's capped logits."""
    from qadapter.library.model import QAdapterModel

    tokenizer = tiny_chat_tokenizer()
    base_model = tiny_causal_lm("gemma2", vocab=len(tokenizer))
    with torch.no_grad():
        base_model.get_output_embeddings().weight.mul_(40.0)  # uncapped logits several times the cap
    model = QAdapterModel(base_model, tokenizer=tokenizer, alpha_tilde=1.0, alpha_0=0.0)
    model.eval()
    policy, base = qadapter_policy(model, tokenizer), lora_policy("base", model.peft_model, tokenizer, adapter=False)
    ids = torch.tensor([tokenizer("the capital of France is Paris")["input_ids"]])
    mask, targets = torch.ones_like(ids), next_token_targets(ids)
    with torch.no_grad():
        own = torch.log_softmax(base_model(input_ids=ids).logits.float(), -1)  # Gemma-2 caps in its forward
    expected = own[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(policy.target_logprobs(ids, mask, None, targets), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.target_logprobs(ids, mask, None, targets), expected[0], rtol=1e-5, atol=1e-5)
    assert mean_kl_to_base(policy, tokenizer, ["hello world"], ["Paris"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_lora_policys_measures_are_its_own_logits(family):
    """Log-probs and KL to the base of a LoRA-tuned model equal those of its own forward's logits
    (Gemma-2's capped by its forward), with no [B, T, V] tensor formed by the measures."""
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_chat_tokenizer()
    base_model = tiny_causal_lm(family, vocab=len(tokenizer))
    with torch.no_grad():
        base_model.get_output_embeddings().weight.mul_(40.0 if family == "gemma2" else 1.0)
    peft = get_peft_model(base_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    peft.eval()
    policy = lora_policy("sft", peft, tokenizer, adapter=True)
    ids = torch.tensor([tokenizer("the capital of France is Paris")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        tuned = torch.log_softmax(peft(input_ids=ids).logits.float(), -1)
        with peft.disable_adapter():
            frozen = torch.log_softmax(peft(input_ids=ids).logits.float(), -1)
    got = policy.target_logprobs(ids, mask, None, next_token_targets(ids))
    torch.testing.assert_close(got, tuned[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)
    kl = (tuned.exp() * (tuned - frozen)).sum(-1)
    assert float(kl.mean()) > 1e-3  # the adapter moved the policy
    torch.testing.assert_close(policy.kl_to_base(ids, mask), kl, rtol=1e-4, atol=1e-5)


def test_kl_and_perplexity_against_plain_loops():
    tokenizer = tiny_chat_tokenizer()
    vocab = len(tokenizer)
    policy, table, base = _fixed_policy(1, vocab, 2), _table(1, vocab), _table(2, vocab)
    prompts, responses = ["hello world", "the capital"], ["Paris is the capital", "hello"]
    assert mean_kl_to_base(_fixed_policy(2, vocab, 2), tokenizer, prompts, responses) == pytest.approx(0.0, abs=1e-7)
    total, count = 0.0, 0
    from qadapter.evaluation.measures import chat_prompts

    for prompt, response in zip(chat_prompts(tokenizer, prompts), responses):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = p + r
        for t in range(len(p) - 1, len(ids) - 1):
            lp, lb = table[ids[t]], base[ids[t]]
            total += float((lp.exp() * (lp - lb)).sum())
            count += 1
    assert mean_kl_to_base(policy, tokenizer, prompts, responses) == pytest.approx(total / count, rel=1e-5)

    passages = ["the capital of France is Paris", "hello world"]
    nll, n = 0.0, 0
    for text in passages:
        ids = tokenizer(text)["input_ids"]
        for t in range(1, len(ids)):
            nll -= float(table[ids[t - 1], ids[t]])
            n += 1
    assert perplexity(policy.target_logprobs, tokenizer, passages) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_methods_and_their_learning_rates():
    options = CompareOptions(methods="dpo, qadapter", learning_rate=1e-3, dpo_learning_rate=1e-4)
    assert options.method_list() == ["dpo", "qadapter"]
    assert [options.method_learning_rate(m) for m in ("sft", "dpo", "qadapter")] == [1e-3, 1e-4, 1e-3]
    assert CompareOptions(learning_rate=1e-3).method_learning_rate("dpo") == 1e-3
    for bad in ("", "ppo", "sft,ppo"):
        with pytest.raises(ValueError, match="methods must be a comma-separated subset of sft,dpo,qadapter"):
            CompareOptions(methods=bad).method_list()


def test_sft_and_dpo_need_trl(monkeypatch, tmp_path):
    """Without TRL, SFT and DPO are refused before any work, with the extra to install."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"qadapter-kernels\[trl\]"):
        run_compare(CompareOptions(output=str(tmp_path), methods="qadapter,dpo", quick=True))
    assert not (tmp_path / "compare.json").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc")
def test_training_memory_counts_what_an_earlier_method_freed():
    """A method that trains after another grows into the memory the first freed, which glibc keeps
    resident: its growth is still its own (it read 0 for the later method of a comparison)."""
    def allocate():  # about 190 MB in blocks small enough for malloc's heap, not mmap
        return [torch.ones(16_000) for _ in range(3000)]

    blocks = allocate()
    live = torch.ones(10)  # allocated after the blocks: the heap cannot shrink past it
    del blocks
    with peak_rss_growth() as memory:
        blocks = allocate()
    assert memory["mb"] > 100, memory
    del blocks, live


def test_budgets_are_checked():
    assert CompareOptions(budgets="40, 160").budget_steps() == [40, 160]
    for bad in ("", "0", "forty", "10,-1"):
        with pytest.raises(ValueError, match="budgets must be positive step counts"):
            CompareOptions(budgets=bad).budget_steps()


def test_the_prompt_budget_defaults_to_the_tasks_or_half_of_max_length():
    """The built-in task keeps 64 prompt tokens (long prompts, short answers); other data keeps half
    of --max-length, as train and eval do, so a longer --max-length is not spent on answers alone."""
    assert CompareOptions().prompt_length() == 64
    assert CompareOptions(max_length=48).prompt_length() == 24
    assert CompareOptions(data="pairs.jsonl", max_length=512).prompt_length() == 256
    assert CompareOptions(data="pairs.jsonl", max_length=512, max_prompt_length=100).prompt_length() == 100
    CompareOptions(data="pairs.jsonl", max_length=48).check()
    with pytest.raises(ValueError, match=r"max_prompt_length \(64\) must be below max_length \(48\)"):
        CompareOptions(max_length=48, max_prompt_length=64).check()


def test_malformed_data_rows_raise_unless_skip_invalid(tmp_path):
    """As in train: a malformed row of --data fails naming the row, before any model loads; with
    --skip-invalid it is skipped and counted in the report's data summary."""
    from qadapter.experiments.compare import _rows, _suite

    good = [{"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"} for i in range(6)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*good[:3], {"prompt": "a", "chosen": "b"}, *good[3:]]) + "\n")
    with pytest.raises(ValueError, match=r"preference row 3 \(line 4 of .*\): missing key 'rejected'"):
        run_compare(CompareOptions(data=str(path), heldout=2, methods="qadapter", output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    options = CompareOptions(data=str(path), heldout=2, skip_invalid=True)
    train, suite = _suite(options, tiny_chat_tokenizer(), _rows(options))
    assert len(train) == 4 and len(suite["heldout_features"]) == 2
    assert suite["data"]["train"]["skipped"] == {"missing key 'rejected'": 1}


@pytest.mark.skipif(not default_model_available(), reason="the embedded default model is not installed")
def test_quick_comparison_runs_and_is_reproducible(tmp_path):
    """Every method trains and is measured; the same seed gives the same table (times and memory aside)."""
    pytest.importorskip("trl")
    reports = []
    for run in ("a", "b"):
        reports.append(run_compare(CompareOptions(output=str(tmp_path / run), quick=True, alpha_0=0.5, alpha_tilde=1.5)))
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (tmp_path / "a" / name).is_file()
    rows = reports[0]["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("base", 0), ("sft", 2), ("dpo", 2), ("qadapter", 2)]
    assert rows[0]["general_kl_to_base"] == 0.0
    assert (rows[3]["alpha_0"], rows[3]["alpha_tilde"]) == (0.5, 1.5) and "alpha_0" not in rows[1]
    assert all(0 <= r["probe_loglik_accuracy"] <= 1 and r["general_perplexity"] > 1 for r in rows)

    def numbers(report):
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "train_memory_mb")} for r in report["rows"]]

    assert numbers(reports[0]) == numbers(reports[1])
    saved = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert numbers(saved) == json.loads(json.dumps(numbers(reports[0])))
    table = format_table(reports[0])
    assert "| Q-Adapter | 2 |" in table and "| base | 0 |" in table and "| alpha~ |" in table


def test_a_quantized_comparison_trains_every_method_on_the_4bit_base(tmp_path, monkeypatch):
    """``qadapter compare --load-in-4bit`` (``quantization="4bit"``): the base policy and every method's
    base load NF4 and the LoRA weights stay float32 (TRL would make SFT's and DPO's bf16), then the
    quick comparison measures every policy."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    from qadapter.experiments import compare
    from qadapter.library.quantization import model_quantization

    save_tiny_base(tmp_path / "base", hidden=64)  # bitsandbytes' CPU 4-bit kernels: inputs in blocks of 64
    trained, train_method = {}, compare.train_method

    def recording(method, *args):
        model, seconds, memory = train_method(method, *args)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        trained[method] = model_quantization(getattr(model, "peft_model", model)), {p.dtype for p in lora}, all(p.requires_grad for p in lora)
        return model, seconds, memory

    monkeypatch.setattr(compare, "train_method", recording)
    report = run_compare(CompareOptions(model=str(tmp_path / "base"), quantization="4bit", quick=True, lora_r=4,
                                        output=str(tmp_path / "out")))
    nf4 = {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert report["quantization"] == nf4 and report["model"] == str(tmp_path / "base")
    assert trained == {method: (nf4, {torch.float32}, True) for method in ("sft", "dpo", "qadapter")}
    assert [(r["method"], r["steps"]) for r in report["rows"]] == [("base", 0), ("sft", 2), ("dpo", 2), ("qadapter", 2)]
    assert all(0 <= r["heldout_accuracy"] <= 1 and math.isfinite(r["general_perplexity"]) for r in report["rows"])


def test_the_tasks_rule_and_the_pairs_made_for_it():
    """The TL;DR rule reads the first non-blank line only, and wants a summary of 3 characters or more
    after the marker; a chosen response is its rejected one with the first sentence (whitespace
    folded) set apart as that line, so the shipped pairs differ in the rule alone."""
    from qadapter.experiments.task import follows_rule, load_task, make_chosen, probe_correct, whole_sentences

    assert follows_rule("TL;DR: Blue light scatters.\n\nMore.") and follows_rule("  \n TL;DR: yes\nrest")
    for broken in ("TL;DR: ok", "TL;DR:\nThe sky is blue.", "tl;dr: The sky is blue.", "The sky. TL;DR: blue."):
        assert not follows_rule(broken), broken
    # The first sentence ends at the first whitespace after '.', '!' or '?' (not at the line break).
    assert make_chosen("The sky is   blue because of\nscattering. Short waves scatter more!  Red less.") == \
        "TL;DR: The sky is blue because of scattering.\n\nShort waves scatter more!  Red less."
    assert make_chosen(" Yes. ") == "TL;DR: Yes."
    # An answer cut at the token limit keeps its whole sentences, each with its full stop.
    assert whole_sentences("It rains. Then it sto") == "It rains."
    assert whole_sentences("One.\nTwo and") == "One."
    assert whole_sentences(" It rains! ") == "It rains!" and whole_sentences("no end at all") == "no end at all"
    assert probe_correct("The answer is Paris.", ["paris"]) and probe_correct("TWELVE", ["12", "twelve"])
    assert not probe_correct("London", ["paris"])
    task = load_task()
    for row in task["train"] + task["heldout"]:
        assert row["chosen"] == make_chosen(row["rejected"]) and whole_sentences(row["rejected"]) == row["rejected"]
        assert follows_rule(row["chosen"]) and not follows_rule(row["rejected"]), row["prompt"]


def test_the_second_preferences_bullets_and_its_pairs():
    """After the opening line, the next non-empty line is a '- ' item saying something; the pairs set
    an answer's later sentences as items, and leave out an answer of one sentence."""
    from qadapter.experiments.task import bullet_pairs, follows_bullets, make_bulleted, sentences

    assert sentences("TL;DR: A b.\n\n- C d. E f!\n") == ["TL;DR: A b.", "C d.", "E f!"]
    assert make_bulleted("First one. Second one! Third?") == "First one.\n\n- Second one!\n- Third?"
    assert follows_bullets("First one.\n\n- Second one!") and follows_bullets("First.\n- ab")
    for broken in ("First.\n\nSecond.", "First.\n- a", "First.\n-", "- First only."):
        assert not follows_bullets(broken), broken
    rows = [{"prompt": "p", "chosen": "TL;DR: One.\n\nTwo. Three.", "rejected": "One. Two. Three."},
            {"prompt": "q", "chosen": "TL;DR: Only.", "rejected": "Only."}]
    assert bullet_pairs(rows) == [{"prompt": "p", "chosen": "TL;DR: One.\n\n- Two.\n- Three.",
                                   "rejected": "TL;DR: One.\n\nTwo. Three."}]
    assert bullet_pairs(rows, "rejected") == [{"prompt": "p", "chosen": "One.\n\n- Two.\n- Three.",
                                               "rejected": "One. Two. Three."}]


def test_the_comparison_table_has_a_column_per_measure_some_row_holds():
    """format_table: the columns of the measures some row has (in COLUMNS' order), '-' where a row has
    none (the base trains with no learning rate), each number in its column's format."""
    rows = [{"method": "base", "steps": 0, "heldout_accuracy": 0.25, "general_kl_to_base": 0.0},
            {"method": "qadapter", "steps": 40, "learning_rate": 3e-4, "heldout_accuracy": 0.8125,
             "general_kl_to_base": 0.01234, "train_seconds": 61.6}]
    report = {"rows": rows, "train_pairs": 93, "heldout_pairs": 20, "probe_questions": 26, "general_prompts": 8,
              "device": "cpu", "threads": 2, "total_seconds": 150, "complete": False}
    lines = format_table(report).splitlines()
    assert lines[:4] == [
        "| method | steps | learning rate | held-out pref. acc. (own reward) | KL to base / token | train s |",
        "|---|---:|---:|---:|---:|---:|",
        "| base | 0 | - | 0.250 | 0.0000 | - |",
        "| Q-Adapter | 40 | 0.0003 | 0.812 | 0.0123 | 62 |"]
    assert lines[5].startswith("93 training pairs, 20 held-out pairs, 26 probe questions, 8 general prompts; "
                               "cpu (2 threads), total 2.5 min.")
    assert lines[-1].startswith("Partial: the run stopped")
    assert "Partial" not in format_table({**report, "complete": True})
