"""EntropyGuard's actions on a Trainer: LR cuts that keep every schedule's shape, events, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from moe_finetune.callbacks.guard import EntropyGuard, append_event
from moe_finetune.callbacks.lr import peak_learning_rate, scale_learning_rate
from moe_finetune.sections import GuardConfig

SCHEDULERS = [
    "linear",
    "cosine",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
]


def _schedule(name: str, cut_at: int | None, factor: float = 0.5, steps: int = 40) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=8, num_training_steps=steps)
    rates = []
    for step in range(steps):
        optimizer.step()
        scheduler.step()
        if step == cut_at:
            scale_learning_rate(optimizer, scheduler, factor)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("cut_at", [3, 20])  # during warm-up and after it
def test_cut_scales_the_rest_of_the_schedule_keeping_its_shape(name: str, cut_at: int) -> None:
    reference = _schedule(name, cut_at=None)
    cut = _schedule(name, cut_at=cut_at)
    assert cut[:cut_at] == pytest.approx(reference[:cut_at])
    assert cut[cut_at:] == pytest.approx([0.5 * r for r in reference[cut_at:]], rel=1e-9, abs=1e-15)


def test_cut_survives_scheduler_state_round_trip() -> None:
    """A checkpoint stores the scheduler's state; a resumed run must keep the cut."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=20)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    scale_learning_rate(optimizer, scheduler, 0.5)
    saved_sched, saved_opt = scheduler.state_dict(), optimizer.state_dict()

    param2 = torch.nn.Parameter(torch.zeros(1))
    optimizer2 = torch.optim.AdamW([param2], lr=1e-3)
    scheduler2 = get_scheduler("cosine", optimizer2, num_warmup_steps=0, num_training_steps=20)
    optimizer2.load_state_dict(saved_opt)
    scheduler2.load_state_dict(saved_sched)
    assert peak_learning_rate(optimizer2, scheduler2) == pytest.approx(5e-4)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        optimizer2.step()
        scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_reduce_on_plateau_is_scaled_through_the_groups() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    before, after = scale_learning_rate(optimizer, scheduler, 0.25)
    assert (before, after) == pytest.approx((1e-2, 2.5e-3))


def test_events_are_valid_json_lines_even_with_nan(tmp_path: Path) -> None:
    append_event(tmp_path, {"step": 3, "action": "halt", "metrics": {"routing/entropy": float("nan")}})
    append_event(tmp_path, {"step": 4, "action": "cut_lr", "values": [1.0, float("inf")]})
    lines = (tmp_path / "guard_events.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 4]
    assert json.loads(lines[0])["metrics"]["routing/entropy"] is None


def test_guard_state_is_exportable_for_checkpoints() -> None:
    guard = EntropyGuard(GuardConfig(cut_drop=0.2, halt_drop=0.5), echo=None)
    exported = guard.state()
    json.dumps(exported)
    assert exported["args"]["config"]["cut_drop"] == pytest.approx(0.2)
    assert exported["attributes"]["_saved_policy"]["cuts_made"] == 0
