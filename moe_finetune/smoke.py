"""`moe-finetune smoke --family NAME`: a tiny random model of one family, a few monitored LoRA steps.

The quickest check that an install works and that a family's routers are found and read right:
it builds (or reuses) the tiny model, applies the default LoRA, prints the aux-loss check, trains
a few SFTTrainer steps on a slice of the bundled data with the RoutingMonitor attached, and prints
the per-layer routing table. Seconds on a laptop CPU; nothing is downloaded.

A run that is not healthy is reported with exit 4, the code of "training halted by a guard": a guard
that halts it, router output that is not finite (the guard's own halt condition, whether or not a guard
was attached to see it), or a training loss that is not finite. Each is the smoke run's health check
failing on a tiny random model, which is neither a bug in moe-finetune nor an invalid input (exit 2).
No routing metrics at all means our family spec no longer finds the routers: a bug, exit 1.
`SmokeResult.problem` says which one it was.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_finetune.errors import MoeFinetuneError, RecipeError, TrainingHalted
from moe_finetune.routing.metrics import RoutingMetrics

Echo = Callable[[str], None]


@dataclass
class SmokeResult:
    family: str
    steps: int
    seconds: float
    train_loss: float | None
    metrics: RoutingMetrics | None  # routing at the last logging step
    table: str
    aux_lines: list[str]
    routing_records: list[dict[str, Any]] = field(default_factory=list)  # the routing.jsonl lines
    log_history: list[dict[str, Any]] = field(default_factory=list)
    requested_steps: int | None = None
    metrics_step: int | None = None  # the step `metrics` were logged at
    halt_reason: str | None = None  # the reason of a guard (in extra_callbacks) that halted the run
    halt_step: int | None = None
    output_dir: Path | None = None  # where routing.jsonl (and a halt's report) stay; None = removed

    @property
    def problem(self) -> str | None:
        """What was wrong with the run, as one sentence with the numbers in it; None when it was healthy."""
        if self.halt_reason is not None:
            where = f" (report in {self.output_dir})" if self.output_dir is not None else ""
            return f"training halted by the routing guard at step {self.halt_step}: {self.halt_reason}{where}"
        if self.metrics is None:
            return (
                f"no routing metrics were logged in {self.steps} steps: the RoutingMonitor saw no routed token, "
                f"so the {self.family} routers were not read (a change in this transformers version's modeling "
                "code is the likely cause)"
            )
        if not self.metrics.finite:
            return (
                f"the router output was not finite (NaN or inf) at step {self.metrics_step}: routing metrics, "
                "and any guard decision based on them, cannot be trusted"
            )
        if self.train_loss is None or not math.isfinite(self.train_loss):
            return f"the training loss was {self.train_loss} after {self.steps} steps, with finite routing"
        if self.requested_steps is not None and self.steps < self.requested_steps:
            return f"training stopped after {self.steps} of {self.requested_steps} steps"
        return None

    @property
    def ok(self) -> bool:
        """Trained every step, logged routing, every router output and the loss were finite, no guard halted."""
        return self.problem is None

    def raise_for_problem(self) -> None:
        """Raise what the run's problem means: TrainingHalted (exit 4) for an unhealthy run, and an
        internal error (exit 1) when no routing metrics were logged at all, because then our family spec
        no longer finds the routers in this transformers: a bug of ours to fix, not a run to halt."""
        if self.problem is None:
            return
        if self.halt_reason is None and self.metrics is None:
            raise MoeFinetuneError(f"smoke {self.family}: {self.problem}; this is a bug in moe-finetune, please report it")
        raise TrainingHalted(f"smoke {self.family}: {self.problem}")


def _smoke_dataset(rows: int) -> Any:
    """The first `rows` prompt/completion pairs of the bundled data (or synthetic ones without it).

    Read directly rather than through data.load_data, which parses and shuffles all 13,000 rows:
    a smoke run needs a few dozen and should start in a second.
    """
    import gzip
    import json

    import datasets

    from moe_finetune.models.tiny import BUNDLED_DATA

    pairs: list[dict[str, str]] = []
    if BUNDLED_DATA.exists():
        with gzip.open(BUNDLED_DATA, "rt", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                pairs.append({"prompt": str(row["prompt"]), "completion": str(row["completion"])})
                if len(pairs) >= rows:
                    break
    if not pairs:
        pairs = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(rows)]
    return datasets.Dataset.from_list(pairs)


def run_smoke(
    family: str = "mixtral",
    steps: int = 8,
    echo: Echo | None = print,
    *,
    output_dir: str | Path | None = None,
    rows: int = 128,
    batch_size: int = 4,
    logging_steps: int = 1,
    learning_rate: float = 1e-4,
    max_length: int = 128,
    extra_callbacks: Sequence[Any] = (),
) -> SmokeResult:
    """Train `steps` monitored LoRA steps on the tiny random model of `family`; print what routing did.

    `output_dir` keeps routing.jsonl (default: a temporary directory, removed afterwards).
    `extra_callbacks` are attached after the RoutingMonitor (e.g. an EntropyGuard, which then reads
    the monitor's metrics in the same step); a guard among them that halts is reported in the result.
    """
    if steps < 1:
        raise RecipeError(f"smoke: steps (--steps) must be at least 1, got {steps}")
    import torch
    import transformers
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from moe_finetune.aux_check import describe_aux_loss
    from moe_finetune.callbacks import EntropyGuard, PerLayerAuxLoss, RoutingMonitor, attach
    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.models.tiny import build_tiny
    from moe_finetune.sections import LoraSection

    say: Echo = echo if echo is not None else (lambda _line: None)
    start = time.perf_counter()
    family_spec = get_family(family)
    model_dir = build_tiny(family_spec)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    model, coverage = apply_lora(model, LoraSection(), family_spec)
    dataset = _smoke_dataset(max(rows, steps * batch_size))
    say(
        f"smoke: tiny {family_spec.name} ({family_spec.num_experts(model.config)} experts, top-{family_spec.top_k(model.config)}), "
        f"{steps} steps of batch {batch_size} on {len(dataset)} rows"
    )
    say(coverage.line())

    with tempfile.TemporaryDirectory(prefix="moe-smoke-") as scratch:
        run_dir = Path(output_dir) if output_dir is not None else Path(scratch)
        args = SFTConfig(
            output_dir=str(run_dir),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            logging_steps=logging_steps,
            learning_rate=learning_rate,
            max_length=max_length,
            report_to="none",
            save_strategy="no",
            bf16=bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
            dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=True,
            # HF logs a NaN loss as the mean of earlier ones by default, which would hide the failure
            # this run exists to find.
            logging_nan_inf_filter=False,
            seed=0,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        for noisy in (PrinterCallback, ProgressCallback):  # our own lines instead of raw log dicts
            trainer.remove_callback(noisy)
        # the recipes' default load-balancing loss (model.aux_loss: per_layer), so smoke checks what runs
        PerLayerAuxLoss().attach(trainer)
        aux_lines = describe_aux_loss(trainer.model, args)
        for line in aux_lines:
            say(line)
        monitor = RoutingMonitor(probe_size=8, drift_steps=max(1, steps // 2))
        attach(trainer, monitor, *extra_callbacks)
        result = trainer.train()

    for record in monitor.history:
        drift = f", drift {record['drift']:.1%}" if record.get("drift") is not None else ""
        loss = f"{record['loss']:.3f}" if record.get("loss") is not None else "n/a"
        say(
            f"  step {record['step']:>3}: loss {loss}, routing entropy {_fmt(record['entropy'])}, "
            f"load max {_fmt(record['load_max'], '.2f')}x, drop {_fmt(record['drop_fraction'], '.1%')}{drift}"
        )
    table = monitor.format_table()
    say(table)
    halted = next(
        (cb for cb in extra_callbacks if isinstance(cb, EntropyGuard) and cb.halted is not None), None
    )
    return SmokeResult(
        family=family_spec.name,
        steps=trainer.state.global_step,
        seconds=time.perf_counter() - start,
        train_loss=result.training_loss,
        metrics=monitor.latest,
        table=table,
        aux_lines=aux_lines,
        routing_records=list(monitor.history),
        log_history=list(trainer.state.log_history),
        requested_steps=steps,
        metrics_step=monitor.latest_step,
        halt_reason=halted.halted.reason if halted is not None else None,
        halt_step=halted.halt_step if halted is not None else None,
        output_dir=Path(output_dir) if output_dir is not None else None,
    )


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
