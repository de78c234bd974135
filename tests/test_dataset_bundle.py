"""Checks on the bundled synthetic dataset ``data/instructions.jsonl.gz``.

Why: smoke tests and routing demos train on this file, so it must exist, be large and balanced
enough (>= 10,000 rows even after a 5% eval split), have clean rows, carry *correct* answers, and
match its generator. The spot checks below recompute answers independently of
``data/make_dataset.py`` so a bug there cannot hide behind itself.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from functools import cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = REPO_ROOT / "data" / "instructions.jsonl.gz"
GENERATOR = REPO_ROOT / "data" / "make_dataset.py"
FIELDS = {"id": int, "domain": str, "prompt": str, "completion": str}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@cache
def load_rows() -> tuple[dict[str, object], ...]:
    """Parse the file once per session; every test reads the same immutable tuple."""
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle)


def rows_matching(pattern: str, domain: str) -> list[tuple[re.Match[str], str]]:
    """Return (match, completion) for rows of ``domain`` whose prompt fully matches ``pattern``."""
    regex = re.compile(pattern)
    found = []
    for row in load_rows():
        if row["domain"] == domain:
            match = regex.fullmatch(str(row["prompt"]))
            if match:
                found.append((match, str(row["completion"]).removeprefix(" ")))
    return found


def test_completions_start_on_a_token_boundary() -> None:
    """One leading space, so byte-level BPE never merges the prompt's last token into the answer."""
    for row in load_rows():
        completion = str(row["completion"])
        assert completion.startswith(" ") and not completion.startswith("  "), row


def test_file_exists_and_is_small() -> None:
    assert DATA_FILE.is_file(), "run `python data/make_dataset.py`"
    assert DATA_FILE.stat().st_size < 600_000


def test_row_count_survives_eval_split() -> None:
    rows = load_rows()
    assert len(rows) >= 12_000
    assert int(len(rows) * 0.95) > 10_000


def test_rows_have_the_four_fields() -> None:
    for row in load_rows():
        assert set(row) == set(FIELDS), row
        for field, kind in FIELDS.items():
            assert isinstance(row[field], kind), (field, row)
        for field in ("domain", "prompt", "completion"):
            assert str(row[field]).strip(), (field, row)


def test_ids_are_consecutive() -> None:
    assert [row["id"] for row in load_rows()] == list(range(len(load_rows())))


def test_domains_are_many_and_balanced() -> None:
    rows = load_rows()
    counts = Counter(str(row["domain"]) for row in rows)
    assert len(counts) >= 8, counts
    for domain, count in counts.items():
        assert count >= 0.05 * len(rows), (domain, count)


def test_domains_are_interleaved() -> None:
    """The first few hundred rows must already mix domains, i.e. the file is shuffled."""
    assert len({row["domain"] for row in load_rows()[:200]}) >= 8


def test_no_duplicate_prompts() -> None:
    prompts = [row["prompt"] for row in load_rows()]
    assert len(set(prompts)) == len(prompts)


def test_lengths_fit_a_small_context() -> None:
    for row in load_rows():
        assert len(str(row["prompt"])) <= 120, row
        assert len(str(row["completion"])) <= 80, row


def test_arithmetic_answers() -> None:
    symbolic = rows_matching(r"(?:What is|Compute|Calculate|Evaluate) (\d+) ([-+*×]) (\d+)[?.]", "arithmetic")
    assert len(symbolic) >= 100
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "×": int.__mul__}
    for match, completion in symbolic:
        a, op, b = int(match[1]), match[2], int(match[3])
        assert int(completion) == ops[op](a, b), match[0]
    subtract = rows_matching(r"Subtract (\d+) from (\d+)\.", "arithmetic")
    assert subtract
    for match, completion in subtract:
        assert int(completion) == int(match[2]) - int(match[1]), match[0]


def test_sorting_answers() -> None:
    found = rows_matching(r"Sort in ascending order: (\[?)([\d, ]+)\]?", "list_operations")
    assert len(found) >= 20
    for match, completion in found:
        numbers = sorted(int(x) for x in match[2].split(", "))
        body = ", ".join(map(str, numbers))
        assert completion == (f"[{body}]" if match[1] else body), match[0]


def test_date_answers() -> None:
    weekday = rows_matching(r"What day of the week was (\d{4}-\d{2}-\d{2})\?", "dates")
    assert len(weekday) >= 10
    for match, completion in weekday:
        assert completion == WEEKDAYS[dt.date.fromisoformat(match[1]).weekday()], match[0]
    added = rows_matching(r"Add (\d+) days to (\d{4}-\d{2}-\d{2})\.", "dates")
    assert len(added) >= 10
    for match, completion in added:
        expected = dt.date.fromisoformat(match[2]) + dt.timedelta(days=int(match[1]))
        assert completion == expected.isoformat(), match[0]


def test_string_answers() -> None:
    found = rows_matching(r"Reverse the word '([a-z]+)'\.", "string_manipulation")
    assert len(found) >= 10
    for match, completion in found:
        assert completion == match[1][::-1], match[0]


def test_unit_answers() -> None:
    km = rows_matching(r"Convert ([\d.]+) kilometers? to meters\.", "unit_conversion")
    assert len(km) >= 5
    for match, completion in km:
        meters = Fraction(match[1]) * 1000
        assert Fraction(completion.split()[0]) == meters, match[0]
    celsius = rows_matching(r"Convert (-?\d+) degrees Celsius to Fahrenheit\.", "unit_conversion")
    assert len(celsius) >= 5
    for match, completion in celsius:
        assert completion.endswith(" °F")
        assert float(completion.split()[0]) == pytest.approx(int(match[1]) * 9 / 5 + 32, abs=0.05), match[0]


def test_code_answers_run() -> None:
    """Execute generated functions: the code domain must be valid Python that does what it says."""
    found = rows_matching(r".* returns x (plus|multiplied by) (\d+)\.", "python_code")
    assert len(found) >= 20
    for match, completion in found:
        namespace: dict[str, object] = {}
        exec(completion, namespace)  # trusted: the bundled file, not user input
        function = next(v for k, v in namespace.items() if k != "__builtins__")
        n = int(match[2])
        assert function(7) == (7 + n if match[1] == "plus" else 7 * n), match[0]


def test_generator_check_passes() -> None:
    """The file on disk must be exactly what ``make_dataset.py`` produces now."""
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generator_check_detects_a_stale_file(tmp_path: Path) -> None:
    """``--check`` must fail on edited content, or the test above would prove nothing."""
    stale = tmp_path / "instructions.jsonl.gz"
    payload = gzip.decompress(DATA_FILE.read_bytes()).replace(b'"completion":"', b'"completion":"x', 1)
    stale.write_bytes(gzip.compress(payload, mtime=0))
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--output", str(stale)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
