"""The guard's retention check: the policy's decisions on scripted retention losses (check 8), its
sentences, its checkpointed state, and the measurement on a tiny model (callbacks/retention.py).

Defaults (sections.RetentionConfig): cut x guards.cut_factor when the loss stands 0.75% above where it stood
before the first update or at the last retention cut, at most 4 cuts, halt 10% above the base model's.
"""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
from pydantic import ValidationError

from moe_finetune.errors import DataError
from moe_finetune.routing.policy import GuardPolicy, RoutingSnapshot
from moe_finetune.sections import DataSection, GuardConfig, RetentionConfig

LR0 = 1e-4


def judge(policy: GuardPolicy, losses: list[float], first_step: int = 0, every: int = 5) -> list:
    """Feed retention losses one check at a time (the first is the base), the LR following the cuts."""
    return [
        policy.retention(first_step + i * every, loss, LR0 * policy.multiplier) for i, loss in enumerate(losses)
    ]


def kinds(actions) -> list[str]:
    return [a.kind for a in actions]


def retention_policy(cooldown: int = 2, **fields) -> GuardPolicy:
    return GuardPolicy(GuardConfig(cooldown=cooldown, retention=RetentionConfig(data="keep.jsonl", **fields)))


def test_a_retention_loss_that_holds_never_acts():
    policy = retention_policy()
    actions = judge(policy, [4.0, 4.02, 3.99, 4.025, 4.0, 3.95])
    assert set(kinds(actions)) == {"none"}
    assert policy.multiplier == 1.0
    assert actions[0].details["check"] == "retention_base"
    assert "before the first update" in actions[0].reason


def test_a_rise_of_three_quarters_of_a_percent_over_the_base_cuts_the_learning_rate():
    policy = retention_policy()
    actions = judge(policy, [4.0, 4.025, 4.035])
    assert kinds(actions) == ["none", "none", "cut_lr"]
    cut = actions[-1]
    assert cut.factor == pytest.approx(0.5) and policy.multiplier == pytest.approx(0.5)
    assert cut.details["check"] == "retention_cut"
    assert "0.9% above the base model's 4.000 (cut line 0.75%)" in cut.reason and "retention cut 1 of 4" in cut.reason
    assert "forgetting" in cut.reason


def test_after_a_cut_only_a_further_rise_from_that_level_cuts_again():
    # forgetting does not heal at a lower rate: the level of the cut is the new reference
    policy = retention_policy()
    actions = judge(policy, [4.0, 4.05, 4.06, 4.075, 4.085, 4.09])
    assert kinds(actions) == ["none", "cut_lr", "none", "none", "cut_lr", "none"]
    assert "above the 4.050 it stood at when the last cut was made" in actions[4].reason


def test_the_cut_budget_is_the_retention_checks_own_and_then_it_only_reports():
    policy = retention_policy(max_cuts=2, cooldown=0)  # cuts in successive windows
    actions = judge(policy, [4.0, 4.05, 4.10, 4.15, 4.20])
    assert kinds(actions) == ["none", "cut_lr", "cut_lr", "none", "none"]
    assert actions[3].details["check"] == "retention_no_cut_left"
    assert "all 2 retention cuts are made" in actions[3].reason
    assert policy.multiplier == pytest.approx(0.25)


def test_halts_when_the_loss_stands_halt_rise_above_the_base_whatever_the_cuts_left():
    policy = retention_policy()
    actions = judge(policy, [4.0, 4.05, 4.44])
    assert kinds(actions) == ["none", "cut_lr", "halt"]
    assert actions[-1].details["check"] == "retention_halt"
    assert "11.0% above the base model's 4.000 (halt line 10%)" in actions[-1].reason


def test_halt_rise_null_never_halts():
    policy = retention_policy(halt_rise=None, max_cuts=1)
    assert kinds(judge(policy, [4.0, 4.05, 8.0, 12.0])) == ["none", "cut_lr", "none", "none"]


def test_a_non_finite_retention_loss_halts():
    policy = retention_policy()
    actions = judge(policy, [4.0, math.nan])
    assert kinds(actions) == ["none", "halt"]
    assert actions[-1].details["check"] == "retention_non_finite"


def test_a_routing_cut_at_the_same_step_answers_the_rise():
    # one cut per logging step: the routing cut made at this step moves the retention reference instead
    policy = retention_policy()
    policy.retention(0, 4.0, LR0)
    answered = policy.retention(5, 4.06, LR0, cut_this_step=True)
    assert answered.kind == "none" and answered.details["check"] == "retention_cut_by_routing"
    assert policy.multiplier == 1.0
    assert policy.retention(10, 4.07, LR0).kind == "none"  # 0.25% above the routing cut's level


def test_a_routing_cut_moves_the_retention_reference_only_when_it_answered_a_rise():
    policy = retention_policy(cooldown=0)
    policy.retention(0, 4.0, LR0)
    # a routing cut at a check whose loss rose less than the cut line answers no rise: the reference stays
    assert policy.retention(5, 4.02, LR0, cut_this_step=True).details["check"] == "retention_ok"
    assert policy.state.retention_reference == pytest.approx(4.0)
    cut = policy.retention(10, 4.035, LR0)  # 0.875% above the base, which is still the reference
    assert cut.details["check"] == "retention_cut" and cut.details["reference_kind"] == "base"


def _routing(step: int, entropy: float) -> RoutingSnapshot:
    return RoutingSnapshot(step, entropy, [entropy, entropy], [[1 / 8] * 8, [1 / 8] * 8])


def test_a_routing_cut_starts_the_one_cooldown_that_holds_back_a_retention_cut_too():
    policy = retention_policy()  # cooldown 2
    policy.set_baseline(0.8, [0.8, 0.8])
    policy.retention(0, 4.0, LR0)
    routing, retention = [], []
    for step, entropy, loss in [(5, 0.68, 4.0), (10, 0.68, 4.05), (15, 0.68, 4.05), (20, 0.68, 4.05)]:
        routing.append(policy.update(_routing(step, entropy), LR0 * policy.multiplier).kind)
        cut_here = routing[-1] == "cut_lr"
        retention.append(policy.retention(step, loss, LR0 * policy.multiplier, cut_this_step=cut_here))
    assert routing == ["cut_lr", "none", "none", "none"]  # one routing cut, then the level holds
    # the rise at 10 comes in the routing cut's cooldown: no x0.25 in two windows; still standing at 20, it is cut
    checks = [a.details["check"] for a in retention]
    assert checks == ["retention_ok", "retention_cooldown", "retention_cooldown", "retention_cut"]
    assert "cooling down after the routing cut at step 5 (cooldown window 1 of 2)" in retention[1].reason
    assert retention[3].details["reference"] == pytest.approx(4.0)  # a cooldown does not move the reference
    assert policy.multiplier == pytest.approx(0.25)


def test_a_retention_cut_starts_the_one_cooldown_that_holds_back_a_routing_cut_too():
    policy = retention_policy()
    policy.set_baseline(0.8, [0.8, 0.8])
    policy.retention(0, 4.0, LR0)
    routing = []
    for step, entropy, loss in [(5, 0.8, 4.05), (10, 0.68, 4.05), (15, 0.68, 4.05), (20, 0.68, 4.05)]:
        action = policy.update(_routing(step, entropy), LR0 * policy.multiplier)
        routing.append(action)
        policy.retention(step, loss, LR0 * policy.multiplier, cut_this_step=action.kind == "cut_lr")
    assert policy.state.retention_cuts == 1
    # the sharp drop at 10 falls in the retention cut's cooldown; at 20 it is still sharp (from 0.8 at 5) and is cut
    assert [a.details["check"] for a in routing] == ["healthy", "cooldown", "cooldown", "entropy_drop_cut"]
    assert "cooling down after the retention cut at step 5" in routing[1].reason


def test_a_cut_never_takes_the_rate_below_min_lr():
    policy = GuardPolicy(GuardConfig(min_lr=6e-5, cooldown=0, retention=RetentionConfig(data="keep.jsonl")))
    actions = judge(policy, [4.0, 4.05, 4.10])
    assert kinds(actions) == ["none", "cut_lr", "none"]
    assert actions[1].details["clipped_to_min_lr"] and actions[1].details["lr_after"] == pytest.approx(6e-5)
    assert "min_lr" in actions[2].reason


def test_a_step_is_judged_once():
    policy = retention_policy()
    judge(policy, [4.0, 4.05])
    again = policy.retention(5, 4.5, LR0)
    assert again.kind == "none" and again.details["check"] == "replay"


def test_the_retention_state_survives_a_checkpoint_and_decides_alike():
    original = retention_policy()
    judge(original, [4.0, 4.05, 4.06])
    resumed = retention_policy()
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for step, loss in [(15, 4.09), (20, 4.12), (25, 4.3)]:
        first = original.retention(step, loss, LR0 * original.multiplier)
        second = resumed.retention(step, loss, LR0 * resumed.multiplier)
        assert (first.kind, first.reason) == (second.kind, second.reason)


def test_a_checkpoint_from_before_the_retention_check_still_resumes():
    policy = retention_policy()
    legacy = policy.state_dict()
    for name in ("retention_base", "retention_reference", "retention_cuts", "retention_last_step"):
        legacy.pop(name)
    policy.load_state_dict(legacy)
    first = policy.retention(10, 4.0, LR0)
    assert first.details["check"] == "retention_base" and "at step 10 (resumed)" in first.reason


def test_a_resumed_halt_keeps_the_base_and_starts_the_cuts_over():
    policy = retention_policy(max_cuts=1)
    judge(policy, [4.0, 4.05, 4.45])
    policy.restart_episode()
    assert policy.state.retention_base == 4.0 and policy.state.retention_cuts == 0
    # the first check after the resume is the new reference; the cut budget is whole again
    assert kinds([policy.retention(20, 4.30, LR0), policy.retention(25, 4.34, LR0)]) == ["none", "cut_lr"]


def test_halt_rise_must_be_above_cut_rise():
    with pytest.raises(ValidationError, match="halt_rise .* must be greater than cut_rise"):
        RetentionConfig(cut_rise=0.05, halt_rise=0.05)


def test_the_retention_check_is_off_unless_it_names_rows():
    assert not GuardConfig().retention.enabled
    assert GuardConfig(retention={"data": "keep.jsonl"}).retention.enabled


# ---------------------------------------------------------------- the measurement


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tiny_mixtral_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    model.train()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_mixtral_dir)


def test_retention_loss_equals_a_direct_cross_entropy(tiny_model_and_tokenizer):
    from moe_finetune.callbacks.retention import RetentionSet

    model, tokenizer = tiny_model_and_tokenizer
    texts = ["def add(a, b): return a + b", "import json\nprint(json.dumps({}))", "x = 1"]
    measured = RetentionSet.from_texts(texts, tokenizer, max_length=64, batch_size=2).loss(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text).input_ids[:64]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert measured == pytest.approx(total / count, rel=1e-5)
    assert model.training  # the training mode is given back


def test_retention_rows_are_read_in_any_training_format(tmp_path, tiny_model_and_tokenizer):
    from moe_finetune.callbacks.retention import RetentionSet

    _, tokenizer = tiny_model_and_tokenizer
    path = tmp_path / "keep.jsonl.gz"
    rows = [{"prompt": f"question {i}: ", "completion": f"answer {i}"} for i in range(5)]
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    settings = RetentionConfig(data=str(path), rows=3)
    kept = RetentionSet.from_settings(
        settings, tokenizer, path=path, training_max_length=32, training_batch_size=2, fields=DataSection(path="x")
    )
    assert len(kept.rows) == 3 and kept.source == str(path) and kept.batch_size == 2
    assert kept.rows[0] == tokenizer("question 0: answer 0").input_ids[:32]
    # the section's own max_length and batch size win over the training's
    own = RetentionSet.from_settings(
        RetentionConfig(data=str(path), rows=3, max_length=4, batch_size=1),
        tokenizer,
        path=path,
        training_max_length=32,
        training_batch_size=2,
    )
    assert own.batch_size == 1 and all(len(ids) <= 4 for ids in own.rows)
    assert own.fingerprint != kept.fingerprint


def test_a_missing_or_broken_retention_file_names_the_field(tmp_path):
    from moe_finetune.callbacks.retention import retention_rows

    with pytest.raises(DataError, match="guards.retention.data: .*missing.jsonl does not exist"):
        retention_rows(tmp_path / "missing.jsonl", rows=4)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(DataError, match="guards.retention.data: .*broken.jsonl"):
        retention_rows(broken, rows=4)


# ---------------------------------------------------------------- through the CLI


def _keep_file(tmp_path, name: str = "keep.jsonl", rows: int = 8) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": f"{name} row {i}: def f(): return {i}"}) + "\n" for i in range(rows)))
    return str(path)


def _checks(run) -> list[dict]:
    """The run's retention.jsonl, one dict per check."""
    return [json.loads(line) for line in (run / "retention.jsonl").read_text().splitlines()]


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from moe_finetune.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_missing_retention_file_exits_2_naming_the_field_and_makes_no_run(
    recipe_factory, tmp_path, capsys, command
):
    recipe = recipe_factory("guards:\n  retention:\n    data: nowhere.jsonl\n")
    code, _, err = _cli(capsys, command, str(recipe))
    assert code == 2, err
    assert "guards.retention.data: " in err and "nowhere.jsonl does not exist" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_retention_file_with_a_bad_row_exits_2_naming_the_file_and_line(recipe_factory, tmp_path, capsys, command):
    bad = tmp_path / "keep.jsonl"
    bad.write_text('{"text": "def f(): pass"}\n{"title": "no text here"}\n')
    recipe = recipe_factory(f"guards:\n  retention:\n    data: {bad}\n")
    code, _, err = _cli(capsys, command, str(recipe))
    assert code == 2, err
    assert "guards.retention.data: " in err and "keep.jsonl" in err and "line 2" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_train_with_a_retention_file_checks_it_at_every_logging_step_and_reports_it(recipe_factory, tmp_path, capsys):
    keep = _keep_file(tmp_path, rows=12)
    recipe = recipe_factory(f"guards:\n  retention:\n    data: {keep}\n    rows: 8\n")
    code, out, err = _cli(capsys, "validate", str(recipe))
    assert code == 0, err
    assert f"retention check: 8 rows of {keep}" in out
    code, out, err = _cli(capsys, "train", str(recipe))
    assert code == 0, err
    assert "[guard] retention check: 8 rows" in out + err
    checks = _checks(tmp_path / "run")
    assert [c["step"] for c in checks] == [0, 2, 4]
    assert checks[0]["check"] == "retention_base" and checks[0]["base"] == checks[0]["loss"]
    assert all(c["base"] == checks[0]["loss"] for c in checks)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**Retention:** loss on the retention rows" in report and "3 checks in retention.jsonl" in report


def test_a_resumed_run_keeps_its_retention_base_and_history_up_to_the_checkpoint(recipe_factory, tmp_path, capsys):
    recipe = recipe_factory(f"guards:\n  retention:\n    data: {_keep_file(tmp_path)}\n")
    code, _, err = _cli(capsys, "train", str(recipe))
    assert code == 0, err
    run = tmp_path / "run"
    first = _checks(run)
    code, out, err = _cli(
        capsys, "train", str(recipe), "--resume", str(run / "checkpoint-2"), "--set", "training.max_steps=6"
    )
    assert code == 0, err
    assert "before any update" not in out + err  # the base came back with the guard's state
    resumed = _checks(run)
    assert [c["step"] for c in resumed] == [0, 2, 4, 6]
    assert resumed[:2] == first[:2]
    assert {c["base"] for c in resumed} == {first[0]["loss"]}


def _scripted_losses(monkeypatch, losses: list[float]) -> None:
    """RetentionSet.loss answers these in turn: the guard's wiring driven by known numbers."""
    from moe_finetune.callbacks.retention import RetentionSet

    answers = iter(losses)

    def scripted(self, model):
        self.last_seconds = 0.0
        return next(answers)

    monkeypatch.setattr(RetentionSet, "loss", scripted)


def test_a_retention_halt_exits_4_naming_the_check_and_the_report_says_resuming_halts_again(
    recipe_factory, tmp_path, capsys, monkeypatch
):
    _scripted_losses(monkeypatch, [4.0, 4.05, 4.5])  # the base; +1.25%: cut at step 2; +12.5%: halt at step 4
    recipe = recipe_factory(f"guards:\n  retention:\n    data: {_keep_file(tmp_path)}\n")
    code, _, err = _cli(capsys, "train", str(recipe), "--set", "training.max_steps=8")
    assert code == 4, err
    assert "training halted by the guard's retention check at step 4" in err
    assert "the model has forgotten too much of what it knew" in err
    run = tmp_path / "run"
    events = [json.loads(line) for line in (run / "guard_events.jsonl").read_text().splitlines()]
    acted = [(e["step"], e["action"], e["details"]["check"]) for e in events if e["action"] in ("cut_lr", "halt")]
    assert acted == [(2, "cut_lr", "retention_cut"), (4, "halt", "retention_halt")]
    # the checkpoint at the first retention cut has begun forgetting: never kept as healthy, and none was
    # saved before it, so the message says to start again rather than resume
    assert (run / "checkpoint-4").is_dir() and not (run / "last-healthy").exists()
    assert "No checkpoint was saved before the forgetting began" in err
    report = (run / "report.md").read_text()
    assert "halts again at its first check" in report


def test_a_base_loss_that_is_not_finite_is_refused_before_the_first_step(recipe_factory, tmp_path, capsys, monkeypatch):
    _scripted_losses(monkeypatch, [math.nan])
    recipe = recipe_factory(f"guards:\n  retention:\n    data: {_keep_file(tmp_path)}\n")
    code, _, err = _cli(capsys, "train", str(recipe))
    assert code == 2, err
    assert "guards.retention.data: the model's loss on the 8 retention rows" in err and "not a finite number" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_run_resumed_with_other_retention_rows_measures_its_base_again(recipe_factory, tmp_path, capsys):
    first_rows = _keep_file(tmp_path, "first.jsonl")
    recipe = recipe_factory(f"guards:\n  retention:\n    data: {first_rows}\n")
    code, _, err = _cli(capsys, "train", str(recipe))
    assert code == 0, err
    run = tmp_path / "run"
    before = _checks(run)[0]["base"]
    code, out, err = _cli(
        capsys,
        "train",
        str(recipe),
        "--resume",
        str(run / "checkpoint-2"),
        "--set",
        "training.max_steps=6",
        "--set",
        f"guards.retention.data={_keep_file(tmp_path, 'second.jsonl', rows=6)}",
    )
    assert code == 0, err
    events = [json.loads(line) for line in (run / "guard_events.jsonl").read_text().splitlines()]
    assert any(e["action"] == "retention_rows_changed" and e["step"] == 2 for e in events)
    checks = _checks(run)
    assert [c["step"] for c in checks] == [0, 2, 2, 4, 6]  # the first run's 0 and 2, then the resumed run's
    measured_again = checks[2]  # the resumed run's first check, at the checkpoint's step, before any update
    assert measured_again["check"] == "retention_base" and measured_again["loss"] == measured_again["base"]
    assert all(c["base"] == measured_again["base"] for c in checks[2:])  # judged against the new rows' base
    assert all(c["base"] == before for c in checks[:2])  # the first run's own lines keep theirs


def test_a_resumed_run_checks_every_nth_logging_step_where_the_whole_run_did(recipe_factory, tmp_path, capsys):
    recipe = recipe_factory(f"guards:\n  retention:\n    data: {_keep_file(tmp_path)}\n    every: 2\n")
    longer = ["--set", "training.max_steps=8"]
    code, _, err = _cli(capsys, "train", str(recipe), *longer)
    assert code == 0, err
    run = tmp_path / "run"
    whole = [c["step"] for c in _checks(run)]
    assert whole == [0, 4, 8]  # logging at 2, 4, 6, 8: every second one
    # checkpoint-6 saved after the third window: the fourth, at step 8, is checked
    code, _, err = _cli(capsys, "train", str(recipe), "--resume", str(run / "checkpoint-6"), *longer)
    assert code == 0, err
    assert [c["step"] for c in _checks(run)] == whole
