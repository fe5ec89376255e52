"""One Q-Adapter training step of a real architecture (random weights), fused loss vs eager-authors.

The model, batch and step are bench/e2e.py's; see there for what a step is. CPU: SmolLM2-135M's
config at 2 pairs x 128 tokens; CUDA: Llama-3.1-8B's at 2 pairs x 1024, with checkpointing.
"""

from __future__ import annotations

import pytest
import torch

from bench import e2e
from bench.baselines import eager_authors_loss
from bench.common import bench_device, bench_dtype, first_line, is_oom
from bench.memory import peak_extra_memory
from qadapter_kernels import qadapter_loss

LOSSES = {"fused": qadapter_loss, "eager-authors": eager_authors_loss}


@pytest.fixture(scope="module")
def setup():
    device = bench_device()
    name = e2e.default_model(device)
    model = e2e.build_model(name, device, bench_dtype(device), checkpointing=device.type == "cuda")
    batch = e2e.make_batch(e2e.MODELS[name]["vocab_size"], 2, e2e.default_seq(device), device)
    return name, device, model, batch


@pytest.mark.parametrize("loss", list(LOSSES))
def test_training_step(benchmark, setup, loss):
    name, device, model, batch = setup
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    step = e2e.training_step(model, optimizer, LOSSES[loss], *batch)
    benchmark.group = f"e2e {name}"
    try:
        benchmark.pedantic(step, rounds=e2e.default_repeats(device), iterations=1, warmup_rounds=1)
        peak = peak_extra_memory(step, device)[1]
    except Exception as exc:  # noqa: BLE001 -- an out-of-memory is a result: recorded as a skip
        if not is_oom(exc):
            raise
        pytest.skip(f"{loss} oom: {first_line(exc)}")
    benchmark.extra_info.update(model=name, loss=loss, seq=batch[0].shape[1], pairs=2, peak_extra_bytes=peak)
