"""Chunked vs reference at the foundation's acceptance shape, side by side in one run.

d=576, V=49152, B=8, T=256, fp32, on the current device: relative agreement of the loss and of
``q_hidden.grad``, forward+backward time ratio (interleaved rounds, median), and peak extra
memory ratio (``bench.memory``). ``python -m bench.foundation_check``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from bench.memory import peak_extra_memory
from qadapter_kernels import qadapter_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_inputs  # noqa: E402


def main(rounds: int = 3) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = make_inputs(batch=8, seq=256, hidden=576, vocab=49152, prompt_only_row=False, device=device)

    def step(backend):
        q = x["q_hidden"].detach().clone().requires_grad_()
        out = qadapter_loss(x["base_hidden"], q, x["weight"], x["labels"], backend=backend)
        out.loss.backward()
        return out.loss.detach(), q.grad

    (loss_r, grad_r), (loss_c, grad_c) = step("reference"), step("chunked")
    times = {"reference": [], "chunked": []}
    for _ in range(rounds):
        for name in times:
            start = time.perf_counter()
            step(name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    memory = {name: peak_extra_memory(lambda n=name: step(n), device)[1] for name in times}
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"loss rel diff {abs(loss_c - loss_r).item() / abs(loss_r).item():.2e}, "
          f"q_hidden.grad rel diff {((grad_c - grad_r).norm() / grad_r.norm()).item():.2e}")
    print(f"time: reference {t['reference']:.2f} s, chunked {t['chunked']:.2f} s, ratio {t['chunked'] / t['reference']:.3f}")
    print(f"peak extra memory: reference {memory['reference'] / 2**20:.1f} MiB, chunked {memory['chunked'] / 2**20:.1f} MiB, "
          f"ratio {memory['chunked'] / memory['reference']:.3f}")


if __name__ == "__main__":
    main()
