"""The sentences a user reads for each guard finding: one place that turns facts into words.

The policy's checks (routing/policy.py) return facts, never prose; `describe` is the only function
that writes a reason, so wording changes in one place and every sentence carries its numbers and
names the layers at fault. Pure: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_finetune.sections import GuardConfig


def describe(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    """The one-sentence reason for a finding (its `check` picks the wording)."""
    writer = _WRITERS.get(facts["check"])
    if writer is None:
        raise KeyError(f"no sentence for guard check {facts['check']!r}")
    return writer(facts, config, step)


def drop_phrase(facts: dict[str, Any]) -> str:
    """`pooled routing entropy 0.68 is 15% below its baseline 0.80 (cut threshold 10%) and ...`."""
    label = facts["label"]
    phrases = []
    if facts["pooled_at_fault"]:
        phrases.append(
            f"pooled routing entropy {facts['pooled_entropy']:.2f} is {facts['pooled_drop']:.0%} below its "
            f"baseline {facts['pooled_baseline']:.2f} ({label} {facts['pooled_threshold']:.0%})"
            + _how_it_moved(facts.get("pooled_fall"), facts.get("pooled_reference"), facts)
            + _how_it_moved_since_cut(facts.get("pooled_further"), facts.get("pooled_level_at_cut"))
        )
    faults = facts["layers"]
    if len(faults) == 1:
        fault = faults[0]
        phrases.append(
            f"{fault['name']} routing entropy {fault['entropy']:.2f} is {fault['drop']:.0%} below its "
            f"baseline {fault['baseline']:.2f} ({label} {facts['layer_threshold']:.0%})"
            + _how_it_moved(fault.get("fall"), fault.get("reference"), facts)
            + _how_it_moved_since_cut(fault.get("further"), fault.get("level_at_cut"))
        )
    elif faults:
        worst = sorted(faults, key=lambda f: f["drop"], reverse=True)
        listed = ", ".join(
            f"{f['name']} {f['entropy']:.2f} vs {f['baseline']:.2f} ({f['drop']:.0%})" for f in worst[:4]
        )
        more = f" and {len(worst) - 4} more" if len(worst) > 4 else ""
        phrases.append(
            f"routing entropy is at least {facts['layer_threshold']:.0%} below baseline ({label}) in "
            f"{len(faults)} layers: {listed}{more}"
        )
    balance = sorted(facts.get("balance_layers") or [], key=lambda f: f["drop"], reverse=True)
    if balance:
        worst = balance[0]
        more = f" ({len(balance) - 1} more layer(s) likewise)" if len(balance) > 1 else ""
        phrases.append(
            f"{worst['name']} balance {worst['balance']:.2f} is {worst['drop']:.0%} below its baseline "
            f"{worst['baseline']:.2f} ({label} {facts['balance_threshold']:.0%})"
            + _how_it_moved(worst.get("fall"), worst.get("reference"), facts)
            + more
        )
    return " and ".join(phrases)


def _how_it_moved(fall: float | None, reference: float | None, facts: dict[str, Any]) -> str:
    if fall is None or reference is None:
        return ""
    steps = facts["window"]
    return f", down {fall:.0%} from {reference:.2f} in the last {steps} logging step{'' if steps == 1 else 's'}"


def _how_it_moved_since_cut(further: float | None, level: float | None) -> str:
    if further is None or level is None:
        return ""
    return f", {further:.0%} further below the {level:.2f} it stood at when the last cut was made"


def _replay(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"step {step} was already judged (last judged step {facts['_last_step']}), so nothing changes"


def _non_finite(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"router output at step {step} is not finite (NaN or inf in {', '.join(facts['fields'])})"


def _non_finite_skipped(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return _non_finite(facts, config, step) + "; skipped because halt_on_nonfinite is off"


def _entropy_floor(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"pooled routing entropy {facts['entropy']:.3f} is below the floor {facts['floor']:.3f}"


def _baseline(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    if "baseline" not in facts:
        return f"collecting the routing-entropy baseline ({facts['collected']} of {facts['needed']} logging steps)"
    sentence = f"routing-entropy baseline set from {facts['needed']} logging steps: pooled {facts['baseline']:.2f}"
    unreachable = facts.get("unreachable_load_layers") or []
    if unreachable:
        worst = max(unreachable, key=lambda u: u["top_share"])
        sentence += (
            f"; the expert-load halt cannot fire in {len(unreachable)} layer(s) (e.g. {worst['name']}, whose "
            f"largest expert already takes {worst['top_share']:.0%} of assignments, so its limit "
            f"{config.load_baseline_factor:g}x that share is at or above the 1/k ceiling): guards.load_baseline_factor "
            "or routing already this concentrated leaves only the dead-expert and balance halts there"
        )
    return sentence


def _load_ratio(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    overloaded = facts["experts"]
    worst = max(overloaded, key=lambda o: o["ratio"])
    more = f" ({len(overloaded) - 1} more expert(s) over the limit)" if len(overloaded) > 1 else ""
    return (
        f"expert {worst['expert']} in {worst['name']} receives {worst['share']:.0%} of top-k assignments, "
        f"{worst['ratio']:.1f}x uniform (limit {worst['limit_ratio']:.2g}x: the larger of "
        f"{config.max_load_ratio:g}x and {config.load_baseline_factor:g}x the layer's largest share at "
        f"the baseline){more}"
    )


def _dead_experts(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    layers = facts["layers"]
    worst = max(layers, key=lambda d: len(d["dead_experts"]) / d.get("alive_at_baseline", d["experts"]))
    more = f" ({len(layers) - 1} more layer(s) likewise)" if len(layers) > 1 else ""
    alive = worst.get("alive_at_baseline", worst["experts"])
    of = f"the {alive} experts" if alive == worst["experts"] else f"the {alive} of {worst['experts']} experts"
    return (
        f"{worst['name']} has had {len(worst['dead_experts'])} of {of} alive at the baseline dead (load share "
        f"below {worst['dead_threshold']:g}x uniform) for {worst['streak']} consecutive checks (limit "
        f"{config.dead_fraction:.0%} of a layer's experts alive at the baseline, for {config.dead_patience} checks){more}"
    )


def _balance_drop(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    layers = sorted(facts["layers"], key=lambda f: f["drop"], reverse=True)
    worst = layers[0]
    more = f" ({len(layers) - 1} more layer(s) likewise)" if len(layers) > 1 else ""
    return (
        f"{worst['name']} balance {worst['balance']:.2f} is {worst['drop']:.0%} below its baseline "
        f"{worst['baseline']:.2f} (halt threshold {facts['threshold']:.0%}): its load is concentrating on "
        f"few experts{more}"
    )


def _settled(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    cuts = facts["cuts_made"]
    after = (
        f"after {cuts} cut(s), the last at step {facts['last_cut_step']}"
        if cuts
        else "with no cut available"
    )
    return (
        f"{drop_phrase(facts)}, but it has stopped falling {after}: routing has settled below its baseline, "
        f"which is not collapse; training goes on, and halts if it falls {config.continue_drop:.0%} further"
    )


def _still_settled(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"routing settled below its baseline since step {facts['settled_step']} and is not falling further"


def _holding(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return (
        f"{drop_phrase(facts)}, but it did not fall that far within the last {config.cut_window} logging steps: "
        "a level reached earlier, not a sharp drop, so no cut"
    )


def _entropy_drop_halt(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return drop_phrase(facts)


def _healthy(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"routing entropy within limits (pooled {facts['entropy']:.2f}, baseline {facts['baseline']:.2f})"


def _cooling_down(facts: dict[str, Any], config: GuardConfig) -> str:
    """`the guard is cooling down after the retention cut at step 5 (cooldown window 1 of 2)`."""
    by = facts.get("cooldown_cut_by")
    cut_step = facts.get("cooldown_cut_step", facts.get("last_cut_step"))
    return (
        f"the guard is cooling down after the {by + ' ' if by else ''}cut at step {cut_step} "
        f"(cooldown window {config.cooldown - facts['cooldown_left']} of {config.cooldown})"
    )


def _cooldown(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"{drop_phrase(facts)}, but {_cooling_down(facts, config)}"


def _retention_cooldown(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return (
        f"{_retention_since(facts)} (cut line {percent(facts['cut_rise'])}), but {_cooling_down(facts, config)}: "
        "judged again after it"
    )


def _after_last_cut(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    phrase = drop_phrase(facts)
    cuts, last_cut = facts["cuts_made"], facts["last_cut_step"]
    if cuts >= facts["max_cuts"] and cuts > 0:
        return f"{phrase}: still falling after the last allowed cut ({cuts} of {facts['max_cuts']}, at step {last_cut})"
    if cuts >= facts["max_cuts"]:
        return f"{phrase}; no last cut can be tried because cuts are off (max_cuts 0)"
    since = f"last cut at step {last_cut}" if last_cut is not None else "no cut yet"
    return (
        f"{phrase}; the learning rate {facts['current_lr']:.2e} is already at min_lr {config.min_lr:.2e}, "
        f"so no further cut can help ({since})"
    )


def _cut(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    clip_note = f", clipped to min_lr {config.min_lr:.2e}" if facts["clipped_to_min_lr"] else ""
    return (
        f"{drop_phrase(facts)}; multiplying the learning rate by {facts['factor']:.3g} "
        f"({facts['lr_before']:.2e} -> {facts['lr_after']:.2e}{clip_note}), cut {facts['cut']} of "
        f"{facts['max_cuts']}"
    )


def percent(fraction: float) -> str:
    """A threshold as a user typed it: 0.0075 -> `0.75%`, 0.1 -> `10%` (a measured value uses `:.1%`)."""
    return f"{fraction * 100:.3g}%"


def _retention_level(facts: dict[str, Any]) -> str:
    """`retention loss 4.41 is 3.4% above the base model's 4.26`."""
    return f"retention loss {facts['loss']:.3f} is {facts['rise']:.1%} above the base model's {facts['base']:.3f}"


def _retention_since(facts: dict[str, Any]) -> str:
    kind = facts.get("reference_kind", "base")
    if kind == "base":
        return _retention_level(facts)
    when = "when the last cut was made" if kind == "cut" else "when the run resumed after its halt"
    return (
        f"retention loss {facts['loss']:.3f} is {facts['rise_since']:.1%} above the {facts['reference']:.3f} it "
        f"stood at {when} ({facts['rise']:+.1%} against the base model's {facts['base']:.3f})"
    )


def _retention_base(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    when = "before the first update" if facts["first_step"] == 0 else f"at step {facts['first_step']} (resumed)"
    return f"retention loss {facts['loss']:.3f} {when}: the base later losses are judged against"


def _retention_ok(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"{_retention_level(facts)}, within the cut line ({percent(facts['cut_rise'])} since the last reference)"


def _retention_cut(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    clip_note = f", clipped to min_lr {config.min_lr:.2e}" if facts["clipped_to_min_lr"] else ""
    return (
        f"{_retention_since(facts)} (cut line {percent(facts['cut_rise'])}): the model is forgetting what it knew; "
        f"multiplying the learning rate by {facts['factor']:.3g} ({facts['lr_before']:.2e} -> "
        f"{facts['lr_after']:.2e}{clip_note}), retention cut {facts['cut']} of {facts['max_cuts']}"
    )


def _retention_cut_by_routing(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return f"{_retention_since(facts)}, answered by the routing cut made at this step"


def _retention_no_cut_left(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    why = (
        f"the learning rate is at min_lr {config.min_lr:.2e}"
        if facts["at_min_lr"]
        else f"all {facts['max_cuts']} retention cuts are made"
    )
    limit = (
        f"; halts at {percent(config.retention.halt_rise)} above the base"
        if config.retention.halt_rise is not None
        else ""
    )
    return f"{_retention_since(facts)}, but {why}{limit}"


def _retention_halt(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    return (
        f"{_retention_level(facts)} (halt line {percent(facts['halt_rise'])}) after {facts['cuts_made']} retention "
        f"cut(s) of {facts['max_cuts']}: the model has forgotten too much of what it knew"
    )


def _retention_non_finite(facts: dict[str, Any], config: GuardConfig, step: int) -> str:
    tail = "" if config.halt_on_nonfinite else "; skipped because halt_on_nonfinite is off"
    return f"retention loss at step {step} is not finite ({facts['loss']}){tail}"


_WRITERS: dict[str, Callable[[dict[str, Any], GuardConfig, int], str]] = {
    "replay": _replay,
    "non_finite": _non_finite,
    "non_finite_skipped": _non_finite_skipped,
    "entropy_floor": _entropy_floor,
    "baseline": _baseline,
    "load_ratio": _load_ratio,
    "dead_experts": _dead_experts,
    "balance_drop": _balance_drop,
    "entropy_drop_halt": _entropy_drop_halt,
    "settled": _settled,
    "still_settled": _still_settled,
    "holding": _holding,
    "healthy": _healthy,
    "cooldown": _cooldown,
    "after_last_cut": _after_last_cut,
    "entropy_drop_cut": _cut,
    "retention_base": _retention_base,
    "retention_ok": _retention_ok,
    "retention_cut": _retention_cut,
    "retention_cut_by_routing": _retention_cut_by_routing,
    "retention_cooldown": _retention_cooldown,
    "retention_no_cut_left": _retention_no_cut_left,
    "retention_halt": _retention_halt,
    "retention_non_finite": _retention_non_finite,
}
