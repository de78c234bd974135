"""Token-id rows as model input, and the next-token loss on them: one copy for every reader of held-out text.

The profile routes rows, the trained tiny MoE measures its held-out loss, and the guard's retention check
measures what the model still knows; all three pad rows the same way and (the last two) sum the same loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Positions whose fp32 logits are materialised at once: a 152k vocabulary at 1,024 positions is 0.6 GB,
# where a whole 8 x 2,048 batch would be 10 GB on top of training's own peak.
LOSS_CHUNK = 1024


def padding_id(tokenizer: Any) -> int:
    """The id that fills a batch's short rows. Padding is masked out of every reading, so any id works; the
    tokenizer's own (else its EOS) is the least surprising, and one rule serves every reader."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad_id if pad_id is not None else 0)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as one right-padded (input_ids, attention_mask) pair."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids, mask


def summed_token_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over the real tokens of one right-padded batch, and their count.

    From the logits, not `labels=`: with `output_router_logits` a model's own loss adds the aux loss. No KV
    cache, and the logits are turned into fp32 a chunk of positions at a time (LOSS_CHUNK).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, targets.shape[1], LOSS_CHUNK):
        chunk = logits[:, start : min(start + LOSS_CHUNK, targets.shape[1])].float()
        total += torch.nn.functional.cross_entropy(
            chunk.reshape(-1, chunk.shape[-1]),
            targets[:, start : start + LOSS_CHUNK].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).double()
    return float(total), int((targets != -100).sum())
