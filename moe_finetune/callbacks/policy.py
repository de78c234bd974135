"""GuardPolicy: the routing-health state machine behind EntropyGuard (pure: numbers in, action out).

At every logging step the adapter hands the policy a `RoutingSnapshot` (pooled and per-layer normalised
routing entropy, per-layer expert load shares) and the learning rate a cut would scale; the policy answers
with a `GuardAction`: do nothing, cut the learning rate by a factor, or halt. It knows nothing about
Trainers, optimizers or tensors, so it is tested with lists of numbers and reused by hand-written loops.

One decision, in this order (as Lightning's EarlyStopping does it):

1. non-finite router output                         -> halt
2. absolute thresholds: entropy floor, expert load  -> halt
3. patience: a quarter of a layer's experts dead for `dead_patience` checks -> halt
4. baseline: the first `baseline_steps` snapshots are averaged; nothing relative is judged before that
5. relative thresholds: entropy `halt_drop` / `halt_layer_drop` below baseline -> halt
6. entropy `cut_drop` / `cut_layer_drop` below baseline -> cut the LR (then `cooldown` windows of grace),
   or halt when no cut is left (`max_cuts` used, or the LR already at `min_lr`)

"Drop" is (baseline - value) / baseline. The defaults are DESIGN.md section 5: our own proposals, not
published constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A drop of exactly 10% computed in floats is 0.0999...; a threshold compares with this much slack.
_SLACK = 1e-9


class GuardConfig(BaseModel):
    """The recipe's `guards:` section: when the routing guards cut the learning rate or halt training."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Run the EntropyGuard: cut the learning rate or halt training when routing collapses.",
    )
    monitor: bool = Field(
        True,
        description="Run the RoutingMonitor: log routing metrics at each logging step and write routing.jsonl.",
    )
    baseline_steps: int = Field(
        3,
        ge=1,
        description="Logging steps whose routing entropy (pooled and per layer) is averaged into the baseline, "
        "unless a probe batch sets the baseline before the first step.",
    )
    cut_drop: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="Cut the learning rate when pooled routing entropy falls this fraction below its baseline "
        "(0.10 = 10%).",
    )
    cut_layer_drop: float = Field(
        0.20,
        gt=0,
        lt=1,
        description="Cut the learning rate when any layer's routing entropy falls this fraction below that "
        "layer's own baseline.",
    )
    cut_factor: float = Field(
        0.5, gt=0, lt=1, description="Multiply the learning rate by this factor at each cut."
    )
    cooldown: int = Field(
        2,
        ge=0,
        description="Logging windows after a cut during which no further cut is made (hard halts still apply).",
    )
    max_cuts: int = Field(
        3,
        ge=0,
        description="Most learning-rate cuts in a run; a collapse that continues after the last one halts "
        "training.",
    )
    min_lr: float = Field(
        1e-7,
        ge=0,
        description="The learning rate is never cut below this; a cut that would go lower lands on it, and a "
        "collapse that continues at this learning rate halts training.",
    )
    halt_drop: float = Field(
        0.40,
        gt=0,
        lt=1,
        description="Halt when pooled routing entropy falls this fraction below its baseline.",
    )
    halt_layer_drop: float = Field(
        0.50,
        gt=0,
        lt=1,
        description="Halt when any layer's routing entropy falls this fraction below that layer's own baseline.",
    )
    entropy_floor: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Halt when pooled normalised routing entropy (0..1) falls below this absolute value; "
        "null turns the floor off.",
    )
    max_load_ratio: float = Field(
        3.0,
        gt=1,
        description="Halt when any expert's load share (fraction of top-k assignments) exceeds this multiple "
        "of uniform (1/E).",
    )
    load_baseline_factor: float = Field(
        1.5,
        ge=1,
        description="The load limit of a layer is the larger of max_load_ratio x uniform and this factor x the "
        "layer's largest expert share at the baseline: routing that was already concentrated at the start "
        "(narrow-domain data) is specialisation, not collapse.",
    )
    dead_threshold: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="An expert counts as dead when its load share is below this multiple of uniform (1/E).",
    )
    dead_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Halt when at least this fraction of one layer's experts are dead for dead_patience "
        "consecutive checks.",
    )
    dead_patience: int = Field(
        3,
        ge=1,
        description="Consecutive logging steps a layer's experts must stay dead before training halts.",
    )
    capacity_factor: float = Field(
        1.25,
        gt=0,
        description="Expert capacity as a multiple of the uniform load, used to report routing/drop_fraction "
        "(tokens over capacity); the guard logs it but does not act on it.",
    )
    halt_on_nonfinite: bool = Field(
        True,
        description="Halt on any NaN or infinite router output; when false such a logging step is skipped.",
    )

    @model_validator(mode="after")
    def _halts_are_deeper_than_cuts(self) -> GuardConfig:
        problems = []
        if self.halt_drop <= self.cut_drop:
            problems.append(f"halt_drop ({self.halt_drop}) must be greater than cut_drop ({self.cut_drop})")
        if self.halt_layer_drop <= self.cut_layer_drop:
            problems.append(
                f"halt_layer_drop ({self.halt_layer_drop}) must be greater than "
                f"cut_layer_drop ({self.cut_layer_drop})"
            )
        if problems:
            raise ValueError(
                "; ".join(problems) + ": a halt is the deeper drop, so a cut gets the chance to act first"
            )
        return self


@dataclass(frozen=True)
class RoutingSnapshot:
    """Routing health at one logging step, already reduced across ranks."""

    step: int
    entropy: float  # pooled normalised routing entropy, 0..1 (mean over MoE layers)
    layer_entropy: list[float]  # (L,) normalised routing entropy per MoE layer
    load_share: list[list[float]]  # (L, E) fraction of top-k assignments per expert; rows sum to 1
    finite: bool = True  # False when the router logits themselves held NaN/inf
    layer_names: list[str] | None = None  # (L,) router module names, for the reason sentences

    def __post_init__(self) -> None:
        layers = len(self.layer_entropy)
        if self.load_share and len(self.load_share) != layers:
            raise ValueError(
                f"snapshot at step {self.step}: load_share has {len(self.load_share)} layers but "
                f"layer_entropy has {layers}"
            )
        if self.layer_names is not None and len(self.layer_names) != layers:
            raise ValueError(
                f"snapshot at step {self.step}: layer_names has {len(self.layer_names)} names but "
                f"layer_entropy has {layers} layers"
            )


@dataclass(frozen=True)
class GuardAction:
    """What the adapter should do: nothing, multiply the learning rate by `factor`, or halt training."""

    kind: Literal["none", "cut_lr", "halt"]
    reason: str  # one sentence with the numbers in it, naming the layers at fault
    factor: float = 1.0  # learning-rate multiplier to apply for cut_lr (1.0 otherwise)
    step: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable: the check, layers, values


class GuardPolicy:
    """Decides, one logging step at a time, whether routing collapse calls for an LR cut or a halt.

    State (all in `state_dict()`): the baseline (pooled and per layer) and the samples collected for it,
    cuts made, cooldown windows left, the product of applied cut factors, per-layer dead-expert streaks,
    and the last step judged (a step judged once is never judged again, so a resumed run never cuts twice).
    """

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config if config is not None else GuardConfig()
        self.baseline: float | None = None
        self.layer_baseline: list[float] | None = None
        self.baseline_samples: list[tuple[float, list[float]]] = []
        # Per layer: the largest expert load share at the baseline, and which experts were alive then.
        self.load_baseline: list[float] | None = None
        self.alive_baseline: list[list[bool]] | None = None
        self.load_samples: list[list[list[float]]] = []
        self.cuts_made = 0
        self.cooldown_left = 0
        self._multiplier = 1.0
        self.dead_streaks: list[int] = []
        self.last_step: int | None = None
        self.last_cut_step: int | None = None

    @property
    def multiplier(self) -> float:
        """Product of all cut factors returned so far; the adapter scales the scheduler's LR by it."""
        return self._multiplier

    def set_baseline(
        self, entropy: float, layer_entropy: list[float], load_share: list[list[float]] | None = None
    ) -> None:
        """Set the baseline directly, e.g. from a probe batch measured before the first step."""
        values = [entropy, *layer_entropy]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"baseline entropy must be finite, got pooled {entropy} and layers {layer_entropy}"
            )
        self.baseline = float(entropy)
        self.layer_baseline = [float(v) for v in layer_entropy]
        self.baseline_samples = []
        self._set_load_baseline([load_share] if load_share else [])

    def _set_load_baseline(self, samples: list[list[list[float]]]) -> None:
        """Average the baseline windows' load shares: per layer the largest share and the live experts."""
        if not samples or not samples[0]:
            self.load_baseline, self.alive_baseline = None, None
            return
        layers, experts = len(samples[0]), len(samples[0][0])
        mean = [
            [sum(s[layer][e] for s in samples) / len(samples) for e in range(experts)]
            for layer in range(layers)
        ]
        self.load_baseline = [max(row) for row in mean]
        threshold = self.config.dead_threshold / experts
        self.alive_baseline = [[share >= threshold for share in row] for row in mean]

    def update(self, snapshot: RoutingSnapshot, current_lr: float) -> GuardAction:
        """Judge one logging step. `current_lr` is the learning rate a cut would scale."""
        cfg = self.config
        step = snapshot.step
        if self.last_step is not None and step <= self.last_step:
            return GuardAction(
                "none",
                f"step {step} was already judged (last judged step {self.last_step}), so nothing changes",
                step=step,
                details={"check": "replay"},
            )
        if not math.isfinite(current_lr) or current_lr < 0:
            raise ValueError(f"current_lr must be a finite number >= 0, got {current_lr}")
        if self.layer_baseline is not None and len(snapshot.layer_entropy) != len(self.layer_baseline):
            raise ValueError(
                f"snapshot at step {step} has {len(snapshot.layer_entropy)} layers but the baseline has "
                f"{len(self.layer_baseline)}"
            )
        self.last_step = step
        in_cooldown = self.cooldown_left > 0
        if in_cooldown:
            self.cooldown_left -= 1

        # 1. Non-finite first: nothing else in a NaN snapshot can be trusted.
        bad_fields = _non_finite_fields(snapshot)
        if bad_fields:
            reason = f"router output at step {step} is not finite (NaN or inf in {', '.join(bad_fields)})"
            if cfg.halt_on_nonfinite:
                return GuardAction(
                    "halt", reason, step=step, details={"check": "non_finite", "fields": bad_fields}
                )
            return GuardAction(
                "none",
                reason + "; skipped because halt_on_nonfinite is off",
                step=step,
                details={"check": "non_finite_skipped", "fields": bad_fields},
            )

        # 2. The absolute floor, judged from the first step on (no baseline needed).
        if cfg.entropy_floor is not None and snapshot.entropy < cfg.entropy_floor:
            return GuardAction(
                "halt",
                f"pooled routing entropy {snapshot.entropy:.3f} is below the floor {cfg.entropy_floor:.3f}",
                step=step,
                details={"check": "entropy_floor", "entropy": snapshot.entropy, "floor": cfg.entropy_floor},
            )

        # 3. Baseline: average the first baseline_steps snapshots; judge nothing relative before that.
        #    Load and dead experts are judged against it too: on narrow-domain data a healthy router
        #    already favours a few experts, and only a change from that is collapse.
        if self.baseline is None or self.layer_baseline is None:
            return self._collect_baseline(snapshot)

        # 4. Expert load over its limit; experts alive at the baseline dead for dead_patience checks.
        dead_layers = self._update_dead_streaks(snapshot)  # streaks count every check, so before any return
        overloaded = self._overloaded_experts(snapshot)
        if overloaded:
            return self._halt_on_load(snapshot, overloaded)
        if dead_layers:
            return self._halt_on_dead_experts(snapshot, dead_layers)

        # 5. Relative thresholds: drops deep enough to halt at once.
        halt_phrase, halt_details = self._drop_condition(
            snapshot, cfg.halt_drop, cfg.halt_layer_drop, "halt threshold"
        )
        if halt_phrase:
            return GuardAction(
                "halt", halt_phrase, step=step, details={"check": "entropy_drop_halt", **halt_details}
            )

        # 6. Drops that call for a cut, or a halt when no cut is left.
        cut_phrase, cut_details = self._drop_condition(
            snapshot, cfg.cut_drop, cfg.cut_layer_drop, "cut threshold"
        )
        if not cut_phrase:
            return GuardAction(
                "none",
                f"routing entropy within limits (pooled {snapshot.entropy:.2f}, baseline {self.baseline:.2f})",
                step=step,
                details={"check": "healthy", "pooled_drop": _drop(self.baseline, snapshot.entropy)},
            )
        if in_cooldown:
            return GuardAction(
                "none",
                f"{cut_phrase}, but the guard is cooling down after the cut at step {self.last_cut_step} "
                f"(cooldown window {cfg.cooldown - self.cooldown_left} of {cfg.cooldown})",
                step=step,
                details={"check": "cooldown", "cooldown_left": self.cooldown_left, **cut_details},
            )
        at_min_lr = current_lr <= cfg.min_lr or math.isclose(current_lr, cfg.min_lr, rel_tol=1e-9)
        if self.cuts_made >= cfg.max_cuts or at_min_lr:
            return self._halt_after_last_cut(step, cut_phrase, cut_details, current_lr, at_min_lr)
        return self._cut(step, cut_phrase, cut_details, current_lr)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints (trainer_state.json / a side file)."""
        return {
            "baseline": self.baseline,
            "layer_baseline": None if self.layer_baseline is None else list(self.layer_baseline),
            "baseline_samples": [[pooled, list(layers)] for pooled, layers in self.baseline_samples],
            "cuts_made": self.cuts_made,
            "cooldown_left": self.cooldown_left,
            "multiplier": self._multiplier,
            "dead_streaks": list(self.dead_streaks),
            "last_step": self.last_step,
            "last_cut_step": self.last_cut_step,
            "load_baseline": None if self.load_baseline is None else list(self.load_baseline),
            "alive_baseline": None if self.alive_baseline is None else [list(r) for r in self.alive_baseline],
            "load_samples": [[list(r) for r in sample] for sample in self.load_samples],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned, so a resumed run decides exactly as the original would."""
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"guard state is missing {', '.join(missing)}; was it written by GuardPolicy?")
        self.baseline = state["baseline"]
        self.layer_baseline = None if state["layer_baseline"] is None else list(state["layer_baseline"])
        self.baseline_samples = [(pooled, list(layers)) for pooled, layers in state["baseline_samples"]]
        self.cuts_made = int(state["cuts_made"])
        self.cooldown_left = int(state["cooldown_left"])
        self._multiplier = float(state["multiplier"])
        self.dead_streaks = [int(n) for n in state["dead_streaks"]]
        self.last_step = state["last_step"]
        self.last_cut_step = state["last_cut_step"]
        self.load_baseline = None if state["load_baseline"] is None else list(state["load_baseline"])
        self.alive_baseline = (
            None if state["alive_baseline"] is None else [list(r) for r in state["alive_baseline"]]
        )
        self.load_samples = [[list(r) for r in sample] for sample in state["load_samples"]]

    # ------------------------------------------------------------------ the individual checks

    def _collect_baseline(self, snapshot: RoutingSnapshot) -> GuardAction:
        if self.baseline_samples and len(self.baseline_samples[0][1]) != len(snapshot.layer_entropy):
            raise ValueError(
                f"snapshot at step {snapshot.step} has {len(snapshot.layer_entropy)} layers but earlier "
                f"baseline samples have {len(self.baseline_samples[0][1])}"
            )
        self.baseline_samples.append((float(snapshot.entropy), [float(v) for v in snapshot.layer_entropy]))
        self.load_samples.append([[float(v) for v in row] for row in snapshot.load_share])
        needed = self.config.baseline_steps
        if len(self.baseline_samples) < needed:
            return GuardAction(
                "none",
                f"collecting the routing-entropy baseline ({len(self.baseline_samples)} of {needed} logging steps)",
                step=snapshot.step,
                details={"check": "baseline", "collected": len(self.baseline_samples)},
            )
        pooled = [p for p, _ in self.baseline_samples]
        per_layer = list(zip(*(layers for _, layers in self.baseline_samples), strict=True))
        self.baseline = sum(pooled) / len(pooled)
        self.layer_baseline = [sum(values) / len(values) for values in per_layer]
        self.baseline_samples = []
        self._set_load_baseline(self.load_samples)
        self.load_samples = []
        return GuardAction(
            "none",
            f"routing-entropy baseline set from {needed} logging steps: pooled {self.baseline:.2f}",
            step=snapshot.step,
            details={"check": "baseline", "baseline": self.baseline, "layer_baseline": self.layer_baseline},
        )

    def _drop_condition(
        self, snapshot: RoutingSnapshot, pooled_threshold: float, layer_threshold: float, label: str
    ) -> tuple[str | None, dict[str, Any]]:
        """Phrase ("pooled ... is 14% below ...") and details when a drop threshold is reached, else None."""
        assert self.baseline is not None and self.layer_baseline is not None
        phrases = []
        pooled_drop = _drop(self.baseline, snapshot.entropy)
        pooled_at_fault = pooled_drop >= pooled_threshold - _SLACK
        if pooled_at_fault:
            phrases.append(
                f"pooled routing entropy {snapshot.entropy:.2f} is {pooled_drop:.0%} below its baseline "
                f"{self.baseline:.2f} ({label} {pooled_threshold:.0%})"
            )
        faults = []
        for layer, (value, base) in enumerate(zip(snapshot.layer_entropy, self.layer_baseline, strict=True)):
            layer_drop = _drop(base, value)
            if layer_drop >= layer_threshold - _SLACK:
                faults.append(
                    {
                        "layer": layer,
                        "name": _layer_label(snapshot, layer),
                        "entropy": value,
                        "baseline": base,
                        "drop": layer_drop,
                    }
                )
        if len(faults) == 1:
            fault = faults[0]
            phrases.append(
                f"{fault['name']} routing entropy {fault['entropy']:.2f} is {fault['drop']:.0%} below its "
                f"baseline {fault['baseline']:.2f} ({label} {layer_threshold:.0%})"
            )
        elif faults:
            worst = sorted(faults, key=lambda f: f["drop"], reverse=True)
            listed = ", ".join(
                f"{f['name']} {f['entropy']:.2f} vs {f['baseline']:.2f} ({f['drop']:.0%})" for f in worst[:4]
            )
            more = f" and {len(worst) - 4} more" if len(worst) > 4 else ""
            phrases.append(
                f"routing entropy is at least {layer_threshold:.0%} below baseline ({label}) in {len(faults)} "
                f"layers: {listed}{more}"
            )
        details = {
            "pooled_entropy": snapshot.entropy,
            "pooled_baseline": self.baseline,
            "pooled_drop": pooled_drop,
            "pooled_at_fault": pooled_at_fault,
            "layers": faults,
        }
        return (" and ".join(phrases) if phrases else None), details

    def _overloaded_experts(self, snapshot: RoutingSnapshot) -> list[dict[str, Any]]:
        over = []
        for layer, shares in enumerate(snapshot.load_share):
            if not shares:
                continue
            limit = self.config.max_load_ratio / len(shares)
            if self.load_baseline is not None:
                limit = max(limit, self.config.load_baseline_factor * self.load_baseline[layer])
            for expert, share in enumerate(shares):
                if share > limit:
                    over.append(
                        {
                            "layer": layer,
                            "expert": expert,
                            "share": share,
                            "ratio": share * len(shares),
                            "limit_ratio": limit * len(shares),
                        }
                    )
        return over

    def _halt_on_load(self, snapshot: RoutingSnapshot, overloaded: list[dict[str, Any]]) -> GuardAction:
        worst = max(overloaded, key=lambda o: o["ratio"])
        name = _layer_label(snapshot, worst["layer"])
        more = f" ({len(overloaded) - 1} more expert(s) over the limit)" if len(overloaded) > 1 else ""
        reason = (
            f"expert {worst['expert']} in {name} receives {worst['share']:.0%} of top-k assignments, "
            f"{worst['ratio']:.1f}x uniform (limit {worst['limit_ratio']:.2g}x: the larger of "
            f"{self.config.max_load_ratio:g}x and {self.config.load_baseline_factor:g}x the layer's largest share at "
            f"the baseline){more}"
        )
        for entry in overloaded:
            entry["name"] = _layer_label(snapshot, entry["layer"])
        return GuardAction(
            "halt",
            reason,
            step=snapshot.step,
            details={"check": "load_ratio", "limit": self.config.max_load_ratio, "experts": overloaded},
        )

    def _update_dead_streaks(self, snapshot: RoutingSnapshot) -> list[dict[str, Any]]:
        """Count consecutive checks per layer with too many dead experts; return the layers out of patience."""
        cfg = self.config
        if len(self.dead_streaks) != len(snapshot.load_share):
            self.dead_streaks = [0] * len(snapshot.load_share)
        out_of_patience = []
        for layer, shares in enumerate(snapshot.load_share):
            if not shares:
                self.dead_streaks[layer] = 0
                continue
            alive = self.alive_baseline[layer] if self.alive_baseline is not None else [True] * len(shares)
            dead = [
                e for e, share in enumerate(shares) if alive[e] and share < cfg.dead_threshold / len(shares)
            ]
            if dead and len(dead) / len(shares) >= cfg.dead_fraction - _SLACK:
                self.dead_streaks[layer] += 1
            else:
                self.dead_streaks[layer] = 0
            if self.dead_streaks[layer] >= cfg.dead_patience:
                out_of_patience.append(
                    {
                        "layer": layer,
                        "name": _layer_label(snapshot, layer),
                        "dead_experts": dead,
                        "experts": len(shares),
                        "streak": self.dead_streaks[layer],
                    }
                )
        return out_of_patience

    def _halt_on_dead_experts(
        self, snapshot: RoutingSnapshot, dead_layers: list[dict[str, Any]]
    ) -> GuardAction:
        cfg = self.config
        worst = max(dead_layers, key=lambda d: len(d["dead_experts"]) / d["experts"])
        more = f" ({len(dead_layers) - 1} more layer(s) likewise)" if len(dead_layers) > 1 else ""
        reason = (
            f"{worst['name']} has had {len(worst['dead_experts'])} of {worst['experts']} experts (alive at the "
            "baseline) dead "
            f"(load share below {cfg.dead_threshold:g}x uniform) for {worst['streak']} consecutive checks "
            f"(limit {cfg.dead_fraction:.0%} of a layer's experts for {cfg.dead_patience} checks){more}"
        )
        return GuardAction(
            "halt", reason, step=snapshot.step, details={"check": "dead_experts", "layers": dead_layers}
        )

    def _halt_after_last_cut(
        self, step: int, phrase: str, details: dict[str, Any], current_lr: float, at_min_lr: bool
    ) -> GuardAction:
        cfg = self.config
        if self.cuts_made >= cfg.max_cuts and self.cuts_made > 0:
            reason = (
                f"{phrase} even after the last allowed cut "
                f"({self.cuts_made} of {cfg.max_cuts}, at step {self.last_cut_step})"
            )
        elif self.cuts_made >= cfg.max_cuts:
            reason = f"{phrase}; no last cut can be tried because cuts are off (max_cuts 0)"
        else:
            since = (
                f"last cut at step {self.last_cut_step}" if self.last_cut_step is not None else "no cut yet"
            )
            reason = (
                f"{phrase}; the learning rate {current_lr:.2e} is already at min_lr {cfg.min_lr:.2e}, "
                f"so no further cut can help ({since})"
            )
        return GuardAction(
            "halt",
            reason,
            step=step,
            details={
                "check": "after_last_cut",
                "cuts_made": self.cuts_made,
                "max_cuts": cfg.max_cuts,
                "last_cut_step": self.last_cut_step,
                "at_min_lr": at_min_lr,
                **details,
            },
        )

    def _cut(self, step: int, phrase: str, details: dict[str, Any], current_lr: float) -> GuardAction:
        cfg = self.config
        factor = cfg.cut_factor
        clipped = current_lr * factor < cfg.min_lr
        if clipped:
            factor = cfg.min_lr / current_lr  # land exactly on min_lr, never below it
        new_lr = current_lr * factor
        self.cuts_made += 1
        self.cooldown_left = cfg.cooldown
        self._multiplier *= factor
        self.last_cut_step = step
        clip_note = f", clipped to min_lr {cfg.min_lr:.2e}" if clipped else ""
        return GuardAction(
            "cut_lr",
            f"{phrase}; multiplying the learning rate by {factor:.3g} ({current_lr:.2e} -> {new_lr:.2e}"
            f"{clip_note}), cut {self.cuts_made} of {cfg.max_cuts}",
            factor=factor,
            step=step,
            details={
                "check": "entropy_drop_cut",
                "lr_before": current_lr,
                "lr_after": new_lr,
                "clipped_to_min_lr": clipped,
                "cut": self.cuts_made,
                "max_cuts": cfg.max_cuts,
                **details,
            },
        )


def _drop(baseline: float, value: float) -> float:
    """Fraction below baseline: (baseline - value) / baseline; 0 when the baseline is not positive."""
    if baseline <= 0:
        return 0.0
    return (baseline - value) / baseline


def _layer_label(snapshot: RoutingSnapshot, layer: int) -> str:
    if snapshot.layer_names is not None:
        return f"layer {snapshot.layer_names[layer]}"
    return f"layer {layer}"


def _non_finite_fields(snapshot: RoutingSnapshot) -> list[str]:
    """Names of the snapshot's fields holding NaN/inf (a comparison with NaN is silently False)."""
    bad = []
    if not snapshot.finite:
        bad.append("router logits")
    if not math.isfinite(snapshot.entropy):
        bad.append("pooled entropy")
    bad_layers = [
        _layer_label(snapshot, i) for i, v in enumerate(snapshot.layer_entropy) if not math.isfinite(v)
    ]
    if bad_layers:
        bad.append("entropy of " + ", ".join(bad_layers))
    bad_loads = [
        _layer_label(snapshot, i)
        for i, shares in enumerate(snapshot.load_share)
        if not all(math.isfinite(s) for s in shares)
    ]
    if bad_loads:
        bad.append("load share of " + ", ".join(bad_loads))
    return bad
