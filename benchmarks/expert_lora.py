"""What expert LoRA costs: attention-only LoRA vs PEFT's expert LoRA vs the fast kernel (models/experts.py).

    python benchmarks/expert_lora.py                 # ~5 minutes on a 2-core CPU
    python benchmarks/expert_lora.py --steps 3       # quicker, noisier

The model is the one issue 13 measured: a random Mixtral with hidden 512, intermediate 1024, 8 experts
top-2, 4 layers (grouped_mm experts, fp32), LoRA r 16 (alpha 32) on q/k/v/o, plus the fused experts
(`gate_up_proj`, `down_proj`) in the two expert arms; batch 4 at sequence 256 and 512.

Each (arm, length) runs in a fresh process, in ABBA order (attention, peft, fast, fast, peft, attention
per length) so drift in machine load hits every arm alike; each process does a plain training loop
(forward, backward, AdamW step on the trainable parameters, random token ids, labels = inputs), drops
the warm-up steps and reports the median step, as wall time and as the process's CPU time (all its
threads; load from other processes on a shared machine disturbs it less than wall time). Peak memory is the process's peak RSS during training
(Linux VmHWM, reset after the model is built), model and optimizer state included; on CUDA,
torch.cuda.max_memory_allocated. Ratios are against attention-only LoRA measured in the same run.
Targets (issue 13): fast <= 1.15x attention-only step time and <= +5% peak memory at both lengths, and
>= 1.4x faster than PEFT's path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from procstatus import status_kb  # noqa: E402  (benchmarks/, beside this script)

SIZES = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "vocab_size": 2048,
}
BATCH, RANK = 4, 16
ARMS = ("attention", "peft", "fast")
LENGTHS = (256, 512)


def run_arm(arm: str, length: int, steps: int, warmup: int) -> dict:
    """One (arm, length) in this process: build, adapt, train `warmup + steps` steps; time and memory."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**SIZES, use_cache=False, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(config).to(device)
    section = LoraSection(
        r=RANK, alpha=2 * RANK, experts=arm != "attention", expert_kernel="fast" if arm == "fast" else "peft"
    )
    peft_model, cov = apply_lora(model, section, get_family("mixtral"))
    assert cov.expert_kernel == ("fast" if arm == "fast" else "peft"), cov.line()
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, SIZES["vocab_size"], (BATCH, length), generator=generator).to(device)
        for _ in range(warmup + steps)
    ]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
    times, cpu_times = [], []
    for ids in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else status_kb("VmHWM") * 1024
    return {
        "arm": arm,
        "length": length,
        "step_s": statistics.median(times[warmup:]),
        "cpu_s": statistics.median(cpu_times[warmup:]),
        "peak_bytes": peak,
        "trainable": cov.trainable,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--child", nargs=2, metavar=("ARM", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child[0], int(args.child[1]), args.steps, args.warmup)))
        return

    import torch

    print(
        f"expert LoRA benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; Mixtral hidden {SIZES['hidden_size']}, "
        f"intermediate {SIZES['intermediate_size']}, {SIZES['num_local_experts']} experts top-"
        f"{SIZES['num_experts_per_tok']}, {SIZES['num_hidden_layers']} layers, LoRA r {RANK}, batch {BATCH}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per process, ABBA"
    )
    results: list[dict] = []
    for length in args.lengths:
        for arm in (*ARMS, *reversed(ARMS)):
            out = subprocess.run(
                [sys.executable, __file__, "--child", arm, str(length), "--steps", str(args.steps),
                 "--warmup", str(args.warmup)],
                check=True, capture_output=True, text=True, cwd=REPO,
            )  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            print(
                f"  {arm:9s} seq {length}: {result['step_s']:.3f} s wall, {result['cpu_s']:.3f} s CPU, "
                f"peak {result['peak_bytes'] / 2**30:.3f} GiB",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))

    print(
        "\n| seq | arm | step (median wall) | vs attention | CPU s / step | vs attention | peak memory "
        "| vs attention | PEFT / this (wall, CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for length in args.lengths:
        runs = {arm: [r for r in results if r["arm"] == arm and r["length"] == length] for arm in ARMS}
        step = {arm: statistics.median(r["step_s"] for r in rs) for arm, rs in runs.items()}
        cpu = {arm: statistics.median(r.get("cpu_s", r["step_s"]) for r in rs) for arm, rs in runs.items()}
        peak = {arm: statistics.median(r["peak_bytes"] for r in rs) for arm, rs in runs.items()}
        for arm in ARMS:
            print(
                f"| {length} | {arm} | {step[arm]:.3f} s | {step[arm] / step['attention']:.2f}x | "
                f"{cpu[arm]:.3f} s | {cpu[arm] / cpu['attention']:.2f}x | {peak[arm] / 2**30:.3f} GiB | "
                f"{100 * (peak[arm] / peak['attention'] - 1):+.1f}% | "
                f"{step['peft'] / step[arm]:.2f}x, {cpu['peft'] / cpu[arm]:.2f}x |"
            )
        verdicts.append(
            (length, step["fast"] / step["attention"], cpu["fast"] / cpu["attention"],
             peak["fast"] / peak["attention"], step["peft"] / step["fast"], cpu["peft"] / cpu["fast"])
        )  # fmt: skip
    print()
    for length, wall, cpu_ratio, memory, speedup, cpu_speedup in verdicts:
        print(
            f"seq {length}: fast/attention step {wall:.2f}x wall, {cpu_ratio:.2f}x CPU (target <= 1.15: "
            f"{'met' if max(wall, cpu_ratio) <= 1.15 else 'MISSED'}); peak memory {100 * (memory - 1):+.1f}% "
            f"(target <= +5%: {'met' if memory <= 1.05 else 'MISSED'}); PEFT/fast {speedup:.2f}x wall, "
            f"{cpu_speedup:.2f}x CPU (target >= 1.4: {'met' if min(speedup, cpu_speedup) >= 1.4 else 'MISSED'})"
        )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
