"""What the interrupt vote costs per step under two ranks: a blocking all-reduce at every step end (the old
InterruptCallback) against the overlapped one (an async all-reduce read one step later), interleaved.

    python benchmarks/interrupt_overhead.py             # ~1-2 minutes on a 2-core CPU
    python benchmarks/interrupt_overhead.py --blocks 16 --block-steps 30

The script launches itself under `torchrun --nproc_per_node 2` (gloo, CPU, one torch thread per rank);
both ranks train one tiny SFTTrainer + LoRA run (`build_tiny("mixtral")`), and a dispatching callback
hands each step end to the old or the new interrupt callback in alternating blocks (ABAB...), so both arms
share the model, the data and the machine's drift. No signal is sent: what is measured is the cost of
agreeing that nobody asked to stop.

Step time: from one on_step_begin to the next (everything every callback does included), the first step
of each block dropped (the switch, and the new arm's first vote, land there). The callback's own time:
the wall time inside the arm's on_step_end, which is the direct account of the vote, free of the step's
noise. On CPU the blocking all-reduce costs only the collective's latency plus whatever skew the ranks
have at the step end; on GPUs it would also make the host wait for the whole step's kernels
(`.item()`), which this machine cannot show.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH = 4
MAX_LENGTH = 64


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def old_interrupt_callback():
    """The InterruptCallback as it was: a blocking MAX all-reduce of the flag, and `.item()`, at every step end."""
    from moe_finetune.callbacks.interrupt import InterruptCallback

    class BlockingInterruptCallback(InterruptCallback):
        def _agreed(self) -> bool:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                flag = torch.tensor([1.0 if self.requested else 0.0])
                if dist.get_backend() == "nccl":
                    flag = flag.cuda()
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                return bool(flag.item() > 0)
            return self.requested

        def on_train_begin(self, args, state, control, **kwargs):
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if self._agreed():
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            return control

    return BlockingInterruptCallback()


def texts(rows: int) -> list[dict[str, str]]:
    """Rows long enough to fill MAX_LENGTH tokens, so every batch has the same shape."""
    return [
        {"text": " ".join(f"Example {i}.{j}: the number {i + j} doubled is {2 * (i + j)}." for j in range(8))}
        for i in range(rows)
    ]


def make_trainer(model_dir: Path, output_dir: Path, steps: int):
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    model, _ = apply_lora(model, LoraSection(), get_family("mixtral"))
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        logging_steps=10**9,  # no logging steps: their `.item()` would be a sync of its own
        max_length=MAX_LENGTH,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        bf16=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    data = datasets.Dataset.from_list(texts(rows=BATCH * 2 * (steps + 1)))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    for noisy in (transformers.PrinterCallback, transformers.ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


def arms_callback(arms: dict[str, Any], warmup: int, blocks: int, block_steps: int):
    """Hands each step end to the arm of its block (none during warm-up and the final step)."""
    from transformers import TrainerCallback

    class Alternate(TrainerCallback):
        def __init__(self) -> None:
            self.active: str | None = None
            self.steps: list[tuple[int, str | None, float]] = []  # (step, arm, seconds in its on_step_end)

        def arm_at(self, step: int) -> str | None:
            block = (step - warmup - 1) // block_steps
            if step <= warmup or block >= blocks:
                return None
            return "old" if block % 2 == 0 else "new"

        def on_step_end(self, args, state, control, **kwargs):
            name = self.arm_at(state.global_step)
            if name != self.active:
                if self.active is not None:  # the new arm finishes its vote in flight
                    arms[self.active].on_train_end(args, state, control)
                if name is not None:
                    arms[name].on_train_begin(args, state, control)
                self.active = name
            spent = 0.0
            if name is not None:
                start = time.perf_counter()
                arms[name].on_step_end(args, state, control)
                spent = time.perf_counter() - start
            self.steps.append((state.global_step, name, spent))
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.active is not None:
                arms[self.active].on_train_end(args, state, control)

    return Alternate()


def clock_callback():
    """Times from one on_step_begin to the next: the whole step, every callback included."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

    return Clock()


def rank_main(args: argparse.Namespace) -> None:
    """One rank: train, then rank 0 prints both arms' figures (step times are rank 0's; own times both ranks')."""
    import tempfile

    import torch
    import torch.distributed as dist

    from moe_finetune.callbacks.interrupt import InterruptCallback

    torch.set_num_threads(1)
    quiet()
    steps = args.warmup + args.blocks * args.block_steps + 1
    trainer = make_trainer(Path(args.model_dir), Path(tempfile.mkdtemp(prefix="moe-bench-int-")), steps)
    clock = clock_callback()
    arms = {"old": old_interrupt_callback(), "new": InterruptCallback()}
    alternate = arms_callback(arms, args.warmup, args.blocks, args.block_steps)
    trainer.callback_handler.callbacks.insert(0, clock)  # its on_step_begin runs before any other
    trainer.add_callback(alternate)  # last, where train.py puts the InterruptCallback
    trainer.train()
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected two ranks"
    step_times = [b - a for a, b in zip(clock.begins, clock.begins[1:], strict=False)]
    first_of_block = {args.warmup + 1 + b * args.block_steps for b in range(args.blocks)}
    samples: dict[str, list[float]] = {"old": [], "new": []}
    own: dict[str, list[float]] = {"old": [], "new": []}
    for (step, name, spent), seconds in zip(alternate.steps, step_times, strict=True):
        if name is not None and step not in first_of_block:
            samples[name].append(seconds)
            own[name].append(spent)
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, own)
    if dist.get_rank() != 0:
        return
    old, new = statistics.median(samples["old"]), statistics.median(samples["new"])
    print(f"machine: {machine()}")
    print(
        f"run: 2 ranks (torchrun, gloo, CPU, 1 torch thread each), tiny Mixtral (build_tiny), LoRA defaults, "
        f"batch {BATCH} x {MAX_LENGTH} per rank; {args.warmup} warm-up steps, then {args.blocks} ABAB blocks of "
        f"{args.block_steps} steps (first step of each dropped)"
    )
    print(
        f"step time, rank 0 (median of {len(samples['old'])} / {len(samples['new'])} steps): "
        f"old (blocking all-reduce) {1000 * old:.2f} ms, new (overlapped) {1000 * new:.2f} ms, "
        f"ratio new/old {new / old:.3f}, difference {1000 * (old - new):+.3f} ms/step"
    )
    for name in ("old", "new"):
        quartiles = statistics.quantiles(samples[name], n=4)
        print(f"  {name}: interquartile range {1000 * quartiles[0]:.2f}-{1000 * quartiles[2]:.2f} ms")
    print("callback's own time per step (median / mean / 90th percentile):")
    for rank, record in enumerate(gathered):
        print(f"  rank {rank}: old {_summary(record['old'])}, new {_summary(record['new'])}")


def _summary(seconds: list[float]) -> str:
    p90 = statistics.quantiles(seconds, n=10)[-1]
    return f"{1000 * statistics.median(seconds):.3f} / {1000 * statistics.fmean(seconds):.3f} / {1000 * p90:.3f} ms"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, load average {load:.2f}; torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=10, help="steps before the first block (not counted)")
    parser.add_argument("--blocks", type=int, default=16, help="blocks, alternating old/new (default 16)")
    parser.add_argument("--block-steps", type=int, default=30, help="steps per block (default 30)")
    parser.add_argument("--rank-child", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.blocks < 2 or args.blocks % 2:
        parser.error("--blocks must be even and at least 2 (ABAB...)")
    if args.rank_child:
        args.model_dir = args.rank_child
        rank_main(args)
        return
    quiet()
    from moe_finetune.models.tiny import build_tiny

    started = time.perf_counter()
    model_dir = build_tiny("mixtral")  # built once here, so the two ranks only read it
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--rank-child",
        str(model_dir),
        "--warmup",
        str(args.warmup),
        "--blocks",
        str(args.blocks),
        "--block-steps",
        str(args.block_steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"the two-rank run failed (exit {done.returncode})")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
