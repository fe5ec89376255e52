"""Nothing lost: saving an adapter replaces only its own files, refuses what is not ours, and a
crash at any point leaves one whole adapter (old or new) that the next load restores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

from helpers import (  # noqa: E402
    left_padded_prompts,
    make_model,
    perturb_adapter,
    tiny_causal_lm,  # noqa: E402
)
from qadapter.library import atomic  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402


def greedy(model, steps=6):
    ids, mask = left_padded_prompts()
    return model.generate(ids, mask, max_new_tokens=steps, eos_token_id=[])


def test_save_keeps_everything_else_in_the_directory(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-5" / "optimizer.pt").write_bytes(b"optimizer state")
    make_model().save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my own model card")
    model = make_model(seed=0)
    perturb_adapter(model, seed=4)
    model.save_pretrained(out)  # again, over the first adapter
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "README.md").read_text() == "my own model card"
    assert (out / "checkpoints" / "checkpoint-5" / "optimizer.pt").read_bytes() == b"optimizer state"
    assert not list(out.glob(atomic.STAGING_PREFIX + "*"))
    assert torch.equal(greedy(QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))), greedy(model))


def test_refuses_a_file_and_a_foreign_directory(tmp_path):
    file = tmp_path / "adapter"
    file.write_text("not a directory")
    with pytest.raises(atomic.OutputDirectoryError, match="is a file"):
        make_model().save_pretrained(file)
    assert file.read_text() == "not a directory"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(atomic.OutputDirectoryError, match="holds no Q-Adapter adapter"):
        make_model().save_pretrained(foreign)
    make_model().save_pretrained(foreign, overwrite=True)  # told to: written, the photo stays
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8" and (foreign / "qadapter_config.json").is_file()


@pytest.mark.parametrize("moved_before_crash", [0, 1, 2])
def test_a_crash_between_renames_is_finished_by_the_next_load(tmp_path, monkeypatch, moved_before_crash):
    """The process dies after `moved_before_crash` of the adapter's files were renamed into place:
    the next load completes the save (the staged set was complete), so the new adapter loads."""
    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    new = make_model()
    perturb_adapter(new, seed=11)
    real_replace = atomic.os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        if calls["n"] == moved_before_crash:
            raise SystemExit("killed")
        calls["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", dying_replace)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(SystemExit):
        new.save_pretrained(out)
    monkeypatch.undo()
    assert list(out.glob(atomic.STAGING_PREFIX + "*"))  # the interrupted save is still there
    loaded = QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))
    assert torch.equal(greedy(loaded), greedy(new))
    assert not list(out.glob(atomic.STAGING_PREFIX + "*"))


def test_a_crash_while_writing_keeps_the_old_adapter(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    old = make_model()
    old.save_pretrained(out)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)

    def write_then_die(self, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"half written")
        raise SystemExit("killed")

    monkeypatch.setattr(QAdapterModel, "write_adapter", write_then_die)
    with pytest.raises(SystemExit):
        make_model(seed=3).save_pretrained(out)
    monkeypatch.undo()
    assert torch.equal(greedy(QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))), greedy(old))
    assert not list(out.glob(atomic.STAGING_PREFIX + "*"))  # the incomplete staging was dropped


def test_cli_train_refuses_a_foreign_output_before_loading_anything(tmp_path):
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("\\documentclass{article}")
    run = subprocess.run([sys.executable, "-m", "qadapter.cli", "train", "--data", str(tmp_path / "none.jsonl"),
                          "--output", str(foreign), "--model", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "holds no Q-Adapter adapter" in run.stderr, run.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "adapter_model.safetensors")
    save_file(change(dict(weights)), path / "adapter_model.safetensors")


@pytest.mark.parametrize("change, fragment", [
    (lambda w: {k: v for i, (k, v) in enumerate(sorted(w.items())) if i}, "missing ['base_model"),
    (lambda w: {**w, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.ones(8, 32)},
     "unexpected ['base_model.model.model.layers.0.mlp.up_proj"),
    (lambda w: {k.replace("q_proj", "k_proj"): v for k, v in w.items()}, "missing"),
])
def test_weights_that_contradict_the_config_are_refused(tmp_path, change, fragment):
    """Missing, extra or renamed LoRA tensors loaded with a warning and acted as the bare base model."""
    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    _rewrite_weights(out, change)
    with pytest.raises(AdapterLoadError, match="does not match its adapter config") as info:
        QAdapterModel.from_pretrained(out, tiny_causal_lm("llama"))
    assert fragment in str(info.value)


@pytest.mark.parametrize("loss, fragment", [
    ({"alpha_tilde": "x"}, "alpha_tilde must be a real number"),
    ({"backend": "fastest"}, "backend must be one of"),
    ({"chunk_size": -3}, "chunk_size must be a positive int"),
    ({"gamma": -1.0}, "gamma must be >= 0"),
])
def test_bad_saved_options_are_refused_before_the_base_loads(tmp_path, loss, fragment):
    import json

    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    config = json.loads((out / "qadapter_config.json").read_text())
    config["loss"].update(loss)
    (out / "qadapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="holds an invalid option") as info:
        QAdapterModel.from_pretrained(out, "/nonexistent/base")  # never reached: the config fails first
    assert fragment in str(info.value)


def test_a_deleted_weights_file_is_named(tmp_path):
    from qadapter.library.model import AdapterLoadError

    out = tmp_path / "adapter"
    make_model().save_pretrained(out)
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors is missing"):
        QAdapterModel.from_pretrained(out, "/nonexistent/base")


KILL_CHILD = """
from helpers import make_model, perturb_adapter
model = make_model()
for version in range(10_000):
    perturb_adapter(model, seed=version)
    model.save_pretrained({out!r})
    print(version, flush=True)
"""


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("attempt", range(5))
def test_sigkill_during_repeated_saves_leaves_a_whole_adapter(tmp_path, attempt):
    """A process saving over and over is killed (SIGKILL) at a random moment; the adapter then
    loads, and is exactly one of the versions the process was saving (never a mix)."""
    import random
    import signal
    import time
    from pathlib import Path

    out = tmp_path / "adapter"
    tests = str(Path(__file__).resolve().parents[1])  # where helpers.py is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, *sys.path])}
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD.format(out=str(out))], stdout=subprocess.PIPE,
                             text=True, env=env)
    first = child.stdout.readline()  # one whole save exists
    assert first.strip() == "0", first
    time.sleep(random.Random(attempt).uniform(0.0, 0.4))
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    last = int(([first] + child.stdout.read().split())[-1])
    loaded = _lora_b(QAdapterModel.from_pretrained(out, tiny_causal_lm("llama")))
    model = make_model()
    candidates = []
    for version in (last, last + 1):  # the last announced save, or the one that was being made
        perturb_adapter(model, seed=version)
        candidates.append(_lora_b(model))
    assert any(all(torch.equal(loaded[n], c[n]) for n in c) for c in candidates)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A tiny local base model and a preference file for ``qadapter train`` in a subprocess."""
    import json

    from helpers import save_tiny_base

    root = tmp_path_factory.mktemp("run")
    save_tiny_base(root / "base")
    rows = [{"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"} for i in range(8)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _train_command(run, output, *extra):
    return [sys.executable, "-m", "qadapter.cli", "train", "--model", str(run / "base"), "--data",
            str(run / "pairs.jsonl"), "--output", str(output), "--max_steps", "400", "--save_steps", "1",
            "--per_device_train_batch_size", "2", "--use_cpu", "true", "--save_total_limit", "3", *extra]


@pytest.mark.parametrize("attempt", range(3))
def test_sigkill_while_checkpointing_then_resume(local_run, tmp_path, attempt):
    """``qadapter train`` checkpointing every step is SIGKILLed at a random moment; every complete
    checkpoint left then loads, and ``--resume`` continues from the newest complete one to the end."""
    import os
    import random
    import signal
    import time

    from qadapter.library.trainer import latest_checkpoint

    output = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(_train_command(local_run, output), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoints = output / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("checkpoint-*")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(attempt).uniform(0.0, 1.5))
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)

    newest = latest_checkpoint(checkpoints)
    assert newest is not None
    QAdapterModel.from_pretrained(newest, str(local_run / "base"))
    step = int(newest.rsplit("-", 1)[1])
    finished = subprocess.run(_train_command(local_run, output, "--resume", "--max_steps", str(step + 2)),
                              env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert latest_checkpoint(checkpoints).endswith(f"checkpoint-{step + 2}")
    QAdapterModel.from_pretrained(output, str(local_run / "base"))


def test_resume_passes_over_a_checkpoint_cut_short(tmp_path):
    """A newest checkpoint without a readable trainer_state.json (killed while checkpointing) is
    passed over, with a warning, for the one before it; Trainer alone would resume from it and fail."""
    from qadapter.library.trainer import latest_checkpoint

    for step, state in ((2, "{}"), (10, "{}"), (12, '{"global_step": 1'), (13, None)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if state is not None:
            (path / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    with pytest.warns(UserWarning, match="checkpoint-13 is incomplete"):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert latest_checkpoint(tmp_path / "nothing-here") is None
