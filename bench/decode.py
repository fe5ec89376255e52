"""Decode cost of the customized policy vs the base model alone, side by side in one run.

Embedded default, batch 1, greedy, 64 new tokens after a chat prompt. Three loops, each a
KV-cached step per token, timed in interleaved rounds (median):

- ``base``: the frozen model alone, batch 1;
- ``base x2``: the frozen model alone on a batch of 2 rows: the floor for any method that runs
  both the frozen and the adapter model in one forward;
- ``qadapter``: ``QAdapterModel.generate`` (frozen and adapter rows in one forward + combine).

``python -m bench.decode [--tokens 64] [--rounds 3]``; writes ``bench/results/decode-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

from bench.common import RESULTS, Timer


@torch.no_grad()
def base_loop(model, ids: torch.Tensor, tokens: int) -> None:
    """Greedy KV-cached decoding of ``tokens`` tokens by ``model.base_model`` alone (whatever adapter state it is in)."""
    cache_arg = model.cache_argument()
    out = model.base_model(input_ids=ids, use_cache=True, logits_to_keep=1)
    for _ in range(tokens - 1):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model.base_model(input_ids=token, use_cache=True, logits_to_keep=1,
                               **{cache_arg: getattr(out, cache_arg)})


def measure(tokens: int = 64, rounds: int = 3) -> dict:
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (LoRA B != 0)
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

    def base(rows):
        with model.peft_model.disable_adapter():
            base_loop(model, ids.repeat(rows, 1), tokens)

    loops = {
        "base": lambda: base(1),
        "base x2": lambda: base(2),
        "qadapter": lambda: model.generate(ids, max_new_tokens=tokens, eos_token_id=[]),
    }
    times = {name: [s / tokens * 1e3 for s in v] for name, v in Timer("cpu").rounds(loops, rounds).items()}
    ms = {name: statistics.median(v) for name, v in times.items()}
    return {
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "tokens": tokens,
        "rounds": rounds, "ms_per_token": ms, "all_ms_per_token": times,
        "qadapter_over_base": ms["qadapter"] / ms["base"], "base_x2_over_base": ms["base x2"] / ms["base"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.tokens, args.rounds)
    for name, value in result["ms_per_token"].items():
        print(f"{name:>9}: {value:7.1f} ms/token")
    print(f"qadapter / base = {result['qadapter_over_base']:.2f}; base x2 / base = {result['base_x2_over_base']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-{result['device']}-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
