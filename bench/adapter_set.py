"""Many adapters in one batch beside one adapter, through the same decode path, in one run.

Rows (transformers' ``generate``, greedy, a fixed number of new tokens, eager; ms/token of the
decode step alone, as ``bench/decode.py`` clocks it; interleaved rounds, median):

- ``one adapter``: ``QAdapterModel.generate`` of one saved adapter on all rows;
- ``set, N adapters``: an :class:`~qadapter.library.adapter_set.AdapterSet` holding N adapters,
  each row naming another one (the bank: two GEMMs per LoRA layer whatever N); with ``--loaded M``
  the set holds M >= N adapters and the rows name N of them (a server's many loaded adapters, a
  batch's few);
- ``set, one adapter``: the same set, every row naming the same adapter;
- ``..., whole bank`` (with ``--loaded``): the same rows with every forward running all M loaded
  adapters' blocks, as the bank did before a batch selected the blocks of the adapters it names;
- ``PEFT mixed batch, N adapters``: the same rows through PEFT's own mixed-batch path
  (``adapter_names=``: per layer, a gather, a LoRA and a scatter for each adapter in the batch), the
  anchor.

Embedded default on the CPU; ``python -m bench.adapter_set [--adapters 8] [--loaded M] [--tokens 32]
[--rounds 3] [--threads N]``; writes ``bench/results/adapter-set-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.common import cpu_bench_args, versions, write_result
from bench.decode import generation, interleaved, trained_looking


def save_adapters(model, directory: Path, count: int) -> dict[str, Path]:
    """``count`` trained-looking adapters of ``model``'s shape, each with its own LoRA weights and
    temperatures, saved under ``directory``; name -> path."""
    from qadapter_kernels import LossConfig

    paths = {}
    for k in range(count):
        trained_looking(model, seed=k)
        model.loss = LossConfig.from_options(model.loss, alpha_tilde=0.6 + 0.1 * k, alpha_0=0.2 + 0.1 * k)
        paths[f"adapter-{k}"] = directory / f"adapter-{k}"
        model.save_pretrained(paths[f"adapter-{k}"])
    return paths


class PeftMixedRows:
    """A row plan (``RowPlan``'s contract) running PEFT's mixed-batch path over an adapter set's own
    per-adapter LoRA modules: the frozen half named ``"__base__"``, each adapter row its adapter."""

    def __init__(self, adapter_set, names: list[str]) -> None:
        from qadapter.library.adapter_set import BankRows

        self.adapter_set = adapter_set
        self.policies = BankRows(adapter_set)  # each row's combine, as the set forms it
        self.policies.assignment = tuple(adapter_set.names.index(n) for n in names)
        self.members = [adapter_set.adapters[i].members[-1] for i in self.policies.assignment]  # PEFT's names

    def expand(self, value, batch: int):
        return self.policies.expand(value, batch)  # single adapters: the doubled batch [frozen, adapter]

    @contextmanager
    def selecting(self, batch: int, device):
        repeats = batch // len(self.members)
        names = ["__base__"] * batch + [n for n in self.members for _ in range(repeats)]
        with self.adapter_set.peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
            yield

    def combine(self, logits, batch: int):
        return self.policies.combine(logits, batch)


def whole_bank_policy(adapter_set, names: list[str]):
    """The set's policy for rows naming ``names``, but with every forward running the blocks of all
    loaded adapters (the bank without a batch's selection of the adapters it names): the anchor of
    ``--loaded``."""
    from qadapter.library.adapter_set import BankRows
    from qadapter.library.policy import CombinedPolicy

    class WholeBankRows(BankRows):
        def _members_run(self, served):
            return set(self.adapter_set.loras)

    rows = WholeBankRows(adapter_set)
    rows.kernel = adapter_set.rows.kernel
    rows.assignment = tuple(adapter_set.names.index(name) for name in names)
    return CombinedPolicy(adapter_set.base_model, rows)


def set_rows(adapter_set, solo, ids: torch.Tensor, tokens: int, rounds: int, active: list[str] | None = None) -> dict:
    """ms/token of one adapter (``solo``, a QAdapterModel) and of the set's mixed batches on the rows of
    ``ids``, the rows naming the set's ``active`` adapters in turn (default: all it holds)."""
    from qadapter.library.policy import CombinedPolicy

    names = active or adapter_set.names
    held = "" if len(names) == len(adapter_set.names) else f" of {len(adapter_set.names)} loaded"
    rows = ids.shape[0]
    mixed = [names[i % len(names)] for i in range(rows)]
    peft_policy = CombinedPolicy(adapter_set.base_model, PeftMixedRows(adapter_set, mixed))

    def set_generate(assigned):
        return lambda *args, **kwargs: adapter_set.generate(*args, adapters=assigned, **kwargs)

    loops = {
        "one adapter": generation(solo.generate, ids, tokens, compiled=False),
        f"set, {len(names)} adapters{held}": generation(set_generate(mixed), ids, tokens, compiled=False),
        "set, one adapter": generation(set_generate([names[0]] * rows), ids, tokens, compiled=False),
        f"PEFT mixed batch, {len(names)} adapters": generation(peft_policy.generate, ids, tokens, compiled=False),
    }
    if held:
        whole = whole_bank_policy(adapter_set, mixed)
        loops[f"set, {len(names)} adapters{held}, whole bank"] = generation(whole.generate, ids, tokens, compiled=False)
    runs = interleaved(loops, rounds)
    ms = {name: statistics.median(v) for name, v in runs.items()}
    one = ms["one adapter"]
    return {"ms_per_token": ms, "all_ms_per_token": runs,
            "tokens_per_s": {name: rows * 1e3 / v for name, v in ms.items()},
            "over_one_adapter": {name: v / one for name, v in ms.items()}}


def measure(adapters: int = 8, tokens: int = 32, rounds: int = 3, loaded: int | None = None) -> dict:
    from qadapter.library.adapter_set import AdapterSet
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    tok = model.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        loaded = max(loaded or adapters, adapters)
        paths = save_adapters(model, Path(tmp), loaded)
        del model
        adapter_set = AdapterSet.from_pretrained(paths)
        solo = QAdapterModel.from_pretrained(paths["adapter-0"])
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    return {
        "device": "cpu", "threads": torch.get_num_threads(), **versions("cpu", ("transformers", "peft")),
        "adapters": adapters, "loaded": loaded, "rows": adapters, "tokens": tokens, "rounds": rounds, "prompt_tokens": ids.shape[1],
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        **set_rows(adapter_set, solo, ids.repeat(adapters, 1), tokens, rounds, adapter_set.names[:adapters]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter_set", description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8, help="adapters the batch names, and rows in the batch")
    parser.add_argument("--loaded", type=int, default=None, help="adapters in the set (default: --adapters)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = cpu_bench_args(parser, argv)
    result = measure(args.adapters, args.tokens, args.rounds, args.loaded)
    for name, value in result["ms_per_token"].items():
        print(f"{name:>30}: {value:7.1f} ms/token  {result['tokens_per_s'][name]:7.1f} tokens/s  "
              f"{result['over_one_adapter'][name]:.2f}x one adapter")
    loaded = f"-{result['loaded']}-loaded" if result["loaded"] != result["adapters"] else ""
    write_result(result, args.out, f"adapter-set-cpu-{datetime.date.today().isoformat()}{loaded}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
