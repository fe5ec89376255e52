"""The smallest complete Q-Adapter training loop: your own PEFT model, plain PyTorch, accelerate.

    python examples/accelerate_loop.py --steps 20

Each step runs the model twice, adapter disabled without gradients (the frozen policy pi1) and
adapter enabled (the residual Q-function), and gives both final hidden states and the lm_head weight
to the fused loss: the [B, T, V] logits are never built, and only the adapter is trained. Batches
hold pairs as rows [chosen..., rejected...] with labels that score the responses only
(qadapter.PreferenceCollator builds them). `accelerate launch` runs the same loop on several GPUs.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from qadapter import PreferenceCollator, frozen_and_adapter_hidden
from torch.utils.data import DataLoader

from qadapter_kernels import LossConfig, qadapter_loss


def train(model, loader, *, steps: int, lr: float = 3e-4, loss: LossConfig | None = None,
          chunk_size: int | None = None) -> list[float]:
    """Trains the adapter of ``model`` (a ``peft.PeftModel``) for ``steps`` steps; returns each step's loss."""
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    losses = []
    while len(losses) < steps:
        for batch in loader:
            optimizer.zero_grad()
            hidden = frozen_and_adapter_hidden(model, batch["input_ids"], batch["attention_mask"])
            out = qadapter_loss(*hidden, batch["labels"], config=loss, chunk_size=chunk_size)
            accelerator.backward(out.loss)
            optimizer.step()
            losses.append(out.loss.item())
            if len(losses) == steps:
                break
    return losses


def run(steps: int, chunk_size: int | None = None):
    """The loop on the toy model and task of examples/toy.py; returns the model and the losses."""
    import toy

    model = toy.tiny_peft_model()
    loader = DataLoader(toy.tokenized_pairs(n=4), batch_size=4, collate_fn=PreferenceCollator(pad_token_id=toy.PAD_ID))
    return model, train(model, loader, steps=steps, lr=1e-2, chunk_size=chunk_size)  # a random model takes big steps


def main(argv: list[str] | None = None) -> None:
    import toy

    toy.run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
