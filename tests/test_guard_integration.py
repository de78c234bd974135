"""Real training that collapses: the guard cuts, then halts (exit 4), and a resumed run goes on."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from moe_finetune.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "guard_events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def halted_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    """The demo recipe run once to its halt (about 15 s); each test resumes from its own copy."""
    run = tmp_path_factory.mktemp("demo") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(REPO / "recipes" / "demo-collapse.yaml"), "--output-dir", str(run)])
    return run, code, out.getvalue(), err.getvalue()


def _copy(halted_demo: tuple[Path, int, str, str], tmp_path: Path) -> Path:
    run = tmp_path / "demo"
    shutil.copytree(halted_demo[0], run)
    return run


def test_demo_recipe_cuts_then_halts_with_checkpoint_and_report_and_resumes(
    halted_demo: tuple[Path, int, str, str], tmp_path: Path, capsys
) -> None:
    _, code, out, err = halted_demo
    assert code == 4, out[-3000:] + err[-3000:]
    run = _copy(halted_demo, tmp_path)

    events = _events(run)
    actions = [e["action"] for e in events]
    assert actions[-1] == "halt" and "cut_lr" in actions
    cuts = [e for e in events if e["action"] == "cut_lr"]
    assert [c["lr_after"] / c["lr_before"] for c in cuts] == pytest.approx([0.8] * len(cuts))
    halt_step = events[-1]["step"]
    assert (run / f"checkpoint-{halt_step}").is_dir()
    report = (run / "collapse_report.md").read_text()
    assert f"**Step:** {halt_step}" in report and "| layer |" in report
    assert "training halted by the routing guard" in err and "--resume" in err
    assert "[guard]" in out and "CUT LR" in out and "HALT" in out
    history = [json.loads(line) for line in (run / "routing.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == halt_step
    assert not (run / "adapter").exists()  # a halted run leaves checkpoints, not a "final" adapter

    first_cut = cuts[0]["step"]
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    suggested = max(step for step in steps if step < first_cut)
    assert f"--resume {halted_demo[0] / f'checkpoint-{suggested}'}" in err
    code = main(
        [
            "train",
            str(REPO / "recipes" / "demo-collapse.yaml"),
            "--output-dir",
            str(run),
            "--resume",
            str(run / f"checkpoint-{suggested}"),
            "--set",
            "training.learning_rate=1e-5",
            "--set",
            f"training.max_steps={halt_step + 20}",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    assert f"done: {halt_step + 20} steps" in out
    after = _events(run)[len(events) :]
    assert after[0]["action"] == "resume_lr" and after[0]["step"] == suggested
    assert after[0]["lr_after"] == pytest.approx(1e-5)
    assert all(e["action"] != "halt" for e in after)  # at 1e-5 the run goes on
    assert all(e["step"] > suggested for e in after[1:])


def test_resuming_after_a_cut_never_applies_it_twice(
    halted_demo: tuple[Path, int, str, str], tmp_path: Path, capsys
) -> None:
    assert halted_demo[1] == 4
    run = _copy(halted_demo, tmp_path)
    events = _events(run)
    first_cut = next(e for e in events if e["action"] == "cut_lr")
    after_cut = min(
        int(p.name.split("-")[1])
        for p in run.glob("checkpoint-*")
        if int(p.name.split("-")[1]) > first_cut["step"]
    )
    state = json.loads((run / f"checkpoint-{after_cut}" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["EntropyGuard"]["attributes"]["_saved_policy"]
    assert saved["cuts_made"] >= 1 and saved["last_step"] >= first_cut["step"]
    code = main(
        [
            "train",
            str(REPO / "recipes" / "demo-collapse.yaml"),
            "--output-dir",
            str(run),
            "--resume",
            str(run / f"checkpoint-{after_cut}"),
            "--set",
            f"training.max_steps={after_cut + 1}",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    assert _events(run)[len(events) :] == []  # same learning rate, no new decision, no repeated cut
    assert f"done: {after_cut + 1} steps" in out
