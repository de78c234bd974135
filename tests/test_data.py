"""Dataset loading: every supported format and field layout, and bad rows named by number and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from moe_finetune.callbacks.dataset_size import check_dataset_size
from moe_finetune.data import load_data
from moe_finetune.errors import DataError, DatasetTooSmallError
from moe_finetune.sections import DataSection

ROWS = [{"prompt": f"Add {i} and 1.\n", "completion": str(i + 1)} for i in range(20)]


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """load_dataset caches each file's Arrow copy; keep the test files' copies out of the user's cache."""
    import datasets

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf-datasets-cache")
    yield
    datasets.config.HF_DATASETS_CACHE = previous


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


_JSONL_WITH_LATIN1 = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:3]) + (
    b'{"prompt": "caf\xe9?", "completion": "x"}\n'  # Latin-1 bytes: not UTF-8
)


@pytest.mark.parametrize(
    ("suffix", "payload", "line"),
    [
        (".jsonl", _JSONL_WITH_LATIN1, 4),
        (".jsonl.gz", _JSONL_WITH_LATIN1, 4),
        (".csv", b"prompt,completion\nq1,a1\ncaf\xe9?,x\n", 3),
    ],
)
def test_invalid_utf8_row_names_the_file_and_line(
    tmp_path: Path, suffix: str, payload: bytes, line: int
) -> None:
    import gzip

    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)
    with pytest.raises(DataError, match=rf"latin1{suffix}: line {line} is not valid UTF-8 \(byte 0xe9"):
        load_data(_spec(path), path)


def test_refusal_names_rows_in_file_and_training_count_after_eval_split(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(100)]
    path = _write_jsonl(tmp_path / "x.jsonl", rows)
    loaded = load_data(DataSection(path=str(path), eval_fraction=0.1), path)
    with pytest.raises(DatasetTooSmallError) as info:
        check_dataset_size(
            loaded.num_train, 100, str(path), rows_in_file=loaded.total_rows, eval_rows=len(loaded.eval)
        )
    message = str(info.value)
    assert f"{path} has 100 rows, 90 training examples after holding out 10 for evaluation" in message
    assert "data.eval_fraction" in message and "fewer than the minimum of 100" in message
    assert "--set data.min_examples=90" in message
    with pytest.raises(DatasetTooSmallError, match="has 100 rows, 90 training examples after the eval split"):
        check_dataset_size(loaded.num_train, 100, str(path), rows_in_file=loaded.total_rows)
    with pytest.raises(DatasetTooSmallError, match="has 90 training examples, fewer than"):
        check_dataset_size(loaded.num_train, 100, str(path), rows_in_file=loaded.num_train)


def test_rows_cut_by_max_examples_are_counted_in_the_refusal() -> None:
    with pytest.raises(DatasetTooSmallError) as info:
        check_dataset_size(4_950, 10_000, "big.jsonl", rows_in_file=20_000, eval_rows=50)
    assert (
        "big.jsonl has 20,000 rows, 4,950 training examples after holding out 50 for evaluation "
        "(data.eval_fraction) and leaving out 15,000 beyond data.max_examples, fewer than the minimum of 10,000"
    ) in str(info.value)


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), "", json.dumps({"prompt": "x"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"gaps.jsonl: line 6 is missing the field 'completion'"):
        load_data(_spec(path), path)


def test_csv_line_numbers_follow_the_file_across_blank_lines_and_multiline_cells(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\n"two\nlines",a1\n\nq2,a2\nq3,\n')
    with pytest.raises(DataError, match="rows.csv: line 6 field 'completion' must be a non-empty string"):
        load_data(_spec(path), path)


def test_number_among_string_completions_is_named_by_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mixed.jsonl", [*ROWS[:3], {"prompt": "x", "completion": 4}, *ROWS[3:]])
    with pytest.raises(DataError, match=r"line 4 field 'completion' must be a non-empty string, got 4"):
        load_data(_spec(path), path)


def test_blank_means_what_str_strip_removes() -> None:
    """The loader finds blank fields in Arrow with a character class; it must be Python's whitespace."""
    from moe_finetune.data import _WHITESPACE

    assert set(_WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}


@pytest.mark.parametrize("blank", ["\x1c", "\x85", "\u00a0", "\u3000 \t"])
def test_unicode_whitespace_only_completion_is_rejected(tmp_path: Path, blank: str) -> None:
    path = _write_jsonl(tmp_path / "ws.jsonl", [ROWS[0], {"prompt": "x", "completion": blank}])
    with pytest.raises(DataError, match="line 2 field 'completion' must be a non-empty string"):
        load_data(_spec(path), path)


def test_zero_width_space_is_text_not_whitespace(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "zw.jsonl", [{"prompt": "x", "completion": "\u200b"}])
    assert load_data(_spec(path), path).train[0]["completion"] == "\u200b"


def test_file_name_with_glob_characters_loads_that_file(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "rows1.jsonl", [{"text": "decoy"}])
    path = _write_jsonl(tmp_path / "rows[1].jsonl", [{"text": "real"}])
    assert load_data(_spec(path), path).train[0] == {"text": "real"}


def _chat(index: int) -> dict:
    """A chat row with a key TRL does not need, which the loader drops."""
    return {
        "messages": [
            {"role": "system", "content": "Be brief.", "name": "sys"},
            {"role": "user", "content": f"What is {index} + 1?"},
            {"role": "assistant", "content": f"{index + 1}"},
        ]
    }


@pytest.mark.parametrize("schema", ["prompt_completion", "messages"])
def test_loading_a_saved_dataset_writes_nothing_into_its_folder(tmp_path: Path, schema: str) -> None:
    """Shuffling or mapping a memory-mapped dataset writes cache files beside it by default."""
    import datasets

    path = tmp_path / "saved"
    rows = ROWS[:8] if schema == "prompt_completion" else [_chat(i) for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    before = sorted(p.name for p in path.rglob("*"))
    loaded = load_data(DataSection(path=str(path), eval_fraction=0.25), path)
    assert loaded.num_train == 6 and loaded.schema == schema
    assert sorted(p.name for p in path.rglob("*")) == before


def test_unreadable_file_gives_one_error_and_no_datasets_noise(tmp_path: Path, capfd) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError):
        load_data(_spec(path), path)
    out, err = capfd.readouterr()
    assert "Failed to load JSON" not in out + err and "Generating train split" not in out + err


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "json", "messages"])
def test_rows_shuffle_and_split_as_the_row_by_row_reader_does(tmp_path: Path, fmt: str) -> None:
    """The datasets-based loader is checked against the plain Python reader (the slow oracle), and
    shuffled rows land in the order of `Dataset.from_list(rows).shuffle(seed)`, as they always have."""
    import datasets

    from moe_finetune.data import _load_row_by_row

    rows = [{"prompt": f"q{i} ", "completion": f" a{i}", "id": i} for i in range(40)]
    path = tmp_path / f"rows.{'jsonl' if fmt == 'messages' else fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "messages":
        _write_jsonl(path, [_chat(i) for i in range(40)])
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "prompt", "completion"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    section = DataSection(path=str(path), eval_fraction=0.1, max_examples=30, seed=5)
    expected, schema = _load_row_by_row(path, path.suffix.lstrip("."), section)
    shuffled = expected.shuffle(seed=5)
    loaded = load_data(section, path)
    assert (loaded.schema, loaded.total_rows) == (schema, 40)
    assert loaded.eval[:] == shuffled.select(range(3))[:]
    assert loaded.train[:] == shuffled.select(range(3, 30))[:]


def test_a_csv_line_of_spaces_is_a_row_with_an_empty_field_not_a_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("text\nhello\n  \nworld\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3 field 'text' must be a non-empty string"):
        load_data(DataSection(path=str(path), min_examples=0), path)


def _tokenizer_with_bos():
    """A Llama-style tokenizer: it adds a BOS to every text, and its chat template writes one too."""
    from tokenizers.processors import TemplateProcessing

    from moe_finetune.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(["hello world, the user asks and the assistant answers"] * 20, vocab_size=300)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    return tokenizer


def test_rows_are_tokenized_as_trl_tokenizes_them_with_one_bos_in_chat_rows() -> None:
    from moe_finetune.data import row_token_ids

    tokenizer = _tokenizer_with_bos()
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    chat = row_token_ids({"messages": messages}, "messages", tokenizer)
    # what TRL's SFTTrainer calls for a conversational row
    assert chat == list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert chat.count(tokenizer.bos_token_id) == 1 and chat[0] == tokenizer.bos_token_id
    text = row_token_ids({"text": "hello world"}, "text", tokenizer)
    assert text == list(tokenizer("hello world").input_ids) and text[0] == tokenizer.bos_token_id
    pair = row_token_ids({"prompt": "hello", "completion": " world"}, "prompt_completion", tokenizer)
    assert pair == list(tokenizer("hello world").input_ids)
