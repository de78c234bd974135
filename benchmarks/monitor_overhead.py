"""What RoutingMonitor costs: the same SFTTrainer + LoRA run with and without it, interleaved.

    python benchmarks/monitor_overhead.py            # ~5 minutes on a 2-core CPU
    python benchmarks/monitor_overhead.py --quick    # ~2 minutes, fewer repetitions

Step time: two identical trainers (same model init, same data, logging_steps=1) are built once and
trained in alternating blocks (ABBA order, so drift in machine load hits both arms alike); a step
is the time between consecutive `on_step_begin` events, so it includes everything every callback
and the Trainer's logging do. The first step of each block is dropped (warm-up). Target: median
ratio <= 1.03.

Peak memory: a fresh subprocess per (arm, sequence length) trains a few steps; on CUDA it reports
torch.cuda.max_memory_allocated, on CPU (Linux) the peak RSS during training (reset just before it)
minus the RSS at its start. The
monitor reduces router logits to (E,)-sized sums inside each forward, so its overhead must not grow
with sequence length.

The drift probe (one no-grad forward of `probe_size` rows, every `drift_steps` steps) is timed on
its own and reported amortised, rather than left to land in a dropped warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A step of ~0.6 s on one core of this 2-core CPU (hidden 512 / intermediate 1024 takes ~1.9 s).
SIZES: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
BATCH = 4


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def build_model_dir(cache: Path, experts_implementation: str) -> Path:
    """A randomly initialised Mixtral of SIZES with the tiny tokenizer, saved once and reused."""
    import torch
    import transformers

    from moe_finetune.models.tiny import BUNDLED_DATA, _corpus_texts, train_tokenizer

    target = (
        cache / f"bench-mixtral-{SIZES['hidden_size']}-{SIZES['num_hidden_layers']}-{experts_implementation}"
    )
    if (target / "config.json").exists():
        return target
    tokenizer = train_tokenizer(_corpus_texts(BUNDLED_DATA if BUNDLED_DATA.exists() else None))
    config = transformers.MixtralConfig(
        **SIZES,
        vocab_size=len(tokenizer),
        router_aux_loss_coef=0.01,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        experts_implementation=experts_implementation,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def long_texts(rows: int, min_chars: int) -> list[dict[str, str]]:
    """Rows of plain text long enough to fill max_length tokens, so every batch is BATCH x max_length."""
    import gzip

    from moe_finetune.models.tiny import BUNDLED_DATA

    source: list[str] = []
    if BUNDLED_DATA.exists():
        with gzip.open(BUNDLED_DATA, "rt", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                source.append(f"{row['prompt']} {row['completion']}")
                if len(source) >= 4000:
                    break
    else:
        source = [f"Example {i}: the number {i} doubled is {2 * i}." for i in range(4000)]
    texts, current, index = [], [], 0
    while len(texts) < rows:
        current.append(source[index % len(source)])
        index += 1
        if sum(len(part) + 1 for part in current) >= min_chars:
            texts.append({"text": " ".join(current)})
            current = []
    return texts


def make_trainer(
    model_dir: Path, output_dir: Path, *, seq: int, steps: int, monitor: bool, lora_experts: bool
):
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    from moe_finetune.callbacks import RoutingMonitor, attach
    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model, _ = apply_lora(model, LoraSection(experts=lora_experts), get_family("mixtral"))
    data = datasets.Dataset.from_list(long_texts(rows=BATCH * steps * 2, min_chars=seq * 8))
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        logging_steps=1,
        max_length=seq,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        bf16=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    for noisy in (transformers.PrinterCallback, transformers.ProgressCallback):
        trainer.remove_callback(noisy)
    monitor_callback = None
    if monitor:
        monitor_callback = RoutingMonitor()
        attach(trainer, monitor_callback)
    return trainer, monitor_callback


class StepClock:
    """Times from one on_step_begin to the next: the whole step, every callback and log included."""

    def __init__(self) -> None:
        self.begins: list[float] = []

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.begins.append(time.perf_counter())

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self.begins.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.begins, self.begins[1:], strict=False)]


def clock_callback():
    from transformers import TrainerCallback

    class Clock(StepClock, TrainerCallback):
        pass

    return Clock()


def instrument_monitor() -> dict[str, float]:
    """Add up the wall time spent in the monitor's own code (router hooks, logging-step summary).

    Step-time medians on a shared CPU move by a few percent between runs; this is the direct,
    noise-free account of what the monitor itself does per step.
    """
    from moe_finetune.callbacks.monitor import RoutingMonitor
    from moe_finetune.routing.capture import RoutingCapture

    spent = {"hooks": 0.0, "collect": 0.0, "drift": 0.0}

    def timed(cls: type, name: str, bucket: str) -> None:
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent[bucket] += time.perf_counter() - start

        setattr(cls, name, wrapper)

    timed(RoutingCapture, "_accumulate", "hooks")
    timed(RoutingCapture, "_on_backbone_start", "hooks")
    timed(RoutingMonitor, "close_window", "collect")
    # each block starts a new run, whose first logging step measures drift: reported apart, amortised
    timed(RoutingMonitor, "_measure_drift", "drift")
    return spent


def time_interleaved(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    arms = {}
    for name, monitored in (("without", False), ("with", True)):
        trainer, monitor = make_trainer(
            model_dir,
            work / name,
            seq=args.seq,
            steps=args.steps,
            monitor=monitored,
            lora_experts=args.lora_experts,
        )
        # first in the list: its on_step_begin runs before any other callback's
        trainer.callback_handler.callbacks.insert(0, clock_callback())
        arms[name] = (trainer, monitor)
    own = instrument_monitor()
    samples: dict[str, list[float]] = {"without": [], "with": []}
    order = ["without", "with"]
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:  # ABBA
            trainer, _ = arms[name]
            clock = trainer.callback_handler.callbacks[0]
            clock.begins.clear()
            trainer.train()
            times = clock.step_times()[1:]  # drop the warm-up step (and the first drift probe)
            samples[name].extend(times)
            print(
                f"  rep {rep + 1}/{args.reps} {name:>7} monitor: median step {statistics.median(times):.3f} s"
            )
    monitor = arms["with"][1]
    assert monitor is not None and monitor.capture is None and monitor.latest is not None
    # the drift probe on its own: install a capture again and time a few probes
    from moe_finetune.routing.capture import RoutingCapture
    from moe_finetune.routing.probe import probe_routing, take_probe_batch

    trainer = arms["with"][0]
    capture = RoutingCapture(trainer.model, train_only=True)
    batch = take_probe_batch(trainer.get_train_dataloader(), monitor.probe_size)
    probe_times = []
    for _ in range(3):
        start = time.perf_counter()
        probe_routing(capture, batch, chunk_rows=BATCH)
        probe_times.append(time.perf_counter() - start)
    capture.remove()
    monitored_steps = args.reps * args.steps
    return {
        "own_hooks_ms": 1000 * own["hooks"] / monitored_steps,
        "own_collect_ms": 1000 * (own["collect"] - own["drift"]) / monitored_steps,
        "without": samples["without"],
        "with": samples["with"],
        "probe_s": statistics.median(probe_times),
        "probe_size": monitor.probe_size,
        "drift_steps": monitor.drift_steps,
    }


def memory_child(model_dir: str, seq: int, monitored: bool, steps: int, lora_experts: bool) -> None:
    """In a fresh process: train `steps` steps, print the training's peak memory growth as JSON."""
    quiet()
    import torch

    trainer, _ = make_trainer(
        Path(model_dir),
        Path(tempfile.mkdtemp(prefix="moe-bench-mem-")),
        seq=seq,
        steps=steps,
        monitor=monitored,
        lora_experts=lora_experts,
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.train()
        peak, kind = torch.cuda.max_memory_allocated(), "cuda allocated"
    else:
        before = _reset_peak_rss()
        trainer.train()
        peak, kind = _proc_status_kb("VmHWM") * 1024, "cpu peak rss"
    print(json.dumps({"peak_growth_mb": (peak - before) / 2**20, "kind": kind}))


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux: `5` to /proc/self/clear_refs) and return the current RSS
    in bytes, so the peak read after training is the training's own, not model loading's."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")
    return _proc_status_kb("VmRSS") * 1024


def measure_memory(model_dir: Path, seq: int, monitored: bool, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        str(model_dir),
        str(seq),
        "1" if monitored else "0",
        str(args.memory_steps),
        "1" if args.lora_experts else "0",
        str(SIZES["hidden_size"]),
        str(SIZES["intermediate_size"]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory run failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} MB [{min(values):.0f}-{max(values):.0f}]"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {device}, "
        f"load average {load:.2f}; torch {torch.__version__}, python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about half the time)")
    parser.add_argument("--reps", type=int, default=None, help="ABBA repetitions (default 6, quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default 6, quick 5)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length for the timing")
    parser.add_argument("--memory-seqs", type=int, nargs=2, default=(256, 1024))
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=None, help="runs per cell (default 3, quick 1)")
    parser.add_argument(
        "--lora-experts",
        action="store_true",
        help="LoRA on the fused experts too (PEFT merges the expert stack every forward: ~2x slower steps)",
    )
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=("eager", "grouped_mm"))
    parser.add_argument("--hidden", type=int, default=SIZES["hidden_size"], help="hidden size (default 256)")
    parser.add_argument(
        "--intermediate", type=int, default=SIZES["intermediate_size"], help="expert intermediate size"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 1 on CPU, torch's own on CUDA). On a shared machine one thread keeps "
        "OpenMP workers from spinning against other processes, which swamps the milliseconds measured",
    )
    parser.add_argument("--memory-child", nargs=7, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads is None and not torch.cuda.is_available():
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the memory subprocesses
    if args.memory_child:
        model_dir, seq, monitored, steps, lora_experts, hidden, intermediate = args.memory_child
        SIZES.update(hidden_size=int(hidden), intermediate_size=int(intermediate))
        memory_child(model_dir, int(seq), monitored == "1", int(steps), lora_experts == "1")
        return
    SIZES.update(hidden_size=args.hidden, intermediate_size=args.intermediate)
    args.reps = args.reps or (3 if args.quick else 6)
    args.steps = args.steps or (5 if args.quick else 6)
    args.memory_repeats = args.memory_repeats or (1 if args.quick else 3)

    quiet()
    from moe_finetune.models.tiny import cache_root

    started = time.perf_counter()
    model_dir = build_model_dir(cache_root(), args.experts_implementation)
    print(f"machine: {machine()}")
    print(
        f"model: Mixtral, hidden {SIZES['hidden_size']}, {SIZES['num_hidden_layers']} layers, "
        f"{SIZES['num_local_experts']} experts top-{SIZES['num_experts_per_tok']}, expert intermediate "
        f"{SIZES['intermediate_size']}, experts_implementation {args.experts_implementation}; LoRA r16 on attention"
        + (" and experts" if args.lora_experts else " (experts frozen)")
        + "; SFTTrainer defaults (gradient checkpointing on), fp32"
    )
    print(
        f"timing: batch {BATCH} x seq {args.seq}, logging_steps=1, {args.reps} ABBA repetitions x {args.steps} "
        "steps per block (first step of each block dropped)"
    )
    timing = time_interleaved(model_dir, args)
    without, with_monitor = statistics.median(timing["without"]), statistics.median(timing["with"])
    ratio = with_monitor / without
    amortised = timing["probe_s"] / timing["drift_steps"] / without
    print(
        f"step time (median of {len(timing['without'])} / {len(timing['with'])} steps): without {without:.3f} s, "
        f"with monitor {with_monitor:.3f} s, ratio {ratio:.3f} (target <= 1.03) "
        f"-> {'OK' if ratio <= 1.03 else 'OVER TARGET'}"
    )
    own = timing["own_hooks_ms"] + timing["own_collect_ms"]
    print(
        f"monitor's own work per step: {own:.1f} ms = {own / 1000 / without:.2%} of a step (router hooks "
        f"{timing['own_hooks_ms']:.1f} ms, logging-step reduce + summary + log {timing['own_collect_ms']:.1f} ms)"
    )
    quartiles = [statistics.quantiles(timing[name], n=4) for name in ("without", "with")]
    print(
        f"  interquartile ranges: without {quartiles[0][0]:.3f}-{quartiles[0][2]:.3f} s, "
        f"with {quartiles[1][0]:.3f}-{quartiles[1][2]:.3f} s"
    )
    print(
        f"drift probe: {timing['probe_s']:.3f} s per measurement ({timing['probe_size']} rows), every "
        f"{timing['drift_steps']} steps = +{amortised:.2%} of a step amortised"
    )
    print(
        f"peak memory growth during training ({args.memory_steps} steps, a fresh process per run, "
        f"{args.memory_repeats} interleaved runs per cell, median [min-max]):"
    )
    growth: dict[tuple[int, bool], list[float]] = {}
    kind = ""
    for _ in range(args.memory_repeats):
        for seq in args.memory_seqs:
            for monitored in (False, True):
                result = measure_memory(model_dir, seq, monitored, args)
                growth.setdefault((seq, monitored), []).append(result["peak_growth_mb"])
                kind = result["kind"]
    for seq in args.memory_seqs:
        base, monitored = growth[(seq, False)], growth[(seq, True)]
        print(
            f"  seq {seq:>5}: without {_spread(base)}, with monitor {_spread(monitored)}, "
            f"overhead {statistics.median(monitored) - statistics.median(base):+.1f} MB ({kind})"
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
