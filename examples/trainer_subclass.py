"""A transformers.Trainer whose compute_loss is the fused Q-Adapter loss, on your own PEFT model.

    python examples/trainer_subclass.py --steps 20

Trainer keeps everything it does (the optimizer, schedules, accumulation, mixed precision,
checkpoints, DDP); only the loss changes: the frozen pass (adapter disabled, no gradients) and the
adapter pass give their final hidden states and the lm_head weight to the fused loss, so the
[B, T, V] logits are never built. Batches hold pairs as rows [chosen..., rejected...] with labels
that score the responses only (qadapter.PreferenceCollator builds them).
"""

from __future__ import annotations

import tempfile

from qadapter import PreferenceCollator, frozen_and_adapter_hidden
from transformers import Trainer, TrainingArguments

from qadapter_kernels import LossConfig, qadapter_loss


class QAdapterLossTrainer(Trainer):
    """Trainer for a ``peft.PeftModel`` whose adapter is the Q-function; ``loss`` holds the loss options."""

    # The loss is a mean over the micro-batch's pairs and tokens: Trainer averages it over accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, loss: LossConfig | None = None, chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # how transformers before loss_is_scaled_for_ga decide the same
        self.loss_config = loss
        self.chunk_size = chunk_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = frozen_and_adapter_hidden(model, inputs["input_ids"], inputs["attention_mask"])
        out = qadapter_loss(*hidden, inputs["labels"], config=self.loss_config, chunk_size=self.chunk_size)
        return (out.loss, out) if return_outputs else out.loss


def run(steps: int, chunk_size: int | None = None):
    """The trainer on the toy model and task of examples/toy.py; returns the trainer and the logged losses."""
    import toy

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
            remove_unused_columns=False, disable_tqdm=True,
        )
        trainer = QAdapterLossTrainer(
            model=toy.tiny_peft_model(), args=args, train_dataset=toy.tokenized_pairs(n=4),
            data_collator=PreferenceCollator(pad_token_id=toy.PAD_ID), chunk_size=chunk_size,
        )
        trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv: list[str] | None = None) -> None:
    import toy

    toy.run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
