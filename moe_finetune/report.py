"""The run report: `report.md` and PNG plots that show a run's routing health at a glance.

`moe-finetune report RUN_DIR [--compare OTHER_RUN]` writes it, and `train` writes it at the end of
every run, after a guard halt and after an interrupt; after a halt it holds what the guard found (the
step, the reason, the routing of every layer at the halt, the checkpoint to go back to), so a run has
one report, not two. Everything comes from the run directory alone (routing.jsonl, guard_events.jsonl,
recipe.resolved.yaml, run_summary.json, the checkpoints), so a report can be written again, years later,
from any run this project has written:

- routing.jsonl before the balance metric (Nov 2026) has no `balance` / `balance_min` / `prob_balance`:
  each layer's balance is computed here from its load share, with the monitor's definition;
- a line cut short (a process killed mid-write) or records repeated by an attempt that stopped are
  left out and said so in the report's notes, never a crash.

Here: reading a run into arrays, the verdict, report.md and `write_report`, the one place that writes
the plots; the plots themselves (and their layout for 2 or 48 layers) are in `report_plots.py`, imported
only when a figure is drawn. Nothing here imports torch, transformers or matplotlib: the command starts in
a fraction of a second and the guard can call it from its halt path.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_finetune.errors import RecipeError, write_failure
from moe_finetune.rundir import (
    ADAPTER_DIR,
    EVENTS_FILE,
    KEPT_CHECKPOINT_DIR,
    REPORT_FILE,
    RESOLVED_RECIPE_FILE,
    RETENTION_FILE,
    ROUTING_FILE,
    RUN_SUMMARY_FILE,
    adapter_problem,
    checkpoint_problems,
    checkpoint_steps,
    read_jsonl,
    write_whole,
)
from moe_finetune.sections import DEFAULT_LEARNING_RATE, MAX_MOE_LEARNING_RATE, TINY_PREFIX

LOAD_SHARE_PLOT = "load_share.png"
FINAL_LOAD_PLOT = "final_load.png"
ENTROPY_PLOT = "routing_entropy.png"
TRAINING_PLOT = "training.png"
COMPARE_PLOT = "compare.png"

MAX_LAYER_PANELS = 8  # more layers than this: the worst ones first (see the module docstring)
DEFAULT_BASELINE_STEPS = 3  # guards.baseline_steps' default: the guard's start is its first 3 logging steps
DEFAULT_HALT_BALANCE_DROP = 0.3  # guards.halt_balance_drop's default


# ------------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class RoutingSeries:
    """routing.jsonl as arrays over T logging steps, L MoE layers, E experts; nan where nothing was logged."""

    steps: np.ndarray  # (T,) training step of each record, ascending
    layer_names: list[str]  # (L,)
    lr: np.ndarray  # (T,)
    loss: np.ndarray  # (T,)
    entropy: np.ndarray  # (T, L) normalised per-token routing entropy (routing/entropy per layer)
    balance: np.ndarray  # (T, L) normalised entropy of the layer's load share (routing/balance per layer)
    load: np.ndarray  # (T, L, E) share of top-k assignments per expert (sums to 1 per layer)
    dead: np.ndarray  # (T, L) experts below the dead line
    drop: np.ndarray  # (T, L) share of assignments over capacity
    drift: np.ndarray  # (T,) pooled top-k drift; nan at the steps where it was not measured
    layer_drift: np.ndarray  # (T, L)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[2])

    @property
    def load_ratio(self) -> np.ndarray:
        """Load share x E: 1.0 = uniform, 0 = dead, E/k = every token picks the expert.   (T, L, E)"""
        return self.load * self.num_experts

    def column_of(self, step: int) -> int:
        """The record (column of a heatmap) a step falls in: the first logging step at or after it."""
        return int(min(np.searchsorted(self.steps, step), len(self.steps) - 1))


@dataclass
class RunData:
    """Everything a report says about one run directory."""

    run_dir: Path
    recipe: dict[str, Any]  # recipe.resolved.yaml ({} without it)
    summary: dict[str, Any]  # run_summary.json ({} for runs not started by `moe-finetune train`)
    series: RoutingSeries | None  # None: no routing record could be read
    events: list[dict[str, Any]]
    checkpoints: list[int]
    has_adapter: bool
    notes: list[str] = field(default_factory=list)  # what could not be read, said in the report
    retention: list[dict[str, Any]] = field(default_factory=list)  # retention.jsonl: the guard's retention checks

    @property
    def name(self) -> str:
        return str(self.recipe.get("name") or self.summary.get("name") or self.run_dir.name)

    @property
    def baseline_steps(self) -> int:
        guards = self.recipe.get("guards") or {}
        return int(guards.get("baseline_steps") or DEFAULT_BASELINE_STEPS)

    @property
    def start(self) -> Start:
        """Each layer's start (`run_start`); only for a run with routing records."""
        assert self.series is not None
        return run_start(self.series, self.events, self.baseline_steps)

    @property
    def guard(self) -> str:
        """ "on", "off" (the recipe's guards.enabled is false) or "unknown" (no recipe and no guard event)."""
        if self.recipe:
            return "off" if (self.recipe.get("guards") or {}).get("enabled") is False else "on"
        return "on" if self.events else "unknown"

    @property
    def halt_balance_drop(self) -> float | None:
        """The guard's balance halt (a fraction below each layer's start); None when the run had no guard."""
        if self.guard != "on":
            return None
        value = (self.recipe.get("guards") or {}).get("halt_balance_drop")
        return float(value) if isinstance(value, (int, float)) else DEFAULT_HALT_BALANCE_DROP

    @property
    def max_steps(self) -> int | None:
        value = self.summary.get("max_steps") or (self.recipe.get("training") or {}).get("max_steps")
        return int(value) if isinstance(value, (int, float)) and value > 0 else None

    @property
    def last_step(self) -> int | None:
        """The step the run got to: the summary's, else the newest routing record's or checkpoint's."""
        if isinstance(self.summary.get("step"), int):
            return int(self.summary["step"])
        candidates = [int(self.series.steps[-1])] if self.series is not None else []
        candidates += self.checkpoints[-1:] + [
            int(e["step"]) for e in self.events if isinstance(e.get("step"), int)
        ]
        return max(candidates) if candidates else None


def looks_like_a_run(path: Path) -> bool:
    """A directory `train` (or a Trainer with our callbacks) wrote: a recipe, routing, events or checkpoints."""
    names = (RESOLVED_RECIPE_FILE, ROUTING_FILE, EVENTS_FILE, RUN_SUMMARY_FILE)
    return any((path / name).is_file() for name in names) or bool(checkpoint_steps(path, complete_only=False))


def read_run(run_dir: str | Path, *, what: str = "RUN_DIR") -> RunData:
    """Read a run directory; a missing folder or one that is not a run is bad input (exit 2)."""
    path = Path(run_dir)
    if not path.exists():
        raise RecipeError(f"report: {what} {path} does not exist; give the output directory of a run")
    if not path.is_dir():
        raise RecipeError(f"report: {what} {path} is not a directory; give the output directory of a run")
    if not looks_like_a_run(path):
        raise RecipeError(
            f"report: {what} {path} is not a run directory: it has none of {RESOLVED_RECIPE_FILE}, "
            f"{ROUTING_FILE}, {EVENTS_FILE} or checkpoint-N/ (give the output_dir a `moe-finetune train` wrote)"
        )
    notes: list[str] = []
    recipe = _read_mapping(path / RESOLVED_RECIPE_FILE, notes, yaml_file=True)
    summary = _read_mapping(path / RUN_SUMMARY_FILE, notes, yaml_file=False)
    skipped: list[int] = []
    records = list(read_jsonl(path / ROUTING_FILE, skipped))
    if skipped:
        notes.append(_skipped_note(ROUTING_FILE, skipped, len(records)))
    series = None
    if records:
        series, parse_notes = parse_routing(records)
        notes += parse_notes
    elif not skipped:
        notes.append(
            f"no {ROUTING_FILE}: the RoutingMonitor was off (monitor.enabled false) or no logging step was "
            "reached, so there are no routing plots"
        )
    problems = checkpoint_problems(path)
    for step, problem in problems.items():
        if problem is not None:
            notes.append(f"checkpoint-{step} is not whole ({problem}): left out; it cannot be resumed from")
    adapter = path / ADAPTER_DIR
    broken_adapter = adapter_problem(adapter) if adapter.is_dir() else None
    if broken_adapter is not None:
        notes.append(f"{ADAPTER_DIR}/ is not whole ({broken_adapter}): it cannot be merged or served")
    skipped_events: list[int] = []
    events = list(read_jsonl(path / EVENTS_FILE, skipped_events))
    if skipped_events:
        notes.append(_skipped_note(EVENTS_FILE, skipped_events, len(events)))
    skipped_checks: list[int] = []
    retention = [r for r in read_jsonl(path / RETENTION_FILE, skipped_checks) if isinstance(r.get("step"), int)]
    if skipped_checks:
        notes.append(_skipped_note(RETENTION_FILE, skipped_checks, len(retention)))
    return RunData(
        run_dir=path,
        recipe=recipe,
        summary=summary,
        series=series,
        events=events,
        checkpoints=[step for step, problem in problems.items() if problem is None],
        has_adapter=adapter.is_dir() and broken_adapter is None,
        notes=notes,
        retention=retention,
    )


def _read_mapping(path: Path, notes: list[str], *, yaml_file: bool) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        if yaml_file:
            from moe_finetune.yamlread import read_yaml

            data = read_yaml(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - a damaged side file is reported, never fatal to the report
        notes.append(f"{path.name} could not be read ({type(err).__name__}: {err}); reported without it")
        return {}
    return data if isinstance(data, dict) else {}


def _skipped_note(name: str, lines: list[int], kept: int) -> str:
    shown = ", ".join(str(n) for n in lines[:5]) + (" ..." if len(lines) > 5 else "")
    return (
        f"{name}: {len(lines)} line(s) could not be read (line {shown}: cut short or damaged, as a process "
        f"killed while writing leaves them); this report covers the {kept} record(s) that could"
    )


def layer_balance(load: np.ndarray) -> np.ndarray:
    """Normalised entropy of each load-share row: -sum s ln s / ln E, in [0, 1].   (..., E) -> (...)

    The monitor's `routing/balance` per layer (routing/metrics.py `balance`), for routing.jsonl written
    before it was logged; numpy here because routing/ pulls torch in. Rows are renormalised (a row of
    rounded shares need not sum to exactly 1); a row with any nan, or summing to 0, gives nan.
    """
    num_experts = load.shape[-1]
    total = load.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = load / total
        terms = np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0)
        result = -terms.sum(axis=-1) / math.log(num_experts)
    bad = ~np.isfinite(load).all(axis=-1) | ~(total[..., 0] > 0)
    return np.where(bad, np.nan, result)


def parse_routing(records: Sequence[dict[str, Any]]) -> tuple[RoutingSeries | None, list[str]]:
    """routing.jsonl records (any version this project wrote) as arrays, and notes on what was left out.

    Records are put in step order; a step logged twice (an attempt that stopped past its checkpoint, in
    files written before resumes dropped those lines) keeps its later record; records whose layers or
    experts differ from the newest record's are left out.
    """
    notes: list[str] = []
    by_step: dict[int, dict[str, Any]] = {}
    unusable = 0
    for record in records:
        layers = record.get("layers")
        if not isinstance(record.get("step"), (int, float)) or not isinstance(layers, list) or not layers:
            unusable += 1
            continue
        by_step[int(record["step"])] = record
    repeated = len(records) - unusable - len(by_step)
    if unusable:
        notes.append(f"{ROUTING_FILE}: {unusable} record(s) without a step or per-layer values were left out")
    if repeated:
        notes.append(
            f"{ROUTING_FILE}: {repeated} step(s) were logged twice (an earlier attempt); the later record is used"
        )
    if not by_step:
        return None, notes
    ordered = [by_step[step] for step in sorted(by_step)]
    shape = _layer_shape(ordered[-1])
    kept = [r for r in ordered if _layer_shape(r) == shape]
    if len(kept) < len(ordered):
        notes.append(
            f"{ROUTING_FILE}: {len(ordered) - len(kept)} record(s) with another number of layers or experts "
            f"than the last one ({shape[0]} x {shape[1]}) were left out"
        )
    if shape[1] < 2:
        notes.append(f"{ROUTING_FILE}: the records have no per-expert load, so there are no routing plots")
        return None, notes

    def column(key: str) -> np.ndarray:
        return np.array([_number(r.get(key)) for r in kept], dtype=float)

    def per_layer(key: str) -> np.ndarray:
        return np.array([[_number(layer.get(key)) for layer in r["layers"]] for r in kept], dtype=float)

    load = np.array([[layer["load"] for layer in r["layers"]] for r in kept], dtype=float)
    balance = per_layer("balance")
    missing = np.isnan(balance) & np.isfinite(load).all(axis=-1)
    if missing.any():  # routing.jsonl from before the balance metric: the same quantity, from the load
        balance = np.where(missing, layer_balance(load), balance)
    names = [str(layer.get("layer", i)) for i, layer in enumerate(kept[-1]["layers"])]
    series = RoutingSeries(
        steps=np.array([int(r["step"]) for r in kept]),
        layer_names=names,
        lr=column("lr"),
        loss=column("loss"),
        entropy=per_layer("entropy"),
        balance=balance,
        load=load,
        dead=per_layer("dead_experts"),
        drop=per_layer("drop_fraction"),
        drift=column("drift"),
        layer_drift=per_layer("drift"),
    )
    return series, notes


def _layer_shape(record: dict[str, Any]) -> tuple[int, int]:
    layers = record["layers"]
    widths = {len(layer.get("load") or []) if isinstance(layer, dict) else -1 for layer in layers}
    return (len(layers), widths.pop()) if len(widths) == 1 else (len(layers), -1)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


# ------------------------------------------------------------------------------------------------
# Pure summaries: baselines, the worst layers, how the run ended, the verdict


def baseline(values: np.ndarray, steps: int) -> np.ndarray:
    """Mean of the first `steps` logging steps, per column: the start of a run without a `baseline` event.
    (T, L) -> (L,), (T, L, E) -> (L, E)"""
    head = values[: max(1, steps)]
    with np.errstate(invalid="ignore"), quiet_nan_warnings():
        return np.nanmean(head, axis=0)


@dataclass
class Start:
    """Each layer's routing at the start of a run: what the guard judged it against.

    The guard's `baseline` event when it recorded one with its numbers (guard_events.jsonl: the probe batch
    routed before the first update, or the routing profile of the base model, written at step 0; or the mean
    of the first `guards.baseline_steps` windows, without a probe); else, for runs written before that
    event or without a guard, the mean of the first `baseline_steps` logging steps. The windows' mean of a
    collapse that begins inside them already holds it (the collapse demo's layer 1 read 0.78 "at the start"
    against a true 0.98), which is why the recorded baseline comes first.
    """

    entropy: np.ndarray  # (L,) routing entropy per layer
    balance: np.ndarray  # (L,) balance per layer
    load_ratio: np.ndarray  # (L, E) each expert's load share x E
    words: str  # what the start is, for the report's sentences
    before_training: bool  # measured before the first update (drawn at step 0)

    @classmethod
    def of_windows(cls, series: RoutingSeries, steps: int, words: str | None = None) -> Start:
        n = max(1, steps)
        return cls(
            entropy=baseline(series.entropy, n),
            balance=baseline(series.balance, n),
            load_ratio=baseline(series.load_ratio, n),
            words=words or f"the mean of the first {n} logging step{'s' * (n != 1)}",
            before_training=False,
        )


_START_WORDS = {
    "probe": "the routing of the probe batch before the first update (the guard's baseline)",
    "profile": "the routing profile of the base model, before any update (the guard's baseline)",
}


def run_start(series: RoutingSeries, events: Sequence[dict[str, Any]], baseline_steps: int) -> Start:
    """Each layer's start (`Start`): the guard's recorded baseline, else the first logging steps' mean."""
    layers, experts = series.num_layers, series.num_experts
    windows = Start.of_windows(series, baseline_steps)
    for event in events:
        details = event.get("details")
        if event.get("action") != "baseline" or not isinstance(details, dict):
            continue
        entropy = _layer_values(details.get("layer_entropy"), layers)
        if entropy is None:
            continue
        balance = _layer_values(details.get("layer_balance"), layers)
        load = details.get("load_share")
        rows = [_layer_values(row, experts) for row in load] if isinstance(load, list) and len(load) == layers else []
        load_ratio = np.array(rows) * experts if rows and all(r is not None for r in rows) else windows.load_ratio
        source = details.get("source")
        words = _START_WORDS.get(source) or (
            f"the mean of the first {baseline_steps} logging steps (the guard's baseline, with no probe batch)"
        )
        return Start(
            entropy=entropy,
            balance=balance if balance is not None else windows.balance,
            load_ratio=load_ratio,
            words=words,
            before_training=source in _START_WORDS and event.get("step") == 0,
        )
    return windows


def _layer_values(values: Any, count: int) -> np.ndarray | None:
    """A JSON list of `count` numbers (null = nan) as an array, else None."""
    if not isinstance(values, list) or len(values) != count:
        return None
    return np.array([_number(v) for v in values], dtype=float)


def balance_fall(series: RoutingSeries, start: Start) -> np.ndarray:
    """Largest fall of each layer's balance below its own start, as a fraction of the start.   (L,)

    The guard's view of collapse (a layer's balance 30% below its baseline halts): a layer whose load
    was concentrated from the start (narrow-domain data) does not rank as collapsing unless it gets worse.
    """
    with np.errstate(invalid="ignore", divide="ignore"), quiet_nan_warnings():
        lowest = np.nanmin(series.balance, axis=0)
        fall = (start.balance - lowest) / start.balance
    return np.where(np.isfinite(fall), fall, -np.inf)


def layers_to_show(series: RoutingSeries, start: Start, limit: int = MAX_LAYER_PANELS) -> list[int]:
    """All layers in model order when they fit; else the `limit` whose balance fell most, worst first."""
    if series.num_layers <= limit:
        return list(range(series.num_layers))
    fall = balance_fall(series, start)
    with quiet_nan_warnings():
        peak = np.nan_to_num(np.nanmax(series.load_ratio[-1], axis=-1), nan=-np.inf)
    order = sorted(range(series.num_layers), key=lambda i: (-fall[i], -peak[i], i))
    return order[:limit]


def worst_first(series: RoutingSeries, start: Start) -> list[int]:
    """Every layer, the one whose balance fell most first (the per-layer table's order)."""
    fall = balance_fall(series, start)
    return sorted(range(series.num_layers), key=lambda i: (-fall[i], i))


def trouble_checkpoint(run_dir: Path, events: Sequence[dict[str, Any]]) -> Path | None:
    """The latest checkpoint saved before the guard's first cut or halt: the place to resume from.

    Resuming from the halt checkpoint itself starts from collapsed routers, which the guard's
    absolute limits (expert load, dead experts) will usually stop again at once. The copy the guard
    keeps out of `save_total_limit` rotation (last-healthy/) is preferred; a rotation that has not yet
    reached the original leaves both. A guard that recorded its `baseline` judged which checkpoints were
    healthy and kept the one to go back to: then only last-healthy/ counts (a checkpoint merely saved
    before the first action may be inside the window that showed the trouble).
    """
    trouble = [
        e["step"] for e in events if e.get("action") in ("cut_lr", "halt") and isinstance(e.get("step"), int)
    ]
    if not trouble:
        return None
    first = min(trouble)
    judged = any(e.get("action") == "baseline" for e in events)
    for folder in (run_dir / KEPT_CHECKPOINT_DIR,) if judged else (run_dir / KEPT_CHECKPOINT_DIR, run_dir):
        steps = [step for step in checkpoint_steps(folder) if step <= first]
        if folder == run_dir:
            steps = [step for step in steps if step < first]
        if steps:
            return folder / f"checkpoint-{max(steps)}"
    return None


def final_halt(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The halt that ended the run: the last halt event, unless the run was resumed after it."""
    for event in reversed(events):
        action = event.get("action")
        if action == "halt":
            return event
        if isinstance(action, str) and action.startswith("resume"):
            return None
    return None


def lower_rate(events: Sequence[dict[str, Any]], fallback: float | None = None) -> str:
    """A learning rate to go on with after a halt, as a number a command can carry: ten times below the rate
    the run halted at (the last event's `lr_after`, else its `lr_before`), else below `fallback`, and at most
    1e-5, the field's rate for MoE fine-tuning: a tenth of a rate far above it still collapses trained
    routers (the collapse demo halted at 4e-3; resumed at 4e-4 it halted again, at 1e-5 it ran to the end)."""
    rates = [
        e.get("lr_after") if isinstance(e.get("lr_after"), (int, float)) else e.get("lr_before")
        for e in events
        if e.get("action") in ("cut_lr", "halt")
    ]
    rates = [r for r in rates if isinstance(r, (int, float)) and r > 0]
    rate = rates[-1] if rates else fallback
    return f"{min(rate / 10, 1e-5):.2g}" if rate else "1e-5"


def run_status(run: RunData) -> str:
    """How the run ended: finished, halted, interrupted, failed (an error `train` caught and recorded), or
    stopped (no end recorded: killed, or running).

    `train` records it in run_summary.json; without one (a Trainer driven by hand, an older run) the
    run directory says it: a halt event not resumed from, or a final adapter.
    """
    recorded = run.summary.get("status")
    if recorded in ("finished", "halted", "interrupted", "failed"):
        return str(recorded)
    if final_halt(run.events) is not None:
        return "halted"
    if run.has_adapter:
        return "finished"
    return "stopped"


@dataclass(frozen=True)
class Verdict:
    """How the run went, in one line a person can act on."""

    kind: str  # healthy | cut | halted | interrupted | failed | stopped | unguarded
    line: str
    step: int | None = None
    cuts: int = 0


def judge(
    status: str,
    events: Sequence[dict[str, Any]],
    *,
    last_step: int | None,
    max_steps: int | None = None,
    kept_checkpoint: Path | None = None,
    newest_checkpoint: int | None = None,
    guard: str = "on",
    worst_fall: tuple[str, float] | None = None,
    halt_drop: float = DEFAULT_HALT_BALANCE_DROP,
    failure: str | None = None,
) -> Verdict:
    """The verdict from how the run ended and its guard events (pure: no files).

    `guard` is "on", "off" (guards.enabled false) or "unknown" (no recipe, no event); a finished run that no
    guard watched is not called healthy: `worst_fall` (the layer whose balance fell most below its start,
    and by how much) says whether the guard would have had cause to halt it.
    """
    cuts = [e for e in events if e.get("action") == "cut_lr"]
    settled = next((e for e in events if e.get("action") == "settled"), None)
    of = f" of {max_steps}" if max_steps else ""
    cut_words = _cut_words(cuts)
    if status == "halted":
        halt = final_halt(events) or {}
        step = halt.get("step", last_step)
        before = f" after {len(cuts)} learning-rate cut{'s' * (len(cuts) != 1)}" if cuts else ""
        go_on = (
            f"Go back to `{kept_checkpoint.parent.name}/{kept_checkpoint.name}`, saved before the guard first "
            "acted, with a lower learning rate (see *Halted*)."
            if kept_checkpoint
            else "No checkpoint was saved before the guard first acted: start again at a lower learning rate."
        )
        return Verdict(
            "halted",
            f"**Halted at step {step}**{of}{before} because {halt.get('reason', 'the guard halted it')}. {go_on}",
            step=step,
            cuts=len(cuts),
        )
    if status == "interrupted":
        so_far = f"; the learning rate had been cut {cut_words}" if cuts else ""
        return Verdict(
            "interrupted",
            f"**Interrupted at step {last_step}**{of} (Ctrl-C or SIGTERM); checkpoint-{last_step} was saved{so_far}. "
            "Continue it with `--resume`.",
            step=last_step,
            cuts=len(cuts),
        )
    go_on = (
        f"continue from checkpoint-{newest_checkpoint} with `--resume`"
        if newest_checkpoint is not None
        else "no checkpoint was saved to continue from"
    )
    if status == "failed":
        return Verdict(
            "failed",
            f"**Failed at step {last_step}**{of}: {failure or 'an error ended it'}; {go_on}.",
            step=last_step,
            cuts=len(cuts),
        )
    if status == "stopped":
        return Verdict(
            "stopped",
            f"**Stopped at step {last_step}**{of} with no end recorded (killed, crashed or still running) and no "
            f"final adapter; {go_on}.",
            step=last_step,
            cuts=len(cuts),
        )
    earlier_halt = next((e for e in events if e.get("action") == "halt"), None)
    resumed = f" (resumed after the halt at step {earlier_halt['step']})" if earlier_halt else ""
    if guard != "on" and not cuts:
        why = "guards.enabled is false" if guard == "off" else "no guard is recorded for this run"
        if worst_fall is None:
            seen = "no routing was logged to judge it by."
        elif worst_fall[1] >= halt_drop:
            seen = (
                f"layer {worst_fall[0]}'s balance fell {worst_fall[1]:.0%} below its start, past the "
                f"{halt_drop:.0%} at which the guard halts: its load collapsed onto few experts (see the plots)."
            )
        else:
            seen = (
                f"no layer's balance fell more than {max(worst_fall[1], 0.0):.0%} below its start "
                f"(the guard halts at {halt_drop:.0%})."
            )
        return Verdict(
            "unguarded",
            f"**Finished with no guard watching** ({why}): ran to step {last_step}{of}; {seen}",
            step=last_step,
        )
    if not cuts:
        return Verdict(
            "healthy",
            f"**Healthy**: ran to step {last_step}{of}{resumed} and the guard never had to cut or halt.",
            step=last_step,
        )
    final_lr = cuts[-1].get("lr_after")
    then = f", then settled at step {settled['step']}" if settled else ""
    if not isinstance(final_lr, (int, float)):
        advice = ""
    elif final_lr > MAX_MOE_LEARNING_RATE:  # never propose a rate `validate` itself warns about
        advice = (
            f" The rate it ended at, {final_lr:.3g}, is still above the {MAX_MOE_LEARNING_RATE:g} at which MoE routers "
            f"tend to collapse: start the next run at `--set training.learning_rate={DEFAULT_LEARNING_RATE:g}` or lower."
        )
    else:
        advice = f" The rate it ended at is a starting point for the next run: `--set training.learning_rate={final_lr:.3g}`."
    return Verdict(
        "cut",
        f"**Learning rate cut {cut_words}**{then}; ran to step {last_step}{of}{resumed}.{advice}",
        step=last_step,
        cuts=len(cuts),
    )


def _cut_words(cuts: Sequence[dict[str, Any]]) -> str:
    count = f"{len(cuts)} time{'s' * (len(cuts) != 1)}"
    first, last = cuts[0].get("lr_before") if cuts else None, cuts[-1].get("lr_after") if cuts else None
    if isinstance(first, (int, float)) and isinstance(last, (int, float)):
        return f"{count} ({first:.3g} -> {last:.3g})"
    return count


def verdict_of(run: RunData) -> Verdict:
    worst = None
    if run.series is not None:
        fall = balance_fall(run.series, run.start)
        layer = int(np.argmax(fall))
        if np.isfinite(fall[layer]):
            worst = (run.series.layer_names[layer], float(fall[layer]))
    return judge(
        run_status(run),
        run.events,
        last_step=run.last_step,
        max_steps=run.max_steps,
        kept_checkpoint=trouble_checkpoint(run.run_dir, run.events),
        newest_checkpoint=run.checkpoints[-1] if run.checkpoints else None,
        guard=run.guard,
        worst_fall=worst,
        halt_drop=run.halt_balance_drop or DEFAULT_HALT_BALANCE_DROP,
        failure=run.summary.get("error") if isinstance(run.summary.get("error"), str) else None,
    )


@contextmanager
def quiet_nan_warnings() -> Iterator[None]:
    """All-nan slices (a layer that routed nothing) are expected here: nan out, no RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ------------------------------------------------------------------------------------------------
# report.md


@dataclass
class Report:
    """What `write_report` wrote."""

    path: Path
    figures: list[Path]
    verdict: Verdict
    notes: list[str]


MODEL_CARD_FILE = "README.md"
_CARD_MARK = "<!-- moe-finetune run card -->"


def _replaceable_card(text: str) -> bool:
    """Ours, or TRL's generated one (which names no base model: "a fine-tuned version of [None]")."""
    return _CARD_MARK in text or "It has been trained using [TRL]" in text


def model_card(run: RunData, verdict: Verdict) -> str:
    """The run directory's README.md: what was trained on what, how routing went, and how to load it."""
    model = (run.recipe.get("model") or {}).get("name") or run.summary.get("model") or "unknown"
    lora = run.recipe.get("lora") or {}
    config: dict[str, Any] = {}
    adapter_config = run.run_dir / ADAPTER_DIR / "adapter_config.json"
    if run.has_adapter:
        try:
            config = json.loads(adapter_config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    modules = config.get("target_modules") or lora.get("target_modules") or []
    modules = sorted(modules) if isinstance(modules, (list, set, tuple)) else [str(modules)]
    parameters = sorted(config.get("target_parameters") or [])
    rows = run.summary.get("train_examples")
    lines = [
        _CARD_MARK,
        f"# {run.name}: a LoRA adapter trained with moe-finetune",
        "",
        f"- **Base model:** `{model}`",
        f"- **Recipe:** `{run.summary.get('recipe') or 'n/a'}` (resolved: `{RESOLVED_RECIPE_FILE}`)",
        f"- **Data:** `{run.summary.get('dataset') or 'n/a'}`"
        + (f", {rows:,} training examples" if isinstance(rows, int) else ""),
        f"- **LoRA:** r {config.get('r', lora.get('r', 'n/a'))}, alpha {config.get('lora_alpha', lora.get('alpha', 'n/a'))}; "
        f"modules {', '.join(modules) or 'n/a'}" + (f"; expert parameters {', '.join(parameters)}" if parameters else ""),
        f"- **Routing:** {verdict.line}",
        f"- **Report:** [`{REPORT_FILE}`]({REPORT_FILE})",
        "",
    ]
    if run.has_adapter and str(model).startswith(TINY_PREFIX):
        lines += [
            f"`{model}` is built locally by moe-finetune (no hub id): try the adapter with",
            "",
            "```bash",
            f'moe-finetune generate {run.run_dir} --prompt "Write a function that reverses a list."',
            "```",
            "",
        ]
    elif run.has_adapter:
        lines += [
            "Load it onto its base (or `moe-finetune merge` this folder for a plain transformers model):",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{model}"), "{ADAPTER_DIR}")',
            "```",
            "",
        ]
    else:
        lines += ["No final adapter was saved: the run did not finish (see the report).", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, compare: str | Path | None = None) -> Report:
    """Write RUN_DIR/report.md and its PNG plots (and, with `compare`, the two runs side by side)."""
    run = read_run(run_dir)
    other = read_run(compare, what="--compare run") if compare is not None else None
    from moe_finetune import report_plots as plots  # matplotlib only now, when a figure is drawn

    verdict = verdict_of(run)
    marks = plots.event_steps(run)
    figures: dict[str, Any] = {}
    series = run.series
    if series is not None:
        start = run.start
        layers = layers_to_show(series, start)
        figures[LOAD_SHARE_PLOT] = plots.load_share_figure(series, layers, marks, start)
        figures[FINAL_LOAD_PLOT] = plots.final_load_figure(series, layers, start, _dead_line(run))
        figures[ENTROPY_PLOT] = plots.entropy_figure(series, marks, start, run.halt_balance_drop)
    steps, lr, loss = _lr_and_loss(run)
    if len(steps):
        checks = [(r["step"], _number(r.get("loss"))) for r in run.retention]
        retention = (np.array([s for s, _ in checks], dtype=float), np.array([v for _, v in checks])) if checks else None
        figures[TRAINING_PLOT] = plots.training_figure(steps, lr, loss, marks, series, retention)
    labels: list[str] = []
    if other is not None:
        labels = _compare_labels(run, other)
        figures[COMPARE_PLOT] = plots.compare_figure([run, other], labels)
    written: list[Path] = []
    try:
        for name, figure in figures.items():
            written.append(plots.save_figure(figure, run.run_dir / name))
        text = render_markdown(run, verdict, [p.name for p in written], other, labels)
        path = run.run_dir / REPORT_FILE
        write_whole(path, text)  # a reader never sees half a report
        card = run.run_dir / MODEL_CARD_FILE
        if not card.exists() or _replaceable_card(card.read_text(encoding="utf-8", errors="replace")):
            write_whole(card, model_card(run, verdict))
    except OSError as err:
        raise RecipeError(f"report: cannot write the report into {run.run_dir}: {err}") from None
    return Report(path=path, figures=written, verdict=verdict, notes=list(run.notes))


def _dead_line(run: RunData) -> float:
    monitor = run.recipe.get("monitor") or {}
    value = monitor.get("dead_threshold")
    return float(value) if isinstance(value, (int, float)) else 0.1


def _lr_and_loss(run: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, learning rate and loss: from routing.jsonl, else from the newest checkpoint's log history."""
    if run.series is not None:
        return run.series.steps, run.series.lr, run.series.loss
    history = _log_history(run)
    entries = [e for e in history if isinstance(e.get("step"), int) and ("loss" in e or "learning_rate" in e)]
    return (
        np.array([e["step"] for e in entries], dtype=float),
        np.array([_number(e.get("learning_rate")) for e in entries], dtype=float),
        np.array([_number(e.get("loss")) for e in entries], dtype=float),
    )


def _log_history(run: RunData) -> list[dict[str, Any]]:
    if not run.checkpoints:
        return []
    path = run.run_dir / f"checkpoint-{run.checkpoints[-1]}" / "trainer_state.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def _compare_labels(run: RunData, other: RunData) -> list[str]:
    first, second = run.name, other.name
    if first == second:
        first, second = f"{first} ({run.run_dir.name})", f"{second} ({other.run_dir.name})"
    if first == second:
        first, second = f"A: {first}", f"B: {second}"
    return [first, second]


def render_markdown(
    run: RunData,
    verdict: Verdict,
    figures: Sequence[str],
    other: RunData | None = None,
    labels: Sequence[str] = (),
) -> str:
    """report.md: the verdict line first, then the facts, the halt, each layer, the events, the plots."""
    lines = [verdict.line, "", f"# Run report: {run.name}", ""]
    lines += _facts(run)
    if run.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in run.notes]
    if verdict.kind == "halted":
        lines += ["", *_halt_section(run, verdict)]
    if run.series is not None:
        lines += ["", *_layer_table(run, verdict)]
    lines += ["", *_events_table(run.events)]
    captions = {
        LOAD_SHARE_PLOT: "Load share per expert (rows) over steps, one panel per layer: white = uniform, red = "
        "more than its share, blue = starving, 0 = dead. Collapse is a few rows turning red while the rest "
        "turn blue.",
        FINAL_LOAD_PLOT: "Each expert's load at the last logging step against uniform (the black line), busiest "
        "first, coloured as in the heatmap; dots are the same expert at the start, crosses the dead ones.",
        ENTROPY_PLOT: "Both entropies the guard watches. Routing entropy falls when routers get confident "
        "(specialisation does that too); balance falls when the load concentrates on few experts (collapse).",
        TRAINING_PLOT: "Learning rate with the guard's cuts, training loss (and, with the guard's retention check, "
        "the loss on the retention rows), and drift (share of probe tokens whose top-k experts changed since the "
        "start).",
        COMPARE_PLOT: "The compared runs side by side.",
    }
    plotted = [name for name in figures if name != COMPARE_PLOT]
    if plotted:
        lines += ["", "## Plots", ""]
        for name in plotted:
            lines += [f"![{name}]({name})", "", captions[name], ""]
    if other is not None:
        lines += ["", *_compare_section(run, other, labels, COMPARE_PLOT in figures)]
    return "\n".join(lines).rstrip() + "\n"


def _facts(run: RunData) -> list[str]:
    recipe, summary, series = run.recipe, run.summary, run.series
    model = (recipe.get("model") or {}).get("name") or summary.get("model")
    source = summary.get("recipe")
    recipe_words = f"`{source}`" if source else f"`{RESOLVED_RECIPE_FILE}`" if recipe else "not recorded"
    name = recipe.get("name") or summary.get("name")
    facts = [
        f"- **Recipe:** {recipe_words}"
        + (f" ({name})" if name else "")
        + (f", model `{model}`" if model else "")
    ]
    training = recipe.get("training") or {}
    if training:
        batch = training.get("per_device_train_batch_size")
        accumulation = training.get("gradient_accumulation_steps", 1)
        schedule = training.get("lr_scheduler_type", "linear")
        facts[-1] += f", learning rate {format_value(training.get('learning_rate'), 'g')} ({schedule})" + (
            f", batch {batch}x{accumulation}" if batch else ""
        )
    examples = summary.get("train_examples")
    if isinstance(examples, int):
        eval_rows = summary.get("eval_examples")
        dataset = f"{examples:,} training examples" + (f" (+ {eval_rows:,} held out)" if eval_rows else "")
        if summary.get("dataset"):
            dataset += f" from `{summary['dataset']}`"
    else:
        dataset = f"not recorded (no {RUN_SUMMARY_FILE}: a run not started by `moe-finetune train`, or an older one)"
    small = next((e for e in run.events if e.get("action") == "allow_small_dataset"), None)
    if small is not None:
        dataset += f"; **below the minimum of {small.get('min_examples', 0):,}**, allowed by an override"
    facts.append(f"- **Dataset:** {dataset}")
    of = f" of {run.max_steps}" if run.max_steps else ""
    logged = ""
    if series is not None:
        span = f"steps {int(series.steps[0])}-{int(series.steps[-1])}"
        logged = f"; {len(series.steps)} logging steps in {ROUTING_FILE} ({span})"
    seconds = summary.get("seconds")
    took = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    facts.append(f"- **Steps:** {format_value(run.last_step, 'd')}{of}{took}{logged}")
    steps, lr, loss = _lr_and_loss(run)
    finite = np.isfinite(loss)
    if finite.any():
        first, last = int(np.argmax(finite)), int(len(loss) - 1 - np.argmax(finite[::-1]))
        lowest = int(np.nanargmin(loss))
        facts.append(
            f"- **Loss:** {loss[first]:.4g} at step {int(steps[first])} -> {loss[last]:.4g} at step "
            f"{int(steps[last])} (lowest {loss[lowest]:.4g} at step {int(steps[lowest])})"
        )
    cuts = [e for e in run.events if e.get("action") == "cut_lr"]
    if np.isfinite(lr).any():
        known = lr[np.isfinite(lr)]
        cut_count = f"{len(cuts)} guard cut{'s' * (len(cuts) != 1)}" if run.guard == "on" else "no guard"
        facts.append(f"- **Learning rate:** {known[0]:.3g} -> {known[-1]:.3g} ({cut_count})")
    if series is not None:
        facts.append(
            f"- **Routing:** {series.num_layers} MoE layers x {series.num_experts} experts; "
            + _routing_words(series)
        )
    if run.retention:
        facts.append(f"- **Retention:** {_retention_words(run)}")
    return facts


def _retention_words(run: RunData) -> str:
    """The guard's retention check in words: the loss on the rows the model should keep knowing."""
    checks = [r for r in run.retention if isinstance(r.get("loss"), (int, float))]
    if not checks:
        return f"no finite retention loss in {RETENTION_FILE}"
    first, last = checks[0], checks[-1]
    base = first.get("base") if isinstance(first.get("base"), (int, float)) else first["loss"]
    worst = max(checks, key=lambda r: r["loss"])
    cuts = sum(
        1 for e in run.events if e.get("action") == "cut_lr" and str((e.get("details") or {}).get("check", "")).startswith("retention")
    )
    when = "before any update" if first["step"] == 0 else f"at step {first['step']}"
    return (
        f"loss on the retention rows {first['loss']:.4g} {when} -> {last['loss']:.4g} at step {last['step']} "
        f"({last['loss'] / base - 1:+.1%} against the base model's {base:.4g}; highest {worst['loss'] / base - 1:+.1%} "
        f"at step {worst['step']}), {cuts} retention cut{'s' * (cuts != 1)}, {len(checks)} checks in {RETENTION_FILE}"
    )


def _routing_words(series: RoutingSeries) -> str:
    """Pooled routing at the first and the last logging step, in words."""
    with quiet_nan_warnings():
        entropy = np.nanmean(series.entropy, axis=1)
        balance = np.nanmin(series.balance, axis=1)
        load_max = np.nanmax(series.load_ratio, axis=(1, 2))
        dead = np.nansum(series.dead, axis=1)
        drop = np.nanmean(series.drop, axis=1)
    first, last = 0, len(series.steps) - 1
    words = (
        f"from step {int(series.steps[first])} to {int(series.steps[last])}: routing entropy "
        f"{_span(entropy[first], entropy[last])}, lowest layer balance {_span(balance[first], balance[last])}, "
        f"busiest expert {_span(load_max[first], load_max[last], '.2f', 'x')} uniform, dead experts "
        f"{_span(dead[first], dead[last], '.0f')}, over capacity {_span(drop[first], drop[last], '.1%')}"
    )
    drift = series.drift[np.isfinite(series.drift)]
    if len(drift):
        words += f", drift {drift[-1]:.0%}"
    return words


def _halt_section(run: RunData, verdict: Verdict) -> list[str]:
    """What the guard found at the halt and how to go on (what collapse_report.md used to say)."""
    halt = final_halt(run.events) or {}
    step = verdict.step
    cuts = [
        e
        for e in run.events
        if e.get("action") == "cut_lr" and isinstance(e.get("step"), int) and e["step"] <= (step or 0)
    ]
    lines = [
        f"## Halted at step {step}",
        "",
        f"- **Reason:** {halt.get('reason', 'n/a')}",
        f"- **Checkpoint:** `{run.run_dir / f'checkpoint-{step}'}` (saved at the halt)",
        f"- **Learning-rate cuts before the halt:** {len(cuts)} "
        f"(multiplier {format_value(halt.get('multiplier'), 'g')})",
    ]
    metrics = halt.get("metrics") or {}
    if metrics:
        shown = {key.removeprefix("routing/"): format_value(value) for key, value in metrics.items()}
        base = format_value((halt.get("baseline") or {}).get("entropy"))
        lines.append(
            f"- **Pooled routing at the halt:** routing entropy {shown.get('entropy')} (baseline {base}), balance "
            f"{shown.get('balance')} (lowest layer {shown.get('balance_min')}), largest expert load "
            f"{format_value(metrics.get('routing/load_max'), '.2f')}x uniform, dead experts "
            f"{format_value(metrics.get('routing/dead_experts'), '.0f')}"
        )
    lines.append("")
    earlier = trouble_checkpoint(run.run_dir, run.events)
    command = run.summary.get("resume_command") or f"moe-finetune train RECIPE --output-dir {run.run_dir} --resume"
    if earlier is not None:
        lines += [
            f"To go on from `{earlier.name}`, the last checkpoint saved before the guard first acted, with a learning "
            "rate ten times below the one it halted at, at most 1e-5 (lower it further if it halts again):",
            "",
            "```bash",
            f"{command} {earlier} --set training.learning_rate={lower_rate(run.events)}",
            "```",
            "",
        ]
    if str((halt.get("details") or {}).get("check", "")).startswith("retention"):
        lines.append(
            "Resuming from the halt checkpoint itself (`--resume` alone) starts from weights that have already "
            "forgotten: the retention check judges them against the same base model's loss and halts again at its "
            "first check, unless `guards.retention.halt_rise` is raised."
        )
    else:
        if earlier is None:
            lines += [
                "No healthy checkpoint was saved before the guard first acted (its first action came before a save "
                "it could keep): start again at a lower learning rate, saving at least as often as the run logs "
                "(`training.save_steps`).",
                "",
            ]
        lines.append(
            "Resuming from the halt checkpoint itself (`--resume` alone) starts from the collapsed routers, judged "
            "against the same baseline of the run's start (only the cut budgets and the cooldown start over): a "
            "limit its routing is still past (balance, expert load, routing-entropy level) halts it again at its "
            "first logging window, dead experts after `guards.dead_patience` checks."
        )
    return lines


def _layer_table(run: RunData, verdict: Verdict) -> list[str]:
    """Every layer at the halt (or the last logging step), the one whose balance fell most first."""
    series = run.series
    assert series is not None
    at = (
        series.column_of(verdict.step)
        if verdict.kind == "halted" and verdict.step is not None
        else len(series.steps) - 1
    )
    step = int(series.steps[at])
    start = run.start
    entropy_start, balance_start = start.entropy, start.balance
    ratio = series.load_ratio[at]
    lines = [
        f"## Routing by layer at step {step}" + (" (the halt)" if verdict.kind == "halted" else ""),
        "",
        f"Start = {start.words}; layers whose balance fell most first.",
        "",
        "| layer | routing entropy: start -> now | balance: start -> now | balance change "
        "| busiest expert (x uniform) | dead experts | over capacity |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in worst_first(series, start):
        start, now = balance_start[layer], series.balance[at, layer]
        change = (now - start) / start if np.isfinite(start) and start > 0 and np.isfinite(now) else math.nan
        busiest = int(np.nanargmax(ratio[layer])) if np.isfinite(ratio[layer]).any() else None
        peak = f"{ratio[layer, busiest]:.2f} (expert {busiest})" if busiest is not None else "n/a"
        lines.append(
            f"| {series.layer_names[layer]} | {_span(entropy_start[layer], series.entropy[at, layer])} | "
            f"{_span(start, now)} | {format_value(change, '+.0%')} | {peak} | "
            f"{format_value(series.dead[at, layer], '.0f')} | {format_value(series.drop[at, layer], '.1%')} |"
        )
    return lines


def _events_table(events: Sequence[dict[str, Any]]) -> list[str]:
    if not events:
        return ["## Guard events", "", f"None: the guard never acted ({EVENTS_FILE} is empty or absent)."]
    lines = [
        "## Guard events",
        "",
        "| step | action | lr before | lr after | reason |",
        "|---|---|---|---|---|",
    ]
    for event in events:
        reason = str(event.get("reason", "")).replace("|", "\\|")
        lines.append(
            f"| {event.get('step', '?')} | {event.get('action', '?')} | "
            f"{format_value(event.get('lr_before'), '.3g')} | {format_value(event.get('lr_after'), '.3g')} | {reason} |"
        )
    return lines


def _compare_section(run: RunData, other: RunData, labels: Sequence[str], plotted: bool) -> list[str]:
    rows = [("run directory", lambda r: f"`{r.run_dir}`"), ("verdict", lambda r: _plain(verdict_of(r).line))]
    rows += [
        ("steps", lambda r: format_value(r.last_step, "d")),
        ("learning-rate cuts", lambda r: str(sum(e.get("action") == "cut_lr" for e in r.events))),
        ("final loss", lambda r: _last(r, lambda s: s.loss, ".4g")),
        ("lowest layer balance, last step", lambda r: _last(r, lambda s: np.nanmin(s.balance, axis=1))),
        (
            "lowest layer routing entropy, last step",
            lambda r: _last(r, lambda s: np.nanmin(s.entropy, axis=1)),
        ),
        (
            "busiest expert, last step (x uniform)",
            lambda r: _last(r, lambda s: np.nanmax(s.load_ratio, axis=(1, 2)), ".2f"),
        ),
        ("dead experts, last step", lambda r: _last(r, lambda s: np.nansum(s.dead, axis=1), ".0f")),
    ]
    lines = [
        f"## Compared with {labels[1]}",
        "",
        f"| | {labels[0]} | {labels[1]} |",
        "|---|---|---|",
    ]
    for title, value in rows:
        lines.append(f"| {title} | {value(run)} | {value(other)} |")
    if plotted:
        lines += ["", f"![{COMPARE_PLOT}]({COMPARE_PLOT})", ""]
    return lines


def _last(run: RunData, values: Any, spec: str = ".3f") -> str:
    if run.series is None:
        return "n/a"
    with quiet_nan_warnings():
        return format_value(values(run.series)[-1], spec)


def _plain(markdown: str) -> str:
    return re.sub(r"[*`]", "", markdown).split(". ")[0].replace("|", "\\|")


def _span(first: Any, last: Any, spec: str = ".3f", unit: str = "") -> str:
    """ "first -> last" of one quantity, each formatted as `format_value` does."""
    return f"{format_value(first, spec)}{unit} -> {format_value(last, spec)}{unit}"


def format_value(value: Any, spec: str = ".3f") -> str:
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
    ):
        return "n/a"
    if not math.isfinite(float(value)):
        return "n/a"
    return format(int(value) if spec == "d" else value, spec)


# ------------------------------------------------------------------------------------------------
# What `train` records for the report


def write_run_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """run_summary.json: what `train` knew of the run (recipe file, dataset size, planned steps, how it ended).

    Written at the start (status "running": a run killed later still says what it was) and again at its end.
    """
    path, text = run_dir / RUN_SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n"
    try:
        return write_whole(path, text)
    except OSError as err:
        if write_failure(err) is None or not path.is_file():
            raise
        # A full disk has no room for a second copy, but the old file's own blocks are freed and reused by
        # rewriting it in place: a run that filled the disk still says so (a cut-short copy reads as none).
        path.write_text(text, encoding="utf-8")
        return path
