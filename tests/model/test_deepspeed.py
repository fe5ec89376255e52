"""DeepSpeed ZeRO-3 and ZeRO-2, on the CPU over gloo: two processes give the loss and the LoRA
gradients of one process on the joined batch, through accelerate (the building blocks on a PEFT
model) and through Trainer's ``deepspeed=`` option (QAdapterTrainer). ZeRO-3 partitions the
lm_head too; the fused loss reads it outside the head's forward, so it is gathered there, once a step.

A step's LoRA gradient is read from the step itself: plain SGD with rate 1 moves each parameter by
minus its gradient (DeepSpeed steps the optimizer inside ``backward``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")
from helpers import (  # noqa: E402
    building_block_loss,
    exit_worker,
    init_gloo,
    joined_batch_reference,
    make_model,
    pair_batch,
    perturb_adapter,
    run_two_workers,
    save_tiny_base,
    tiny_causal_lm,
    training_setup,
)
from qadapter.library.hidden import whole_parameters  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LR = 1.0
CHUNK = 4  # several chunks per loss: the head is still gathered once a step
TRAINER_OPTIONS = dict(max_steps=1, per_device_train_batch_size=16, reward_norm="mean", optim="sgd", learning_rate=LR,
                       lr_scheduler_type="constant", max_grad_norm=0.0)  # one step over all 32 pairs, unclipped


@pytest.fixture(autouse=True)
def cpu_deepspeed(monkeypatch):
    """The workers' DeepSpeed runs on its CPU accelerator (read when deepspeed is first imported)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def zero_config(stage: int, batch="auto") -> dict:
    """ZeRO ``stage`` in fp32; stage 3 partitions every parameter, however small (by default it keeps
    small ones whole, and the tiny model's head would be)."""
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1 if batch != "auto" else "auto",
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def join_workers(rank: int, world: int, init_file: str) -> None:
    """The process group, and accelerate's state for DeepSpeed over it.

    accelerate counts the processes of the device's own backend (NCCL on GPUs), which a CPU lacks:
    the state is made here with gloo named, and the Accelerator, or Trainer told to use it
    (``use_configured_state``), takes it as it is."""
    from accelerate import PartialState

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), ACCELERATE_USE_DEEPSPEED="true")
    init_gloo(rank, world, init_file)
    import deepspeed

    # DeepSpeed's CPU accelerator would compile its shared-memory collectives on first use; gloo
    # does the work here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    assert PartialState(backend="gloo").num_processes == world


def lora_params(peft_model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters whole, from ZeRO's fp32 partitions."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def head_weight(peft_model) -> torch.nn.Parameter:
    return peft_model.get_base_model().get_output_embeddings().weight


def count_gathers() -> list:
    """Records each ``deepspeed.zero.GatheredParameters`` entered from now on (one item each)."""
    import deepspeed

    entered = []

    class Counting(deepspeed.zero.GatheredParameters):
        def __enter__(self):
            entered.append(self.enabled)
            return super().__enter__()

    deepspeed.zero.GatheredParameters = Counting
    return entered


def _accelerate_worker(rank, world, init_file, out_dir, stage):
    join_workers(rank, world, init_file)
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    peft_model = make_model().peft_model  # before the plugin: it would initialise the model under ZeRO-3's zero.Init
    peft_model.eval()  # no dropout: compare exact functions
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=zero_config(stage, batch=2)))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(peft_model, optimizer)
    partitioned = head_weight(peft_model).numel() == 0
    gathers = count_gathers()
    loss = building_block_loss(model, *pair_batch(rank), chunk_size=CHUNK)
    accelerator.backward(loss)  # DeepSpeed's backward, then its optimizer step
    torch.save({"loss": loss.detach(), "params": lora_params(peft_model), "partitioned": partitioned,
                "gathers": len(gathers)}, f"{out_dir}/rank{rank}.pt")
    exit_worker()


@pytest.mark.parametrize("stage", [3, 2])
def test_accelerate_two_processes_match_one_process_on_the_joined_batch(tmp_path, stage):
    """frozen_and_adapter_hidden on accelerate's DeepSpeed engine: the mean of the per-rank losses
    and the averaged LoRA gradients are the joined batch's; under ZeRO-3 the head, partitioned,
    is gathered once for the step's loss and its backward."""
    run_two_workers(_accelerate_worker, tmp_path, stage)
    peft_model, loss = joined_batch_reference()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["partitioned"] for r in ranks] == [stage == 3] * 2
    assert [r["gathers"] for r in ranks] == [int(stage == 3)] * 2
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-5, atol=1e-6)
    assert_steps_are_gradients(peft_model, ranks)


def assert_steps_are_gradients(peft_model, ranks: list[dict]) -> None:
    """Every rank's LoRA parameters moved by minus the one-process gradient (SGD at rate 1)."""
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(set(r["params"]) == set(trainable) for r in ranks)
    for name, param in trainable.items():
        assert param.grad.abs().sum() > 0, name
        for r in ranks:
            torch.testing.assert_close((param.detach() - r["params"][name]) / LR, param.grad, rtol=1e-4, atol=1e-6)


def _trainer_worker(rank, world, init_file, out_dir, stage):
    join_workers(rank, world, init_file)
    from qadapter.library.model import QAdapterModel
    from qadapter.library.trainer import QAdapterTrainer

    out = Path(out_dir)
    # Trainer's arguments first, as for a large model: the base then loads partitioned (zero.Init),
    # and the adapter goes onto it only if the base's fingerprint, read gathered, is the dense one's.
    _, tokenizer, args, train, _ = training_setup(out / "run", deepspeed=zero_config(stage), use_cpu=False,
                                                  accelerator_config={"use_configured_state": True}, **TRAINER_OPTIONS)
    model = QAdapterModel.from_pretrained(out / "before", str(out / "base"), is_trainable=True)
    loaded_partitioned = head_weight(model.peft_model).numel() == 0
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    gathers = count_gathers()
    loss = trainer.train().training_loss
    partitioned, step_gathers = head_weight(model.peft_model).numel() == 0, len(gathers)
    trainer.save_model(str(out / "adapter"))  # on every process, as Trainer's own checkpoints
    params = lora_params(model.peft_model)
    trainer.state.best_model_checkpoint = str(out / "before")  # load_best_model_at_end's load
    trainer._load_best_model()
    with whole_parameters(list(model.peft_model.parameters())):
        loaded = {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if p.requires_grad}
    torch.save({"loss": torch.tensor(loss), "params": params, "partitioned": [loaded_partitioned, partitioned],
                "gathers": step_gathers, "loaded": loaded}, out / f"rank{rank}.pt")
    exit_worker()


@pytest.mark.parametrize("stage", [3])
def test_trainer_deepspeed_option_matches_one_process_on_the_joined_batch(tmp_path, stage):
    """QAdapterTrainer with ``deepspeed=`` (a dict config) on an adapter loaded onto a base ZeRO-3
    loads partitioned: one step on two processes, each with half of the pairs, is one process's step
    on all of them (the QAdapterModel forward, inside the engine's, finds the head gathered); the
    adapter it saves is the stepped one, whole, and the best-model load puts a saved adapter (the
    one before the step) into the partitioned one."""
    from qadapter.library.data import PreferenceCollator
    from qadapter.library.model import QAdapterModel

    save_tiny_base(tmp_path / "base")  # training_setup's base
    model, tokenizer, args, train, _ = training_setup(tmp_path / "reference", **TRAINER_OPTIONS)
    perturb_adapter(model)
    model.save_pretrained(tmp_path / "before")
    before = {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if p.requires_grad}
    run_two_workers(_trainer_worker, tmp_path, stage)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(train)
    loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["partitioned"] for r in ranks] == [[stage == 3] * 2] * 2
    assert all(r["gathers"] <= 1 for r in ranks)  # inside the engine's forward, ZeRO-3 gathers it on access
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert_steps_are_gradients(model.peft_model, ranks)
    saved = QAdapterModel.from_pretrained(tmp_path / "adapter", tiny_causal_lm("llama", vocab=len(tokenizer)))
    saved_lora = {n: p for n, p in saved.peft_model.named_parameters() if "lora_" in n}
    assert set(saved_lora) == set(ranks[0]["params"])
    for name, param in saved_lora.items():
        torch.testing.assert_close(param, ranks[0]["params"][name], rtol=0, atol=0)
    for r in ranks:
        assert set(r["loaded"]) == set(before)
        for name, param in before.items():
            torch.testing.assert_close(r["loaded"][name], param, rtol=0, atol=0)


def _recipe_worker(rank, world, init_file, out_dir, config_file):
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = config_file  # as `accelerate launch --deepspeed_config_file`
    join_workers(rank, world, init_file)
    sys.path.insert(0, str(EXAMPLES))
    import accelerate_loop

    peft_model, losses = accelerate_loop.run(steps=3)
    torch.save({"losses": losses, "partitioned": head_weight(peft_model).numel() == 0}, f"{out_dir}/rank{rank}.pt")
    exit_worker()


def test_accelerate_recipe_runs_unchanged_under_zero3(tmp_path, monkeypatch):
    """examples/accelerate_loop.py launched with a ZeRO-3 config, as README shows: each of the two
    processes gets the recipe's one batch (accelerate evens the ranks' batches out), so its losses
    are one process's, step by step, while the head stays partitioned."""
    config_file = tmp_path / "zero3.json"
    config_file.write_text(json.dumps(zero_config(3)))
    run_two_workers(_recipe_worker, tmp_path, str(config_file))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import accelerate_loop

    _, expected = accelerate_loop.run(steps=3)
    assert all(b < a for a, b in zip(expected, expected[1:])), expected
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["partitioned"]
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_train_command_under_torchrun_is_one_run_and_saves_the_adapter_whole(tmp_path, capsys):
    """``torchrun --nproc_per_node 2 qadapter train --deepspeed zero3.json`` on CPUs: the processes join
    (accelerate joins CPU processes only with use_cpu, which the command sets; else each trained alone,
    and ZeRO-3's gathers failed), the command speaks, saves and pushes once, and the adapter saved and
    pushed at the end is whole (outside a gather, ZeRO-3's partitions were empty tensors): equal to the
    last checkpoint's, its provenance counting the processes."""
    from safetensors.torch import load_file

    save_tiny_base(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i}", "chosen": "the capital", "rejected": "of France"})
                            + "\n" for i in range(8)))
    (tmp_path / "zero3.json").write_text(json.dumps(zero_config(3)))
    # The hub, caught where huggingface_hub uploads: the pushed folder is copied to hub/.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import shutil, types, huggingface_hub\n"
        "huggingface_hub.HfApi.create_repo = lambda self, repo_id, **_: None\n"
        "def upload_folder(self, *, repo_id, folder_path, **_):\n"
        f"    shutil.copytree(folder_path, {str(tmp_path / 'hub')!r})\n"
        "    return types.SimpleNamespace(commit_url='hub://' + repo_id)\n"
        "huggingface_hub.HfApi.upload_folder = upload_folder\n")
    output = tmp_path / "adapter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}

    def train(*options):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "qadapter", "train", "--model", str(tmp_path / "base"), "--data", str(data),
                              "--output", str(output), "--per_device_train_batch_size", "2", "--save_steps", "2",
                              "--deepspeed", str(tmp_path / "zero3.json"), *options],
                             env=env, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run

    run = train("--max_steps", "2", "--eval-data", str(data), "--push_to_hub", "true", "--hub_model_id", "me/adapter")
    for once in ("training data:", "adapter saved to", "adapter pushed to the hub: hub://me/adapter"):
        assert run.stderr.count(once) == 1, (once, run.stderr)
    # stdout is the held-out measures alone, once, but for DeepSpeed's own print (each process's, on CPUs)
    # of the shared-memory collective it built, which the command does not control.
    measures = "".join(line for line in run.stdout.splitlines(keepends=True)
                       if not (line.startswith("DeepSpeed ") and line.endswith("built successfully\n")))
    assert json.loads(measures)["accuracy"] >= 0, run.stdout
    saved = load_file(output / "adapter_model.safetensors")
    checkpoint = load_file(output / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    pushed = load_file(tmp_path / "hub" / "adapter_model.safetensors")
    assert saved.keys() == checkpoint.keys() == pushed.keys() and all(saved[k].numel() > 0 for k in saved)
    for name, tensor in saved.items():  # the whole adapter saved and pushed (not each process's empty partition)
        torch.testing.assert_close(tensor, checkpoint[name], rtol=0, atol=0)
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=0)
    record = json.loads((output / "provenance.json").read_text())
    assert record["training"]["processes"] == 2 and record["training"]["global_step"] == 2
    # Two processes of 2 pairs each: the 8 pairs are one epoch in 2 steps (alone, each would take 4).
    assert record["training"]["epoch"] == 1.0
    from qadapter.cli import main

    assert main(["info", str(output)]) == 0
    assert "training: step 2, completed True, 2 processes;" in capsys.readouterr().out
    (output / "checkpoints" / "checkpoint-3").mkdir()  # cut short: every process would say so; the main one does
    resumed = train("--max_steps", "3", "--resume")
    assert resumed.stderr.count("checkpoint-3 is incomplete") == 1, resumed.stderr
    assert resumed.stderr.count("with max_steps 3 (the checkpoint run: 2): the run goes on") == 1, resumed.stderr
