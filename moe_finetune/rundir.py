"""The files of a run directory, their names, and the one way they are written and read.

Every writer of a run's JSON Lines files (the RoutingMonitor's routing.jsonl, the guard's
guard_events.jsonl, the dataset-size override) goes through `append_jsonl`, and every reader
through `read_jsonl`, so that "what a line is" lives in one place: one JSON object, with nan and
inf written as null (JSON has neither), and a line cut short by a killed process skipped on read
rather than failing the whole file. No torch, no transformers: reports read runs without them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESOLVED_RECIPE_FILE = "recipe.resolved.yaml"
ROUTING_FILE = "routing.jsonl"
ROUTING_PROBE_FILE = "routing_probe.pt"  # the drift probe's routing at the start of the run
EVENTS_FILE = "guard_events.jsonl"
# The guard's retention check: the loss on the retention rows at each check (step, loss, base, rise, action).
RETENTION_FILE = "retention.jsonl"
REPORT_FILE = "report.md"  # the run report (moe_finetune/report.py), its PNG plots beside it
# What `train` knew of the run (recipe file, dataset size, planned steps, how it ended): the report reads it.
RUN_SUMMARY_FILE = "run_summary.json"
ADAPTER_DIR = "adapter"
# The last checkpoint before the guard first acted, kept out of the Trainer's save_total_limit rotation.
KEPT_CHECKPOINT_DIR = "last-healthy"


def json_safe(value: Any) -> Any:
    """JSON has no nan/inf: a layer that routed nothing (or a broken router) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line (the folder is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(json_safe(record)) + "\n")


def read_jsonl(path: Path, skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The records of a JSON Lines file; a line that is not a whole JSON object (a crash mid-write) is
    skipped.

    `skipped`, when given, collects the (1-based) numbers of the skipped lines, so a reader that must
    say what it could not read (the run report) can; blank lines are not records and not counted.
    """
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                yield record
            elif skipped is not None and line.strip():
                skipped.append(number)


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records past `step`: a resumed run continues after its checkpoint's step, so lines
    written past it (by the attempt that stopped) would repeat; a fresh run (step 0) starts the file over."""
    if not path.exists():
        return
    kept = [] if step == 0 else [record for record in read_jsonl(path) if record.get("step", 0) <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def checkpoint_steps(output_dir: Path, complete_only: bool = True) -> list[int]:
    """Steps of the `checkpoint-N` folders in a run (complete ones have trainer_state.json), ascending."""
    if not output_dir.is_dir():
        return []
    steps = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and path.is_dir() and (not complete_only or (path / "trainer_state.json").is_file()):
            steps.append(int(suffix))
    return sorted(steps)
