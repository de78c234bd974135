"""What reading the dataset through `datasets` saves: `load_data` on a large JSONL, old vs new.

    python benchmarks/data_load.py                        # 1,000,000 rows, 3 reps, ~40 s (2-core CPU)
    python benchmarks/data_load.py --gz                   # and a .jsonl.gz of the same rows, ~70 s
    python benchmarks/data_load.py --rows 100000          # where the fixed cost of load_dataset shows

The baseline is `moe_finetune/data.py` as it was at commit 9a12047 (every line parsed with
`json.loads`, checked in Python, then `Dataset.from_list`), copied below as BASELINE_SOURCE and
imported from a temporary file, so this script keeps measuring the same baseline whatever
data.py becomes. Both arms load the same generated prompt/completion file with the same recipe
section (shuffle, eval_fraction 0.02), interleaved old/new in each repetition (ABAB), and the
script checks they produce the same rows before it reports medians and the ratio new/old.

The new loader caches the Arrow conversion (in HF_DATASETS_CACHE, keyed by the file's path and
mtime), so it is timed twice per repetition: "cold", against an empty cache (the first load of a
file, the fair comparison with the baseline), and "warm", loading the same file again. The
script keeps all caches in its temporary directory, never the user's.

Measured on a shared 2-core AMD EPYC, Python 3.11, datasets 5.2.0, pyarrow 26.0.1, median of 3:
1,000,000 rows (122 MiB JSONL): old 4.69 s, new cold 1.61 s (0.34x), warm 0.46 s (0.10x);
the same as .jsonl.gz (11 MiB): old 4.28 s, new cold 1.84 s (0.43x), warm 0.30 s (0.07x);
100,000 rows: old 0.43 s, new cold 0.48 s (1.11x: load_dataset's fixed cost), warm 0.06 s.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOMAINS = ["arithmetic", "dates", "list_operations", "string_manipulation", "unit_conversion", "python_code"]


def make_row(index: int, rng: random.Random) -> dict[str, Any]:
    """A row shaped like the bundled data (id, domain, prompt, completion), ~100 bytes of JSON."""
    a, b = rng.randrange(1000), rng.randrange(1000)
    return {
        "id": index,
        "domain": DOMAINS[index % len(DOMAINS)],
        "prompt": f"What is {a} plus {b}? Answer with the number only.",
        "completion": f" {a + b}",
    }


def write_jsonl(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for start in range(0, rows, 10_000):  # write in blocks: one call per row is slow
            block = (make_row(i, rng) for i in range(start, min(start + 10_000, rows)))
            handle.write("".join(json.dumps(row) + "\n" for row in block))
    return path


def import_baseline(directory: Path) -> ModuleType:
    """The old data.py as a module of its own (registered in sys.modules: its @dataclass needs that)."""
    source = directory / "data_baseline.py"
    source.write_text(BASELINE_SOURCE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("data_baseline", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_baseline"] = module
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    """The CPU model on Linux (platform.processor() is often empty there), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def use_fresh_cache(root: Path) -> Path:
    """Point datasets at an empty cache; `load_dataset` reads this setting at every call."""
    import datasets

    cache = Path(tempfile.mkdtemp(prefix="hf-cache-", dir=root))
    datasets.config.HF_DATASETS_CACHE = cache
    return cache


def timed(load: Callable[[Any, Path], Any], section: Any, path: Path) -> tuple[float, Any]:
    gc.collect()  # the baseline leaves a million dicts behind; do not bill their collection to the next arm
    start = time.perf_counter()
    loaded = load(section, path)
    _ = loaded.num_train, len(loaded.eval)
    return time.perf_counter() - start, loaded


def same_result(old: Any, new: Any) -> bool:
    """Same counts, schema and (a sample of) the same rows in the same order."""
    if (old.schema, old.total_rows, old.num_train, len(old.eval)) != (
        new.schema,
        new.total_rows,
        new.num_train,
        len(new.eval),
    ):
        return False
    n = old.num_train
    sample = sorted({0, 1, n // 3, n // 2, n - 1})
    return old.train.select(sample)[:] == new.train.select(sample)[:] and old.eval[:100] == new.eval[:100]


def measure(path: Path, reps: int, root: Path, old: ModuleType) -> dict[str, list[float]]:
    from moe_finetune.data import load_data
    from moe_finetune.sections import DataSection

    section = DataSection(path=str(path), eval_fraction=0.02, seed=0)
    times: dict[str, list[float]] = {"old": [], "new cold": [], "new warm": []}
    for rep in range(reps):
        seconds, baseline = timed(old.load_data, section, path)
        times["old"].append(seconds)
        use_fresh_cache(root)
        seconds, loaded = timed(load_data, section, path)
        times["new cold"].append(seconds)
        seconds, _ = timed(load_data, section, path)  # same cache: the Arrow file is reused
        times["new warm"].append(seconds)
        if rep == 0 and not same_result(baseline, loaded):
            raise SystemExit(
                "old and new loaders disagree on the rows; the timings would compare different work"
            )
        del baseline, loaded
        print(
            f"  rep {rep + 1}: old {times['old'][-1]:.2f} s, new cold {times['new cold'][-1]:.2f} s, "
            f"new warm {times['new warm'][-1]:.2f} s",
            flush=True,
        )
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated file")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each arm (at least 2)")
    parser.add_argument("--gz", action="store_true", help="also time a .jsonl.gz of the same rows")
    args = parser.parse_args(argv)
    if args.reps < 2:
        parser.error("--reps must be at least 2 (a median of one run says little)")

    with tempfile.TemporaryDirectory(prefix="data-load-bench-") as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf-cache")  # before datasets is imported
        import datasets
        import pyarrow

        datasets.disable_progress_bars()
        old = import_baseline(root)
        print(
            f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, datasets {datasets.__version__}, pyarrow {pyarrow.__version__}"
        )
        names = ["rows.jsonl", "rows.jsonl.gz"] if args.gz else ["rows.jsonl"]
        results = {}
        for name in names:
            start = time.perf_counter()
            path = write_jsonl(root / name, args.rows)
            size = path.stat().st_size / 2**20
            print(
                f"{name}: {args.rows:,} rows, {size:.1f} MiB, written in {time.perf_counter() - start:.1f} s"
            )
            results[name] = measure(path, args.reps, root, old)

        print(f"\nmedian of {args.reps} (load_data incl. shuffle and eval_fraction 0.02):")
        print(f"{'file':<16}{'old s':>9}{'new cold s':>12}{'new warm s':>12}{'cold/old':>10}{'warm/old':>10}")
        for name, times in results.items():
            old_s, cold_s, warm_s = (statistics.median(times[arm]) for arm in ("old", "new cold", "new warm"))
            print(
                f"{name:<16}{old_s:>9.2f}{cold_s:>12.2f}{warm_s:>12.2f}{cold_s / old_s:>10.3f}{warm_s / old_s:>10.3f}"
            )
    return 0


# moe_finetune/data.py at commit 9a12047, verbatim but for one import: DataSection has since moved
# from moe_finetune.recipe to moe_finetune.sections.
BASELINE_SOURCE = r'''
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
from moe_finetune.sections import DataSection

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
'''


if __name__ == "__main__":
    raise SystemExit(main())
