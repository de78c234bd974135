"""Ctrl-C / SIGTERM during `train`: a checkpoint at the current step, a resume hint, exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _start(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moe_finetune.cli", "train", str(recipe), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_130_then_resume_continues(
    recipe_factory, tmp_path: Path, tiny_mixtral_dir: Path, sig: signal.Signals
) -> None:
    recipe = recipe_factory()
    # The guard would (rightly) stop a long run on 40 rows; this test is about signals only.
    proc = _start(
        recipe,
        "--set",
        "training.max_steps=100000",
        "--set",
        "training.save_steps=100000",
        "--set",
        "guards.enabled=false",
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "LoRA coverage" in line or time.monotonic() > deadline:
            break
    time.sleep(3.0)  # let it train a few dozen steps
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 130, text[-2000:]
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, text[-2000:]
    stopped = int(checkpoints[-1].name.split("-")[1])
    assert stopped > 0
    assert f"interrupted at step {stopped}" in text and "--resume" in text

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_finetune.cli",
            "train",
            str(recipe),
            "--resume",
            "--set",
            f"training.max_steps={stopped + 2}",
            "--set",
            "training.save_steps=100000",
            "--set",
            "guards.enabled=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"done: {stopped + 2} steps" in resumed.stdout
