"""Real training on the two demo recipes: collapse is cut, then halts (exit 4), and its recovery runs to the
end; sharpening is cut, settles and runs to the end; resumes never cut twice and keep the cut rate.

They pin the story, not step numbers (other library versions and thread counts move the steps): the
baseline is routing before the first update, the checkpoint kept as last-healthy is healthy by the
guard's own measure, and the recovery the halt message gives finishes."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from moe_finetune.cli import main
from moe_finetune.recipe import load_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COLLAPSE = REPO / "recipes" / "demo-collapse.yaml"
SHARPENING = REPO / "recipes" / "demo-sharpening.yaml"


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "guard_events.jsonl").read_text().splitlines()]


def _routing(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "routing.jsonl").read_text().splitlines()]


def _train(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def halted_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    """The collapse demo run once to its halt (a few seconds); each test resumes from its own copy."""
    run = tmp_path_factory.mktemp("collapse") / "run"
    return (run, *_train(str(COLLAPSE), "--output-dir", str(run)))


@pytest.fixture(scope="module")
def settled_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    """The sharpening demo run once to its end (about 15 s)."""
    run = tmp_path_factory.mktemp("sharpening") / "run"
    return (run, *_train(str(SHARPENING), "--output-dir", str(run)))


def _window_of(run: Path, step: int) -> dict:
    """The routing.jsonl record of the logging window a checkpoint saved at `step` belongs to."""
    return next(r for r in _routing(run) if r["step"] >= step)


def _healthy_by_the_guards_measure(run: Path, step: int, recipe: Path) -> bool:
    """Whether the window a checkpoint at `step` was saved in sits above every cut line of the guard."""

    guards = load_recipe(recipe).guards
    baseline = next(e for e in _events(run) if e["action"] == "baseline")["details"]
    window = _window_of(run, step)
    layers = window["layers"]
    return (
        window["entropy"] > (1 - guards.cut_drop) * baseline["entropy"]
        and all(
            layer["entropy"] > (1 - guards.cut_layer_drop) * start
            for layer, start in zip(layers, baseline["layer_entropy"], strict=True)
        )
        and all(
            layer["balance"] > (1 - guards.cut_balance_drop) * start
            for layer, start in zip(layers, baseline["layer_balance"], strict=True)
        )
    )


def _copy(demo: tuple[Path, int, str, str], tmp_path: Path) -> Path:
    run = tmp_path / "demo"
    shutil.copytree(demo[0], run)
    return run


def test_collapsing_load_is_cut_then_halted_with_checkpoint_report_and_a_kept_healthy_checkpoint(
    halted_demo: tuple[Path, int, str, str],
) -> None:
    run, code, out, err = halted_demo
    assert code == 4, out[-3000:] + err[-3000:]
    events = _events(run)
    actions = [e["action"] for e in events]
    assert actions[-1] == "halt" and "cut_lr" in actions  # cut first, then halted
    halt = events[-1]
    # judged against the routing before the first update, not against the first (already collapsing) windows
    baseline = events[0]
    assert baseline["action"] == "baseline" and baseline["step"] == 0 and baseline["details"]["source"] == "probe"
    assert halt["baseline"]["layer_entropy"] == pytest.approx(baseline["details"]["layer_entropy"])
    faulty = halt["details"]["layers"][0]
    assert faulty["baseline"] == pytest.approx(baseline["details"]["layer_balance"][faulty["layer"]])
    assert halt["details"]["check"] == "balance_drop"  # the load concentrating, not a confident router
    assert "its load is concentrating on few experts" in halt["reason"]
    assert (run / f"checkpoint-{halt['step']}").is_dir()
    report = (run / "report.md").read_text()  # one report: the halt is its verdict and its own section
    assert report.startswith(f"**Halted at step {halt['step']}**") and "| layer |" in report
    assert f"## Halted at step {halt['step']}" in report and (run / "load_share.png").is_file()
    assert not (run / "collapse_report.md").exists()
    assert "[guard]" in out and "CUT LR" in out and "HALT" in out
    assert _routing(run)[-1]["step"] == halt["step"]
    assert not (run / "adapter").exists()  # a halted run leaves checkpoints, not a "final" adapter
    first_cut = next(e["step"] for e in events if e["action"] == "cut_lr")
    kept = sorted((run / "last-healthy").glob("checkpoint-*"))
    assert len(kept) == 1
    kept_step = int(kept[0].name.split("-")[1])
    # healthy by the guard's own measure: saved inside a window it judged above every cut line, before the
    # window that showed the trouble (so never inside it, nor at or after it)
    troubled_window_start = max(r["step"] for r in _routing(run) if r["step"] < first_cut)
    assert kept_step <= troubled_window_start < first_cut
    assert _healthy_by_the_guards_measure(run, kept_step, COLLAPSE)
    assert f"--resume {kept[0]}" in err and re.search(r"--set training.learning_rate=[0-9.e+-]+(\s|$)", err)


def test_recovery_from_the_checkpoint_before_trouble_at_a_lower_rate_runs_to_the_end(
    halted_demo: tuple[Path, int, str, str], tmp_path: Path
) -> None:
    """What the halt message recommends must work: from the kept checkpoint at the rate it prints the load
    neither collapses nor needs to recover; the guard may cut, but it never halts, and the run goes to the
    end, judged against the baseline of the original start (kept in the guard's state)."""
    assert halted_demo[1] == 4
    printed = re.search(r"--resume (\S+) --set training\.learning_rate=([0-9.e+-]+)", halted_demo[3])
    assert printed is not None, halted_demo[3][-3000:]
    run = _copy(halted_demo, tmp_path)
    kept = run / "last-healthy" / Path(printed.group(1)).name  # the copy of the checkpoint the message names
    rate = printed.group(2)
    code, out, err = _train(
        str(COLLAPSE), "--output-dir", str(run), "--resume", str(kept), "--set", f"training.learning_rate={rate}"
    )
    assert code == 0, out[-3000:] + err[-3000:]
    assert "done: 400 steps" in out
    # guard_events.jsonl now holds the original run up to the kept checkpoint, then the resumed one
    resumed = [e for e in _events(run) if e["step"] >= int(kept.name.split("-")[1])]
    assert resumed[0]["action"] == "resume_lr" and resumed[0]["lr_after"] == pytest.approx(float(rate))
    assert all(e["action"] not in ("halt", "baseline") for e in resumed)  # the start's baseline, kept
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_resuming_the_halt_checkpoint_itself_is_judged_against_the_healthy_start_and_halts_again(
    halted_demo: tuple[Path, int, str, str], tmp_path: Path
) -> None:
    """`--resume` alone after the collapse halt: a fresh episode (cuts, cooldown start over) judged against the
    baseline measured before the first update, not against the collapsed routing it resumes from, so a limit
    it is still past stops it again at its first logging window (re-measured there, the load limit would be
    1.5x the collapsed share, above what top-2 routing can reach, and the balance line 30% below collapse)."""
    run = _copy(halted_demo, tmp_path)
    baseline = next(e for e in _events(run) if e["action"] == "baseline")["details"]
    halt_step = _events(run)[-1]["step"]
    code, out, err = _train(str(COLLAPSE), "--output-dir", str(run), "--resume", str(run / f"checkpoint-{halt_step}"))
    assert code == 4, out[-3000:] + err[-3000:]
    resumed = [e for e in _events(run) if e["step"] >= halt_step][1:]  # after the original halt
    assert [e["action"] for e in resumed] == ["resume_after_halt", "halt"]
    assert "judged against the baseline of the run's start" in resumed[0]["reason"]
    again = resumed[-1]
    assert again["step"] == halt_step + 5  # its first logging window
    assert again["baseline"]["layer_entropy"] == pytest.approx(baseline["layer_entropy"])
    details = again["details"]
    if details["check"] == "load_ratio":  # the limit of the start: max(max_load_ratio, 1.5x its largest share)
        guards = load_recipe(COLLAPSE).guards
        for expert in details["experts"]:
            start_max = baseline["layer_load_max"][expert["layer"]]
            assert expert["limit_ratio"] == pytest.approx(max(guards.max_load_ratio, 1.5 * start_max))
    else:
        assert details["check"] == "balance_drop"
        faulty = details["layers"][0]
        assert faulty["baseline"] == pytest.approx(baseline["layer_balance"][faulty["layer"]])
    assert again["cuts_made"] == 0  # a new episode's budget, and no cut tried on a level reached before


def test_a_halt_before_any_save_keeps_nothing_and_says_to_start_again_at_a_lower_rate(tmp_path: Path) -> None:
    """The collapse demo saving only every 1000 steps: the guard acts before any checkpoint it could keep, so
    last-healthy/ stays empty (never the troubled weights), the halt still saves its own checkpoint, and the
    message and the report say to start over at a lower rate rather than name a healthy point."""
    run = tmp_path / "run"
    code, out, err = _train(str(COLLAPSE), "--output-dir", str(run), "--set", "training.save_steps=1000")
    assert code == 4, out[-3000:] + err[-3000:]
    halt = _events(run)[-1]
    assert halt["action"] == "halt" and (run / f"checkpoint-{halt['step']}").is_dir()
    assert not list((run / "last-healthy").glob("checkpoint-*"))
    assert "No healthy checkpoint was saved before the guard first acted" in err
    printed = re.search(r"--overwrite --set training\.learning_rate=([0-9.e+-]+)", err)
    assert printed is not None and float(printed.group(1)) <= 1e-5, err[-2000:]
    report = (run / "report.md").read_text()
    assert report.splitlines()[0].endswith(
        "No checkpoint was saved before the guard first acted: start again at a lower learning rate."
    )
    assert "No healthy checkpoint was saved before the guard first acted" in report


def test_sharpening_without_collapse_is_cut_then_settles_and_runs_to_the_end(
    settled_demo: tuple[Path, int, str, str],
) -> None:
    run, code, out, err = settled_demo
    assert code == 0, out[-3000:] + err[-3000:]
    events = _events(run)
    actions = [e["action"] for e in events]
    assert actions.count("cut_lr") >= 1 and actions.count("settled") == 1 and "halt" not in actions
    assert actions.index("settled") > max(i for i, action in enumerate(actions) if action == "cut_lr")
    settled = next(e for e in events if e["action"] == "settled")
    assert "has settled below its baseline" in settled["reason"]
    assert "SETTLED" in out and "done: 400 steps" in out
    # routing sharpened (entropy fell) while the load stayed spread (balance held): not collapse
    last = _routing(run)[-1]
    assert last["balance"] > 0.85 and last["entropy_min"] < 0.75


def test_the_checkpoint_before_the_first_cut_survives_save_total_limit_rotation(
    settled_demo: tuple[Path, int, str, str],
) -> None:
    run = settled_demo[0]
    first_cut = next(e["step"] for e in _events(run) if e["action"] == "cut_lr")
    kept = sorted((run / "last-healthy").glob("checkpoint-*"))
    assert len(kept) == 1
    kept_step = int(kept[0].name.split("-")[1])
    assert kept_step < first_cut and _healthy_by_the_guards_measure(run, kept_step, SHARPENING)
    assert (kept[0] / "trainer_state.json").is_file()
    assert not (run / kept[0].name).exists()  # rotated away (save_total_limit 3) in the run itself
    assert len(list(run.glob("checkpoint-*"))) == 3


def test_resuming_through_logging_steps_after_a_cut_never_applies_it_twice_and_keeps_the_cut_rate(
    settled_demo: tuple[Path, int, str, str], tmp_path: Path
) -> None:
    first_cut = next(e for e in _events(settled_demo[0]) if e["action"] == "cut_lr")
    # the same run stopped 10 steps after its first cut, then resumed through four logging steps
    stop_at = first_cut["step"] + 10
    code, out, err = _train(
        str(SHARPENING), "--output-dir", str(tmp_path / "first"), "--set", f"training.max_steps={stop_at}"
    )
    assert code == 0, out[-3000:] + err[-3000:]
    first = tmp_path / "first"
    cuts_before = [e for e in _events(first) if e["action"] == "cut_lr"]
    assert [c["step"] for c in cuts_before] == [first_cut["step"]]
    code, out, err = _train(
        str(SHARPENING),
        "--output-dir",
        str(first),
        "--resume",
        str(first / f"checkpoint-{stop_at}"),
        "--set",
        f"training.max_steps={stop_at + 20}",  # four more logging steps
    )
    assert code == 0, out[-3000:] + err[-3000:]
    assert f"done: {stop_at + 20} steps" in out
    after = [e for e in _events(first) if e["step"] > stop_at]
    assert [e["action"] for e in after] == []  # no decision repeated, no cut applied twice
    assert [e["step"] for e in _events(first) if e["action"] == "cut_lr"] == [first_cut["step"]]
    lrs = [r["lr"] for r in _routing(first) if r["step"] > stop_at]
    assert len(lrs) == 4 and lrs == pytest.approx([cuts_before[0]["lr_after"]] * 4)  # the cut rate, kept
    # guard_events.jsonl holds this run's history once: the resumed attempt did not repeat lines
    steps = [(e["step"], e["action"]) for e in _events(first)]
    assert len(steps) == len(set(steps))
