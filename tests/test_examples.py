"""Every example in callbacks/ runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "callbacks").glob("*_example.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(example: Path) -> None:
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "routing" in result.stdout
    if example.stem == "sft_trainer_example":  # the guard given only a config reads its retention rows itself
        assert "retention loss: " in result.stdout and "[guard] retention check: " in result.stdout


def test_there_is_an_example_for_each_kind_of_trainer() -> None:
    assert {p.stem for p in EXAMPLES} >= {"sft_trainer_example", "trainer_example", "manual_loop_example"}
