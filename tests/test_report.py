"""The run report: report.md and its PNG plots, from synthetic run directories written with the project's
own writer (and one real `train` run): the verdict matches the guard events, plots are real PNGs of a
sensible size, damaged or old routing.jsonl files are reported rather than crashed on, --compare works,
and the command's exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moe_finetune.cli import main
from moe_finetune.report import (
    COMPARE_PLOT,
    ENTROPY_PLOT,
    FINAL_LOAD_PLOT,
    LOAD_SHARE_PLOT,
    TRAINING_PLOT,
    Start,
    judge,
    layer_balance,
    layers_to_show,
    parse_routing,
    read_run,
    write_report,
)
from moe_finetune.rundir import (
    ADAPTER_DIR,
    EVENTS_FILE,
    KEPT_CHECKPOINT_DIR,
    REPORT_FILE,
    RESOLVED_RECIPE_FILE,
    ROUTING_FILE,
    RUN_SUMMARY_FILE,
    append_jsonl,
)

ROUTING_PLOTS = (LOAD_SHARE_PLOT, FINAL_LOAD_PLOT, ENTROPY_PLOT, TRAINING_PLOT)


# ------------------------------------------------------------------------------------------------
# synthetic run directories, in the RoutingMonitor's record format


def _share(experts: int, collapse: float, rng: np.random.Generator) -> list[float]:
    """A load share: near uniform at collapse 0, two experts taking it all at collapse 1 (top-2)."""
    logits = rng.normal(0.0, 0.1, size=experts)
    logits[:2] += 6.0 * collapse
    share = np.exp(logits) / np.exp(logits).sum()
    share = np.minimum(share, 0.5)
    return (share / share.sum()).tolist()


def _record(
    step: int, shares: list[list[float]], *, lr: float = 1e-4, loss: float = 2.0, balance: bool = True
) -> dict:
    experts = len(shares[0])
    layers = []
    for i, share in enumerate(shares):
        layer = {
            "layer": f"model.layers.{i}.mlp.gate",
            "tokens": 512.0,
            "entropy": 0.8,
            "load": share,
            "prob": share,
            "load_cv": float(np.std(share) * experts),
            "load_max": max(share) * experts,
            "dead_experts": float(sum(s < 0.1 / experts for s in share)),
            "aux_loss": 2.0,
            "z_loss": 5.0,
            "drop_fraction": 0.1,
            "drift": None,
            "drift_load_js": None,
        }
        if balance:
            layer["balance"] = float(layer_balance(np.array(share)))
            layer["prob_balance"] = layer["balance"]
        layers.append(layer)
    record = {
        "step": step,
        "epoch": 0.1,
        "lr": lr,
        "loss": loss,
        "entropy": 0.8,
        "drift": None,
        "tokens": 512,
        "finite": True,
        "capacity_factor": 1.25,
        "num_experts": experts,
        "layers": layers,
    }
    if balance:
        record["balance"] = float(np.mean([layer["balance"] for layer in layers]))
    return record


def make_run(
    folder: Path,
    *,
    steps: int = 50,
    every: int = 5,
    layers: int = 2,
    experts: int = 8,
    collapsing: tuple[int, ...] = (),
    events: tuple[dict, ...] = (),
    status: str | None = "finished",
    adapter: bool = True,
    balance: bool = True,
    guards: bool = True,
) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / RESOLVED_RECIPE_FILE).write_text(
        f"name: {folder.name}\nmodel:\n  name: tiny-mixtral\ntraining:\n  max_steps: {steps}\n"
        "  learning_rate: 0.0001\n  per_device_train_batch_size: 4\n"
        f"guards:\n  enabled: {str(guards).lower()}\n  baseline_steps: 3\n  halt_balance_drop: 0.3\n"
    )
    logged = list(range(every, steps + 1, every))
    for index, step in enumerate(logged):
        progress = index / max(1, len(logged) - 1)
        shares = [_share(experts, progress if layer in collapsing else 0.0, rng) for layer in range(layers)]
        append_jsonl(folder / ROUTING_FILE, _record(step, shares, loss=3.0 - progress, balance=balance))
    for event in events:
        append_jsonl(folder / EVENTS_FILE, event)
    if status is not None:
        summary = {
            "status": status,
            "recipe": "recipes/x.yaml",
            "train_examples": 13000,
            "eval_examples": 0,
            "max_steps": steps,
            "step": logged[-1],
        }
        (folder / RUN_SUMMARY_FILE).write_text(json.dumps(summary))
    if adapter:
        (folder / ADAPTER_DIR).mkdir()
        (folder / ADAPTER_DIR / "adapter_config.json").write_text("{}")  # a whole adapter has its config
    return folder


def _cut(step: int, before: float, after: float, cut: int) -> dict:
    return {
        "step": step,
        "action": "cut_lr",
        "reason": f"layer balance dropped sharply, cut {cut} of 3",
        "lr_before": before,
        "lr_after": after,
        "multiplier": after / 1e-4,
        "cuts_made": cut,
    }


DRAWN: dict[str, int] = {}  # file name -> the data values the figure saved under it drew (see _drawn)


@pytest.fixture(autouse=True)
def _record_what_each_figure_draws(monkeypatch):
    """Every figure the report saves is read before it is written: how much data its panels draw."""
    from moe_finetune import report_plots

    save = report_plots.save_figure

    def recording(figure, path):
        DRAWN[Path(path).name] = _drawn(figure)
        return save(figure, path)

    DRAWN.clear()
    monkeypatch.setattr(report_plots, "save_figure", recording)


def _drawn(figure) -> int:
    """The data values drawn in the figure's emptiest panel: finite points of its lines in data coordinates
    (not the reference lines across a panel, at a start or a cut), finite cells of its heatmaps, bars of
    non-zero height. 0 = a panel with only its frame (a panel that says in words why it has nothing to draw,
    as the drift panel of a run without a probe does, is not counted)."""
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]
    counts = []
    for ax in panels:
        data_lines = [line for line in ax.lines if line.get_transform() is ax.transData]
        lines = sum(int(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).sum()) for line in data_lines)
        cells = sum(int(np.isfinite(np.asarray(image.get_array(), dtype=float)).sum()) for image in ax.images)
        bars = sum(
            sum(1 for path in collection.get_paths() if np.ptp(path.vertices[:, 1]) > 0) for collection in ax.collections
        )
        if lines + cells + bars or not ax.texts:
            counts.append(lines + cells + bars)
    return min(counts, default=0)


def _assert_sensible_pngs(run: Path, names: tuple[str, ...]) -> None:
    """Each figure is there, decodes to a readable size and is not one flat colour, and every panel of it drew
    the run's data (a figure whose data came out nan keeps its frames, ticks and titles: `_drawn` is 0)."""
    from matplotlib import image

    for name in names:
        path = run / name
        assert path.is_file(), f"{name} missing"
        pixels = image.imread(path)[..., :3]
        height, width = pixels.shape[:2]
        assert 800 <= width <= 2000 and 300 <= height <= 2500, (name, width, height)
        assert float(pixels.std()) > 0.05, f"{name} is one flat colour"
        assert DRAWN.get(name, 0) > 0, f"{name} has a panel with no data drawn"


# ------------------------------------------------------------------------------------------------
# the verdict matches the guard events


def test_a_healthy_run_gets_a_healthy_verdict_the_facts_and_four_valid_pngs(tmp_path: Path) -> None:
    run = make_run(tmp_path / "healthy")
    report = write_report(run)
    text = (run / REPORT_FILE).read_text()
    assert report.verdict.kind == "healthy"
    assert text.splitlines()[0].startswith("**Healthy**: ran to step 50 of 50")
    assert "13,000 training examples" in text and "`recipes/x.yaml`" in text
    assert "## Guard events" in text and "None: the guard never acted" in text
    assert "## Routing by layer at step 50" in text and "| model.layers.0.mlp.gate |" in text
    for name in ROUTING_PLOTS:
        assert f"![{name}]({name})" in text
    _assert_sensible_pngs(run, ROUTING_PLOTS)
    assert not (run / COMPARE_PLOT).exists()


def test_a_cut_run_says_how_often_the_rate_was_cut_and_the_rate_to_start_from(tmp_path: Path) -> None:
    events = (
        _cut(20, 1e-4, 8e-5, 1),
        _cut(35, 8e-5, 6.4e-5, 2),
        {
            "step": 45,
            "action": "settled",
            "reason": "has settled below its baseline",
            "lr_before": 6.4e-5,
            "lr_after": 6.4e-5,
        },
    )
    run = make_run(tmp_path / "cut", collapsing=(1,), events=events)
    write_report(run)
    first = (run / REPORT_FILE).read_text().splitlines()[0]
    assert first.startswith("**Learning rate cut 2 times (0.0001 -> 6.4e-05)**, then settled at step 45")
    assert "ran to step 50 of 50" in first and "--set training.learning_rate=6.4e-05" in first


def test_a_halted_run_leads_with_step_and_reason_and_holds_what_the_collapse_report_said(
    tmp_path: Path,
) -> None:
    reason = (
        "layer model.layers.1.mlp.gate balance 0.51 is 30% below its baseline 0.74: its load is concentrating"
    )
    halt = {
        "step": 35,
        "action": "halt",
        "reason": reason,
        "lr_before": 8e-5,
        "lr_after": 8e-5,
        "multiplier": 0.8,
        "metrics": {"routing/entropy": 0.79, "routing/balance": 0.6, "routing/load_max": 3.6},
        "baseline": {"entropy": 0.81, "layer_entropy": [0.8, 0.82]},
    }
    run = make_run(
        tmp_path / "halted",
        steps=35,
        collapsing=(1,),
        events=(_cut(20, 1e-4, 8e-5, 1), halt),
        status=None,
        adapter=False,
    )
    kept = run / KEPT_CHECKPOINT_DIR / "checkpoint-10"
    kept.mkdir(parents=True)
    (kept / "trainer_state.json").write_text("{}")
    (run / "checkpoint-35").mkdir()
    (run / "checkpoint-35" / "trainer_state.json").write_text("{}")
    write_report(run)
    text = (run / REPORT_FILE).read_text()
    assert text.startswith(f"**Halted at step 35** of 35 after 1 learning-rate cut because {reason}.")
    assert "## Halted at step 35" in text and f"`{run / 'checkpoint-35'}` (saved at the halt)" in text
    assert f"--resume {kept} --set training.learning_rate=8e-06" in text  # a tenth of the rate it halted at
    assert "## Routing by layer at step 35 (the halt)" in text
    rows = [line for line in text.splitlines() if line.startswith("| model.layers.")]
    assert rows[0].startswith("| model.layers.1.mlp.gate |")  # the collapsing layer first
    assert not (run / "collapse_report.md").exists()
    _assert_sensible_pngs(run, ROUTING_PLOTS)


@pytest.mark.parametrize(
    ("status", "adapter", "kind", "opening"),
    [
        ("interrupted", False, "interrupted", "**Interrupted at step 50** of 50 (Ctrl-C or SIGTERM)"),
        ("running", False, "stopped", "**Stopped at step 50** of 50 with no end recorded"),
        (None, False, "stopped", "**Stopped at step 50** of 50 with no end recorded"),
        (None, True, "healthy", "**Healthy**"),
    ],
)
def test_how_a_run_ended_comes_from_its_summary_or_else_from_its_directory(
    tmp_path: Path, status: str | None, adapter: bool, kind: str, opening: str
) -> None:
    run = make_run(tmp_path / "run", status=status, adapter=adapter)
    assert write_report(run).verdict.kind == kind
    assert (run / REPORT_FILE).read_text().startswith(opening)


def test_a_finished_run_no_guard_watched_is_not_called_healthy_and_says_if_it_collapsed(
    tmp_path: Path,
) -> None:
    collapsed = make_run(tmp_path / "collapsed", collapsing=(1,), guards=False)
    steady = make_run(tmp_path / "steady", guards=False)
    first = write_report(collapsed).verdict.line
    assert first.startswith(
        "**Finished with no guard watching** (guards.enabled is false): ran to step 50 of 50;"
    )
    assert (
        "layer model.layers.1.mlp.gate's balance fell" in first
        and "past the 30% at which the guard halts" in first
    )
    assert "no layer's balance fell more than" in write_report(steady).verdict.line


def test_a_halt_or_a_stop_with_no_checkpoint_to_go_back_to_says_so() -> None:
    halted = judge("halted", [{"step": 5, "action": "halt", "reason": "collapse"}], last_step=5)
    assert halted.line.endswith(
        "No checkpoint was saved before the guard first acted: start again at a lower learning rate."
    )
    stopped = judge("stopped", [], last_step=7, newest_checkpoint=None)
    assert stopped.line.endswith("no checkpoint was saved to continue from.")
    assert judge("stopped", [], last_step=7, newest_checkpoint=5).line.endswith(
        "continue from checkpoint-5 with `--resume`."
    )


def test_a_run_resumed_after_its_halt_is_judged_on_how_it_ended() -> None:
    events = [
        _cut(20, 1e-4, 8e-5, 1),
        {"step": 35, "action": "halt", "reason": "collapse"},
        {"step": 10, "action": "resume_after_halt", "reason": "resumed"},
    ]
    verdict = judge("finished", events, last_step=400, max_steps=400)
    assert verdict.kind == "cut" and "resumed after the halt at step 35" in verdict.line


# ------------------------------------------------------------------------------------------------
# every routing.jsonl this project has written


def test_a_truncated_routing_file_is_reported_with_a_note_not_a_crash(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "killed", status="running", adapter=False)
    whole = (run / ROUTING_FILE).read_text()
    last = whole.splitlines()[-1]
    with (run / ROUTING_FILE).open("a") as handle:
        handle.write(last[: len(last) // 2])  # killed mid-line
    code = main(["report", str(run)])
    out, err = capsys.readouterr()
    assert code == 0, err
    text = (run / REPORT_FILE).read_text()
    assert "routing.jsonl: 1 line(s) could not be read (line 11" in text and "covers the 10 record(s)" in text
    assert "note: routing.jsonl: 1 line(s) could not be read" in out
    _assert_sensible_pngs(run, ROUTING_PLOTS)


def test_routing_written_before_the_balance_metric_gets_its_balance_from_the_load(tmp_path: Path) -> None:
    old = make_run(tmp_path / "old", balance=False, collapsing=(0,))
    new = make_run(tmp_path / "new", balance=True, collapsing=(0,))
    old_series, new_series = read_run(old).series, read_run(new).series
    assert old_series is not None and new_series is not None
    np.testing.assert_allclose(old_series.balance, new_series.balance, rtol=1e-9)
    assert old_series.balance[-1, 0] < 0.5 < old_series.balance[-1, 1]  # the collapsing layer shows it
    write_report(old)
    _assert_sensible_pngs(old, ROUTING_PLOTS)


def test_layer_balance_is_the_monitors_balance() -> None:
    import torch

    from moe_finetune.routing.metrics import balance

    rng = np.random.default_rng(1)
    shares = rng.dirichlet(np.full(16, 0.3), size=(5, 4))  # (T, L, E)
    shares[0, 0, :3] = 0.0  # dead experts
    shares[0, 0] /= shares[0, 0].sum()
    ours = layer_balance(shares)
    theirs = balance(torch.tensor(shares.reshape(-1, 16))).numpy().reshape(5, 4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    nan_row = layer_balance(np.array([[math.nan] * 8, [0.125] * 8]))
    assert math.isnan(nan_row[0]) and nan_row[1] == pytest.approx(1.0)


def test_repeated_steps_keep_the_later_record_and_are_noted() -> None:
    shares = [[0.125] * 8]
    records = [_record(5, shares, loss=3.0), _record(10, shares, loss=2.0), _record(10, shares, loss=1.0)]
    series, notes = parse_routing(records)
    assert series is not None
    assert series.steps.tolist() == [5, 10] and series.loss.tolist() == [3.0, 1.0]
    assert any("1 step(s) were logged twice" in note for note in notes)


def _baseline_event(balance: list[float], experts: int = 8) -> dict:
    """The guard's step-0 `baseline` event: the probe batch routed before the first update."""
    return {
        "step": 0,
        "action": "baseline",
        "reason": "routing of the probe batch (512 tokens) before the first update",
        "details": {
            "source": "probe",
            "tokens": 512,
            "entropy": 0.8,
            "layer_entropy": [0.8] * len(balance),
            "layer_balance": balance,
            "layer_load_max": [1.0] * len(balance),
            "load_share": [[1 / experts] * experts for _ in balance],
        },
    }


def test_each_layers_start_is_the_guards_baseline_before_the_first_update_not_the_first_windows_mean(
    tmp_path: Path,
) -> None:
    from moe_finetune import report_plots as plots

    # layer 1 collapses from the first window on: the mean of the first 3 windows already holds some of it
    run = make_run(tmp_path / "early", collapsing=(1,), events=(_baseline_event([0.99, 0.985]),))
    data = read_run(run)
    start = data.start
    assert start.balance.tolist() == [0.99, 0.985] and start.before_training
    assert np.allclose(start.load_ratio, 1.0)  # each expert's share at the start, x E
    windows = Start.of_windows(data.series, 3)
    assert windows.balance[1] < 0.97  # what the report read as layer 1's start before
    write_report(run)
    text = (run / REPORT_FILE).read_text()
    assert "Start = the routing of the probe batch before the first update (the guard's baseline)" in text
    row = next(line for line in text.splitlines() if line.startswith("| model.layers.1.mlp.gate |"))
    assert "| 0.985 -> " in row
    figure = plots.entropy_figure(data.series, {}, start, 0.3)
    at_zero = [line for ax in figure.axes for line in ax.lines if list(line.get_xdata()) == [0]]
    assert len(at_zero) == 4  # each layer's start drawn at step 0, in both panels
    # a run without that event (written before it, or with no guard) reads its start from the first windows
    old = make_run(tmp_path / "old", collapsing=(1,))
    write_report(old)
    assert "Start = the mean of the first 3 logging steps;" in (old / REPORT_FILE).read_text()
    assert read_run(old).start.balance[1] == pytest.approx(windows.balance[1])


def test_many_layers_show_the_worst_layers_first_and_stay_readable(tmp_path: Path) -> None:
    run = make_run(tmp_path / "deep", layers=20, experts=64, collapsing=(17, 3, 11))
    series = read_run(run).series
    assert series is not None
    shown = layers_to_show(series, Start.of_windows(series, 3))
    assert len(shown) == 8 and set(shown[:3]) == {3, 11, 17}
    write_report(run)
    text = (run / REPORT_FILE).read_text()
    _assert_sensible_pngs(run, ROUTING_PLOTS)
    assert len([line for line in text.splitlines() if line.startswith("| model.layers.")]) == 20


def test_a_run_without_routing_still_gets_a_report_of_its_loss_and_learning_rate(tmp_path: Path) -> None:
    run = tmp_path / "unmonitored"
    (run / "checkpoint-4").mkdir(parents=True)
    history = [
        {"step": 2, "loss": 3.0, "learning_rate": 1e-4},
        {"step": 4, "loss": 2.5, "learning_rate": 1e-4},
    ]
    (run / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    report = write_report(run)
    text = report.path.read_text()
    assert "no routing.jsonl" in text and "**Loss:** 3 at step 2 -> 2.5 at step 4" in text
    assert [p.name for p in report.figures] == [TRAINING_PLOT]


# ------------------------------------------------------------------------------------------------
# the command


def test_compare_puts_both_runs_side_by_side(tmp_path: Path, capsys) -> None:
    guarded = make_run(
        tmp_path / "guard-on",
        steps=35,
        collapsing=(1,),
        events=(_cut(20, 1e-4, 8e-5, 1), {"step": 35, "action": "halt", "reason": "collapse"}),
        status="halted",
        adapter=False,
    )
    unguarded = make_run(tmp_path / "guard-off", steps=100, collapsing=(1,), guards=False)
    code = main(["report", str(guarded), "--compare", str(unguarded)])
    assert code == 0, capsys.readouterr().err
    text = (guarded / REPORT_FILE).read_text()
    assert "## Compared with guard-off" in text and "| | guard-on | guard-off |" in text
    assert "| verdict | Halted at step 35 of 35 after 1 learning-rate cut because collapse |" in text
    assert "| Finished with no guard watching (guards.enabled is false): ran to step 100 of 100;" in text
    assert "| learning-rate cuts | 1 | 0 |" in text and "| steps | 35 | 100 |" in text
    assert f"![{COMPARE_PLOT}]({COMPARE_PLOT})" in text
    _assert_sensible_pngs(guarded, (*ROUTING_PLOTS, COMPARE_PLOT))


@pytest.mark.parametrize("problem", ["missing", "a file", "not a run", "compare missing"])
def test_report_on_something_that_is_not_a_run_exits_2_naming_it(
    tmp_path: Path, capsys, problem: str
) -> None:
    target = tmp_path / "target"
    argv = ["report", str(target)]
    if problem == "a file":
        target.write_text("hello")
    elif problem == "not a run":
        target.mkdir()
        (target / "notes.txt").write_text("not a run")
    elif problem == "compare missing":
        make_run(target)
        argv += ["--compare", str(tmp_path / "absent")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("absent" if problem == "compare missing" else str(target)) in err and "Traceback" not in err
    assert not (target / REPORT_FILE).exists()


# ------------------------------------------------------------------------------------------------
# the terminal


def test_the_console_line_has_loss_lr_both_entropies_load_drop_and_the_guard_action() -> None:
    from moe_finetune.callbacks.console import format_log_line

    logs = {
        "loss": 6.716,
        "grad_norm": 0.28,
        "learning_rate": 0.004,
        "routing/entropy": 0.797,
        "routing/entropy_min": 0.770,
        "routing/balance": 0.623,
        "routing/balance_min": 0.514,
        "routing/load_max": 3.62,
        "routing/dead_experts": 3.0,
        "routing/drop_fraction": 0.5086,
        "routing/guard_action": 2.0,
        "mean_token_accuracy": 0.19,
        "epoch": 0.02,
    }
    line = format_log_line(35, logs, 400)
    assert line == (
        "step  35/400  loss 6.716  lr 4.00e-03  entropy 0.797 (min 0.770)  balance 0.623 (min 0.514)  "
        "load max 3.62x  dead 3  drop 50.9%  guard HALT"
    )
    assert (
        format_log_line(40, {"loss": 2.0, "learning_rate": 1e-4}, 400) == "step  40/400  loss 2  lr 1.00e-04"
    )
    assert (
        format_log_line(30, {"eval_loss": 2.5, "eval_runtime": 1.25}, 60)
        == "step 30/60  eval  loss 2.5000  took 1.2 s"
    )
    summary = {"train_runtime": 31.0, "train_steps_per_second": 1.13, "train_loss": 6.764, "epoch": 0.02}
    assert format_log_line(35, summary, 400) == "trained 35 steps in 31.0 s (1.13 steps/s) mean loss 6.7640"


@pytest.mark.slow
def test_train_writes_the_report_and_prints_one_routing_line_per_logging_step(
    recipe_factory, tmp_path: Path, tiny_mixtral_dir: Path, capsys
) -> None:
    code = main(["train", str(recipe_factory())])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    run = tmp_path / "run"
    lines = [line for line in out.splitlines() if line.lstrip().startswith("step ") and "/4" in line]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], out[-3000:]
    assert all("entropy" in line and "balance" in line and "load max" in line for line in lines)
    assert "{'loss'" not in out and "routing at step 4" in out  # no raw dicts; the final table stays
    summary = json.loads((run / RUN_SUMMARY_FILE).read_text())
    assert summary["status"] == "finished" and summary["step"] == 4 and summary["train_examples"] == 40
    # 4 steps at 1e-4 leave the tiny model's routing where it started: the guard records its baseline (and the
    # 40-row dataset's override is recorded), but never acts
    events = [json.loads(line) for line in (run / EVENTS_FILE).read_text().splitlines()]
    assert sorted(e["action"] for e in events) == ["allow_small_dataset", "baseline"], events
    text = (run / REPORT_FILE).read_text()
    assert text.startswith("**Healthy**: ran to step 4 of 4")
    assert "40 training examples" in text and f"report: {run / REPORT_FILE}" in out
    _assert_sensible_pngs(run, ROUTING_PLOTS)


def test_the_run_directorys_readme_is_our_model_card_not_trls_empty_one(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", status="finished", adapter=True)
    (run / "README.md").write_text(
        "# Model Card\n\nThis model is a fine-tuned version of [None](https://huggingface.co/None).\n"
        "It has been trained using [TRL](https://github.com/huggingface/trl).\n"
    )
    report = write_report(run)
    card = (run / "README.md").read_text()
    assert "[None]" not in card and "Base model:" in card and report.verdict.line in card
    mine = tmp_path / "mine"
    mine.mkdir()
    for path in run.iterdir():
        if path.is_file() and path.name != "README.md":
            (mine / path.name).write_bytes(path.read_bytes())
    (mine / "README.md").write_text("my own notes")
    write_report(mine)
    assert (mine / "README.md").read_text() == "my own notes"  # a README of the user's is left alone


def test_a_cut_runs_verdict_never_proposes_a_rate_validate_warns_about() -> None:
    from moe_finetune.report import judge

    high = judge("finished", [_cut(80, 5e-3, 2.5e-3, 1)], last_step=400)
    assert "training.learning_rate=1e-05" in high.line and "2.5e-03" not in high.line
    assert "above the 0.0001" in high.line
    low = judge("finished", [_cut(80, 1e-5, 5e-6, 1)], last_step=400)
    assert "training.learning_rate=5e-06" in low.line
