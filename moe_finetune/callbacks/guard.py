"""EntropyGuard: turn GuardPolicy's decisions into learning-rate cuts and clean halts in a Trainer.

The policy (`routing/policy.py`) decides from numbers alone; this adapter only acts:

- a cut multiplies the optimizer's learning rate *and* the scheduler's reference rates by the factor
  (`callbacks/lr.py`), so the schedule continues with the same shape, scaled; the scheduler state
  saved in each checkpoint carries it;
- a halt asks the Trainer to save a checkpoint at this step and stop, and writes the run report
  (`report.md` and its plots, moe_finetune/report.py: what happened, in which layers, where to resume);
  `moe-finetune train` then exits with code 4;
- the baseline is the routing of the model before its first update: the routing profile when one was
  given (`use_baseline`, `lora.experts: auto`), else the RoutingMonitor's probe batch routed at train
  begin and summarised as a logging window is (`RoutingMonitor.begin_metrics`); only without either
  (`monitor.probe_size: 0`) is it the mean of the first `guards.baseline_steps` logging windows, which a
  fast collapse may already be inside. A resumed run keeps the baseline of its start (the guard's state),
  and so does one resumed from its halt: a fresh episode (cut budgets, cooldown, dead streaks start over)
  judged against the healthy start, never against the collapsed routing it resumes from. The baseline is
  written to guard_events.jsonl as a `baseline` event (its source and numbers);
- when the guard first acts, the newest checkpoint that is healthy by its own measure (saved inside a
  logging window it judged healthy, before that step: routing/guard_state.HealthyCheckpoints) is copied
  out of the Trainer's `save_total_limit` rotation (`OUTPUT/last-healthy/`, whole or not at all), so a
  halted run has a healthy point to go back to when one was saved; with none saved yet (a first action
  before the first save) it keeps nothing, never the troubled weights, and the halt says to start over;
- every action is logged as `routing/guard_action` (1 cut, 2 halt, 3 settled), appended to
  `guard_events.jsonl` with metrics and learning rates before/after, and printed as one line;
- with `guards.retention.data` (or a RetentionSet given), the retention check: the loss on rows the model
  should keep knowing, measured before the first update and at every `retention.every`-th logging step
  (callbacks/retention.py), judged by the same policy (its check 8), logged as `retention/loss` and
  `retention/rise` and written to `retention.jsonl`; its cuts and halts are guard actions like the others.

Decisions depend only on metrics that the monitor has all-reduced across processes, so every rank
takes the same decision at the same step; only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from moe_finetune.callbacks.lr import check_scheduler_can_be_cut, peak_learning_rate, scale_learning_rate
from moe_finetune.routing.guard_state import HealthyCheckpoints
from moe_finetune.routing.policy import (
    HEALTHY_CHECKS,
    GuardAction,
    GuardPolicy,
    RoutingSnapshot,
    load_limit_problem,
)
from moe_finetune.routing.reasons import percent
from moe_finetune.rundir import (
    EVENTS_FILE,
    KEPT_CHECKPOINT_DIR,
    RETENTION_FILE,
    append_jsonl,
    checkpoint_problem,
    keep_records_up_to,
    unique_sibling,
)
from moe_finetune.sections import GuardConfig

ACTION_CODES = {"none": 0, "cut_lr": 1, "halt": 2, "settled": 3}


def snapshot_from_metrics(step: int, metrics: Any, top_k: int | None = None) -> RoutingSnapshot:
    """A RoutingMetrics (routing/metrics.py) as the policy's input."""
    layer_balance = getattr(metrics, "layer_balance", None)
    return RoutingSnapshot(
        step=step,
        entropy=float(metrics.entropy),
        layer_entropy=[float(v) for v in metrics.layer_entropy],
        load_share=[[float(v) for v in row] for row in metrics.load_share],
        finite=bool(metrics.finite),
        layer_names=list(metrics.layer_names),
        dead_threshold=float(metrics.dead_threshold),
        layer_balance=None if layer_balance is None else [float(v) for v in layer_balance],
        top_k=top_k,
    )


def append_event(output_dir: Path, event: dict[str, Any]) -> None:
    """One guard event as one line of guard_events.jsonl."""
    append_jsonl(output_dir / EVENTS_FILE, event)


def _link_or_copy(src: str, dst: str) -> None:
    """One file of a kept checkpoint: weights hard-linked where the file system allows, the rest copied."""
    if src.endswith(".safetensors"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def keep_out_of_rotation(checkpoint: Path, output_dir: Path) -> Path:
    """Copy a checkpoint to OUTPUT/last-healthy/, out of the Trainer's save_total_limit rotation.

    Weights (`*.safetensors`) are hard-linked where the file system allows, which costs no space and is
    safe because safetensors replaces a file rather than writing into it; everything else (optimizer,
    scheduler and trainer state, which the Trainer writes in place when it saves that step again) is
    copied, so the kept checkpoint can never change afterwards. The copy is made in a hidden sibling of
    its own (`last-healthy/.checkpoint-N.<pid>-<id>.tmp`) and renamed into place once whole, so a crash
    or a full disk mid-copy never leaves a partial `last-healthy/checkpoint-N`; a folder already there
    is trusted only when every file in it is whole (`rundir.checkpoint_problem`), else it is replaced.
    """
    target = output_dir / KEPT_CHECKPOINT_DIR / checkpoint.name
    if target.exists() and checkpoint_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = unique_sibling(target)
    try:
        shutil.copytree(checkpoint, staged, copy_function=_link_or_copy)
        if target.exists():  # not whole (an older copy cut short): moved aside, then removed
            damaged = unique_sibling(target, ".damaged")
            os.replace(target, damaged)
            shutil.rmtree(damaged, ignore_errors=True)
        os.replace(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return target


class EntropyGuard(TrainerCallback, ExportableState):
    """Cut the learning rate on a sharp routing-entropy drop; halt on expert collapse.

    Needs routing metrics at each logging step: give it the RoutingMonitor it should read
    (`attach(trainer, monitor, guard)` does), or let it find the monitor running on the same model
    (in either order of `callbacks=[...]`); with no monitor at all it runs one of its own.
    After a halt it writes the run report into the output directory (`report_on_halt`; `moe-finetune
    train` turns it off because it writes the report itself at every end of a run).
    With `config.retention.data` (or `retention=RetentionSet(...)`) it also watches forgetting: the loss
    on those rows, cut on its rise and halted at its limit (module docstring).
    """

    def __init__(
        self,
        config: GuardConfig | dict[str, Any] | None = None,
        monitor: Any | None = None,
        output_dir: str | Path | None = None,
        echo: Callable[[str], None] | None = print,
        report_on_halt: bool = True,
        retention: Any | None = None,
    ) -> None:
        self.config = config if isinstance(config, GuardConfig) else GuardConfig(**(config or {}))
        # The retention rows (a callbacks.retention.RetentionSet): given, or read at train begin from
        # config.retention.data with the Trainer's tokenizer.
        self.retention = retention
        self._retention_given = retention is not None
        self._model: Any = None
        self._windows = 0  # logging windows judged in this run (checkpointed): retention.every counts them
        self.policy = GuardPolicy(self.config)
        self.monitor = monitor
        self._owns_monitor = False
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._output_dir_given = output_dir is not None  # else each train() writes to its args.output_dir
        self.echo = echo
        self.report_on_halt = report_on_halt
        # Routing measured before any update (the profile of `lora.experts: auto`), judged against instead of
        # the first logging windows; see use_baseline.
        self.preset_baseline: dict[str, Any] | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.is_main = True
        self.halted: GuardAction | None = None
        self.halt_step: int | None = None
        self.events: list[dict[str, Any]] = []
        self.initial_lr: float | None = None
        self.requested_lr: float | None = None  # args.learning_rate when the run started
        # which saves were healthy by the guard's own measure, from the saves and judgements every rank saw
        self.checkpoints = HealthyCheckpoints()
        self.kept_checkpoint: Path | None = None  # the healthy checkpoint kept out of rotation
        self._baseline_pending = False  # measure the baseline on the monitor's probe before the first update
        self._pending_log: dict[str, float] = {}
        self._begin: tuple[Any, Any, Any, dict[str, Any]] | None = None

    # --- state saved into every checkpoint (trainer_state.json, stateful_callbacks) ---
    def state(self) -> dict[str, Any]:
        return {
            "args": {"config": self.config.model_dump()},
            "attributes": {
                "_saved_policy": self.policy.state_dict(),
                "_saved_initial_lr": self.initial_lr,
                "_saved_requested_lr": self.requested_lr,
                "_saved_halt_step": self.halt_step,
                "_saved_kept_checkpoint": None if self.kept_checkpoint is None else str(self.kept_checkpoint),
                "_saved_windows": self._windows,
                "_saved_checkpoints": self.checkpoints.state_dict(),
            },
        }

    def _restore(self, saved: dict[str, Any], args: Any, state: Any) -> None:
        attributes = saved.get("attributes", {})
        policy_state = attributes.get("_saved_policy")
        if not policy_state:
            return
        self.policy.load_state_dict(policy_state)
        kept = attributes.get("_saved_kept_checkpoint")
        self.kept_checkpoint = Path(kept) if kept else None
        # retention.every counts on from the checkpoint, so a resumed run checks where the whole one did
        self._windows = int(attributes.get("_saved_windows", 0))
        self.checkpoints = HealthyCheckpoints.from_state_dict(attributes.get("_saved_checkpoints"))
        # the state was saved just before the Trainer's on_save of this checkpoint: count it as that save
        self.checkpoints.saved(int(state.global_step))
        self.initial_lr = attributes.get("_saved_initial_lr")
        halt_step = attributes.get("_saved_halt_step")
        # What the user asked for then (older checkpoints: the rate the run started with).
        asked_then = attributes.get("_saved_requested_lr", self.initial_lr)
        requested = float(args.learning_rate)
        self.requested_lr = requested
        if asked_then is not None and not math.isclose(requested, asked_then, rel_tol=1e-9):
            # HF restores the scheduler's base rates from the checkpoint, which would silently ignore a
            # learning rate changed for the resumed run: the rate the user gives is the one used, from
            # where the schedule stands now (a Trainer built with its own optimizer keeps its own ratio).
            current = peak_learning_rate(self.optimizer, self.scheduler)
            target = current * requested / asked_then / self.policy.multiplier
            before, after = scale_learning_rate(self.optimizer, self.scheduler, target / current)
            self.policy.state.multiplier = 1.0  # the rate is the user's again; cuts count from here
            self.initial_lr = target
            self._record(
                "resume_lr", f"resumed with learning rate {requested:g} (was {asked_then:g})", state, None, before, after
            )
        if halt_step is not None:
            # The run halted here before: a fresh guard episode (cut budgets, cooldown, dead streaks start
            # over) judged against the baseline of the run's start, not the collapsed routing it resumes
            # from; the cuts already made stay in the learning rate (and in the multiplier). The halted
            # weights are never a healthy checkpoint of the new episode.
            self.policy.restart_episode()
            self.checkpoints = HealthyCheckpoints()
            baseline = self.policy.state
            against = (
                f"judged against the baseline of the run's start (routing entropy {baseline.baseline:.3f}"
                + (
                    f", lowest layer balance {min(baseline.layer_balance_baseline):.3f}"
                    if baseline.layer_balance_baseline
                    else ""
                )
                + "), so a limit the halted routing is still past halts it again"
                if baseline.baseline is not None
                else "its baseline is still the mean of the first logging windows"
            )
            self._record(
                "resume_after_halt",
                f"resumed after the halt at step {halt_step}: {against}; the cut budgets and the cooldown start "
                "over; the retention check (if on) still judges against the base model's loss",
                state,
                None,
                None,
                None,
            )

    # --- Trainer events ---
    def use_baseline(
        self, entropy: float, layer_entropy: list[float], load_share: list[list[float]], dead_threshold: float
    ) -> None:
        """Judge the run against routing measured on the base model before any update (a routing profile of
        the training data) instead of the monitor's probe batch, a few rows. Applies to a fresh run; a
        resumed one keeps the baseline its checkpoint saved."""
        self.preset_baseline = {
            "entropy": float(entropy),
            "layer_entropy": [float(v) for v in layer_entropy],
            "load_share": [[float(v) for v in row] for row in load_share],
            "dead_threshold": float(dead_threshold),
        }

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        from moe_finetune.callbacks.monitor import MONITOR_ATTRIBUTE

        self.optimizer, self.scheduler = optimizer, lr_scheduler
        self.is_main = state.is_world_process_zero
        if not self._output_dir_given:
            self.output_dir = Path(args.output_dir)
        if self._owns_monitor:  # a guard reused for another train(): its own monitor starts over too
            self.monitor, self._owns_monitor = None, False
        fresh = state.global_step == 0
        if fresh:  # a fresh run: nothing carries over from an earlier train() call
            self.policy = GuardPolicy(self.config)
            self.halted, self.halt_step, self.kept_checkpoint = None, None, None
            self.events, self.initial_lr, self.requested_lr = [], None, None
            self.checkpoints = HealthyCheckpoints()
        self._baseline_pending = False
        if self.config.enabled and lr_scheduler is not None:
            check_scheduler_can_be_cut(lr_scheduler)
        if self.is_main:
            # a resumed run continues after its checkpoint's step: events past it (from the attempt
            # that stopped) did not happen in this run's history; a fresh run starts the file over
            keep_records_up_to(self.output_dir / EVENTS_FILE, int(state.global_step))
        if self.monitor is None:
            self.monitor = getattr(model, MONITOR_ATTRIBUTE, None)
        if self.monitor is None:
            # A RoutingMonitor listed after us starts in its own on_train_begin, after this one: wait
            # for the first step to see whether it did, before running one of our own.
            self._begin = (args, state, control, {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler, **kwargs})
        else:
            self._listen(self.monitor)
        self._model, self._windows = model, 0
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and saved:
            self._restore(saved[0] if isinstance(saved, list) else saved, args, state)
        if state.stateful_callbacks is not None and type(self).__name__ not in state.stateful_callbacks:
            # A checkpoint from a run without the guard: transformers' _save_checkpoint expects the key.
            state.stateful_callbacks[type(self).__name__] = self.state()
        if self.initial_lr is None:
            self.initial_lr = (
                peak_learning_rate(optimizer, lr_scheduler) if optimizer is not None else float(args.learning_rate)
            )
        if self.requested_lr is None:
            self.requested_lr = float(args.learning_rate)
        if fresh and self.preset_baseline is not None:
            self.policy.set_baseline(**self.preset_baseline)
            # whoever gave it says so (train.py prints the profile's line): recorded, not echoed again
            self._record_baseline("profile", state, self.preset_baseline, echo=False)
        elif fresh:
            self._baseline_pending = True
        if self._baseline_pending and self.monitor is not None and getattr(self.monitor, "capture", None) is not None:
            self._baseline_from_probe(state)  # the monitor began before us; else at the first step's begin
        if self.config.enabled and (self.config.retention.enabled or self._retention_given) and model is not None:
            self._start_retention(args, state, model, kwargs.get("processing_class"))
        return control

    def _baseline_from_probe(self, state: Any) -> None:
        """Take the monitor's probe, routed at this train begin before any update, as the baseline; without
        one, say that the first `baseline_steps` logging windows will be averaged instead."""
        self._baseline_pending = False
        step = int(state.global_step)
        metrics = getattr(self.monitor, "begin_metrics", None)
        problem = None
        if metrics is None or getattr(self.monitor, "begin_step", None) != step:
            problem = "no probe batch was routed at train begin (monitor.probe_size 0, or the probe failed)"
        else:
            baseline = {
                "entropy": float(metrics.entropy),
                "layer_entropy": [float(v) for v in metrics.layer_entropy],
                "load_share": [[float(v) for v in row] for row in metrics.load_share],
                "dead_threshold": float(metrics.dead_threshold),
            }
            try:
                self.policy.set_baseline(**baseline)
            except ValueError as err:  # a layer the probe's rows never reached: nan
                problem = f"the probe's routing cannot be a baseline ({err})"
            else:
                self._record_baseline("probe", state, baseline, tokens=int(metrics.tokens))
                return
        if self.config.enabled:
            n = self.config.baseline_steps
            self._record(
                "baseline",
                f"{problem}: the baseline is the mean of the first {n} logging window{'s' * (n != 1)}, "
                "which a collapse in the first steps would already be inside",
                state,
                None,
                None,
                None,
            )

    def _record_baseline(
        self, source: str, state: Any, baseline: dict[str, Any], *, tokens: int | None = None, echo: bool = True
    ) -> None:
        """One `baseline` event: where the baseline came from and its numbers (the report's start)."""
        if not self.config.enabled:
            return
        balance = list(self.policy.state.layer_balance_baseline or [])
        load_max = [max(row) * len(row) for row in baseline.get("load_share") or [] if row]
        where = {
            "probe": f"routing of the probe batch ({tokens or 0:,} tokens) before the first update",
            "profile": "the routing profile measured on the base model before any update",
            "windows": f"the mean of the first {self.config.baseline_steps} logging windows",
        }[source]
        reason = (
            f"{where}: routing entropy {baseline['entropy']:.3f} (lowest layer "
            f"{min(baseline['layer_entropy']):.3f})"
            + (f", balance lowest layer {min(balance):.3f}" if balance else "")
            + (f", largest expert load {max(load_max):.2f}x uniform" if load_max else "")
        )
        event = {
            "source": source,
            "tokens": tokens,
            "entropy": baseline["entropy"],
            "layer_entropy": list(baseline["layer_entropy"]),
            "layer_balance": balance or None,
            "layer_load_max": load_max or None,
            # (L, E) each expert's load share at the start: the report's per-expert start
            "load_share": [list(row) for row in baseline.get("load_share") or []] or None,
        }
        self._record("baseline", reason, state, None, None, None, details=event, echo=echo)

    def _start_retention(self, args: Any, state: Any, model: Any, tokenizer: Any) -> None:
        """Read the retention rows (unless given) and, on a fresh run, measure the base loss before any update."""
        settings = self.config.retention
        if self.retention is None:
            from moe_finetune.callbacks.retention import RetentionSet

            if tokenizer is None:
                raise ValueError(
                    "EntropyGuard: guards.retention.data needs the tokenizer; the Trainer passes it as processing_class"
                )
            self.retention = RetentionSet.from_settings(
                settings,
                tokenizer,
                path=settings.data,
                training_max_length=getattr(args, "max_length", None),
                training_batch_size=int(args.per_device_train_batch_size),
            )
        if self.is_main:
            keep_records_up_to(self.output_dir / RETENTION_FILE, int(state.global_step))
        stored = self.policy.state
        if stored.retention_base is not None and stored.retention_fingerprint in (None, self.retention.fingerprint):
            stored.retention_fingerprint = self.retention.fingerprint
            return  # resumed: the base loss of the fresh start came back with the guard's state
        if stored.retention_base is not None:
            self.policy.reset_retention()
            self._record(
                "retention_rows_changed",
                f"the retention rows ({self.retention.source}) differ from those the checkpoint's base loss was "
                f"measured on: the base is measured again at step {state.global_step}",
                state,
                None,
                None,
                None,
            )
        self._check_retention(state, None)
        if stored.retention_base is None or not math.isfinite(stored.retention_base):
            from moe_finetune.errors import RecipeError

            raise RecipeError(
                f"guards.retention.data: the model's loss on the {len(self.retention.rows)} retention rows of "
                f"{self.retention.source} is not a finite number at step {state.global_step}, so forgetting "
                "cannot be judged against it (a model that overflows in float16, or weights already broken); "
                "check the model on those rows, or train in bfloat16 or float32"
            )
        stored.retention_fingerprint = self.retention.fingerprint
        if self.echo is not None and self.is_main:
            rows, tokens = len(self.retention.rows), self.retention.tokens
            halt = f", halts {percent(settings.halt_rise)} above it" if settings.halt_rise is not None else ""
            every = "every logging step" if settings.every == 1 else f"every {settings.every} logging steps"
            step = int(state.global_step)
            when = "before any update" if step == 0 else f"at step {step} (a checkpoint without a retention base)"
            self.echo(
                f"[guard] retention check: {rows} rows ({tokens:,} tokens) of {self.retention.source}, loss "
                f"{self.policy.state.retention_base:.3f} {when} ({self.retention.last_seconds:.1f} s a "
                f"check), {every}; cuts the learning rate {percent(settings.cut_rise)} above it or the last cut "
                f"(at most {settings.max_cuts}){halt}"
            )

    def _check_retention(self, state: Any, control: Any, *, cut_this_step: bool = False) -> str:
        """Measure the retention loss now (every rank), act on the policy's answer and return its kind."""
        assert self.retention is not None and self._model is not None
        step = int(state.global_step)
        loss = self.retention.loss(self._model)
        lr = peak_learning_rate(self.optimizer, self.scheduler) if self.optimizer is not None else 0.0
        action = self.policy.retention(step, loss, lr, cut_this_step=cut_this_step)
        base = self.policy.state.retention_base
        rise = loss / base - 1 if base and math.isfinite(loss) else math.nan
        if control is not None:  # the base measurement (before the first step) is in retention.jsonl only
            self._pending_log["retention/loss"] = loss
            self._pending_log["retention/rise"] = rise
        if self.is_main and self.output_dir is not None:
            append_jsonl(
                self.output_dir / RETENTION_FILE,
                {
                    "step": step,
                    "loss": loss,
                    "base": base,
                    "rise": rise,
                    "reference": self.policy.state.retention_reference,
                    "lr": float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None,
                    "action": action.kind,
                    "check": action.details.get("check"),
                    "seconds": self.retention.last_seconds,
                },
            )
        if control is not None and action.kind in ("cut_lr", "halt"):
            self._act(action, step, state, control, None)
        return action.kind

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._begin is not None:
            from moe_finetune.callbacks.monitor import MONITOR_ATTRIBUTE, RoutingMonitor

            begin_args, begin_state, begin_control, begin_kwargs = self._begin
            self._begin = None
            found = getattr(begin_kwargs["model"], MONITOR_ATTRIBUTE, None)
            if found is None:
                # No monitor registered at all: run our own, driven by our own events.
                found = RoutingMonitor(self.output_dir)
                self._owns_monitor = True
                found.on_train_begin(begin_args, begin_state, begin_control, **begin_kwargs)
            self._listen(found)
        if self._baseline_pending:
            self._baseline_from_probe(state)
        return control

    def _listen(self, monitor: Any) -> None:
        self.monitor = monitor
        if self._on_metrics not in monitor._listeners:
            monitor.add_listener(self._on_metrics)
        capture = getattr(monitor, "capture", None)
        if capture is not None and self.config.enabled:
            problem = load_limit_problem(self.config, capture.num_experts, capture.top_k)
            if problem is not None:
                warnings.warn(problem, UserWarning, stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs):
        if self._owns_monitor:
            self.monitor.on_step_end(args, state, control, **kwargs)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._owns_monitor:
            self.monitor.on_epoch_end(args, state, control, **kwargs)
        return control

    def _on_metrics(self, step: int, metrics: Any, state: Any, control: Any) -> None:
        """The monitor's listener: judge this logging step's (all-reduced) metrics and act at once."""
        if not self.config.enabled or self.optimizer is None:
            return
        top_k = getattr(getattr(self.monitor, "capture", None), "top_k", None)
        collecting = self.policy.baseline is None
        action = self.policy.update(
            snapshot_from_metrics(step, metrics, top_k), peak_learning_rate(self.optimizer, self.scheduler)
        )
        check = action.details.get("check")
        if collecting and self.policy.baseline is not None:  # the fallback: the first windows' mean is complete
            baseline = {"entropy": self.policy.baseline, "layer_entropy": list(self.policy.layer_baseline or [])}
            self._record_baseline("windows", state, baseline)
        if action.details.get("unreachable_load_layers"):
            self._record("warning", action.reason, state, action, None, None, metrics)
        if action.kind != "none":
            self._act(action, step, state, control, metrics)
        self._windows += 1
        retention = None
        if self.retention is not None and action.kind != "halt" and self._windows % self.config.retention.every == 0:
            retention = self._check_retention(state, control, cut_this_step=action.kind == "cut_lr")
        if check != "replay":  # a step judged before this resume: its window was accounted for then
            self.checkpoints.judged(step, check in HEALTHY_CHECKS and retention not in ("cut_lr", "halt"))

    def _act(self, action: GuardAction, step: int, state: Any, control: Any, metrics: Any) -> None:
        """Carry out a cut, a halt or a `settled` finding, of the routing checks or the retention check."""
        self._pending_log["routing/guard_action"] = float(ACTION_CODES[action.kind])
        if action.kind in ("cut_lr", "halt"):
            self._keep_healthy_checkpoint(step)
        if action.kind == "settled":
            lr = float(self.optimizer.param_groups[0]["lr"])
            self._record("settled", action.reason, state, action, lr, lr, metrics)
            return
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

    def _keep_healthy_checkpoint(self, step: int) -> None:
        """When the guard first acts, keep the newest healthy checkpoint before `step` out of rotation.

        Healthy by the guard's own measure: saved inside a logging window it judged healthy
        (HealthyCheckpoints), so never one inside the window that showed the trouble, nor the weights
        at the trouble itself. Decided from the saves and judgements every rank has seen, never from one
        rank's disk. With no healthy checkpoint saved yet it keeps nothing: a halted run then says to
        start again at a lower learning rate.
        """
        if self.kept_checkpoint is not None or self.output_dir is None:
            return
        healthy = self.checkpoints.before(step)
        if healthy is not None:
            self._keep(healthy)

    def _keep(self, saved_step: int) -> None:
        """Every rank records where the kept copy is; the main process makes it (when the original is here)."""
        assert self.output_dir is not None
        name = f"checkpoint-{saved_step}"
        self.kept_checkpoint = self.output_dir / KEPT_CHECKPOINT_DIR / name
        if self.is_main and (self.output_dir / name).is_dir():
            keep_out_of_rotation(self.output_dir / name, self.output_dir)
        elif self.is_main and not self.kept_checkpoint.is_dir():
            warnings.warn(
                f"EntropyGuard: the healthy {name} was rotated away (save_total_limit) before the guard acted: "
                "nothing is kept in last-healthy/",
                stacklevel=2,
            )

    def on_save(self, args, state, control, **kwargs):
        self.checkpoints.saved(int(state.global_step))
        return control

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
        if self.halted is not None and self.is_main and self.output_dir is not None and self.report_on_halt:
            from moe_finetune.report import write_report

            try:
                write_report(self.output_dir)
            except Exception as err:  # noqa: BLE001 - the halt and its checkpoint matter more than plots
                problem = f"{type(err).__name__}: {err}"
                warnings.warn(f"EntropyGuard: the run report was not written ({problem})", stacklevel=2)
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
        details: dict[str, Any] | None = None,
        echo: bool = True,
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
        if details is not None:
            event["details"] = details
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
            if self.echo is not None and echo:
                label = {"cut_lr": "CUT LR", "halt": "HALT", "settled": "SETTLED", "warning": "WARNING"}.get(kind, kind)
                lrs = f" (lr {lr_before:.3g} -> {lr_after:.3g})" if kind == "cut_lr" else ""
                self.echo(f"[guard] step {state.global_step}: {label}{lrs}: {reason}")
