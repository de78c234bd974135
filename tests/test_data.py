"""Dataset loading: every supported format and field layout, and bad rows named by number and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from moe_finetune.callbacks.dataset_size import check_dataset_size
from moe_finetune.data import load_data
from moe_finetune.errors import DataError, DatasetTooSmallError
from moe_finetune.recipe import DataSection

ROWS = [{"prompt": f"Add {i} and 1.\n", "completion": str(i + 1)} for i in range(20)]


def _spec(path: Path, **kwargs) -> DataSection:
    return DataSection(path=str(path), shuffle=False, **kwargs)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "csv", "parquet", "disk"])
def test_every_supported_format_loads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    import datasets

    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, ROWS)
    elif fmt == "jsonl.gz":
        import gzip

        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
            writer.writeheader()
            writer.writerows(ROWS)
    elif fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    loaded = load_data(_spec(path), path)
    assert loaded.schema == "prompt_completion"
    assert loaded.num_train == len(ROWS)
    assert loaded.train[3] == {"prompt": "Add 3 and 1.\n", "completion": "4"}


def test_text_and_messages_layouts_are_recognised(tmp_path: Path) -> None:
    text = load_data(_spec(tmp_path / "t.jsonl"), _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}] * 3))
    assert text.schema == "text" and text.train[0] == {"text": "hello"}
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    loaded = load_data(_spec(tmp_path / "m.jsonl"), _write_jsonl(tmp_path / "m.jsonl", chat))
    assert loaded.schema == "messages"
    assert loaded.train[0]["messages"][1] == {"role": "assistant", "content": "hello"}


def test_custom_field_names_are_mapped(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "a"}] * 2)
    loaded = load_data(_spec(path, prompt_field="question", completion_field="answer"), path)
    assert loaded.train[0] == {"prompt": "q?", "completion": "a"}


def test_row_missing_a_field_is_named_by_line_and_field(tmp_path: Path) -> None:
    rows = [*ROWS[:4], {"prompt": "no answer here"}, *ROWS[4:]]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"line 5 is missing the field 'completion'"):
        load_data(_spec(path), path)


def test_empty_completion_is_rejected_with_its_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [*ROWS[:2], {"prompt": "x", "completion": "  "}])
    with pytest.raises(DataError, match=r"line 3 field 'completion' must be a non-empty string"):
        load_data(_spec(path), path)


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_data(_spec(path), path)


def test_rows_without_any_known_field_list_what_is_needed(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="line 1 has fields .* but needs 'text'"):
        load_data(_spec(path), path)


def test_bad_chat_message_is_named(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"line 1 messages\[1\] needs a 'role'"):
        load_data(_spec(path), path)


def test_csv_rows_are_numbered_as_in_an_editor(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\nq1,a1\nq2,\n")
    with pytest.raises(DataError, match="line 3 field 'completion'"):
        load_data(_spec(path), path)


def test_unknown_extension_asks_for_a_format(tmp_path: Path) -> None:
    path = tmp_path / "rows.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="data.format"):
        load_data(_spec(path), path)


def test_missing_split_of_a_saved_datasetdict_lists_the_splits(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    with pytest.raises(DataError, match="data.split: 'train' is not a split .* validation"):
        load_data(_spec(path), path)


def test_eval_fraction_and_max_examples_split_deterministically(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", ROWS)
    spec = DataSection(path=str(path), eval_fraction=0.25, max_examples=16, seed=3)
    first, second = load_data(spec, path), load_data(spec, path)
    assert first.num_train == 12 and len(first.eval) == 4
    assert first.train[:] == second.train[:]


def test_bundled_dataset_passes_the_default_size_threshold() -> None:
    path = Path(__file__).resolve().parents[1] / "data" / "instructions.jsonl.gz"
    loaded = load_data(DataSection(path=str(path), eval_fraction=0.02), path)
    check_dataset_size(loaded.num_train, 10_000, str(path))
    assert loaded.num_train >= 10_000


def test_size_check_gives_count_threshold_and_overrides() -> None:
    with pytest.raises(DatasetTooSmallError) as info:
        check_dataset_size(40, 10_000, "small.jsonl")
    message = str(info.value)
    assert "40" in message and "10,000" in message
    assert "data.min_examples" in message and "--allow-small-dataset" in message
