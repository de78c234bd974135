"""GuardPolicy driven by scripted routing metrics: what it does to the learning rate and when it halts.

Defaults are DESIGN.md section 5: baseline over 3 logging steps, cut x0.5 at a 10% pooled (20% per-layer)
drop, cooldown 2, at most 3 cuts, min_lr 1e-7, halt at 40% (50%), load > 3x uniform, a quarter of a
layer's experts dead for 3 checks, or any non-finite value.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moe_finetune.routing.policy import GuardAction, GuardPolicy, RoutingSnapshot
from moe_finetune.sections import GuardConfig, MonitorSection

EXPERTS = 8
UNIFORM = [1 / EXPERTS] * EXPERTS
LR0 = 1e-5


def snap(step, pooled, layers=None, load=None, names=None, finite=True):
    """A snapshot with `pooled` entropy in every layer and uniform load unless told otherwise."""
    layers = [pooled, pooled] if layers is None else layers
    load = [list(UNIFORM) for _ in layers] if load is None else load
    return RoutingSnapshot(step, pooled, layers, load, finite=finite, layer_names=names)


def drive(policy, pooled_values, lr0=LR0, first_step=1):
    """Feed pooled entropies one logging step at a time, the LR following the policy's cuts."""
    return [
        policy.update(snap(first_step + i, value), current_lr=lr0 * policy.multiplier)
        for i, value in enumerate(pooled_values)
    ]


def kinds(actions):
    return [a.kind for a in actions]


def with_dead_experts(count):
    """Load shares for one layer where `count` experts get almost nothing (0.005 < 0.1 x 1/8)."""
    dead_share = 0.005
    alive_share = (1 - count * dead_share) / (EXPERTS - count)
    return [dead_share] * count + [alive_share] * (EXPERTS - count)


# ---------------------------------------------------------------- healthy runs never act


def test_steady_routing_never_acts():
    policy = GuardPolicy(GuardConfig())
    wobble = [0.80 + 0.01 * math.sin(i) for i in range(60)]
    assert set(kinds(drive(policy, wobble))) == {"none"}
    assert policy.multiplier == 1.0 and policy.cuts_made == 0


def test_slow_decline_that_stays_under_the_thresholds_never_acts():
    policy = GuardPolicy(GuardConfig())
    decline = [0.80 - 0.064 * i / 59 for i in range(60)]  # ends 8% below baseline: under the 10% cut
    assert set(kinds(drive(policy, decline))) == {"none"}


def test_no_relative_action_while_the_baseline_is_being_collected():
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [0.9, 0.3, 0.9])  # a 67% "drop" inside the baseline window is not judged
    assert kinds(actions) == ["none", "none", "none"]
    assert policy.baseline == pytest.approx(0.7)
    assert policy.layer_baseline == pytest.approx([0.7, 0.7])


# ---------------------------------------------------------------- cuts


def test_sharp_pooled_drop_cuts_lr_by_half_cools_down_then_cuts_again_only_if_it_keeps_falling():
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [0.8, 0.8, 0.8, 0.68, 0.66, 0.64, 0.60])
    assert kinds(actions) == ["none", "none", "none", "cut_lr", "none", "none", "cut_lr"]
    first_cut = actions[3]
    assert first_cut.factor == 0.5 and first_cut.step == 4
    assert (
        "pooled routing entropy 0.68 is 15% below its baseline 0.80 (cut threshold 10%)" in first_cut.reason
    )
    assert "cut 1 of 3" in first_cut.reason
    assert first_cut.details["lr_before"] == pytest.approx(1e-5)
    assert first_cut.details["lr_after"] == pytest.approx(5e-6)
    assert "cooling down" in actions[4].reason
    # the second cut answers a further 12% fall from where the first cut left it (0.68 -> 0.60)
    assert "down 12% from 0.68" in actions[6].reason
    assert actions[6].details["lr_before"] == pytest.approx(5e-6)
    assert policy.multiplier == pytest.approx(0.25)


def test_entropy_that_holds_below_its_baseline_after_a_cut_is_not_cut_again():
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [0.8, 0.8, 0.8] + [0.68] * 30)
    assert kinds(actions).count("cut_lr") == 1
    assert set(kinds(actions[4:])) == {"none"}
    assert "not a sharp drop" in actions[-1].reason
    assert policy.multiplier == 0.5


def test_a_drop_reached_slowly_over_many_windows_is_a_level_not_a_sharp_drop():
    policy = GuardPolicy(GuardConfig(cut_window=5))
    decline = [0.8] * 3 + [0.8 - 0.004 * i for i in range(1, 60)]  # 0.4% per window, 29% in all
    actions = drive(policy, decline)
    assert "cut_lr" not in kinds(actions)
    # ... until it is deep enough for the halt level (40% is never reached here): nothing at all
    assert set(kinds(actions)) == {"none"}


def test_recovery_run_resumed_below_its_baseline_at_a_lower_rate_runs_on_untouched():
    """The halt message's advice: resume from the checkpoint before trouble with a lower learning rate.
    The entropy slid (never sharply) to 12% below the baseline, past the cut line, and then holds:
    judged as a level against the baseline it would be cut at once; as a rate, nothing happens."""
    original = GuardPolicy(GuardConfig())
    slide = [0.8, 0.8, 0.8] + [0.8 - 0.004 * i for i in range(1, 25)]  # 0.5% a window, to 0.704
    assert set(kinds(drive(original, slide))) == {"none"}
    resumed = GuardPolicy(GuardConfig())
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    held = [0.704 + 0.002 * math.sin(i) for i in range(200)]
    actions = drive(resumed, held, lr0=1e-6, first_step=len(slide) + 1)
    assert set(kinds(actions)) == {"none"}
    assert "not a sharp drop" in actions[-1].reason
    assert resumed.cuts_made == 0


def test_a_checkpoint_from_before_the_sharp_drop_reference_resumes_without_cutting_at_once():
    """Guard state written before `recent` existed: its first step after the resume is the reference,
    not a drop from the baseline level (which would cut, or halt after the last cut, at once)."""
    policy = GuardPolicy(GuardConfig())
    drive(policy, [0.8, 0.8, 0.8, 0.68])  # one cut
    legacy = policy.state_dict()
    for added in ("recent", "level_at_last_cut", "layer_balance_baseline", "balance_samples", "settled_step"):
        legacy.pop(added)
    legacy.pop("reseed_reference")
    legacy["load_baseline"] = legacy.pop("baseline_top_share")  # and the old names
    legacy["alive_baseline"] = legacy.pop("alive_at_baseline")
    resumed = GuardPolicy(GuardConfig())
    resumed.load_state_dict(legacy)
    actions = drive(resumed, [0.68] * 20, lr0=LR0 * 0.5, first_step=5)
    assert set(kinds(actions)) == {"none"} and resumed.cuts_made == 1
    concentrating = [0.28] * 3 + [0.032] * 5  # the balance baseline was re-taken at the resume
    assert resumed.update(snap(25, 0.68, load=[list(UNIFORM), concentrating]), LR0 * 0.5).kind == "cut_lr"


def test_a_fall_spread_over_more_than_cut_window_logging_steps_is_not_sharp():
    policy = GuardPolicy(GuardConfig(cut_window=1))
    actions = drive(policy, [0.8, 0.8, 0.8, 0.75, 0.70, 0.655])  # under 10% from one step to the next
    assert "cut_lr" not in kinds(actions)


def test_single_layer_drop_cuts_and_names_the_layer():
    names = [f"model.layers.{i}.mlp.gate" for i in range(4)]
    policy = GuardPolicy(GuardConfig())
    for step in (1, 2, 3):
        policy.update(snap(step, 0.8, layers=[0.8] * 4, names=names), LR0)
    # layer 2 falls 25% (over the 20% layer threshold) while the pooled mean falls only 6%
    action = policy.update(snap(4, 0.75, layers=[0.8, 0.8, 0.6, 0.8], names=names), LR0)
    assert action.kind == "cut_lr" and action.factor == 0.5
    assert (
        "layer model.layers.2.mlp.gate routing entropy 0.60 is 25% below its baseline 0.80" in action.reason
    )
    assert "pooled" not in action.reason
    assert [fault["layer"] for fault in action.details["layers"]] == [2]


def test_recovery_after_a_cut_takes_no_more_actions():
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [0.8, 0.8, 0.8, 0.68] + [0.79] * 30)
    assert kinds(actions).count("cut_lr") == 1
    assert set(kinds(actions[4:])) == {"none"}
    assert policy.multiplier == 0.5


def test_set_baseline_from_a_probe_batch_lets_the_first_step_be_judged():
    policy = GuardPolicy(GuardConfig())
    policy.set_baseline(0.8, [0.8, 0.8])
    action = policy.update(snap(1, 0.68), LR0)
    assert action.kind == "cut_lr"
    assert "baseline 0.80" in action.reason


def test_cut_is_clipped_so_the_lr_lands_on_min_lr_and_then_a_further_drop_halts():
    policy = GuardPolicy(GuardConfig(min_lr=1e-7))
    lr0 = 1.5e-7  # x0.5 would give 7.5e-8, below min_lr
    actions = drive(policy, [0.8, 0.8, 0.8, 0.68, 0.68, 0.68, 0.64], lr0=lr0)
    cut = actions[3]
    assert cut.kind == "cut_lr"
    assert cut.factor == pytest.approx(1e-7 / 1.5e-7)
    assert lr0 * cut.factor == pytest.approx(1e-7)
    assert "clipped to min_lr" in cut.reason
    assert kinds(actions[4:6]) == ["none", "none"]  # cooldown
    assert actions[6].kind == "halt"
    assert "already at min_lr" in actions[6].reason and "last cut at step 4" in actions[6].reason
    assert policy.cuts_made == 1


# ---------------------------------------------------------------- halts


# three sharp drops, each 10-12% below where the last cut left it: a cut each, two windows apart
THREE_CUTS = [0.8, 0.8, 0.8, 0.70, 0.70, 0.70, 0.62, 0.62, 0.62, 0.555, 0.555]


def test_collapse_that_continues_after_the_last_allowed_cut_halts_naming_that_cut():
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [*THREE_CUTS, 0.555, 0.52])  # 6% below 0.555, where the last cut stood
    assert kinds(actions) == ["none"] * 3 + ["cut_lr", "none", "none"] * 3 + ["halt"]
    halt = actions[-1]
    assert halt.step == 13
    assert "still falling after the last allowed cut (3 of 3, at step 10)" in halt.reason
    assert "6% further below the 0.56 it stood at when the last cut was made" in halt.reason
    assert halt.details["check"] == "after_last_cut"
    assert policy.multiplier == pytest.approx(0.125)


def test_run_that_settles_below_its_baseline_after_the_last_cut_runs_on_with_one_settled_event():
    """Entropy fell 10-30% and held after the cuts: settled, not collapsing (halt level 40% never reached)."""
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [*THREE_CUTS] + [0.55 + 0.005 * math.sin(i) for i in range(100)])
    assert kinds(actions).count("cut_lr") == 3
    assert "halt" not in kinds(actions)
    settled = [a for a in actions if a.kind == "settled"]
    assert len(settled) == 1 and settled[0].step == 13  # the first check after the last cut's cooldown
    assert "has settled below its baseline" in settled[0].reason and "after 3 cut(s)" in settled[0].reason
    assert policy.multiplier == pytest.approx(0.125)


def test_with_cuts_turned_off_a_cut_condition_halts():
    policy = GuardPolicy(GuardConfig(max_cuts=0))
    actions = drive(policy, [0.8, 0.8, 0.8, 0.68])
    assert actions[-1].kind == "halt" and "max_cuts 0" in actions[-1].reason


def test_deep_pooled_drop_halts_at_once_without_cutting_first():
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [0.8, 0.8, 0.8, 0.45])
    assert actions[-1].kind == "halt"
    assert (
        "pooled routing entropy 0.45 is 44% below its baseline 0.80 (halt threshold 40%)"
        in actions[-1].reason
    )
    assert policy.cuts_made == 0


def test_deep_single_layer_drop_halts_naming_the_layer():
    policy = GuardPolicy(GuardConfig())
    for step in (1, 2, 3):
        policy.update(snap(step, 0.8, layers=[0.8, 0.8, 0.8]), LR0)
    action = policy.update(snap(4, 0.67, layers=[0.8, 0.35, 0.8]), LR0)
    assert action.kind == "halt"
    assert "layer 1 routing entropy 0.35 is 56% below its baseline 0.80 (halt threshold 50%)" in action.reason


def test_hard_halts_still_apply_during_cooldown():
    policy = GuardPolicy(GuardConfig())
    actions = drive(policy, [0.8, 0.8, 0.8, 0.68, 0.4])
    assert kinds(actions[3:]) == ["cut_lr", "halt"]


def _after_uniform_baseline(config: GuardConfig | None = None) -> GuardPolicy:
    policy = GuardPolicy(config or GuardConfig())
    for step in (1, 2, 3):
        assert policy.update(snap(step, 0.8), LR0).kind == "none"
    return policy


def test_expert_over_three_times_uniform_load_halts_naming_layer_and_expert():
    hot = [0.6 / 7] * EXPERTS
    hot[5] = 0.4  # 3.2x uniform (1/8)
    policy = _after_uniform_baseline()
    action = policy.update(snap(4, 0.8, load=[list(UNIFORM), hot]), LR0)
    assert action.kind == "halt"
    assert "expert 5 in layer 1 receives 40% of top-k assignments, 3.2x uniform (limit 3x" in action.reason
    assert action.details["experts"][0]["expert"] == 5


def test_load_is_not_judged_before_the_baseline_exists():
    hot = [0.6 / 7] * EXPERTS
    hot[5] = 0.4
    policy = GuardPolicy(GuardConfig())
    assert policy.update(snap(1, 0.8, load=[list(UNIFORM), hot]), LR0).kind == "none"


def test_routing_already_concentrated_at_the_baseline_is_specialisation_not_collapse():
    narrow = [0.6 / 7] * EXPERTS
    narrow[2] = 0.4  # one expert favoured from the start (narrow-domain data): 3.2x uniform
    policy = GuardPolicy(GuardConfig())
    for step in (1, 2, 3):
        policy.update(snap(step, 0.8, load=[list(UNIFORM), narrow]), LR0)
    assert policy.update(snap(4, 0.8, load=[list(UNIFORM), narrow]), LR0).kind == "none"
    worse = [0.35 / 7] * EXPERTS
    worse[2] = 0.65  # 1.6x its baseline share: beyond the 1.5x headroom
    action = policy.update(snap(5, 0.8, load=[list(UNIFORM), worse]), LR0)
    assert action.kind == "halt" and "expert 2 in layer 1" in action.reason


def test_expert_just_under_the_load_limit_does_not_halt():
    warm = [0.63 / 7] * EXPERTS
    warm[0] = 0.37  # 2.96x uniform
    policy = _after_uniform_baseline()
    assert policy.update(snap(4, 0.8, load=[list(UNIFORM), warm]), LR0).kind == "none"


def test_a_quarter_of_a_layers_experts_dead_for_three_consecutive_checks_halts():
    policy = _after_uniform_baseline()
    load = [list(UNIFORM), with_dead_experts(2)]  # 2 of 8 = 25% dead in layer 1
    actions = [policy.update(snap(step, 0.8, load=load), LR0) for step in (4, 5, 6)]
    # the load concentrating on the other six drops the layer's balance 12% at once: a cut first
    assert kinds(actions) == ["cut_lr", "none", "halt"]
    assert "layer 1 balance 0.88 is 12% below its baseline 1.00 (cut threshold 10%)" in actions[0].reason
    assert "layer 1 has had 2 of the 8 experts alive at the baseline dead" in actions[-1].reason
    assert "for 3 consecutive checks" in actions[-1].reason
    assert actions[-1].details["layers"][0]["dead_experts"] == [0, 1]


def test_experts_already_unused_at_the_baseline_are_not_counted_as_dying():
    policy = GuardPolicy(GuardConfig())
    load = [list(UNIFORM), with_dead_experts(2)]
    actions = [policy.update(snap(step, 0.8, load=load), LR0) for step in range(1, 10)]
    assert set(kinds(actions)) == {"none"}


def test_dead_experts_that_recover_before_the_third_check_do_not_halt():
    policy = GuardPolicy(GuardConfig())
    dead = [list(UNIFORM), with_dead_experts(2)]
    healthy = [list(UNIFORM), list(UNIFORM)]
    loads = [dead, dead, healthy, dead, dead, healthy, dead]
    actions = [policy.update(snap(step, 0.8, load=load), LR0) for step, load in enumerate(loads, start=1)]
    assert "halt" not in kinds(actions)


def test_one_dead_expert_of_eight_is_under_the_quarter_and_never_halts():
    policy = GuardPolicy(GuardConfig())
    load = [list(UNIFORM), with_dead_experts(1)]
    actions = [policy.update(snap(step, 0.8, load=load), LR0) for step in range(1, 11)]
    assert set(kinds(actions)) == {"none"}


def test_entropy_floor_halts_below_it_and_is_off_by_default():
    assert GuardPolicy(GuardConfig()).update(snap(1, 0.05), LR0).kind == "none"
    action = GuardPolicy(GuardConfig(entropy_floor=0.2)).update(snap(1, 0.15), LR0)
    assert action.kind == "halt" and "below the floor 0.200" in action.reason


@pytest.mark.parametrize(
    "snapshot",
    [
        snap(4, float("nan")),
        snap(4, 0.8, layers=[0.8, float("inf")]),
        snap(4, 0.8, load=[list(UNIFORM), [float("nan")] * EXPERTS]),
        snap(4, 0.8, finite=False),
    ],
    ids=["nan_pooled", "inf_layer", "nan_load", "router_logits_not_finite"],
)
def test_non_finite_router_output_halts(snapshot):
    policy = GuardPolicy(GuardConfig())
    drive(policy, [0.8, 0.8, 0.8])
    action = policy.update(snapshot, LR0)
    assert action.kind == "halt"
    assert "not finite" in action.reason and "step 4" in action.reason


def test_non_finite_output_is_skipped_when_halting_on_it_is_off():
    policy = GuardPolicy(GuardConfig(halt_on_nonfinite=False))
    action = policy.update(snap(1, float("nan")), LR0)
    assert action.kind == "none" and "skipped" in action.reason
    assert policy.state_dict()["baseline_samples"] == []  # a NaN never enters the baseline


# ---------------------------------------------------------------- resume


SCRIPT = [0.8, 0.81, 0.79, 0.68, 0.67, 0.69, 0.66, 0.7, 0.79, 0.68, 0.68, 0.68, 0.68, 0.68, 0.68, 0.68]
DEAD_EVERY_OTHER = [with_dead_experts(2) if i % 3 else list(UNIFORM) for i in range(len(SCRIPT))]


def scripted_snapshot(i):
    return snap(i + 1, SCRIPT[i], load=[list(UNIFORM), DEAD_EVERY_OTHER[i]])


@pytest.mark.parametrize("stop_after", [2, 4, 5, 8, 12])  # mid-baseline, right after a cut, in cooldown, ...
def test_state_dict_round_trip_mid_sequence_gives_identical_subsequent_decisions(stop_after):
    original = GuardPolicy(GuardConfig())
    for i in range(stop_after):
        original.update(scripted_snapshot(i), LR0 * original.multiplier)

    resumed = GuardPolicy(GuardConfig())
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert resumed.state_dict() == original.state_dict()

    for i in range(stop_after, len(SCRIPT)):
        expected = original.update(scripted_snapshot(i), LR0 * original.multiplier)
        got = resumed.update(scripted_snapshot(i), LR0 * resumed.multiplier)
        assert got == expected
    assert resumed.state_dict() == original.state_dict()


def test_replaying_an_already_judged_step_does_nothing():
    policy = GuardPolicy(GuardConfig())
    cut = drive(policy, [0.8, 0.8, 0.8, 0.68])[-1]
    assert cut.kind == "cut_lr"
    before = policy.state_dict()
    for step in (4, 3, 1):  # a resumed Trainer may log the checkpoint's step again
        replay = policy.update(snap(step, 0.3), LR0)
        assert replay == GuardAction("none", replay.reason, step=step, details={"check": "replay"})
        assert "already judged" in replay.reason
    assert policy.state_dict() == before


def test_load_state_dict_rejects_a_foreign_dict():
    with pytest.raises(ValueError, match="missing"):
        GuardPolicy(GuardConfig()).load_state_dict({"best_score": 1.0})


# ---------------------------------------------------------------- config


def test_defaults_are_the_design_section_5_values_and_every_field_is_described():
    config = GuardConfig()
    assert (config.baseline_steps, config.cut_drop, config.cut_layer_drop, config.cut_factor) == (
        3,
        0.1,
        0.2,
        0.5,
    )
    assert (config.cooldown, config.max_cuts, config.min_lr) == (2, 3, 1e-7)
    assert (config.halt_drop, config.halt_layer_drop, config.max_load_ratio) == (0.4, 0.5, 3.0)
    monitor = MonitorSection()
    assert (monitor.dead_threshold, config.dead_fraction, config.dead_patience) == (0.1, 0.25, 3)
    assert config.entropy_floor is None and config.halt_on_nonfinite and monitor.capacity_factor == 1.25
    assert all(info.description for info in GuardConfig.model_fields.values())


def test_halt_drop_not_deeper_than_cut_drop_is_rejected():
    with pytest.raises(ValidationError, match=r"halt_drop \(0.1\) must be greater than cut_drop \(0.2\)"):
        GuardConfig(cut_drop=0.2, halt_drop=0.1)
    with pytest.raises(ValidationError, match="halt_layer_drop"):
        GuardConfig(cut_layer_drop=0.5, halt_layer_drop=0.5)


def test_unknown_guard_key_is_rejected():
    with pytest.raises(ValidationError, match="cut_dorp"):
        GuardConfig(cut_dorp=0.1)


@pytest.mark.parametrize(
    "bad",
    [
        {"cut_factor": 1.0},
        {"cut_drop": 0.0},
        {"dead_fraction": 1.5},
        {"max_load_ratio": 1.0},
        {"baseline_steps": 0},
    ],
)
def test_out_of_range_thresholds_are_rejected(bad):
    with pytest.raises(ValidationError, match=next(iter(bad))):
        GuardConfig(**bad)


# ---------------------------------------------------------------- invariants


@settings(max_examples=150, deadline=None)
@given(
    pooled=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    layer_jitter=st.lists(st.floats(-0.3, 0.3), min_size=40, max_size=40),
    lr0=st.floats(1e-7, 1e-3),
    min_lr=st.sampled_from([0.0, 1e-7, 5e-6, 1e-4]),
    cut_factor=st.floats(0.05, 0.95),
    max_cuts=st.integers(0, 5),
    cooldown=st.integers(0, 3),
)
def test_multiplier_stays_between_min_lr_over_lr0_and_one_and_cuts_never_exceed_max_cuts(
    pooled, layer_jitter, lr0, min_lr, cut_factor, max_cuts, cooldown
):
    config = GuardConfig(
        min_lr=min_lr, cut_factor=cut_factor, max_cuts=max_cuts, cooldown=cooldown, max_load_ratio=10.0
    )
    policy = GuardPolicy(config)
    lowest = min(1.0, min_lr / lr0)
    for step, (value, jitter) in enumerate(zip(pooled, layer_jitter[: len(pooled)], strict=True), start=1):
        layers = [value, min(1.0, max(0.0, value + jitter))]
        action = policy.update(snap(step, value, layers=layers), lr0 * policy.multiplier)
        if action.kind == "cut_lr":
            assert 0 < action.factor < 1
        assert lowest * (1 - 1e-9) <= policy.multiplier <= 1.0
        assert lr0 * policy.multiplier >= min(lr0, min_lr) * (1 - 1e-9)
        assert policy.cuts_made <= max_cuts


def test_load_concentrating_on_three_experts_halts_on_balance_while_under_the_load_and_dead_limits():
    concentrated = [0.31] * 3 + [0.014] * 5  # 2.5x uniform at most, none dead: balance 0.67 (33% down)
    policy = _after_uniform_baseline()
    action = policy.update(snap(4, 0.8, load=[list(UNIFORM), concentrated]), LR0)
    assert action.kind == "halt" and action.details["check"] == "balance_drop"
    assert "layer 1 balance 0.67 is 33% below its baseline 1.00 (halt threshold 30%)" in action.reason


def test_load_starting_to_concentrate_cuts_on_the_sharp_balance_drop():
    concentrating = [0.28] * 3 + [0.032] * 5  # balance 0.78: 22% down, under the 30% halt
    policy = _after_uniform_baseline()
    action = policy.update(snap(4, 0.8, load=[list(UNIFORM), concentrating]), LR0)
    assert action.kind == "cut_lr"
    assert "layer 1 balance 0.78 is 22% below its baseline 1.00 (cut threshold 10%)" in action.reason


def test_a_halt_resumed_from_keeps_the_cuts_already_in_the_learning_rate():
    policy = GuardPolicy(GuardConfig())
    drive(policy, [0.8, 0.8, 0.8, 0.68])
    policy.restart_episode()
    assert policy.multiplier == 0.5 and policy.cuts_made == 0 and policy.state.cooldown_left == 0
    assert policy.baseline == pytest.approx(0.8)  # judged against the start, not re-measured


def test_a_collapse_inside_the_first_windows_is_cut_then_halted_against_the_start_not_averaged_away():
    # the collapse demo's shape: the load of layer 1 concentrates within the first logging windows
    start = [list(UNIFORM), list(UNIFORM)]
    windows = [
        [list(UNIFORM), [0.16] * 4 + [0.09] * 4],  # balance 0.98: still healthy
        [list(UNIFORM), [0.27] * 3 + [0.0475] * 4 + [0.0]],  # balance 0.79: 21% down
        [list(UNIFORM), [0.37, 0.37, 0.21] + [0.01] * 5],  # balance 0.62: 38% down, under the 3x load limit
    ]
    averaged = GuardPolicy(GuardConfig())  # no routing before the first update: the first 3 windows are the start
    measured = GuardPolicy(GuardConfig())
    measured.set_baseline(0.8, [0.8, 0.8], start)
    averaged_kinds = [averaged.update(snap(5 * (i + 1), 0.8, load=load), LR0).kind for i, load in enumerate(windows)]
    measured_actions = [measured.update(snap(5 * (i + 1), 0.8, load=load), LR0) for i, load in enumerate(windows)]
    assert averaged_kinds == ["none", "none", "none"]  # the collapse became its baseline
    assert kinds(measured_actions) == ["none", "cut_lr", "halt"]
    assert measured_actions[-1].details["check"] == "balance_drop"
    assert "baseline 1.00" in measured_actions[-1].reason  # judged against the start, not the collapsed windows


def test_a_checkpoint_is_healthy_only_when_the_window_it_was_saved_in_was_judged_healthy():
    from moe_finetune.routing.guard_state import HealthyCheckpoints

    saves = HealthyCheckpoints()
    saves.judged(5, healthy=True)
    saves.saved(5)  # saved right after its own healthy window was judged
    assert saves.before(10) == 5
    saves.saved(8)  # inside the window that ends at 10 ...
    saves.judged(10, healthy=False)  # ... which proved troubled: never kept
    saves.saved(10)  # the weights at the trouble itself: never kept
    assert saves.before(12) == 5
    saves.saved(12)
    saves.judged(15, healthy=True)  # a later healthy window makes its saves healthy
    assert saves.before(20) == 12
    assert saves.before(12) is None  # never the checkpoint at (or after) the step the guard acts


def test_with_no_healthy_checkpoint_saved_nothing_is_kept_and_the_state_round_trips():
    from moe_finetune.routing.guard_state import HealthyCheckpoints

    saves = HealthyCheckpoints()
    saves.saved(10)
    saves.judged(10, healthy=False)
    assert saves.before(15) is None
    saves.saved(12)
    restored = HealthyCheckpoints.from_state_dict(json.loads(json.dumps(saves.state_dict())))
    assert restored == saves and restored.unjudged == [12]
    assert HealthyCheckpoints.from_state_dict(None) == HealthyCheckpoints()  # a checkpoint written before it


# ---------------------------------------------------------------- one cooldown, a resumed halt, the floor


def test_cooldown_also_holds_back_the_continues_halt_after_the_last_cut():
    policy = GuardPolicy(GuardConfig(max_cuts=1))
    actions = drive(policy, [0.8, 0.8, 0.8, 0.68, 0.60, 0.60, 0.60])
    # cut at 4; 5 and 6 are its cooldown (0.60 is 12% below the cut's 0.68, past continue_drop); then it halts
    assert kinds(actions[3:]) == ["cut_lr", "none", "none", "halt"]
    assert [a.details["check"] for a in actions[4:6]] == ["cooldown", "cooldown"]
    assert actions[-1].details["check"] == "after_last_cut"
    assert "continues after the last cut" in GuardConfig.model_fields["cooldown"].description
    assert "retention cut" in GuardConfig.model_fields["cooldown"].description


def _resumable_collapse() -> tuple[GuardPolicy, list[list[float]]]:
    """A policy whose start was uniform routing, halted at step 15 on layer 1's load concentrating, and
    restored from that halt's checkpoint as a resumed run would be."""
    collapsed = [list(UNIFORM), [0.37, 0.37, 0.21] + [0.01] * 5]  # balance 0.62, 38% down; 5 experts starving
    policy = GuardPolicy(GuardConfig())
    policy.set_baseline(0.8, [0.8, 0.8], [list(UNIFORM), list(UNIFORM)])
    assert policy.update(snap(15, 0.8, load=collapsed), LR0).kind == "halt"
    resumed = GuardPolicy(GuardConfig())
    resumed.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    resumed.restart_episode()
    return resumed, collapsed


def test_a_resumed_halt_is_judged_against_the_healthy_start_not_the_collapsed_routing():
    resumed, collapsed = _resumable_collapse()
    state = resumed.state
    assert state.baseline == pytest.approx(0.8) and state.layer_balance_baseline == pytest.approx([1.0, 1.0])
    assert state.baseline_top_share == pytest.approx([1 / EXPERTS, 1 / EXPERTS])
    assert state.alive_at_baseline == [[True] * EXPERTS, [True] * EXPERTS]
    # still collapsed at the resumed run's first window: the same limit stops it again, against the start
    again = resumed.update(snap(20, 0.8, load=collapsed), LR0)
    assert again.kind == "halt" and again.details["check"] == "balance_drop"
    assert "baseline 1.00" in again.reason


def test_a_resumed_halt_starts_its_cuts_and_cooldown_over_and_a_level_below_the_cut_line_is_not_a_sharp_drop():
    resumed, _ = _resumable_collapse()
    assert resumed.cuts_made == 0 and resumed.state.cooldown_left == 0 and resumed.state.dead_streaks == []
    recovering = [list(UNIFORM), [0.25, 0.25, 0.2] + [0.06] * 5]  # balance 0.89: past the cut line, not sharp
    assert resumed.update(snap(20, 0.8, load=recovering), LR0).details["check"] == "holding"
    falling = [list(UNIFORM), [0.3, 0.3, 0.25] + [0.03] * 5]  # balance 0.77: 14% down from 0.89 within the window
    assert resumed.update(snap(25, 0.8, load=falling), LR0).kind == "cut_lr"


def test_dead_experts_are_a_fraction_of_those_alive_at_the_baseline():
    config = GuardConfig(cut_balance_drop=0.5, halt_balance_drop=0.9)  # dead experts alone decide here
    half_unused = with_dead_experts(4)  # 4 of 8 unused from the start: narrow data
    one_more = [0.005] * 5 + [(1 - 5 * 0.005) / 3] * 3  # one of the 4 alive dies: a quarter of them
    policy = GuardPolicy(config)
    policy.set_baseline(0.8, [0.8, 0.8], [list(UNIFORM), half_unused])
    actions = [policy.update(snap(step, 0.8, load=[list(UNIFORM), one_more]), LR0) for step in (5, 10, 15)]
    assert kinds(actions) == ["none", "none", "halt"] and actions[-1].details["check"] == "dead_experts"
    assert actions[-1].details["layers"][0]["alive_at_baseline"] == 4
    assert "1 of the 4 of 8 experts alive at the baseline dead" in actions[-1].reason


def test_a_near_deterministic_router_is_not_cut_or_halted_on_a_relative_wobble():
    policy = GuardPolicy(GuardConfig())  # min_baseline_entropy 0.05
    policy.set_baseline(0.4, [0.78, 0.024])
    wobble = policy.update(snap(5, 0.395, layers=[0.78, 0.01]), LR0)  # layer 1: 58% below its 0.024
    assert wobble.kind == "none" and wobble.details["check"] == "healthy"
    # a layer above the floor is judged as before
    falling = policy.update(snap(10, 0.2, layers=[0.35, 0.024]), LR0)
    assert falling.kind == "halt" and "layer 0 routing entropy 0.35" in falling.reason
    # and a floor of 0 judges the wobble too
    strict = GuardPolicy(GuardConfig(min_baseline_entropy=0.0))
    strict.set_baseline(0.4, [0.78, 0.024])
    assert strict.update(snap(5, 0.395, layers=[0.78, 0.01]), LR0).kind == "halt"
