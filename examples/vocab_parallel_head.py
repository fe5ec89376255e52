"""Q-Adapter training with a vocabulary-parallel lm_head: the head's rows split over the ranks of a
process group, as a tensor-parallel model lays out its output layer.

    python examples/vocab_parallel_head.py --steps 20 --world 2     # spawns 2 CPU (gloo) processes
    torchrun --nproc-per-node 2 examples/vocab_parallel_head.py --steps 20

Every rank runs the model on the same batch and gives the loss only its rows of the head
(``vocab_shard(V, group)``: torch.tensor_split's split; in a tensor-parallel model, the rank's shard of
the lm_head and where it starts). The loss merges the ranks' log-sum-exps and target Q-values and sums
their shares of the q_hidden gradient, so every rank gets the loss and LoRA gradients of one process
holding the whole head, and the ranks' adapters stay equal with no other communication.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from qadapter import PreferenceCollator, frozen_and_adapter_hidden
from torch.utils.data import DataLoader

from qadapter_kernels import qadapter_loss, vocab_shard


def train(model, loader, *, steps: int, lr: float, group: dist.ProcessGroup | None = None,
          chunk_size: int | None = None) -> list[float]:
    """Trains the adapter of ``model`` (a ``peft.PeftModel``), its head's rows split over ``group``
    (None: one process, the whole head); returns each step's loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = slice(None) if group is None else vocab_shard(vocab, group)  # this rank's rows of the head
    model.train()
    losses = []
    while len(losses) < steps:
        for batch in loader:
            optimizer.zero_grad()
            base_hidden, q_hidden, weight = frozen_and_adapter_hidden(model, batch["input_ids"],
                                                                      batch["attention_mask"])
            out = qadapter_loss(base_hidden, q_hidden, weight[rows], batch["labels"], chunk_size=chunk_size,
                                group=group, vocab_start=rows.start)
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
            if len(losses) == steps:
                break
    return losses


def train_toy(steps: int, chunk_size: int | None = None, group: dist.ProcessGroup | None = None) -> list[float]:
    """:func:`train` on the toy model and task of examples/toy.py (the same on every rank)."""
    import toy

    model = toy.tiny_peft_model()
    loader = DataLoader(toy.tokenized_pairs(n=4), batch_size=4, collate_fn=PreferenceCollator(pad_token_id=toy.PAD_ID))
    return train(model, loader, steps=steps, lr=1e-2, group=group, chunk_size=chunk_size)


def _spawned(rank: int, world: int, directory: str, steps: int, chunk_size: int | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=world)
    losses = train_toy(steps, chunk_size, dist.group.WORLD)
    Path(directory, f"losses{rank}.json").write_text(json.dumps(losses))
    os._exit(0)  # skips torch's gloo teardown at exit, which can deadlock


def run(steps: int, chunk_size: int | None = None, world: int = 2) -> list[list[float]]:
    """Each rank's losses, from ``world`` spawned gloo processes (``world=1``: this process, the whole head)."""
    if world == 1:
        return [train_toy(steps, chunk_size)]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(_spawned, args=(world, directory, steps, chunk_size), nprocs=world, start_method="spawn")
        return [json.loads(Path(directory, f"losses{rank}.json").read_text()) for rank in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--world", type=int, default=2, help="processes to spawn (not under torchrun)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # torchrun: this process is one rank
        dist.init_process_group("gloo")
        losses = train_toy(args.steps, group=dist.group.WORLD)
        show = dist.get_rank() == 0
        dist.destroy_process_group()
    else:
        losses, show = run(args.steps, world=args.world)[0], True
    if show:
        for step, value in enumerate(losses, start=1):
            print(f"step {step}: loss {value:.4f}")


if __name__ == "__main__":
    main()
