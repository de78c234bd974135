"""Refuse to fine-tune an MoE on too few examples: the field's advice is at least ~10,000.

`check_dataset_size` is the one check, shared by `moe-finetune train` (which runs it right after
loading the data, before any model is loaded, exit 3) and by `DatasetSizeGuard`, which applies the
same rule to a Trainer a user already has, at `on_train_begin`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from moe_finetune.errors import DatasetTooSmallError
from moe_finetune.sections import DEFAULT_MIN_EXAMPLES


def check_dataset_size(
    count: int,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    source: str = "the dataset",
    *,
    rows_in_file: int | None = None,
    eval_rows: int | None = None,
) -> None:
    """Refuse small datasets (exit 3): the count, the threshold and both ways to override.

    `rows_in_file` (and `eval_rows`, the rows held out by data.eval_fraction) say where the other
    rows went when the file holds more rows than there are training examples, so that "9,799
    training examples" from a file a user knows has 9,999 rows is not a puzzle.
    """
    if count >= min_examples:
        return
    size = f"{count:,} training examples"
    if rows_in_file is not None and rows_in_file != count:
        cut = rows_in_file - count - (eval_rows or 0)  # what data.max_examples left out
        held_out = [f"holding out {eval_rows:,} for evaluation (data.eval_fraction)"] if eval_rows else []
        beyond_max = [f"leaving out {cut:,} beyond data.max_examples"] if cut > 0 else []
        known = eval_rows is not None and bool(held_out or beyond_max)
        unknown = "the eval split (data.eval_fraction) and any data.max_examples cut"
        where = " and ".join(held_out + beyond_max) if known else unknown
        size = f"{rows_in_file:,} rows, {size} after {where}"
    raise DatasetTooSmallError(
        f"dataset refused: {source} has {size}, fewer than the minimum of "
        f"{min_examples:,}. MoE routers tend to collapse when fine-tuned on small datasets. To train "
        f"anyway, lower data.min_examples in the recipe (e.g. --set data.min_examples={count}) or pass "
        "--allow-small-dataset (DatasetSizeGuard(min_examples=...) or allow_small=True in Python)."
    )


def count_examples(dataset: Any) -> int:
    """Examples before packing: a packed row of TRL's SFTTrainer holds several (its `seq_lengths`)."""
    if dataset is None:
        return 0
    columns = getattr(dataset, "column_names", None) or []
    if "seq_lengths" in columns:
        return sum(len(lengths) for lengths in dataset["seq_lengths"])
    return len(dataset)


class DatasetSizeGuard(TrainerCallback):
    """Refuse to start training on fewer than `min_examples` examples (raises DatasetTooSmallError).

    With `allow_small=True` it lets training start, says so loudly, and records the override in
    `guard_events.jsonl` so that the run directory tells the truth about it later. The record is written
    at the first step's begin, after every callback's `on_train_begin`: a fresh run's EntropyGuard starts
    that file over at its train begin, which would erase a record written before it (in either order of
    the callbacks).
    """

    def __init__(
        self,
        min_examples: int = DEFAULT_MIN_EXAMPLES,
        allow_small: bool = False,
        dataset: Any = None,
        echo: Callable[[str], None] | None = print,
    ) -> None:
        self.min_examples = min_examples
        self.allow_small = allow_small
        self.dataset = dataset
        self.echo = echo
        self.count: int | None = None
        self._pending: tuple[Path, dict[str, Any]] | None = None  # the override record, written at the first step

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = self.dataset
        if dataset is None and train_dataloader is not None:
            dataset = getattr(train_dataloader, "dataset", None)
        self.count = count_examples(dataset)
        if self.count >= self.min_examples:
            return control
        if not self.allow_small:
            check_dataset_size(self.count, self.min_examples, "the training dataset")
        if state.is_world_process_zero:
            message = (
                f"dataset size override: training on {self.count:,} examples, below the minimum of "
                f"{self.min_examples:,}; watch routing entropy closely"
            )
            record = {
                "step": state.global_step,
                "action": "allow_small_dataset",
                "reason": message,
                "count": self.count,
                "min_examples": self.min_examples,
            }
            self._pending = (Path(args.output_dir), record)
            if self.echo is not None:
                self.echo(f"WARNING: {message}")
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self._pending is not None:
            from moe_finetune.callbacks.guard import append_event

            output_dir, record = self._pending
            self._pending = None
            append_event(output_dir, record)
        return control
