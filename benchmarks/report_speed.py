"""How long `moe-finetune report` takes on a long run, against reading its routing.jsonl alone.

A synthetic run directory (routing.jsonl written with the project's own writer, one record per logging
step in the monitor's format; a guard_events.jsonl with a cut and a halt; recipe.resolved.yaml) of
--steps training steps logged every --logging-steps, --layers MoE layers x --experts experts. Some
layers collapse over the run (a few experts take the load), the others stay balanced, so the plots
have something to show. Default: a 10,000-step run of an OLMoE-sized router (16 layers x 64 experts,
top-8) logged every 10 steps: 1,000 records.

It prints, for the same directory and in the same process (median of --repeat, interleaved):
  read     read_run(): parse routing.jsonl and guard_events.jsonl into arrays (the baseline)
  report   write_report(): the same read, plus every plot and report.md
and the ratio report / read; then the whole command, `python -m moe_finetune.cli report DIR`, in a fresh
process (imports included), which is what the < 5 s target of issue 15 is about: its wall time and its CPU
time (on a shared machine the wall time also counts the time spent waiting for a core).

    python benchmarks/report_speed.py
    python benchmarks/report_speed.py --layers 48 --experts 128 --keep /tmp/big-run   # and look at it
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moe_finetune.report import read_run, write_report
from moe_finetune.rundir import EVENTS_FILE, RESOLVED_RECIPE_FILE, ROUTING_FILE, append_jsonl


def synthetic_run(
    folder: Path, *, steps: int, logging_steps: int, layers: int, experts: int, top_k: int, seed: int = 0
) -> int:
    """Write a run directory; returns the number of routing records."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESOLVED_RECIPE_FILE).write_text(
        f"name: synthetic\nmodel:\n  name: synthetic-{layers}x{experts}\ntraining:\n  max_steps: {steps}\n"
        f"  learning_rate: 1.0e-05\n  logging_steps: {logging_steps}\nguards:\n  baseline_steps: 3\n",
        encoding="utf-8",
    )
    collapsing = set(rng.choice(layers, size=max(1, layers // 8), replace=False).tolist())
    favourite = rng.integers(0, experts, size=layers)
    logged = list(range(logging_steps, steps + 1, logging_steps))
    cut_step, halt_step = logged[len(logged) // 2], logged[-1]
    with open(folder / ROUTING_FILE, "w", encoding="utf-8"):
        pass
    for index, step in enumerate(logged):
        progress = index / max(1, len(logged) - 1)
        layer_records = []
        for layer in range(layers):
            logits = rng.normal(0.0, 0.15, size=experts)
            if layer in collapsing:
                logits[favourite[layer]] += 4.0 * progress
                logits[(favourite[layer] + 1) % experts] += 3.0 * progress
            share = np.exp(logits) / np.exp(logits).sum()
            share = np.minimum(share, 1.0 / top_k)
            share = share / share.sum()
            balance = float(-(share * np.log(share)).sum() / math.log(experts))
            layer_records.append(
                {
                    "layer": f"model.layers.{layer}.mlp.gate",
                    "tokens": 4096.0,
                    "entropy": 0.8 - 0.2 * progress * (layer in collapsing) + rng.normal(0, 0.01),
                    "load": share.tolist(),
                    "prob": share.tolist(),
                    "load_cv": float(share.std() / share.mean()),
                    "load_max": float(share.max() * experts),
                    "dead_experts": float((share < 0.1 / experts).sum()),
                    "aux_loss": float(experts * (share * share).sum()),
                    "z_loss": 5.0,
                    "drop_fraction": float(np.clip(share * experts - 1.25, 0, None).sum() / experts),
                    "balance": balance,
                    "prob_balance": balance,
                    "drift": None,
                    "drift_load_js": None,
                }
            )
        drift = 0.3 * progress if index % 5 == 0 else None
        append_jsonl(
            folder / ROUTING_FILE,
            {
                "step": step,
                "epoch": step / steps,
                "lr": 1e-5 * (0.5 if step > cut_step else 1.0),
                "loss": 2.0 + math.exp(-3 * progress) + rng.normal(0, 0.02),
                "entropy": float(np.mean([r["entropy"] for r in layer_records])),
                "balance": float(np.mean([r["balance"] for r in layer_records])),
                "load_max": float(max(r["load_max"] for r in layer_records)),
                "dead_experts": float(sum(r["dead_experts"] for r in layer_records)),
                "drop_fraction": float(np.mean([r["drop_fraction"] for r in layer_records])),
                "drift": drift,
                "tokens": 4096 * layers,
                "finite": True,
                "capacity_factor": 1.25,
                "num_experts": experts,
                "layers": layer_records,
            },
        )
    for step, action, reason in (
        (cut_step, "cut_lr", "synthetic: a layer's balance dropped sharply"),
        (halt_step, "halt", "synthetic: a layer's balance is 30% below its baseline"),
    ):
        append_jsonl(
            folder / EVENTS_FILE,
            {
                "step": step,
                "action": action,
                "reason": reason,
                "lr_before": 1e-5,
                "lr_after": 5e-6,
                "multiplier": 0.5,
            },
        )
    return len(logged)


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the run (and its report) here and keep it"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="moe-report-bench-") as scratch:
        folder = args.keep if args.keep is not None else Path(scratch) / "run"
        records = synthetic_run(
            folder,
            steps=args.steps,
            logging_steps=args.logging_steps,
            layers=args.layers,
            experts=args.experts,
            top_k=args.top_k,
        )
        size = (folder / ROUTING_FILE).stat().st_size / 2**20
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
            f"python {platform.python_version()}; "
            f"run: {args.steps} steps logged every {args.logging_steps} ({records} records), "
            f"{args.layers} layers x {args.experts} experts, routing.jsonl {size:.1f} MiB"
        )
        write_report(folder)  # warm: matplotlib imported, fonts cached
        reads, reports = [], []
        for _ in range(args.repeat):  # interleaved, so a busy moment of the machine hits both
            reads.append(_timed(lambda: read_run(folder)))
            reports.append(_timed(lambda: write_report(folder)))
        read_s, report_s = statistics.median(reads), statistics.median(reports)
        print(f"read    (baseline, median of {args.repeat}): {read_s:6.2f} s")
        print(
            f"report  (median of {args.repeat}):            {report_s:6.2f} s   = {report_s / read_s:.2f}x read"
        )
        command = [sys.executable, "-m", "moe_finetune.cli", "report", str(folder)]
        walls, cpus = [], []
        for _ in range(args.repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            walls.append(_timed(lambda: subprocess.run(command, check=True, capture_output=True)))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(
            f"moe-finetune report, fresh process (median of {args.repeat}): {wall:6.2f} s wall = {wall / read_s:.2f}x "
            f"read, {cpu:.2f} s of CPU (what an idle core takes; wall includes waiting for a busy machine)"
        )
        print(
            f"target < 5 s: {'met' if wall < 5 else 'not met'} in wall time, {'met' if cpu < 5 else 'not met'} in CPU time"
        )
        if args.keep is not None:
            print(f"kept: {folder / 'report.md'}")


if __name__ == "__main__":
    main()
