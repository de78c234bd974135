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

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_finetune.callbacks.ranks import all_reduce_sum, world_size
from moe_finetune.data import row_token_ids
from moe_finetune.errors import DataError
from moe_finetune.models.tokens import pad_batch, padding_id, summed_token_loss
from moe_finetune.sections import DataSection, RetentionConfig

DEFAULT_MAX_LENGTH = 1024  # SFTConfig's own default max_length


def _input_device(model: Any) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        device = embeddings.weight.device
        if device.type != "meta":
            return device
    return next(model.parameters()).device


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

    @property
    def fingerprint(self) -> str:
        """A digest of the token ids: a resumed run judges against its stored base only on the same rows."""
        digest = hashlib.sha256(json.dumps(self.rows, separators=(",", ":")).encode())
        return digest.hexdigest()[:16]

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], tokenizer: Any, *, max_length: int, batch_size: int, source: str = "texts"
    ) -> RetentionSet:
        rows = [list(tokenizer(text).input_ids)[:max_length] for text in texts]
        return cls(rows=rows, pad_id=padding_id(tokenizer), batch_size=batch_size, source=source)

    @classmethod
    def from_settings(
        cls,
        settings: RetentionConfig,
        tokenizer: Any,
        *,
        path: str | Path,
        training_max_length: int | None,
        training_batch_size: int,
        fields: DataSection | None = None,
        loaded: LoadedRows | None = None,
    ) -> RetentionSet:
        """The one way `guards.retention` becomes rows (for `train` and for a guard given only a config):
        the first `settings.rows` rows of `path` (`loaded`, when `retention_rows` already read them),
        rendered as training renders them, cut at `max_length` (else the training's), batched likewise."""
        loaded = loaded if loaded is not None else retention_rows(path, rows=settings.rows, fields=fields)
        max_length = settings.max_length or training_max_length or DEFAULT_MAX_LENGTH
        return cls(
            rows=[row_token_ids(row, loaded.schema, tokenizer)[:max_length] for row in loaded.rows],
            pad_id=padding_id(tokenizer),
            batch_size=settings.batch_size or training_batch_size,
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
        world = world_size()
        if world > 1:  # on the backend's device, wherever the embeddings live (CPU-offloaded under FSDP)
            reduced = all_reduce_sum(torch.tensor([loss if math.isfinite(loss) else math.nan], dtype=torch.float64))
            loss = float(reduced[0]) / world
        self.last_seconds = time.perf_counter() - started
        return loss


@dataclass
class LoadedRows:
    """The first rows of a retention file, normalised like training rows (no tokenizer needed yet)."""

    rows: list[dict[str, Any]]
    schema: str  # "text" | "prompt_completion" | "messages"


def retention_rows(path: str | Path, *, rows: int, fields: DataSection | None = None) -> LoadedRows:
    """Read and check the first `rows` rows of a retention file in any format `data.path` takes, with
    `fields`' column names: a bad file fails here (exit 2), before any model loads."""
    from moe_finetune.data import load_data

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
    first = data.train.select(range(min(rows, len(data.train))))
    return LoadedRows(rows=[dict(row) for row in first], schema=data.schema)
