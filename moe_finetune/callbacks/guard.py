"""EntropyGuard: turn GuardPolicy's decisions into learning-rate cuts and clean halts in a Trainer.

The policy (`routing/policy.py`) decides from numbers alone; this adapter only acts:

- a cut multiplies the optimizer's learning rate *and* the scheduler's base rates by the factor,
  so every schedule the Trainer offers (LambdaLR-based linear, cosine, constant-with-warmup, ...)
  continues with the same shape, scaled; the scheduler state saved in each checkpoint carries it;
- a halt asks the Trainer to save a checkpoint at this step and stop, and writes
  `collapse_report.md`; `moe-finetune train` then exits with code 4;
- every action is logged as `routing/guard_action` (0 none, 1 cut, 2 halt), appended to
  `guard_events.jsonl` with metrics and learning rates before/after, and printed as one line.

Decisions depend only on metrics that the monitor has all-reduced across processes, so every rank
takes the same decision at the same step; only rank 0 writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from moe_finetune.routing.policy import GuardAction, GuardPolicy, RoutingSnapshot
from moe_finetune.rundir import EVENTS_FILE, REPORT_FILE, append_jsonl, checkpoint_steps
from moe_finetune.sections import GuardConfig

ACTION_CODES = {"none": 0, "cut_lr": 1, "halt": 2}


def unwrap_scheduler(scheduler: Any) -> Any:
    """accelerate wraps the scheduler; the base rates live on the inner one."""
    return getattr(scheduler, "scheduler", scheduler)


def scale_learning_rate(optimizer: Any, scheduler: Any, factor: float) -> tuple[float, float]:
    """Multiply the current and the scheduled learning rate by `factor`; return (lr before, lr after).

    LambdaLR-style schedulers compute `base_lr * lambda(step)`, so scaling `base_lrs` keeps the
    schedule's shape for every later step; the current rate is scaled too, so the very next
    optimizer step already uses the cut rate. ReduceLROnPlateau works from the group rates alone.
    """
    before = float(optimizer.param_groups[0]["lr"])
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    inner = unwrap_scheduler(scheduler)
    if inner is not None and hasattr(inner, "base_lrs"):
        inner.base_lrs = [lr * factor for lr in inner.base_lrs]
        if hasattr(inner, "_last_lr"):
            inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return before, float(optimizer.param_groups[0]["lr"])


def peak_learning_rate(optimizer: Any, scheduler: Any) -> float:
    """The rate a cut scales: the schedule's base rate (not the warm-up- or decay-scaled current one)."""
    inner = unwrap_scheduler(scheduler)
    if inner is not None and getattr(inner, "base_lrs", None):
        return float(inner.base_lrs[0])
    return float(optimizer.param_groups[0]["lr"])


def snapshot_from_metrics(step: int, metrics: Any) -> RoutingSnapshot:
    """A RoutingMetrics (routing/metrics.py) as the policy's input."""
    return RoutingSnapshot(
        step=step,
        entropy=float(metrics.entropy),
        layer_entropy=[float(v) for v in metrics.layer_entropy],
        load_share=[[float(v) for v in row] for row in metrics.load_share],
        finite=bool(metrics.finite),
        layer_names=list(metrics.layer_names),
        dead_threshold=float(metrics.dead_threshold),
    )


def append_event(output_dir: Path, event: dict[str, Any]) -> None:
    """One guard event as one line of guard_events.jsonl."""
    append_jsonl(output_dir / EVENTS_FILE, event)


class EntropyGuard(TrainerCallback, ExportableState):
    """Cut the learning rate on a sharp routing-entropy drop; halt on expert collapse.

    Needs routing metrics at each logging step: give it the RoutingMonitor it should read
    (`attach(trainer, monitor, guard)` does), or let it find the monitor running on the same model;
    with no monitor at all it runs one of its own.
    """

    def __init__(
        self,
        config: GuardConfig | dict[str, Any] | None = None,
        monitor: Any | None = None,
        output_dir: str | Path | None = None,
        echo: Callable[[str], None] | None = print,
    ) -> None:
        self.config = config if isinstance(config, GuardConfig) else GuardConfig(**(config or {}))
        self.policy = GuardPolicy(self.config)
        self.monitor = monitor
        self._owns_monitor = False
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.echo = echo
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.is_main = True
        self.halted: GuardAction | None = None
        self.halt_step: int | None = None
        self.events: list[dict[str, Any]] = []
        self.initial_lr: float | None = None
        self._pending_log: dict[str, float] = {}

    # --- state saved into every checkpoint (trainer_state.json, stateful_callbacks) ---
    def state(self) -> dict[str, Any]:
        return {
            "args": {"config": self.config.model_dump()},
            "attributes": {
                "_saved_policy": self.policy.state_dict(),
                "_saved_initial_lr": self.initial_lr,
                "_saved_halt_step": self.halt_step,
            },
        }

    def _restore(self, saved: dict[str, Any], args: Any, state: Any) -> None:
        attributes = saved.get("attributes", {})
        policy_state = attributes.get("_saved_policy")
        if not policy_state:
            return
        self.policy.load_state_dict(policy_state)
        saved_lr = attributes.get("_saved_initial_lr")
        self.initial_lr = saved_lr
        halt_step = attributes.get("_saved_halt_step")
        requested = float(args.learning_rate)
        if saved_lr is not None and not math.isclose(requested, saved_lr, rel_tol=1e-9):
            # HF restores the scheduler's base rates from the checkpoint, which would silently ignore a
            # learning rate changed for the resumed run: the rate the user gives is the one used.
            current = peak_learning_rate(self.optimizer, self.scheduler)
            before, after = scale_learning_rate(self.optimizer, self.scheduler, requested / current)
            self.initial_lr = requested
            self._record(
                "resume_lr",
                f"resumed with learning rate {requested:g} (was {current:g})",
                state,
                None,
                before,
                after,
            )
        if halt_step is not None:
            # The run halted here before: a fresh guard episode, judged against a new baseline.
            self.policy.restart_episode()
            self._record(
                "resume_after_halt",
                f"resumed after the halt at step {halt_step}: routing baseline re-measured, cut budget reset",
                state,
                None,
                None,
                None,
            )

    # --- Trainer events ---
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        from moe_finetune.callbacks.monitor import MONITOR_ATTRIBUTE, RoutingMonitor

        self.optimizer, self.scheduler = optimizer, lr_scheduler
        self.is_main = state.is_world_process_zero
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir)
        if self.monitor is None:
            self.monitor = getattr(model, MONITOR_ATTRIBUTE, None)
        if self.monitor is None:
            # No monitor registered before us: run our own, driven by our own events.
            self.monitor = RoutingMonitor(self.output_dir, capacity_factor=self.config.capacity_factor)
            self._owns_monitor = True
            self.monitor.on_train_begin(
                args, state, control, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs
            )
        if self._on_metrics not in self.monitor._listeners:
            self.monitor.add_listener(self._on_metrics)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and saved:
            self._restore(saved[0] if isinstance(saved, list) else saved, args, state)
        if state.stateful_callbacks is not None and type(self).__name__ not in state.stateful_callbacks:
            # A checkpoint from a run without the guard: transformers' _save_checkpoint expects the key.
            state.stateful_callbacks[type(self).__name__] = self.state()
        if self.initial_lr is None:
            self.initial_lr = (
                peak_learning_rate(optimizer, lr_scheduler)
                if optimizer is not None
                else float(args.learning_rate)
            )
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._owns_monitor:
            self.monitor.on_step_end(args, state, control, **kwargs)
        return control

    def _on_metrics(self, step: int, metrics: Any, state: Any, control: Any) -> None:
        """The monitor's listener: judge this logging step's (all-reduced) metrics and act at once."""
        if not self.config.enabled or self.optimizer is None:
            return
        action = self.policy.update(
            snapshot_from_metrics(step, metrics), peak_learning_rate(self.optimizer, self.scheduler)
        )
        if action.kind == "none":
            return
        self._pending_log["routing/guard_action"] = float(ACTION_CODES[action.kind])
        if action.kind == "cut_lr":
            before, after = scale_learning_rate(self.optimizer, self.scheduler, action.factor)
            self._record("cut_lr", action.reason, state, action, before, after, metrics)
            return
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.halted = action
        self.halt_step = step
        self._record("halt", action.reason, state, action, lr, lr, metrics)
        control.should_save = True
        control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._owns_monitor:
            self.monitor.on_log(args, state, control, logs=logs, **kwargs)
        if self._pending_log and state.log_history and state.log_history[-1].get("step") == state.global_step:
            # Used without attach(): the loggers have run, but the history still gets the action.
            state.log_history[-1].update(self.pop_log())
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._owns_monitor:
            self.monitor.on_train_end(args, state, control, **kwargs)
        if self.halted is not None and self.is_main and self.output_dir is not None:
            write_collapse_report(self.output_dir, self)
        return control

    def pop_log(self) -> dict[str, float]:
        """Metrics to merge into the Trainer's next log (read by `attach`'s log wrapper)."""
        pending, self._pending_log = self._pending_log, {}
        return pending

    # --- bookkeeping ---
    def _record(
        self,
        kind: str,
        reason: str,
        state: Any,
        action: GuardAction | None,
        lr_before: float | None,
        lr_after: float | None,
        metrics: Any = None,
    ) -> None:
        event: dict[str, Any] = {
            "step": state.global_step,
            "action": kind,
            "reason": reason,
            "lr_before": lr_before,
            "lr_after": lr_after,
            "multiplier": self.policy.multiplier,
            "cuts_made": self.policy.cuts_made,
        }
        if action is not None:
            event["details"] = action.details
        if metrics is not None:
            event["metrics"] = metrics.pooled()
            event["baseline"] = {"entropy": self.policy.baseline, "layer_entropy": self.policy.layer_baseline}
            event["layer_entropy"] = list(metrics.layer_entropy)
            event["layer_load_max"] = list(metrics.layer_load_max)
            event["layer_dead_experts"] = list(metrics.layer_dead_experts)
        self.events.append(event)
        if self.is_main:
            if self.output_dir is not None:
                append_event(self.output_dir, event)
            if self.echo is not None:
                label = {"cut_lr": "CUT LR", "halt": "HALT"}.get(kind, kind)
                lrs = f" (lr {lr_before:.3g} -> {lr_after:.3g})" if kind == "cut_lr" else ""
                self.echo(f"[guard] step {state.global_step}: {label}{lrs}: {reason}")


def checkpoint_before_trouble(output_dir: Path, events: list[dict[str, Any]]) -> Path | None:
    """The latest checkpoint saved before the guard's first cut or halt: the place to resume from.

    Resuming from the halt checkpoint itself starts from collapsed routers, which the guard's
    absolute limits (expert load, dead experts) will usually stop again at once.
    """
    trouble = [e["step"] for e in events if e.get("action") in ("cut_lr", "halt")]
    if not trouble:
        return None
    first = min(trouble)
    steps = [step for step in checkpoint_steps(output_dir, complete_only=False) if step < first]
    return output_dir / f"checkpoint-{max(steps)}" if steps else None


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def write_collapse_report(output_dir: Path, guard: EntropyGuard) -> Path:
    """`collapse_report.md`: what happened, in which layers, with the numbers, and how to go on."""
    halt = guard.events[-1] if guard.events and guard.events[-1]["action"] == "halt" else None
    step = guard.halt_step
    lines = [
        "# Training halted: routing collapse",
        "",
        f"- **Step:** {step}",
        f"- **Reason:** {guard.halted.reason if guard.halted else 'n/a'}",
        f"- **Checkpoint:** `{output_dir / f'checkpoint-{step}'}` (saved at the halt)",
        f"- **Learning-rate cuts before the halt:** {guard.policy.cuts_made} (multiplier {guard.policy.multiplier:g})",
        "",
    ]
    earlier = checkpoint_before_trouble(output_dir, guard.events)
    if earlier is not None:
        lines += [
            f"To go on from `{earlier.name}`, the last checkpoint saved before the guard first acted, with a lower "
            "learning rate:",
            "",
            "```bash",
            f"moe-finetune train RECIPE --output-dir {output_dir} --resume {earlier} --set training.learning_rate=LOWER_LR",
            "```",
            "",
        ]
    lines += [
        "Resuming from the halt checkpoint itself (`--resume` alone) re-measures the guard's baseline, but starts "
        "from the collapsed routers: the guard's absolute limits (expert load, dead experts) may stop it again.",
        "",
    ]
    if halt is not None and "layer_entropy" in halt:
        baseline = halt.get("baseline", {}) or {}
        layer_baseline = baseline.get("layer_entropy") or [None] * len(halt["layer_entropy"])
        names = (
            guard.monitor.latest.layer_names if guard.monitor is not None and guard.monitor.latest else None
        ) or [str(i) for i in range(len(halt["layer_entropy"]))]
        pooled = halt.get("metrics", {})
        lines += [
            "## Routing at the halt",
            "",
            f"Pooled normalised routing entropy {_fmt(pooled.get('routing/entropy'))} "
            f"(baseline {_fmt(baseline.get('entropy'))}); largest expert load "
            f"{_fmt(pooled.get('routing/load_max'), '.2f')}x uniform; dead experts {pooled.get('routing/dead_experts')}.",
            "",
            "| layer | entropy | baseline | drop | load max (x uniform) | dead experts |",
            "|---|---|---|---|---|---|",
        ]
        for name, ent, base, load_max, dead in zip(
            names,
            halt["layer_entropy"],
            layer_baseline,
            halt["layer_load_max"],
            halt["layer_dead_experts"],
            strict=False,
        ):
            drop = (base - ent) / base if base and ent is not None and math.isfinite(ent) else None
            lines.append(
                f"| {name} | {_fmt(ent)} | {_fmt(base)} | {_fmt(drop, '.0%')} | {_fmt(load_max, '.2f')} | "
                f"{_fmt(dead, '.0f')} |"
            )
        lines.append("")
    lines += [
        "## Guard events",
        "",
        "| step | action | lr before | lr after | reason |",
        "|---|---|---|---|---|",
    ]
    for event in guard.events:
        lines.append(
            f"| {event['step']} | {event['action']} | {_fmt(event.get('lr_before'), '.3g')} | "
            f"{_fmt(event.get('lr_after'), '.3g')} | {event['reason']} |"
        )
    path = output_dir / REPORT_FILE
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
