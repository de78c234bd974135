"""Load a training dataset from any common format, check every row, and count it.

All formats end up as one `datasets.Dataset` with exactly one of three shapes that TRL's
SFTTrainer understands: `text`, `prompt`/`completion`, or chat `messages`. Rows are checked here,
not deep inside the trainer, so a bad row is reported by its number and field before any model
is loaded (exit 2), and the size check (exit 3) sees the true count.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_finetune.errors import DataError
from moe_finetune.recipe import DataSection

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class LoadedData:
    """The normalised splits, their schema ("text" | "prompt_completion" | "messages") and counts."""

    train: Any  # datasets.Dataset
    eval: Any | None
    schema: str
    path: Path
    total_rows: int

    @property
    def num_train(self) -> int:
        return len(self.train)


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "disk"
    name = path.name.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    raise DataError(
        f"data.path: cannot tell the format of {path} from its extension; use one of "
        f"{', '.join(sorted(_EXTENSIONS))}, a datasets.save_to_disk directory, or set data.format"
    )


def _open_text(path: Path):
    return (
        gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")
    )


def _read_rows(path: Path, fmt: str, split: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) pairs; `where` names the row the way a person would find it."""
    if fmt == "jsonl":
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    elif fmt == "json":
        with _open_text(path) as handle:
            try:
                payload = json.load(handle)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(payload, dict) and len(payload) == 1 and isinstance(next(iter(payload.values())), list):
            payload = next(iter(payload.values()))
        if not isinstance(payload, list):
            raise DataError(f"{path}: a .json dataset must be a list of objects (or use .jsonl)")
        for index, row in enumerate(payload):
            yield f"item {index}", row
    elif fmt == "csv":
        with _open_text(path) as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                yield f"line {number}", row
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read as Parquet ({err})") from None
        for index, row in enumerate(table.to_pylist()):
            yield f"row {index}", row
    elif fmt == "disk":
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"{path}: not a datasets.save_to_disk directory ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"data.split: {split!r} is not a split of {path}; it has {', '.join(loaded)}")
            loaded = loaded[split]
        for index, row in enumerate(loaded):
            yield f"row {index}", row
    else:  # pragma: no cover - the schema restricts `format`
        raise DataError(f"data.format: unknown format {fmt!r}")


def _schema_of(row: Any, spec: DataSection, where: str, path: Path) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where} is a {type(row).__name__}, expected an object with named fields")
    if spec.messages_field in row:
        return "messages"
    if spec.prompt_field in row or spec.completion_field in row:
        return "prompt_completion"
    if spec.text_field in row:
        return "text"
    raise DataError(
        f"{path}: {where} has fields {sorted(row)} but needs '{spec.text_field}', or "
        f"'{spec.prompt_field}' and '{spec.completion_field}', or '{spec.messages_field}' "
        "(rename them in data.text_field / data.prompt_field / data.completion_field / data.messages_field)"
    )


def _need_text(row: dict, field: str, where: str, path: Path) -> str:
    value = row.get(field)
    if value is None:
        raise DataError(f"{path}: {where} is missing the field '{field}'")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: {where} field '{field}' must be a non-empty string, got {value!r:.60}")
    return value


def normalise_row(row: Any, schema: str, spec: DataSection, where: str, path: Path) -> dict[str, Any]:
    """The row in TRL's field names, or a DataError naming the row and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where} is a {type(row).__name__}, expected an object with named fields")
    if schema == "text":
        return {"text": _need_text(row, spec.text_field, where, path)}
    if schema == "prompt_completion":
        return {
            "prompt": _need_text(row, spec.prompt_field, where, path),
            "completion": _need_text(row, spec.completion_field, where, path),
        }
    messages = row.get(spec.messages_field)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}: {where} field '{spec.messages_field}' must be a non-empty list of messages")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise DataError(
                f"{path}: {where} {spec.messages_field}[{index}] needs a 'role' in {sorted(_ROLES)}, got {message!r:.80}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{path}: {where} {spec.messages_field}[{index}] is missing a string 'content'")
        clean.append({"role": message["role"], "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{path}: {where} {spec.messages_field} has no assistant message to learn from")
    return {"messages": clean}


def load_data(spec: DataSection, path: Path) -> LoadedData:
    """Read, check, shuffle and split the dataset the recipe names."""
    import datasets

    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    fmt = detect_format(path, spec.format)
    rows: list[dict[str, Any]] = []
    schema: str | None = None
    for where, row in _read_rows(path, fmt, spec.split):
        if schema is None:
            schema = _schema_of(row, spec, where, path)
        rows.append(normalise_row(row, schema, spec, where, path))
    if schema is None:
        raise DataError(f"data.path: {path} holds no rows")

    dataset = datasets.Dataset.from_list(rows)
    if spec.shuffle:
        dataset = dataset.shuffle(seed=spec.seed)
    if spec.max_examples is not None:
        dataset = dataset.select(range(min(spec.max_examples, len(dataset))))
    eval_split = None
    if spec.eval_fraction > 0:
        n_eval = max(1, int(round(len(dataset) * spec.eval_fraction)))
        eval_split = dataset.select(range(n_eval))
        dataset = dataset.select(range(n_eval, len(dataset)))
    return LoadedData(train=dataset, eval=eval_split, schema=schema, path=path, total_rows=len(rows))
