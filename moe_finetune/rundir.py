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
import os
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
    Lines end at \n only, as `append_jsonl` writes them: a \r inside a damaged line is one more
    byte of that line, not a line of its own (text mode's universal newlines would count each).
    """
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace", newline="\n") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                yield record
            elif skipped is not None and line.strip():
                skipped.append(number)


def unique_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden name beside `path` that no other writer (another rank, a crashed earlier attempt) shares;
    the file mode stays the usual one (mkstemp's would be 0600)."""
    import uuid

    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def write_whole(path: Path, text: str) -> Path:
    """Write `text` to `path` so a reader sees the old file or the whole new one, never a part: written
    beside it, then renamed over it. A failed write (a full disk) removes its partial copy."""
    temporary = unique_sibling(path)
    try:
        with temporary.open("x", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records past `step`: a resumed run continues after its checkpoint's step, so lines
    written past it (by the attempt that stopped) would repeat; a fresh run (step 0) starts the file over."""
    if not path.exists():
        return
    kept = [] if step == 0 else [record for record in read_jsonl(path) if record.get("step", 0) <= step]
    write_whole(path, "".join(json.dumps(record) + "\n" for record in kept))


def checkpoint_steps(output_dir: Path, complete_only: bool = True) -> list[int]:
    """Steps of the `checkpoint-N` folders in a run, ascending: only whole ones (`checkpoint_problem`)
    unless `complete_only` is False."""
    if not complete_only:
        return sorted(_checkpoint_folders(output_dir))
    return [step for step, problem in checkpoint_problems(output_dir).items() if problem is None]


def _checkpoint_folders(output_dir: Path) -> dict[int, Path]:
    if not output_dir.is_dir():
        return {}
    folders = {}
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and path.is_dir():
            folders[int(suffix)] = path
    return folders


def checkpoint_problems(output_dir: Path) -> dict[int, str | None]:
    """Each `checkpoint-N` step of a run, ascending, with what is wrong with it (None: whole). Every file
    of every checkpoint is read once here: callers that need both the whole and the damaged ones ask once."""
    return {step: checkpoint_problem(path) for step, path in sorted(_checkpoint_folders(output_dir).items())}


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is whole when its header parses and its size is the header's data end."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path.name} is cut short ({size} bytes)"
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            return f"{path.name} is cut short ({size} bytes, its header alone says {length + 8})"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return f"{path.name} has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{path.name} is cut short ({size} of {expected} bytes)"
    return None


def _file_problem(path: Path) -> str | None:
    """Why one file of a checkpoint cannot be what its writer meant, or None (checked by format, cheaply:
    JSON parses, a safetensors file is as long as its header says, a torch.save zip has its directory)."""
    import zipfile

    suffix = path.suffix
    try:
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".safetensors":
            return _safetensors_problem(path)
        elif suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path.name} is cut short or damaged (not a whole torch.save file)"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is cut short or damaged (not whole JSON)"
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or err})"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed, merged or reported on, or None when it is whole.

    The Trainer writes a checkpoint file by file, in place: a crash or a full disk leaves a folder with
    some files missing or cut short, which then fails deep inside `--resume`. Every file is checked."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "it has no trainer_state.json (its save did not finish)"
    return folder_problem(checkpoint)


def folder_problem(folder: Path) -> str | None:
    """The first file in `folder` (and below) that is cut short or damaged, said in words; None if none."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            problem = _file_problem(path)
            if problem is not None:
                return problem
    return None


def adapter_problem(adapter_dir: Path) -> str | None:
    """Why a saved adapter folder cannot be loaded, or None (the same file checks as a checkpoint's)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        return "it has no adapter_config.json"
    return folder_problem(adapter_dir)
