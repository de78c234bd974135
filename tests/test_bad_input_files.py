"""Hostile or odd input files, each through the command a user would run: a YAML bomb of aliases, values too
long to echo, a byte-order mark on a dataset, a damaged line full of carriage returns in routing.jsonl.
Bad input is exit 2 with one short paragraph naming the file (and field); nothing is expanded or printed whole."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest
from test_report import make_run

from moe_finetune.cli import main
from moe_finetune.data import load_data
from moe_finetune.errors import DataError, RecipeError
from moe_finetune.recipe import MAX_ALIAS_NODES, MAX_SHOWN_CHARS, load_recipe
from moe_finetune.rundir import REPORT_FILE, ROUTING_FILE, read_jsonl
from moe_finetune.sections import DataSection

BOM = b"\xef\xbb\xbf"
# One message: a paragraph of at most a few lines, never a value printed whole.
MAX_MESSAGE_CHARS = 2_000


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_short_paragraph(err: str, *names: str) -> None:
    assert len(err) < MAX_MESSAGE_CHARS, f"{len(err)} characters: {err[:300]}..."
    assert "\n\n" not in err.strip() and "Traceback" not in err and "internal error" not in err
    for name in names:
        assert name in err


# --------------------------------------------------------------------------- YAML aliases


def _billion_laughs(levels: int, fanout: int = 9) -> str:
    """The classic bomb: each anchor a list of `fanout` aliases of the one before; the last used as a field."""
    lines = ["x:", "  a0: &a0 [" + ", ".join(['"lol"'] * fanout) + "]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel:\n  name: *a{levels - 1}\ndata:\n  path: data.jsonl\n"


def _merge_key_bomb(levels: int) -> str:
    """The same through merge keys (`<<: [*m, *m, ...]`), which PyYAML flattens into ever longer mappings."""
    lines = ["x:", "  m0: &m0 {" + ", ".join(f"k{j}: v" for j in range(9)) + "}"]
    lines += [
        f"  m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + f"], own{i}: v}}" for i in range(1, levels)
    ]
    return (
        "\n".join(lines)
        + f"\ntraining:\n  <<: *m{levels - 1}\nmodel:\n  name: m\ndata:\n  path: data.jsonl\n"
    )


@pytest.mark.parametrize("levels", [7, 9])
def test_a_recipe_of_nested_yaml_aliases_is_refused_before_it_expands(
    tmp_path: Path, capsys, levels: int
) -> None:
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(_billion_laughs(levels), encoding="utf-8")
    assert recipe.stat().st_size < 600  # 9 levels: 9**9 strings once expanded, from these few bytes

    code, _, err = _run(capsys, "validate", str(recipe))

    assert code == 2, err
    _assert_one_short_paragraph(
        err, str(recipe), "aliases", f"{MAX_ALIAS_NODES:,} nodes", "before validation"
    )


def test_the_alias_refusal_comes_before_anything_is_expanded(tmp_path: Path) -> None:
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(_billion_laughs(9), encoding="utf-8")
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match="aliases expand to more than"):
            load_recipe(recipe)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"{peak:,} bytes allocated to refuse it"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (_merge_key_bomb(8), "aliases expand to more than"),
        (
            "x: &loop [1, *loop]\nmodel:\n  name: m\ndata:\n  path: d.jsonl\n",
            "anchored at line 1 is inside that value",
        ),
    ],
    ids=["merge-keys", "alias-inside-its-anchor"],
)
def test_merge_key_bombs_and_self_referencing_aliases_are_refused(
    tmp_path: Path, capsys, text: str, says: str
) -> None:
    recipe = tmp_path / "aliases.yaml"
    recipe.write_text(text, encoding="utf-8")
    code, _, err = _run(capsys, "validate", str(recipe))
    assert code == 2, err
    _assert_one_short_paragraph(err, str(recipe), says)


def test_anchors_used_a_few_times_still_load(tmp_path: Path, small_jsonl: Path) -> None:
    recipe = tmp_path / "anchors.yaml"
    recipe.write_text(
        "model:\n  name: &model tiny-mixtral\n"
        "name: *model\n"
        "description: *model\n"
        f"data:\n  path: {small_jsonl}\n  min_examples: 10\n"
        "lora:\n  target_modules: &attention [q_proj, k_proj, v_proj, o_proj]\n"
        "training:\n  <<: {learning_rate: 2.0e-5, max_steps: 3}\n  max_steps: 5\n",
        encoding="utf-8",
    )
    loaded = load_recipe(recipe)
    assert loaded.name == loaded.description == "tiny-mixtral"
    assert loaded.training == {"learning_rate": 2e-5, "max_steps": 5}


def test_an_anchor_used_many_times_within_the_bound_loads(tmp_path: Path, small_jsonl: Path) -> None:
    recipe = tmp_path / "many.yaml"
    recipe.write_text(
        "model:\n  name: tiny-mixtral\n"
        f"data:\n  path: {small_jsonl}\n  min_examples: 10\n"
        "lora:\n  experts:\n    0: &all ["
        + ", ".join(str(e) for e in range(8))
        + "]\n"
        + "".join(f"    {layer}: *all\n" for layer in range(1, 64)),  # 63 uses of a 9-node value
        encoding="utf-8",
    )
    loaded = load_recipe(recipe)
    assert loaded.lora.experts == {layer: list(range(8)) for layer in range(64)}


# --------------------------------------------------------------------------- values too long to echo


def test_a_huge_wrong_value_is_echoed_cut_short(tmp_path: Path, small_jsonl: Path, capsys) -> None:
    recipe = tmp_path / "huge.yaml"
    huge = "[" + ", ".join(f"item{i}" for i in range(20_000)) + "]"
    recipe.write_text(
        f"model:\n  name: {huge}\ndata:\n  path: {small_jsonl}\ntraining:\n  learning_rate: {huge}\n"
        f"lora:\n  experts: {huge}\n",
        encoding="utf-8",
    )
    assert recipe.stat().st_size > 300_000

    code, _, err = _run(capsys, "validate", str(recipe))

    assert code == 2, err
    _assert_one_short_paragraph(
        err, str(recipe), "model.name", "training.learning_rate", "lora.experts", "..."
    )
    assert "item0" in err and "item10000" not in err


def test_a_huge_string_named_by_set_is_echoed_cut_short(recipe_factory, capsys) -> None:
    recipe = recipe_factory("description: " + "x" * 1_000_000 + "\n")
    code, _, err = _run(capsys, "validate", str(recipe), "--set", "description.part=1")
    assert code == 2, err
    _assert_one_short_paragraph(err, "description is a value", "not a section")
    assert err.count("x") < MAX_SHOWN_CHARS


@pytest.mark.parametrize(
    ("value", "says"),
    [("[" * 5000 + "]" * 5000, "nested too deeply"), ("2024-02-30", "day is out of range")],
    ids=["nested-5000-deep", "impossible-date"],
)
def test_yaml_python_cannot_build_is_bad_input_not_a_bug(
    tmp_path: Path, capsys, value: str, says: str
) -> None:
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(f"model:\n  name: {value}\ndata:\n  path: d.jsonl\n", encoding="utf-8")
    code, _, err = _run(capsys, "validate", str(recipe))
    assert code == 2, err
    _assert_one_short_paragraph(err, str(recipe), says)


# --------------------------------------------------------------------------- a byte-order mark on the data


def _rows(count: int) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(count)]


def _as_csv(rows: list[dict[str, str]]) -> bytes:
    return ("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows)).encode()


def _as_jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_a_csv_with_a_byte_order_mark_validates(recipe_factory, tmp_path: Path, capsys) -> None:
    data = tmp_path / "excel.csv"
    data.write_bytes(BOM + _as_csv(_rows(40)))
    code, out, err = _run(capsys, "validate", str(recipe_factory(data_path=data)))
    assert code == 0, err
    assert "data: 40 training examples (prompt_completion)" in out


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.csv", _as_csv(_rows(3))),
        ("a.jsonl", _as_jsonl(_rows(3))),
        ("a.ndjson", _as_jsonl(_rows(3))),
        ("a.json", json.dumps(_rows(3)).encode()),
        ("wrapped.json", json.dumps({"rows": _rows(3)}).encode()),  # read row by row
        ("a.jsonl.gz", _as_jsonl(_rows(3))),
        ("wrapped.json.gz", json.dumps({"rows": _rows(3)}).encode()),
    ],
    ids=["csv", "jsonl", "ndjson", "json", "wrapped-json", "jsonl-gz", "wrapped-json-gz"],
)
def test_every_text_format_reads_past_a_byte_order_mark(tmp_path: Path, name: str, text: bytes) -> None:
    path = tmp_path / name
    marked = BOM + text  # in a .gz, the mark is on the text inside
    path.write_bytes(gzip.compress(marked) if name.endswith(".gz") else marked)
    loaded = load_data(DataSection(path=name, min_examples=1, shuffle=False), path)
    assert loaded.num_train == 3
    assert loaded.train[0] == {"prompt": "What is 0 plus 0?", "completion": "0"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", _as_csv(_rows(2)) + b",no prompt\n", "line 4 field 'prompt' must be a non-empty string"),
        ("bad.jsonl", _as_jsonl(_rows(2)) + b'{"prompt": " ", "completion": "x"}\n', "line 3 field 'prompt'"),
        ("cut.jsonl", _as_jsonl(_rows(2)) + b'{"prompt": "x", "compl', "line 3 is not valid JSON"),
    ],
    ids=["csv", "jsonl", "cut-jsonl"],
)
def test_a_bad_row_after_a_byte_order_mark_is_named_by_its_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(BOM + content)
    with pytest.raises(DataError, match=message) as caught:
        load_data(DataSection(path=name, min_examples=1), path)
    assert str(path) in str(caught.value) and "line 1" not in str(caught.value)


# --------------------------------------------------------------------------- routing.jsonl lines


def _garbage_line(size: int) -> bytes:
    """A damaged line full of bytes text mode would take for line breaks: \\r, and UTF-8 NEL and LS."""
    unit = b"garbage\r" + "\u0085\u2028".encode() + b"\x00\xff" + b"x" * 230
    return (unit * (size // len(unit) + 1))[:size]


def test_report_counts_a_damaged_line_of_carriage_returns_as_one_line(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "damaged", status="running", adapter=False)
    routing = run / ROUTING_FILE
    lines = routing.read_bytes().splitlines(keepends=True)
    garbage = _garbage_line(5_000_000)  # the reported case was 50 MB: "204081 line(s) could not be read"
    assert garbage.count(b"\r") > 10_000
    routing.write_bytes(b"".join(lines[:4]) + garbage + b"\n" + b"".join(lines[4:]))

    code, out, err = _run(capsys, "report", str(run))

    assert code == 0, err
    note = "routing.jsonl: 1 line(s) could not be read (line 5: cut short or damaged"
    assert note in out and note in (run / REPORT_FILE).read_text(encoding="utf-8")
    assert f"covers the {len(lines)} record(s)" in out
    assert len(out) < 20_000


def test_records_written_with_windows_line_ends_and_a_cut_last_line_still_read(tmp_path: Path) -> None:
    path = tmp_path / ROUTING_FILE
    records = [{"step": step, "loss": 1.0 / step} for step in range(1, 4)]
    path.write_bytes(
        b"".join(json.dumps(r).encode() + b"\r\n" for r in records) + b"\r\n" + b'{"step": 4, "lo'
    )
    skipped: list[int] = []
    assert list(read_jsonl(path, skipped)) == records
    assert skipped == [5]  # the blank line 4 is no record and no damage


def test_report_and_merge_read_a_runs_resolved_recipe_with_the_same_alias_bound(
    tmp_path: Path, random_adapter: Path, capsys
) -> None:
    import shutil

    from moe_finetune.cli import main
    from moe_finetune.report import write_report

    run = tmp_path / "run"
    shutil.copytree(random_adapter, run / "adapter")
    (run / "recipe.resolved.yaml").write_text(_billion_laughs(9))
    report = write_report(run)  # a note, not a 2.8 GB expansion
    assert any("recipe.resolved.yaml could not be read" in note for note in report.notes)
    code = main(["merge", str(run), "--output", str(tmp_path / "merged")])
    _, err = capsys.readouterr()
    assert code == 2 and "recipe.resolved.yaml cannot be read" in err and len(err) < 2000


def test_a_bad_value_from_set_is_named_as_coming_from_set(capsys) -> None:
    from moe_finetune.cli import main

    code = main(["validate", str(Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"), "--skip-data", "--set", "lora.r=abc"])
    err = capsys.readouterr().err
    assert code == 2 and "lora.r:" in err and "[from --set lora.r=abc]" in err


def test_a_model_name_meant_as_a_folder_that_does_not_exist_is_named_as_a_missing_folder(tmp_path, capsys) -> None:
    from moe_finetune.errors import RecipeError
    from moe_finetune.models.loading import resolve_model_path
    from moe_finetune.sections import ModelSection

    with pytest.raises(RecipeError, match="no such folder './models/mine'"):
        resolve_model_path(ModelSection(name="./models/mine"), tmp_path / "models" / "mine")


def test_an_unreachable_hub_is_said_at_once_not_after_a_minute_of_retries(monkeypatch) -> None:
    import time

    from huggingface_hub import constants

    from moe_finetune.errors import RecipeError
    from moe_finetune.models.loading import resolve_model_path
    from moe_finetune.sections import ModelSection

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="not in the local Hugging Face cache and the hub"):
        resolve_model_path(ModelSection(name="someorg/not-cached-here"))
    assert time.perf_counter() - start < 10


def test_a_datasets_cache_that_cannot_be_written_is_named_not_a_silent_switch_to_the_slow_reader(
    tmp_path: Path, monkeypatch
) -> None:
    import errno

    import datasets

    from moe_finetune.data import load_data
    from moe_finetune.errors import OutputWriteError
    from moe_finetune.sections import DataSection

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "p{i}", "completion": "c{i}"}}\n' for i in range(20)))

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.arrow"))

    monkeypatch.setattr(datasets, "load_dataset", full)
    with pytest.raises(OutputWriteError, match="no space left on device while `datasets` wrote"):
        load_data(DataSection(path=str(rows), min_examples=1), rows)
