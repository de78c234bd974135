"""After a halt: `collapse_report.md` (what happened, in which layers, with the numbers) and where to resume.

The healthy point to go back to is the last checkpoint saved before the guard first acted. The
Trainer's `save_total_limit` rotation would delete it by the time of a halt, so the guard keeps a
copy of it out of rotation, in `OUTPUT/last-healthy/` (see EntropyGuard); this module only reads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moe_finetune.rundir import EVENTS_FILE, KEPT_CHECKPOINT_DIR, REPORT_FILE, checkpoint_steps, read_jsonl


def run_events(output_dir: Path, guard: Any) -> list[dict[str, Any]]:
    """The whole run's guard events (guard_events.jsonl; a resumed run's guard only saw its own
    attempt's), or this attempt's when the file is not here (another rank, no output dir yet)."""
    return list(read_jsonl(output_dir / EVENTS_FILE)) or list(guard.events)


def checkpoint_before_trouble(output_dir: Path, events: list[dict[str, Any]]) -> Path | None:
    """The latest checkpoint saved before the guard's first cut or halt: the place to resume from.

    Resuming from the halt checkpoint itself starts from collapsed routers, which the guard's
    absolute limits (expert load, dead experts) will usually stop again at once. The copy kept out
    of rotation is preferred; a rotation that has not yet reached the original leaves both.
    """
    trouble = [e["step"] for e in events if e.get("action") in ("cut_lr", "halt")]
    if not trouble:
        return None
    first = min(trouble)
    for folder in (output_dir / KEPT_CHECKPOINT_DIR, output_dir):
        steps = [step for step in checkpoint_steps(folder) if step <= first]
        if folder == output_dir:
            steps = [step for step in steps if step < first]
        if steps:
            return folder / f"checkpoint-{max(steps)}"
    return None


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def write_collapse_report(output_dir: Path, guard: Any) -> Path:
    """`collapse_report.md`: what happened, in which layers, with the numbers, and how to go on."""
    events = run_events(output_dir, guard)
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
    earlier = checkpoint_before_trouble(output_dir, events)
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
    for event in events:
        lines.append(
            f"| {event['step']} | {event['action']} | {_fmt(event.get('lr_before'), '.3g')} | "
            f"{_fmt(event.get('lr_after'), '.3g')} | {event['reason']} |"
        )
    path = output_dir / REPORT_FILE
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
