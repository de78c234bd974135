"""RoutingMonitor: routing health at every logging step of any transformers Trainer (SFTTrainer too).

At train begin it hooks every router (routing/capture.py) and routes a small fixed probe batch
taken from the training data, the reference for drift; the same forwards, summarised as a logging
window is (`begin_metrics`), are the routing of the model before this run's first update, which the
EntropyGuard takes as its baseline. At each logging step (in `on_step_end`,
after DefaultFlowCallback has set `control.should_log`) it

1. all-reduces the flattened running sums across processes (one collective, callbacks/ranks.py), so
   every rank computes identical numbers and guards on every rank take the same decision;
2. summarises them (metrics.py, one host sync) and, every `drift_steps`, re-routes the probe; a probe
   that fails (at train begin or at a drift check) on any rank turns drift off on every rank, agreed in
   the same collective that reduces the probe's numbers, so no rank is left waiting in one;
3. resets the sums, calls the listeners (the EntropyGuard acts in the same step), and queues the
   pooled `routing/*` values for the Trainer's next log.

Why the values are queued rather than added in `on_log`: `Trainer.log` appends a copy of `logs`
to `state.log_history` and the `report_to` integrations are callbacks that run before ours, so
keys added inside `on_log` reach neither (DESIGN.md section 3). `attach(trainer, monitor)` wraps
`trainer.log` so queued values join the same log entry as the loss. Passed bare as
`callbacks=[RoutingMonitor()]` the monitor still patches the newest `state.log_history` entry and
writes routing.jsonl, and warns once that the loggers cannot see the metrics.

Only the main process writes `OUTPUT/routing.jsonl`: one JSON object per logging step with the
step, learning rate, loss, pooled metrics, drift, and per layer entropy, load[E], prob[E], ...
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from moe_finetune.callbacks.ranks import all_reduce_measured, all_reduce_sum, world_size
from moe_finetune.routing.capture import RoutingCapture
from moe_finetune.routing.metrics import RoutingMetrics, summarise
from moe_finetune.routing.probe import Drift, ProbeResult, compare_probes, probe_routing, take_probe_batch
from moe_finetune.rundir import ROUTING_FILE, ROUTING_PROBE_FILE, append_jsonl, json_safe, keep_records_up_to

Listener = Callable[[int, RoutingMetrics, Any, Any], None]
Echo = Callable[[str], None]

# Set on the model while a monitor runs, so other callbacks (EntropyGuard) can find it.
MONITOR_ATTRIBUTE = "_moe_finetune_monitor"

_BARE_WARNING = (
    "RoutingMonitor was passed to the Trainer directly: routing/* metrics reach trainer.state.log_history "
    "and {path}, but the report_to loggers (TensorBoard, W&B, MLflow, ...) log before any user callback "
    "and cannot see them. Use `moe_finetune.callbacks.attach(trainer, monitor)` instead of "
    "`callbacks=[...]` to send them through the Trainer's own log."
)


def _short_layer_name(name: str) -> str:
    return name.removeprefix("model.")


class RoutingMonitor(TrainerCallback):
    """Logs routing health (`routing/*`) at every logging step and writes routing.jsonl.

    Args:
        output_dir: where routing.jsonl goes; None = the Trainer's `args.output_dir`.
        capacity_factor: expert capacity (x uniform) at which `routing/drop_fraction` is counted.
        probe_size: rows of the training data routed at the start and again for drift (0 = no drift).
        drift_steps: re-route the probe at the first logging step at least this many steps after the
            last measurement (and at the first logging step). A probe is one no-grad forward of
            `probe_size` rows: every logging step would cost far more than the monitor itself.
        dead_threshold: an expert is dead below this multiple of the uniform load share.
        history_size: how many of the latest routing.jsonl records `history` keeps in memory (at most
            twice that between trims).
        echo: where the end-of-training table is printed (main process only); None = silent.

    The probe's routing at the start is kept in the run directory (routing_probe.pt), so a resumed run
    measures drift from the start too; routing.jsonl lines past the checkpoint's step (from the attempt
    that stopped) are dropped. `begin_metrics` (at `begin_step`) is the probe's routing at this train
    begin as RoutingMetrics, all-reduced like a logging step's: the guard's baseline (None without a probe).
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        *,
        capacity_factor: float = 1.25,
        probe_size: int = 8,
        drift_steps: int = 50,
        dead_threshold: float = 0.1,
        history_size: int = 1000,
        echo: Echo | None = None,
    ) -> None:
        if probe_size < 0 or drift_steps < 1:
            raise ValueError(f"probe_size must be >= 0 and drift_steps >= 1, got {probe_size}, {drift_steps}")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.capacity_factor = capacity_factor
        self.probe_size = probe_size
        self.drift_steps = drift_steps
        self.dead_threshold = dead_threshold
        self.echo = echo
        self.capture: RoutingCapture | None = None
        self.latest: RoutingMetrics | None = None
        self.latest_step: int | None = None
        self.latest_drift: Drift | None = None
        # The latest routing.jsonl records, on every rank: bounded, because a 100k-step run of a
        # 64-expert model would otherwise keep every per-layer record in host memory (the file has them all).
        self.history: list[dict[str, Any]] = []
        self.history_size = history_size
        self._listeners: list[Listener] = []
        self._model: Any = None
        self._probe_batch: dict[str, torch.Tensor] | None = None
        self._probe_start: ProbeResult | None = None
        # The probe's routing at this train begin, before the run's first update: the guard's baseline.
        self.begin_metrics: RoutingMetrics | None = None
        self.begin_step: int | None = None
        self._probe_chunk: int | None = None  # the training batch size: a probe never outgrows a step
        self._last_drift_step: int | None = None
        self._pending_log: dict[str, float] = {}
        self._pending_record: dict[str, Any] | None = None
        self._is_main = True
        self._warned_bare = False

    # ------------------------------------------------------------------ public

    @property
    def routing_file(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / ROUTING_FILE

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(step, metrics, state, control)` right after each logging step's metrics.

        It runs inside `on_step_end`, before the Trainer logs, saves or evaluates, so it can change
        `control` (stop, save) or the optimizer in the very step that showed the problem.
        """
        self._listeners.append(listener)

    def pop_log(self) -> dict[str, float]:
        """Metrics queued for the Trainer's next log (taken by `attach`'s wrapper of `trainer.log`)."""
        pending, self._pending_log = self._pending_log, {}
        return pending

    def _drift_when(self) -> str:
        """Drift is re-measured every `drift_steps` only: say when, where that is not the table's step."""
        measured = self._last_drift_step
        return f" (measured at step {measured})" if measured is not None and measured != self.latest_step else ""

    def format_table(self, metrics: RoutingMetrics | None = None) -> str:
        """A compact per-layer table of the latest (or given) metrics, for the end of a run."""
        metrics = metrics if metrics is not None else self.latest
        if metrics is None:
            return "routing: no logging step was reached, so there are no routing metrics"
        experts = len(metrics.load_share[0]) if metrics.load_share else 0
        width = max([len("layer"), *(len(_short_layer_name(n)) for n in metrics.layer_names)])
        drift = self.latest_drift
        title = (
            f"routing at step {self.latest_step}: entropy {metrics.entropy:.3f} (min {metrics.entropy_min:.3f}), "
            f"load max {metrics.load_max:.2f}x uniform, aux {metrics.aux_loss:.3f}, "
            f"drop {metrics.drop_fraction:.1%} at capacity {metrics.capacity_factor:g}"
            + (f", drift {drift.topk_change:.1%}{self._drift_when()}" if drift is not None else "")
            + ("" if metrics.finite else "  [NON-FINITE router output]")
        )
        header = f"  {'layer':<{width}}  entropy  load max x{experts}  load cv  dead  drop"
        rows = [title, header]
        for i, name in enumerate(metrics.layer_names):
            rows.append(
                f"  {_short_layer_name(name):<{width}}  {metrics.layer_entropy[i]:7.3f}  "
                f"{metrics.layer_load_max[i]:{len(f'load max x{experts}')}.2f}  {metrics.layer_load_cv[i]:7.3f}  "
                f"{_fmt_count(metrics.layer_dead_experts[i]):>4}  {metrics.layer_drop_fraction[i]:5.1%}"
            )
        return "\n".join(rows)

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("RoutingMonitor.on_train_begin needs the model (the Trainer passes it)")
        self._release()
        self._is_main = bool(state.is_world_process_zero)
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir)
        if self._is_main:
            keep_records_up_to(self.routing_file, int(state.global_step))
        self._model = model
        self.capture = RoutingCapture(model, capacity_factor=self.capacity_factor, train_only=True)
        setattr(model, MONITOR_ATTRIBUTE, self)
        self._probe_batch, self._probe_start, self._last_drift_step = None, None, None
        self.begin_metrics, self.begin_step = None, int(state.global_step)
        if self.probe_size > 0:
            now, failure = None, None
            try:
                self._probe_batch = take_probe_batch(train_dataloader, self.probe_size)
                self._probe_chunk = int(getattr(args, "per_device_train_batch_size", 0) or 0) or None
                if self._probe_batch is not None:
                    now = probe_routing(self.capture, self._probe_batch, self._probe_chunk)
                    self._probe_start = self._reference_probe(int(state.global_step), now)
            except Exception as err:  # drift is optional: never fail a training run over the probe
                failure, now = err, None
            self.begin_metrics = self._summarise_probe(now, failure)
        return control

    def _summarise_probe(self, probe: ProbeResult | None, failure: Exception | None) -> RoutingMetrics | None:
        """The probe's routing at train begin as a logging step's metrics, reduced across ranks the same way;
        None when it routed no real token, or when any rank has no probe (it failed there, or found no rows):
        then drift is off on every rank alike, and so is the guard's baseline from the probe."""
        assert self.capture is not None
        like = self.capture.empty_sums()
        local = probe.sums.as_tensor() if probe is not None and probe.sums is not None else None
        flat, missing = all_reduce_measured(local, like.as_tensor())
        if flat is None:
            if failure is not None or missing < world_size():
                here = f"here: {failure}" if failure is not None else "here it routed fine"
                warnings.warn(
                    f"RoutingMonitor: no probe batch on {missing} of {world_size()} rank(s) ({here}), so "
                    "routing/drift is off on every rank",
                    stacklevel=3,
                )
            self._probe_batch, self._probe_start = None, None
            return None
        metrics = summarise(like.from_tensor(flat), capacity_factor=self.capacity_factor, dead_threshold=self.dead_threshold)
        return metrics if metrics.tokens > 0 else None

    def _reference_probe(self, step: int, now: ProbeResult) -> ProbeResult:
        """Routing of the probe at the start of the run: `now` on a fresh start (and kept in the run
        directory), read back on a resume, so routing/drift stays "since the start" across resumes."""
        assert self.capture is not None and self._probe_batch is not None
        path = self.output_dir / ROUTING_PROBE_FILE if self.output_dir is not None else None
        if step == 0:
            if self._is_main and path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "topk": now.topk.cpu(),
                        "counts": now.counts.cpu(),
                        "valid": None if now.valid is None else now.valid.cpu(),
                        "batch": _batch_fingerprint(self._probe_batch),
                    },
                    path,
                )
            return now
        if path is not None and path.is_file():
            saved = torch.load(path, map_location=self.capture.device)
            same_rows = saved.get("batch") == _batch_fingerprint(self._probe_batch)
            if same_rows and tuple(saved["topk"].shape) == tuple(now.topk.shape):
                valid = saved["valid"].to(self.capture.device) if saved["valid"] is not None else None
                return ProbeResult(topk=saved["topk"].to(self.capture.device), counts=saved["counts"], valid=valid)
        warnings.warn(
            f"RoutingMonitor: no reference probe from the start of this run in {path}: routing/drift is "
            f"measured from the resumed step {step}",
            stacklevel=2,
        )
        return now

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback (always first in the Trainer's list) has decided should_log by now.
        if self.capture is not None and control.should_log:
            self.close_window(state, control, optimizer=kwargs.get("optimizer"))
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # logging_strategy "epoch": DefaultFlowCallback sets should_log here, not at a step end. With
        # "steps" the window was closed at the step end already and is empty now (nothing logged twice).
        if self.capture is not None and control.should_log:
            self.close_window(state, control, optimizer=kwargs.get("optimizer"))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_log:
            # Not taken by attach()'s wrapper: the loggers have already run. Patch the history entry
            # the Trainer has just appended (it carries this step) so log_history still has them.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending_log)
            self._pending_log = {}
            if not self._warned_bare and self._is_main:
                self._warned_bare = True
                warnings.warn(_BARE_WARNING.format(path=self.routing_file), UserWarning, stacklevel=2)
        if self._pending_record is not None and logs is not None:
            self._pending_record["loss"] = logs.get("loss", self._pending_record.get("loss"))
            if "learning_rate" in logs:
                self._pending_record["lr"] = logs["learning_rate"]
            self._write_record()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending_record is not None:
            self._write_record()
        if self.echo is not None and self._is_main and self.latest is not None:
            self.echo(self.format_table())
        self._release()
        return control

    # ------------------------------------------------------------------ the logging step

    def close_window(self, state: Any, control: Any, *, optimizer: Any = None) -> None:
        """Reduce, summarise and reset the sums of this logging window; notify the listeners."""
        assert self.capture is not None
        sums = self.capture.sums
        if world_size() > 1:
            sums = sums.from_tensor(all_reduce_sum(sums.as_tensor()))  # every sum in one float64 vector
        metrics = summarise(sums, capacity_factor=self.capacity_factor, dead_threshold=self.dead_threshold)
        self.capture.reset()
        step = int(state.global_step)
        if metrics.tokens == 0:
            return  # nothing routed in this window (no forward, or only evaluation): nothing to report
        drift = self._measure_drift(step)
        self.latest, self.latest_step = metrics, step
        pooled = metrics.pooled()
        if drift is not None:
            pooled["routing/drift"] = drift.topk_change
        self._pending_log = dict(pooled)
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
        self._pending_record = self._record(step, state, metrics, drift, lr)
        for listener in list(self._listeners):
            listener(step, metrics, state, control)

    def _measure_drift(self, step: int) -> Drift | None:
        if self._probe_start is None or self._probe_batch is None or self.capture is None:
            return None
        due = self._last_drift_step is None or step - self._last_drift_step >= self.drift_steps
        if not due:
            return None
        self._last_drift_step = step
        layers = self.capture.num_layers
        local, failure = None, None
        try:
            drift = compare_probes(self._probe_start, probe_routing(self.capture, self._probe_batch, self._probe_chunk))
            values = [drift.topk_change, drift.load_js, *drift.layer_topk_change, *drift.layer_load_js]
            local = torch.tensor(values, dtype=torch.float64)
        except Exception as err:  # drift is optional: never fail a training run over the probe
            failure = err
        # the mean over ranks: identical probes give identical numbers anyway, and ranks fed different data
        # (so different probe rows) still log and decide on the same values
        summed, missing = all_reduce_measured(local, torch.zeros(2 + 2 * layers, dtype=torch.float64))
        if summed is None:
            here = f"here: {failure}" if failure is not None else "here it routed fine"
            warnings.warn(
                f"RoutingMonitor: the drift probe failed at step {step} on {missing} of {world_size()} rank(s) "
                f"({here}), so routing/drift is off on every rank from here",
                stacklevel=2,
            )
            self._probe_start, self._probe_batch = None, None
            return None
        mean = (summed / world_size()).tolist()
        self.latest_drift = Drift(mean[0], mean[1], mean[2 : 2 + layers], mean[2 + layers :])
        return self.latest_drift

    def _record(
        self, step: int, state: Any, metrics: RoutingMetrics, drift: Drift | None, lr: float | None
    ) -> dict[str, Any]:
        pooled = {key.removeprefix("routing/"): value for key, value in metrics.pooled().items()}
        return {
            "step": step,
            "epoch": state.epoch,
            "lr": lr,
            "loss": None,
            **pooled,
            "drift": None if drift is None else drift.topk_change,
            "drift_load_js": None if drift is None else drift.load_js,
            "tokens": metrics.tokens,
            "finite": metrics.finite,
            "capacity_factor": metrics.capacity_factor,
            "num_experts": len(metrics.load_share[0]) if metrics.load_share else 0,
            "layers": [
                {
                    **layer,
                    "drift": None if drift is None else drift.layer_topk_change[i],
                    "drift_load_js": None if drift is None else drift.layer_load_js[i],
                }
                for i, layer in enumerate(metrics.per_layer())
            ],
        }

    def _write_record(self) -> None:
        record, self._pending_record = json_safe(self._pending_record), None
        self.history.append(record)
        if len(self.history) > 2 * self.history_size:  # trimmed in batches: appends stay O(1) amortised
            del self.history[: -self.history_size]
        if self._is_main and self.routing_file is not None:
            append_jsonl(self.routing_file, record)

    def _release(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        if self._model is not None and getattr(self._model, MONITOR_ATTRIBUTE, None) is self:
            delattr(self._model, MONITOR_ATTRIBUTE)
        self._model = None


def _batch_fingerprint(batch: dict[str, torch.Tensor]) -> str:
    """A digest of the probe's tokens: a saved reference is only comparable to the same rows."""
    ids = batch.get("input_ids", batch.get("inputs_embeds"))
    return hashlib.sha256(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _fmt_count(value: float) -> str:
    return "-" if not math.isfinite(value) else str(int(value))
