"""DatasetSizeGuard on a Trainer a user already has: refuse at on_train_begin, or record an override."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from test_monitor import make_trainer

from moe_finetune.callbacks import DatasetSizeGuard, attach
from moe_finetune.callbacks.dataset_size import count_examples
from moe_finetune.errors import DatasetTooSmallError


def test_guard_refuses_a_small_dataset_before_the_first_step(tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_mixtral_dir, tmp_path / "run")
    attach(trainer, DatasetSizeGuard(min_examples=10_000, echo=None))
    with pytest.raises(DatasetTooSmallError) as info:
        trainer.train()
    message = str(info.value)
    assert "10,000" in message and "--allow-small-dataset" in message and "data.min_examples" in message
    assert trainer.state.global_step == 0


def test_allowed_small_dataset_trains_and_records_the_override(
    tiny_mixtral_dir: Path, tmp_path: Path
) -> None:
    trainer = make_trainer(tiny_mixtral_dir, tmp_path / "run")
    lines: list[str] = []
    guard = DatasetSizeGuard(min_examples=10_000, allow_small=True, echo=lines.append)
    attach(trainer, guard)
    trainer.train()
    assert trainer.state.global_step == 4
    assert lines and lines[0].startswith("WARNING: dataset size override")
    events = [json.loads(line) for line in (tmp_path / "run" / "guard_events.jsonl").read_text().splitlines()]
    assert events[0]["action"] == "allow_small_dataset" and events[0]["count"] == guard.count < 10_000


def test_packed_rows_are_counted_as_the_examples_they_hold() -> None:
    packed = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "seq_lengths": [[1, 2], [2]]})
    assert count_examples(packed) == 3
    assert count_examples(datasets.Dataset.from_dict({"text": ["a", "b"]})) == 2
