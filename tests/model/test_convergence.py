"""Convergence: whole training runs through QAdapterTrainer follow the reference's trajectory.

A single step's loss and gradient agreeing (tests/kernels, tests/model/test_packing.py) does not
show that nothing drifts over a run: the optimizer, the schedule, checkpointing and the packed
layout all sit between the steps. Here a run on the executable spec (the ``reference`` backend on the
padded batch) is the baseline, and the fused backends, padding-free passes and gradient
checkpointing must retrace it step by step in float32.
"""

import pytest
import torch
from helpers import training_setup
from qadapter.library.trainer import QAdapterTrainer

STEPS = 24
# float32 throughout: the runs differ only in summation order (chunks, packed GEMM shapes, recomputed
# activations), which leaves both the losses and the LoRA updates within about 2e-7 of the baseline's
# after 24 Adam steps; 1e-5 leaves room for other machines' orders and fails on any real difference.
TOLERANCE = 1e-5


def train(tmp_path, *, padding_free: bool, **config) -> tuple[list[float], torch.Tensor]:
    """The logged loss of each step and the LoRA weights' change over the run."""
    model, tokenizer, args, train_pairs, _ = training_setup(tmp_path, max_steps=STEPS, **config)
    model.padding_free = padding_free

    def lora() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for n, p in model.peft_model.named_parameters() if "lora_" in n])

    start = lora().clone()
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train_pairs, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, lora() - start


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return train(tmp_path_factory.mktemp("reference"), padding_free=False, backend="reference")


@pytest.mark.parametrize("config", [
    dict(backend="chunked", chunk_size=7, padding_free=True),  # tiles smaller than a row, packed passes
    dict(backend="chunked", padding_free=True, activation_checkpointing=True),
    dict(backend="chunked", padding_free=False),
    dict(backend="reference", padding_free=True),
], ids=["chunked-packed", "chunked-packed-checkpointed", "chunked-padded", "reference-packed"])
def test_training_runs_retrace_the_reference(baseline, tmp_path, config):
    losses, update = train(tmp_path, **config)
    want_losses, want_update = baseline
    assert len(losses) == len(want_losses) == STEPS
    assert want_losses[-1] < want_losses[0] - 0.05  # the baseline learns: a trajectory worth retracing
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=TOLERANCE, atol=0)
    assert float((update - want_update).norm() / want_update.norm()) < TOLERANCE
