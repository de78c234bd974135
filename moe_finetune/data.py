"""Load a training dataset from any common format, check every row, and count it.

All formats end up as one `datasets.Dataset` with exactly one of three shapes that TRL's
SFTTrainer understands: `text`, `prompt`/`completion`, or chat `messages`. Rows are checked here,
not deep inside the trainer, so a bad row is reported by its number and field before any model
is loaded (exit 2), and the size check (exit 3) sees the true count.

Files are read by `datasets.load_dataset` (pyarrow parses them, in C++, into Arrow tables that are
cached and memory-mapped) and checked a column at a time. A file that pyarrow or pandas cannot
read, or whose first bad row must be named by its line, is read again row by row in Python: that
slow path is the old reader, kept as the oracle, so every error still names the file, the line
(JSONL line N counting blank lines from 1; CSV line N where line 1 is the header) and the field.

Why one file of ~450 lines: the fast path (Arrow, a column at a time) and the row-by-row fallback that
names the line at fault share one set of row rules, which must not drift apart.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
# A person finds a row of these by its line in an editor, which the row's index does not give
# (blank lines, multi-line CSV fields), so an error in them is located by re-reading the file.
_LINE_FORMATS = {"jsonl", "csv"}
# What str.strip() removes (the characters str.isspace() accepts), so that a field Arrow finds
# blank with _BLANK_PATTERN is exactly one Python would; tests/test_data.py pins the set to Python's.
_WHITESPACE = "\x09\x0a\x0b\x0c\x0d\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_BLANK_PATTERN = "^[" + "".join(f"\\x{{{ord(char):x}}}" for char in _WHITESPACE) + "]*$"


class RowProblem(ValueError):
    """What is wrong with one row, in words that follow its location ("line 5 <problem>").

    The rules below do not know where a row came from; `index` (its position in the file, from 0)
    is filled in by the column checks, and `load_data` turns it into the line a person would look at.
    """

    def __init__(self, problem: str, index: int | None = None) -> None:
        super().__init__(problem)
        self.index = index


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


# --- The rules for one row: shared by the column checks and the row-by-row reader. ---


def schema_of(row: Any, section: DataSection) -> str:
    """Which of TRL's three layouts the (first) row is in, judged by the fields it has."""
    if not isinstance(row, dict):
        raise RowProblem(f"is a {type(row).__name__}, expected an object with named fields")
    if section.messages_field in row:
        return "messages"
    if section.prompt_field in row or section.completion_field in row:
        return "prompt_completion"
    if section.text_field in row:
        return "text"
    raise RowProblem(
        f"has fields {sorted(row)} but needs '{section.text_field}', or "
        f"'{section.prompt_field}' and '{section.completion_field}', or '{section.messages_field}' "
        "(rename them in data.text_field / data.prompt_field / data.completion_field / data.messages_field)"
    )


def _is_text(value: Any) -> bool:
    """A usable text field: a string with something in it besides whitespace."""
    return isinstance(value, str) and bool(value.strip())


def _need_text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowProblem(f"is missing the field '{field}'")
    if not _is_text(value):
        raise RowProblem(f"field '{field}' must be a non-empty string, got {value!r:.60}")
    return value


def _clean_messages(messages: Any, field: str) -> list[dict[str, str]]:
    """The chat as [{role, content}, ...]: other keys dropped, at least one assistant turn to learn from."""
    if not isinstance(messages, list) or not messages:
        raise RowProblem(f"field '{field}' must be a non-empty list of messages")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RowProblem(f"{field}[{index}] needs a 'role' in {sorted(_ROLES)}, got {message!r:.80}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RowProblem(f"{field}[{index}] is missing a string 'content'")
        clean.append({"role": message["role"], "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise RowProblem(f"{field} has no assistant message to learn from")
    return clean


def normalise_row(row: Any, schema: str, section: DataSection) -> dict[str, Any]:
    """The row in TRL's field names, or a RowProblem naming the field."""
    if not isinstance(row, dict):
        raise RowProblem(f"is a {type(row).__name__}, expected an object with named fields")
    if schema == "text":
        return {"text": _need_text(row, section.text_field)}
    if schema == "prompt_completion":
        return {
            "prompt": _need_text(row, section.prompt_field),
            "completion": _need_text(row, section.completion_field),
        }
    return {"messages": _clean_messages(row.get(section.messages_field), section.messages_field)}


def _source_fields(schema: str, section: DataSection) -> list[tuple[str, str]]:
    """For the flat layouts, (column in the file, TRL's name for it), in the order rows are checked."""
    if schema == "text":
        return [(section.text_field, "text")]
    return [(section.prompt_field, "prompt"), (section.completion_field, "completion")]


# --- Fast path: datasets/pyarrow read the file, the checks run a column at a time. ---


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars and its own error log while loading, then restore both.

    A file it cannot parse is not an error yet (the row-by-row reader decides), and its
    "Failed to load JSON ..." line would only bury the one-line DataError that follows.
    """
    import datasets

    logger = logging.getLogger("datasets")
    level, bars_were_on = logger.level, not datasets.utils.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _is_list_of_objects(path: Path) -> bool:
    """Whether a .json file starts `[{`: the one layout datasets' json loader reads as we do.

    It would read a bare list of strings as a `text` column, and a {"key": [...]} wrapper as a
    single row; the row-by-row reader handles (or refuses) those the way this module always has.
    """
    with _open_binary(path) as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[") and head[1:].lstrip(b" \t\r\n").startswith(b"{")


def _csv_header(path: Path) -> list[str] | None:
    with contextlib.closing(_checked_lines(path)) as lines:
        return next(csv.reader(lines), None)


def _load_saved(path: Path, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a datasets.save_to_disk directory ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"data.split: {split!r} is not a split of {path}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _has_whitespace_only_line(path: Path) -> bool:
    """Whether some line holds only spaces or tabs (not an empty line, which csv skips too)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return any(line.strip() == b"" and line.strip(b"\r\n") != b"" for line in handle)


def _load_with_datasets(path: Path, fmt: str, split: str) -> Any | None:
    """The file as datasets reads it, or None where only the row-by-row reader can say what is wrong."""
    import datasets

    if fmt == "disk":
        return _load_saved(path, split)
    options: dict[str, Any] = {}
    if fmt == "json" and not _is_list_of_objects(path):
        return None
    if fmt == "csv":
        header = _csv_header(path)
        if not header or len(set(header)) != len(header) or _has_whitespace_only_line(path):
            # pandas skips a line of spaces as blank, where csv (and the recipe's rules) see a row
            # with an empty field: only the row-by-row reader names it
            return None
        # Every cell a string ('' when empty), as csv.DictReader gives them: "4" stays text, not 4.
        options = {
            "features": datasets.Features(dict.fromkeys(header, datasets.Value("string"))),
            "na_filter": False,
        }
    builder = "json" if fmt in ("jsonl", "json") else fmt
    try:
        # data_files is a glob pattern: escape it, or "rows[1].jsonl" would load rows1.jsonl.
        pattern = glob.escape(str(path.resolve()))
        loaded = datasets.load_dataset(builder, data_files=pattern, split="train", **options)
        # pyarrow's JSON parser lets invalid UTF-8 through into string columns; full validation
        # (a fast C++ scan) catches it here rather than as a UnicodeDecodeError deep in training.
        loaded.data.table.validate(full=True)
    except Exception as err:  # pyarrow/pandas parse errors name no line a person can use; the row reader will
        from moe_finetune.errors import OutputWriteError, write_failure

        failure = write_failure(err)
        if failure is not None:  # not the file's fault: a full disk or an unwritable cache, said as such
            from datasets import config

            raise OutputWriteError(
                f"{failure[0]} while `datasets` wrote its Arrow copy of {path} into its cache "
                f"({failure[1] or config.HF_DATASETS_CACHE}); free space there or set HF_DATASETS_CACHE to a "
                "writable folder"
            ) from None
        return None
    return loaded


def _first_bad_text_row(dataset: Any, field: str) -> int | None:
    """The index of the first row whose `field` is not a non-empty string (missing counts), or None."""
    import datasets
    import pyarrow.compute as pc

    if field not in dataset.column_names:
        return 0
    feature = dataset.features[field]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        # In Arrow, a regex per value: ~50x faster than a Python loop over a million strings.
        blank = pc.match_substring_regex(dataset.with_format("arrow")[field], _BLANK_PATTERN)
        index = pc.index(pc.fill_null(blank, True), True).as_py()  # null: the field is missing
        return None if index < 0 else index
    # Not a string column (numbers, lists, or a Json column of mixed types): decoded, row by row.
    return next((i for i, value in enumerate(dataset[field]) if not _is_text(value)), None)


def _normalise_message_batch(messages: list[Any], indices: list[int], section: DataSection) -> dict[str, Any]:
    clean = []
    for index, chat in zip(indices, messages, strict=True):
        try:
            clean.append(_clean_messages(chat, section.messages_field))
        except RowProblem as problem:
            raise RowProblem(str(problem), index) from None
    return {"messages": clean}


def _normalise_columns(raw: Any, section: DataSection) -> tuple[Any, str]:
    """The rows in TRL's field names and their schema, or a RowProblem with the first bad row's index."""
    first = {name: value for name, value in raw[0].items() if value is not None}  # null = absent in Arrow
    try:
        schema = schema_of(first, section)
    except RowProblem as problem:
        raise RowProblem(str(problem), 0) from None
    if schema == "messages":
        dataset = raw.map(
            _normalise_message_batch,
            input_columns=[section.messages_field],
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            keep_in_memory=True,  # never write cache files next to a user's save_to_disk folder
            fn_kwargs={"section": section},
        )
        return dataset, schema
    fields = _source_fields(schema, section)
    sources = [source for source, _ in fields]
    bad = [index for source in sources if (index := _first_bad_text_row(raw, source)) is not None]
    if bad:
        index = min(bad)
        try:
            normalise_row(raw[index], schema, section)
        except RowProblem as problem:
            raise RowProblem(str(problem), index) from None
    if len(set(sources)) == len(sources):  # select and rename: no row is copied
        renames = {source: name for source, name in fields if source != name}
        return raw.select_columns(sources).rename_columns(renames), schema
    # One column named as both prompt and completion: only a copy gives it two names.
    copies = raw.map(
        lambda batch: {name: batch[source] for source, name in fields},
        batched=True,
        remove_columns=raw.column_names,
        keep_in_memory=True,
    )
    return copies, schema


# --- Slow path: the file row by row in Python; it names the line of anything wrong. ---


def _checked_lines(path: Path) -> Iterator[str]:
    """The file's lines as text (universal newlines), refusing the first one that is not UTF-8.

    A UTF-8 byte-order mark at the start (Excel and Notepad write one) is not part of the text:
    left in, it would stick to the CSV header's first name ('\ufeffprompt') or fail json.loads.
    """
    # surrogateescape keeps reading past a bad byte so the line it is on can be counted and named.
    with (
        gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
        if path.name.endswith(".gz")
        else open(path, encoding="utf-8-sig", errors="surrogateescape")
    ) as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as err:
                byte = ord(line[err.start]) - 0xDC00
                raise DataError(
                    f"{path}: line {number} is not valid UTF-8 (byte 0x{byte:02x} at column {err.start + 1}); "
                    "re-save the file as UTF-8"
                ) from None
            yield line


def _csv_rows(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line where the record starts, {header: value}) for each record; missing trailing cells are None."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    start = reader.line_num + 1
    for values in reader:
        if values:  # a blank line is not a row (csv.DictReader skips them too)
            row: dict[str, Any] = dict.fromkeys(header)
            row.update(zip(header, values, strict=False))  # extra cells are ignored, as DictReader does
            yield start, row
        start = reader.line_num + 1


def _read_rows(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) pairs; `where` names the row the way a person would find it."""
    if fmt == "jsonl":
        for number, line in enumerate(_checked_lines(path), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    elif fmt == "json":
        try:
            payload = json.loads("".join(_checked_lines(path)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(payload, dict) and len(payload) == 1 and isinstance(next(iter(payload.values())), list):
            payload = next(iter(payload.values()))
        if not isinstance(payload, list):
            raise DataError(f"{path}: a .json dataset must be a list of objects (or use .jsonl)")
        for index, row in enumerate(payload):
            yield f"item {index}", row
    elif fmt == "csv":
        for number, row in _csv_rows(_checked_lines(path)):
            yield f"line {number}", row
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read as Parquet ({err})") from None
        for index, row in enumerate(table.to_pylist()):
            yield f"row {index}", row
    else:  # pragma: no cover - the schema restricts `format`, and "disk" always loads with datasets
        raise DataError(f"data.format: unknown format {fmt!r}")


def _load_row_by_row(path: Path, fmt: str, section: DataSection) -> tuple[Any, str]:
    """The normalised rows and their schema, or a DataError naming the first bad row's line and field."""
    import datasets

    rows: list[dict[str, Any]] = []
    schema: str | None = None
    for where, row in _read_rows(path, fmt):
        try:
            if schema is None:
                schema = schema_of(row, section)
            rows.append(normalise_row(row, schema, section))
        except RowProblem as problem:
            raise DataError(f"{path}: {where} {problem}") from None
    if schema is None:
        raise DataError(f"data.path: {path} holds no rows")
    return datasets.Dataset.from_list(rows), schema


def _where(fmt: str, index: int) -> str:
    """A row named by its position, for the formats without lines."""
    return f"item {index}" if fmt == "json" else f"row {index}"


# --- Together. ---


def _shuffle_and_split(dataset: Any, section: DataSection) -> tuple[Any, Any | None]:
    """(train, eval): shuffled (seeded), cut to the first max_examples, the first eval_fraction held out."""
    if section.shuffle:
        # In memory: an 8-byte index per row, instead of a cache file per seed (or in a user's folder).
        dataset = dataset.shuffle(seed=section.seed, keep_in_memory=True)
    if section.max_examples is not None:
        dataset = dataset.select(range(min(section.max_examples, len(dataset))))
    if section.eval_fraction <= 0:
        return dataset, None
    n_eval = max(1, int(round(len(dataset) * section.eval_fraction)))
    return dataset.select(range(n_eval, len(dataset))), dataset.select(range(n_eval))


def row_text(row: dict[str, Any], schema: str, tokenizer: Any) -> str:
    """A normalised row as the text the model reads: the chat template where the tokenizer has one."""
    if schema == "text":
        return str(row["text"])
    if schema == "prompt_completion":
        return f"{row['prompt']}{row['completion']}"
    messages = row["messages"]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    return "\n".join(message["content"] for message in messages)


def row_token_ids(row: dict[str, Any], schema: str, tokenizer: Any) -> list[int]:
    """A normalised row's token ids as TRL's SFTTrainer makes them, so the profile and the guard's
    retention check read what training reads. A chat template already writes the BOS of models that
    use one, so its text is tokenized without special tokens (else Llama-style tokenizers add a
    second BOS, a token no training row starts with); plain text gets the tokenizer's own. TRL's EOS
    at the end of plain rows is left out: one token a row, which neither measure needs."""
    templated = schema == "messages" and bool(getattr(tokenizer, "chat_template", None))
    text = row_text(row, schema, tokenizer)
    return list(tokenizer(text, add_special_tokens=not templated).input_ids)


def load_data(section: DataSection, path: Path) -> LoadedData:
    """Read, check, shuffle and split the dataset the recipe names."""
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    fmt = detect_format(path, section.format)
    with _quiet_datasets():
        raw = _load_with_datasets(path, fmt, section.split)
        if raw is None:
            dataset, schema = _load_row_by_row(path, fmt, section)
        elif len(raw) == 0:
            raise DataError(f"data.path: {path} holds no rows")
        else:
            try:
                dataset, schema = _normalise_columns(raw, section)
            except RowProblem as problem:
                if fmt not in _LINE_FORMATS:
                    raise DataError(f"{path}: {_where(fmt, problem.index or 0)} {problem}") from None
                # A row's index is not its line: the row-by-row reader names the line as an editor shows
                # it (and, were it ever to accept what the column checks refused, its reading stands).
                dataset, schema = _load_row_by_row(path, fmt, section)
        train, eval_split = _shuffle_and_split(dataset, section)
    return LoadedData(train=train, eval=eval_split, schema=schema, path=path, total_rows=len(dataset))
