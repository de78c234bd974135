"""The retention check's measurement: the model's loss on rows it should keep knowing.

The routing guard watches the routers; what a user fears is the model forgetting, and on a pretrained MoE
that can happen while routing does not move at all (README, "Does the guard protect a trained model from
forgetting?": router frozen, forgetting as large, routing flat). So the guard can also watch forgetting
itself: `guards.retention.data` names rows unlike the fine-tune's (general text, the pretraining mix, an
earlier task), and at every `retention.every`-th logging step EntropyGuard measures their mean next-token
loss here and hands it to GuardPolicy.retention, which decides (routing/policy.py, check 8).

Every rank evaluates every row (the loss is cheap next to training, and under FSDP or ZeRO-3 every rank
must run the same forwards anyway); the mean over ranks is what the policy sees, so all ranks take the
same decision even if their floating-point results differ in the last bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_finetune.errors import DataError
from moe_finetune.sections import DataSection

DEFAULT_MAX_LENGTH = 1024  # SFTConfig's own default max_length


def summed_token_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over the real tokens of one right-padded batch, and their count.

    From the logits, not `labels=`: with `output_router_logits` a model's own loss adds the aux loss.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(loss), int((targets != -100).sum())


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one right-padded (input_ids, attention_mask) pair."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids, mask


def _input_device(model: Any) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        device = embeddings.weight.device
        if device.type != "meta":
            return device
    return next(model.parameters()).device


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@dataclass
class RetentionSet:
    """Tokenised retention rows and how to measure the model's loss on them."""

    rows: list[list[int]]
    pad_id: int
    batch_size: int
    source: str  # where the rows came from, for the sentences a user reads

    def __post_init__(self) -> None:
        self.rows = [list(ids) for ids in self.rows if len(ids) >= 2]  # a row needs a next token to predict
        if not self.rows:
            raise DataError(f"guards.retention.data: {self.source} has no row of two tokens or more to evaluate")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.last_seconds: float | None = None

    @property
    def tokens(self) -> int:
        """Tokens predicted per check (every real token but each row's first)."""
        return sum(len(ids) - 1 for ids in self.rows)

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], tokenizer: Any, *, max_length: int, batch_size: int, source: str = "texts"
    ) -> RetentionSet:
        rows = [list(tokenizer(text).input_ids)[:max_length] for text in texts]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(rows=rows, pad_id=int(pad_id if pad_id is not None else 0), batch_size=batch_size, source=source)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        tokenizer: Any,
        *,
        rows: int,
        max_length: int,
        batch_size: int,
        fields: DataSection | None = None,
    ) -> RetentionSet:
        """The first `rows` rows of a dataset file in any format `data.path` takes (text, prompt +
        completion, or chats through the tokenizer's template), read with `fields`' column names."""
        return cls.from_texts(
            retention_texts(path, tokenizer, rows=rows, fields=fields),
            tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            source=str(path),
        )

    def loss(self, model: Any) -> float:
        """Mean next-token loss of `model` on the rows (eval mode, no gradients), averaged over ranks."""
        started = time.perf_counter()
        was_training = model.training
        device = _input_device(model)
        total, count = 0.0, 0
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(self.rows), self.batch_size):
                    input_ids, mask = pad_batch(self.rows[start : start + self.batch_size], self.pad_id)
                    summed, tokens = summed_token_loss(model, input_ids.to(device), mask.to(device))
                    total += summed
                    count += tokens
        finally:
            model.train(was_training)
        loss = total / max(count, 1)
        world = _world_size()
        if world > 1:
            reduced = torch.tensor([loss if math.isfinite(loss) else math.nan], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(reduced)
            loss = float(reduced[0]) / world
        self.last_seconds = time.perf_counter() - started
        return loss


def retention_texts(
    path: str | Path, tokenizer: Any, *, rows: int, fields: DataSection | None = None
) -> list[str]:
    """The texts of the first `rows` rows of a retention file, as the model reads them in training."""
    from moe_finetune.data import load_data, row_text

    path = Path(path)
    if not path.exists():
        raise DataError(f"guards.retention.data: {path} does not exist")
    section = DataSection(
        **{
            **(fields.model_dump() if fields is not None else {}),
            "path": str(path),
            "format": "auto",
            "split": fields.split if fields is not None else "train",
            "eval_fraction": 0.0,
            "max_examples": None,
            "shuffle": False,
            "min_examples": 0,
        }
    )
    try:
        data = load_data(section, path)
    except DataError as err:
        raise DataError(f"guards.retention.data: {err}") from None
    return [row_text(row, data.schema, tokenizer) for row in data.train.select(range(min(rows, len(data.train))))]
