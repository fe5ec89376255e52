"""TRL's DPOTrainer with the Q-Adapter loss in place of DPO's: a TRL user changes one class name.

    python examples/trl_dpo.py --steps 20

TRL's preference collator already stacks a batch as [chosen..., rejected...] with a completion
mask, the Q-Adapter loss's layout. The subclass takes the final hidden states from the model in two
passes, the reference pass with the adapter disabled and without gradients (the frozen policy pi1)
and the adapter pass (the Q-function), and gives them with the lm_head weight to the fused loss,
as TRL feeds its own fused LM head: the [B, T, V] logits are never built. Everything else (data
preparation, the optimizer, logging, checkpoints, distributed training) stays TRL's.

The model must carry a PEFT adapter (pass ``peft_config``, or a ``peft.PeftModel``). DPO's loss
options (``beta``, ``loss_type``, ...) do not apply: the Q-Adapter's come as ``loss=LossConfig(...)``.
Written against TRL 1.16.0.
"""

from __future__ import annotations

import tempfile

import torch
from qadapter.library.hidden import frozen_and_adapter_hidden, peft_model_of
from qadapter.library.trainer import METRIC_NAMES
from trl import DPOConfig, DPOTrainer

from qadapter_kernels import LossConfig, qadapter_loss


class QAdapterDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is the Q-Adapter loss; ``loss`` holds its options (default: the method's)."""

    def __init__(self, *args, loss: LossConfig | None = None, chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        peft_model_of(self.model)  # the adapter is the Q-function: refuse a model without one now
        if self.args.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs must be False: the Q-Adapter loss reads the frozen model's "
                             "hidden states, not reference log-probs")
        self.loss_config = loss
        self.chunk_size = chunk_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        hidden = frozen_and_adapter_hidden(model, inputs["input_ids"], inputs["attention_mask"])
        out = qadapter_loss(*hidden, labels, config=self.loss_config, chunk_size=self.chunk_size)
        mode = "train" if model.training else "eval"
        for name, key in METRIC_NAMES.items():
            value = self.accelerator.gather_for_metrics(getattr(out, name).detach().float().mean())
            self._metrics[mode][key].append(value.mean().item())
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the loss and the metrics; there are no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def run(steps: int, chunk_size: int | None = None):
    """The trainer on the toy model, tokenizer and task of examples/toy.py; returns it and the logged losses."""
    import toy
    from datasets import Dataset

    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", bf16=False,
            disable_tqdm=True,
        )
        trainer = QAdapterDPOTrainer(
            model=toy.tiny_causal_lm(), args=args, train_dataset=Dataset.from_list(toy.text_pairs(n=4)),
            processing_class=toy.tokenizer(), peft_config=toy.lora_config(), chunk_size=chunk_size,
        )
        trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv: list[str] | None = None) -> None:
    import toy

    toy.run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
