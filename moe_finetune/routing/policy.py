"""GuardPolicy: the routing-health state machine behind EntropyGuard (pure: numbers in, action out).

At every logging step the adapter hands the policy a `RoutingSnapshot` (pooled and per-layer normalised
routing entropy, per-layer expert load shares) and the learning rate a cut would scale; the policy answers
with a `GuardAction`: do nothing, cut the learning rate by a factor, or halt. It knows nothing about
Trainers, optimizers or tensors (no torch, no transformers: a test imports it with both blocked), so it is
tested with lists of numbers and reused by hand-written loops.

Shaped like Lightning's EarlyStopping: a small `GuardState` dataclass (whose `state_dict` is derived from
its fields, so nothing is listed twice), one `decide` whose checks return `Finding`s (facts: which check,
with which numbers), and one place, `routing/reasons.py`, that turns a finding into the sentence a user
reads. The checks, in order:

1. non-finite router output                         -> halt
2. absolute threshold: entropy floor                -> halt
3. baseline: routing before the first update, given by the adapter (`set_baseline`: the probe batch
   routed at train begin, or a routing profile); without one, the first `baseline_steps` snapshots are
   averaged, and nothing relative is judged before that
4. collapse of the load: an expert over its load limit, a quarter of a layer's experts dead for
   `dead_patience` checks, or a layer's balance `halt_balance_drop` below its baseline -> halt
5. level limits: routing entropy `halt_drop` / `halt_layer_drop` below baseline -> halt
6. a sharp drop: routing entropy fell `cut_drop` (pooled) or `cut_layer_drop` (a layer), or a layer's
   balance fell `cut_balance_drop`, within the last `cut_window` logging steps (and since the last cut),
   and sits that far below its baseline -> cut the LR, then `cooldown` windows of grace
7. after the last cut (`max_cuts` used, or the LR at `min_lr`), entropy still below the cut line:
   it "continues" when it falls `continue_drop` further below where it stood at the last cut -> halt;
   otherwise the run has settled below its baseline -> one `settled` event, and it runs on

A relative fall of routing entropy (checks 5-7) is judged only where the baseline (pooled, or the layer's)
is at least `min_baseline_entropy`: a router near-deterministic at the start moves by half of its entropy
on a wobble. One cooldown serves every cut of the guard (routing's and retention's): in its windows
neither check cuts and the "continues" halt waits; the halts of checks 1, 2, 4 and 5 and retention's
`halt_rise` apply throughout.

and, apart from routing, the retention check (`retention`, when `guards.retention.data` names rows the
model should keep knowing; the adapter measures their loss, the policy judges it):

8. the retention loss before the first update is the base; a loss `retention.halt_rise` above it -> halt;
   one `retention.cut_rise` above its reference -> cut the LR (its own budget, `retention.max_cuts`; at most
   one cut per logging step, whichever check makes it). The reference is where the loss stood before the
   first update, or at the last cut that answered a rise: a retention cut, or a routing cut made at the step
   a rise was seen (else one rise would cost two cuts, the routing one and a retention one after cooldown)

Two entropies, because sharpening is not collapse (README, "What the guards do"): *routing entropy*
(`routing/entropy`, the mean per-token entropy of the router's distribution) falls when routers get
confident, which healthy specialisation also does; *balance* (`routing/balance`, the entropy of a
layer's load share) falls when the load concentrates on few experts, which is collapse. A sharp drop
of either cuts the learning rate, as the field advises; collapse of the load (balance far below its
baseline, an expert over its limit, dead experts) halts, and routing entropy halts only at an extreme
level or when it goes on falling after the last cut.

"Drop" is (reference - value) / reference. The defaults are DESIGN.md section 5: our own proposals,
not published constants.

Why one file of ~550 lines: it is one state machine, and its checks are meant to be read in the
order `decide` runs them; its inputs, state and outputs live in guard_state.py, its sentences in reasons.py.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from moe_finetune.routing import reasons
from moe_finetune.routing.guard_state import (
    Finding,
    GuardAction,
    GuardState,
    RoutingSnapshot,
    share_balance,
)
from moe_finetune.sections import GuardConfig

__all__ = [
    "HEALTHY_CHECKS",
    "Finding",
    "GuardAction",
    "GuardPolicy",
    "GuardState",
    "RoutingSnapshot",
    "load_limit_problem",
]

# A drop of exactly 10% computed in floats is 0.0999...; a threshold compares with this much slack.
_SLACK = 1e-9

# The checks whose answer means "this logging window was healthy": above every cut line (or, with no
# baseline measured before the first update, one of the windows the baseline is averaged from). A
# checkpoint saved inside such a window is one the guard may keep as healthy (guard_state.HealthyCheckpoints).
HEALTHY_CHECKS = frozenset({"healthy", "baseline"})

# What a new episode (a halt the user resumed from) keeps of the state: what the run is judged against (the
# baseline of its start, or the windows collected for it; the base model's retention loss) and the bookkeeping
# that must not run twice (the last judged steps, the cuts already in the learning rate).
_KEPT_BY_A_NEW_EPISODE = (
    "baseline",
    "layer_baseline",
    "baseline_samples",
    "load_samples",
    "baseline_top_share",
    "alive_at_baseline",
    "layer_balance_baseline",
    "balance_samples",
    "last_step",
    "window_step",
    "multiplier",
    "retention_base",
    "retention_last_step",
    "retention_fingerprint",
)


class GuardPolicy:
    """Decides, one logging step at a time, whether routing collapse calls for an LR cut or a halt."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config if config is not None else GuardConfig()
        self.state = GuardState()

    # ------------------------------------------------------------------ read-only views of the state

    @property
    def multiplier(self) -> float:
        """Product of all cut factors returned so far; the adapter scales the scheduler's LR by it."""
        return self.state.multiplier

    @property
    def cuts_made(self) -> int:
        return self.state.cuts_made

    @property
    def baseline(self) -> float | None:
        return self.state.baseline

    @property
    def layer_baseline(self) -> list[float] | None:
        return self.state.layer_baseline

    @property
    def last_step(self) -> int | None:
        return self.state.last_step

    @property
    def last_cut_step(self) -> int | None:
        return self.state.last_cut_step

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned, so a resumed run decides exactly as the original would."""
        self.state = GuardState.from_state_dict(state)

    def restart_episode(self) -> None:
        """A fresh episode after a halt the user resumed from: the cut budgets, the cooldown, the dead
        streaks and what the last cut left (its level, `settled`) start over; what the run is judged
        against does not.

        The baseline stays the routing of the run's start (entropy, balance, load, the experts alive then),
        as the base model's retention loss stays the retention base: re-measured on the halted model it
        would absolve the collapse (a load limit 1.5x a collapsed share is at or above 1/k and can never
        fire; experts already dead leave the dead count). So a limit the halted routing is still past
        halts the resumed run again. The sharp-drop reference starts at the resumed run's first window (a
        level reached before the halt is not a sharp drop), the last judged step stays (no step is judged
        twice), and so does the multiplier: the cuts already made are in the rate the run resumes with.
        """
        old = self.state
        kept = {name: copy.deepcopy(getattr(old, name)) for name in _KEPT_BY_A_NEW_EPISODE}
        self.state = GuardState(
            **kept,
            reseed_reference=old.baseline is not None,
            retention_reference_kind="resume",  # the retention reference starts over at the first check
        )

    def reset_retention(self) -> None:
        """Forget the retention base (other rows than those it was measured on): the next loss is the base."""
        defaults = GuardState()
        for name in ("retention_base", "retention_reference", "retention_cuts", "retention_last_step",
                     "retention_fingerprint", "retention_reference_kind"):
            setattr(self.state, name, getattr(defaults, name))

    # ------------------------------------------------------------------ the decision

    def set_baseline(
        self,
        entropy: float,
        layer_entropy: list[float],
        load_share: list[list[float]] | None = None,
        dead_threshold: float = 0.1,
    ) -> None:
        """Set the baseline directly, e.g. from a probe batch measured before the first step."""
        values = [entropy, *layer_entropy]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"baseline entropy must be finite, got pooled {entropy} and layers {layer_entropy}"
            )
        self.state.baseline = float(entropy)
        self.state.layer_baseline = [float(v) for v in layer_entropy]
        self.state.baseline_samples = []
        self._set_load_baseline([load_share] if load_share else [], dead_threshold)
        self.state.layer_balance_baseline = [share_balance(row) for row in load_share] if load_share else None
        self.state.recent = [self._baseline_entry()]

    def update(self, snapshot: RoutingSnapshot, current_lr: float) -> GuardAction:
        """Judge one logging step. `current_lr` is the learning rate a cut would scale."""
        finding = self.decide(snapshot, current_lr)
        return GuardAction(
            finding.kind,
            reasons.describe(finding.facts, self.config, snapshot.step),
            factor=finding.factor,
            step=snapshot.step,
            # facts whose name starts with "_" only serve the sentence
            details={key: value for key, value in finding.facts.items() if not key.startswith("_")},
        )

    def decide(self, snapshot: RoutingSnapshot, current_lr: float) -> Finding:
        """Run the checks in order (module docstring) and return the first one that has something to say."""
        cfg, state, step = self.config, self.state, snapshot.step
        if state.last_step is not None and step <= state.last_step:
            return Finding("none", {"check": "replay", "_last_step": state.last_step})
        if not math.isfinite(current_lr) or current_lr < 0:
            raise ValueError(f"current_lr must be a finite number >= 0, got {current_lr}")
        if state.layer_baseline is not None and len(snapshot.layer_entropy) != len(state.layer_baseline):
            raise ValueError(
                f"snapshot at step {step} has {len(snapshot.layer_entropy)} layers but the baseline has "
                f"{len(state.layer_baseline)}"
            )
        state.last_step = step
        in_cooldown = self._enter_window(step)

        # 1. Non-finite first: nothing else in a NaN snapshot can be trusted.
        bad_fields = _non_finite_fields(snapshot)
        if bad_fields:
            facts = {"fields": bad_fields}
            if cfg.halt_on_nonfinite:
                return Finding("halt", {"check": "non_finite", **facts})
            return Finding("none", {"check": "non_finite_skipped", **facts})

        # 2. The absolute floor, judged from the first step on (no baseline needed).
        if cfg.entropy_floor is not None and snapshot.entropy < cfg.entropy_floor:
            return Finding(
                "halt", {"check": "entropy_floor", "entropy": snapshot.entropy, "floor": cfg.entropy_floor}
            )

        # 3. Baseline: set before the first update (set_baseline), or else the first baseline_steps
        #    snapshots averaged, judging nothing relative before that. Load and dead experts are judged against it too: on narrow-domain data a healthy router
        #    already favours a few experts, and only a change from that is collapse.
        if state.baseline is None or state.layer_baseline is None:
            return self._collect_baseline(snapshot)

        # 4. Collapse of the load: an expert over its limit, experts alive at the baseline dead for
        #    dead_patience checks, or a layer's balance (load-share entropy) far below its baseline.
        dead_layers = self._update_dead_streaks(snapshot)  # streaks count every check, so before any return
        overloaded = self._overloaded_experts(snapshot)
        if overloaded:
            return Finding("halt", {"check": "load_ratio", "limit": cfg.max_load_ratio, "experts": overloaded})
        if dead_layers:
            return Finding("halt", {"check": "dead_experts", "layers": dead_layers})
        unbalanced = self._unbalanced_layers(snapshot)
        if unbalanced:
            return Finding(
                "halt", {"check": "balance_drop", "threshold": cfg.halt_balance_drop, "layers": unbalanced}
            )

        # 5. Level limits: routing entropy so far below its baseline that training halts at once.
        halt_drop = self._drop(snapshot, cfg.halt_drop, cfg.halt_layer_drop, "halt threshold")
        if halt_drop["at_fault"]:
            return Finding("halt", {"check": "entropy_drop_halt", **halt_drop})

        # A checkpoint from before the sharp-drop reference existed: this step is the reference from
        # now on (a level reached before the resume is not a sharp drop), and the balance baseline.
        if state.reseed_reference:
            self._reseed_reference(snapshot)

        # 6./7. Below the cut line: a sharp fall cuts; after the last cut, a further fall halts.
        below = self._drop(snapshot, cfg.cut_drop, cfg.cut_layer_drop, "cut threshold")
        below["balance_layers"] = self._balance_below(snapshot, cfg.cut_balance_drop)
        below["balance_threshold"] = cfg.cut_balance_drop
        below["at_fault"] = below["at_fault"] or bool(below["balance_layers"])
        sharp = self._sharp_fall(snapshot, below)
        self._remember(snapshot)
        if not below["at_fault"]:
            return Finding(
                "none",
                {
                    "check": "healthy",
                    "entropy": snapshot.entropy,
                    "baseline": state.baseline,
                    "pooled_drop": below["pooled_drop"],
                },
            )
        if in_cooldown:
            return Finding(
                "none",
                {
                    "check": "cooldown",
                    "cooldown_left": state.cooldown_left,
                    "last_cut_step": state.last_cut_step,
                    "cooldown_cut_step": state.cooldown_cut_step,
                    "cooldown_cut_by": state.cooldown_cut_by,
                    **below,
                },
            )
        at_min_lr = current_lr <= cfg.min_lr or math.isclose(current_lr, cfg.min_lr, rel_tol=1e-9)
        if state.cuts_made >= cfg.max_cuts or at_min_lr:
            last_cut = {
                "cuts_made": state.cuts_made,
                "max_cuts": cfg.max_cuts,
                "last_cut_step": state.last_cut_step,
                "at_min_lr": at_min_lr,
                "current_lr": current_lr,
            }
            # With no cut ever made (cuts off, or the LR at min_lr from the start), a sharp fall is
            # what a cut would have answered: nothing is left to answer it with.
            continues = sharp if state.level_at_last_cut is None else self._continues(snapshot, below)
            if continues["at_fault"]:
                return Finding("halt", {"check": "after_last_cut", **last_cut, **continues})
            if state.settled_step is None:
                state.settled_step = step
                return Finding("settled", {"check": "settled", **last_cut, **below})
            return Finding("none", {"check": "still_settled", "settled_step": state.settled_step, **below})
        if sharp["at_fault"]:
            return self._cut(step, sharp, current_lr, snapshot)
        return Finding("none", {"check": "holding", **below})

    # ------------------------------------------------------------------ the individual checks

    def _enter_window(self, step: int) -> bool:
        """Whether the logging window ending at `step` is one of a cooldown's, counting it once: the routing
        checks and the retention check of one window read the same answer (the routing checks run first)."""
        state = self.state
        if state.window_step is None or step > state.window_step:
            state.window_step = step
            state.window_in_cooldown = state.cooldown_left > 0
            if state.window_in_cooldown:
                state.cooldown_left -= 1
        return state.window_in_cooldown

    def _start_cooldown(self, step: int, by: str) -> None:
        state = self.state
        state.cooldown_left = self.config.cooldown
        state.cooldown_cut_step, state.cooldown_cut_by = step, by

    def _collect_baseline(self, snapshot: RoutingSnapshot) -> Finding:
        state = self.state
        if state.baseline_samples and len(state.baseline_samples[0][1]) != len(snapshot.layer_entropy):
            raise ValueError(
                f"snapshot at step {snapshot.step} has {len(snapshot.layer_entropy)} layers but earlier "
                f"baseline samples have {len(state.baseline_samples[0][1])}"
            )
        state.baseline_samples.append([float(snapshot.entropy), [float(v) for v in snapshot.layer_entropy]])
        state.load_samples.append([[float(v) for v in row] for row in snapshot.load_share])
        if snapshot.layer_balance is not None:
            state.balance_samples.append([float(v) for v in snapshot.layer_balance])
        needed = self.config.baseline_steps
        if len(state.baseline_samples) < needed:
            return Finding("none", {"check": "baseline", "collected": len(state.baseline_samples), "needed": needed})
        pooled = [p for p, _ in state.baseline_samples]
        per_layer = list(zip(*(layers for _, layers in state.baseline_samples), strict=True))
        state.baseline = sum(pooled) / len(pooled)
        state.layer_baseline = [sum(values) / len(values) for values in per_layer]
        state.baseline_samples = []
        self._set_load_baseline(state.load_samples, snapshot.dead_threshold)
        state.load_samples = []
        if state.balance_samples and len(state.balance_samples) == len(pooled):
            columns = list(zip(*state.balance_samples, strict=True))
            state.layer_balance_baseline = [sum(c) / len(c) for c in columns]
        state.balance_samples = []
        state.recent = [self._baseline_entry()]
        return Finding(
            "none",
            {
                "check": "baseline",
                "needed": needed,
                "baseline": state.baseline,
                "layer_baseline": state.layer_baseline,
                "unreachable_load_layers": self._unreachable_load_layers(snapshot),
            },
        )

    def _unreachable_load_layers(self, snapshot: RoutingSnapshot) -> list[dict[str, Any]]:
        """Layers whose load limit (raised by a concentrated baseline) is at or above 1/k: it can never fire."""
        top_share = self.state.baseline_top_share
        if snapshot.top_k is None or top_share is None:
            return []
        ceiling = 1.0 / snapshot.top_k
        unreachable = []
        for layer, (shares, share) in enumerate(zip(snapshot.load_share, top_share, strict=True)):
            limit = max(self.config.max_load_ratio / len(shares), self.config.load_baseline_factor * share)
            if limit >= ceiling - _SLACK:
                unreachable.append(
                    {"layer": layer, "name": snapshot.layer_label(layer), "top_share": share, "limit": limit}
                )
        return unreachable

    def _set_load_baseline(self, samples: list[list[list[float]]], dead_threshold: float) -> None:
        """Average the baseline windows' load shares: per layer the largest share and the live experts."""
        state = self.state
        if not samples or not samples[0]:
            state.baseline_top_share, state.alive_at_baseline = None, None
            return
        layers, experts = len(samples[0]), len(samples[0][0])
        mean = [
            [sum(s[layer][e] for s in samples) / len(samples) for e in range(experts)]
            for layer in range(layers)
        ]
        state.baseline_top_share = [max(row) for row in mean]
        state.alive_at_baseline = [[share >= dead_threshold / experts for share in row] for row in mean]

    def _drop(
        self, snapshot: RoutingSnapshot, pooled_threshold: float, layer_threshold: float, label: str
    ) -> dict[str, Any]:
        """The facts of a drop check: how far pooled and each layer fell below baseline, and who is at fault."""
        state, floor = self.state, self.config.min_baseline_entropy
        assert state.baseline is not None and state.layer_baseline is not None
        pooled_drop = _fraction_below(state.baseline, snapshot.entropy)
        # below the floor a relative fall is a wobble of a near-deterministic router, not a drop
        pooled_at_fault = pooled_drop >= pooled_threshold - _SLACK and state.baseline >= floor
        faults = []
        for layer, (value, base) in enumerate(zip(snapshot.layer_entropy, state.layer_baseline, strict=True)):
            layer_drop = _fraction_below(base, value)
            if layer_drop >= layer_threshold - _SLACK and base >= floor:
                faults.append(
                    {
                        "layer": layer,
                        "name": snapshot.layer_label(layer),
                        "entropy": value,
                        "baseline": base,
                        "drop": layer_drop,
                    }
                )
        return {
            "label": label,
            "pooled_threshold": pooled_threshold,
            "layer_threshold": layer_threshold,
            "pooled_entropy": snapshot.entropy,
            "pooled_baseline": state.baseline,
            "pooled_drop": pooled_drop,
            "pooled_at_fault": pooled_at_fault,
            "layers": faults,
            "at_fault": pooled_at_fault or bool(faults),
        }

    def _overloaded_experts(self, snapshot: RoutingSnapshot) -> list[dict[str, Any]]:
        over = []
        for layer, shares in enumerate(snapshot.load_share):
            if not shares:
                continue
            limit = self.config.max_load_ratio / len(shares)
            if self.state.baseline_top_share is not None:
                limit = max(limit, self.config.load_baseline_factor * self.state.baseline_top_share[layer])
            for expert, share in enumerate(shares):
                if share > limit:
                    over.append(
                        {
                            "layer": layer,
                            "name": snapshot.layer_label(layer),
                            "expert": expert,
                            "share": share,
                            "ratio": share * len(shares),
                            "limit_ratio": limit * len(shares),
                        }
                    )
        return over

    def _update_dead_streaks(self, snapshot: RoutingSnapshot) -> list[dict[str, Any]]:
        """Count consecutive checks per layer with too many dead experts; return the layers out of patience."""
        cfg, state = self.config, self.state
        if len(state.dead_streaks) != len(snapshot.load_share):
            state.dead_streaks = [0] * len(snapshot.load_share)
        out_of_patience = []
        for layer, shares in enumerate(snapshot.load_share):
            if not shares:
                state.dead_streaks[layer] = 0
                continue
            alive = state.alive_at_baseline[layer] if state.alive_at_baseline is not None else [True] * len(shares)
            alive_count = sum(alive)  # the fraction counts the experts alive at the baseline, not all of them
            line = snapshot.dead_threshold / len(shares)
            dead = [e for e, share in enumerate(shares) if alive[e] and share < line]
            if dead and len(dead) / alive_count >= cfg.dead_fraction - _SLACK:
                state.dead_streaks[layer] += 1
            else:
                state.dead_streaks[layer] = 0
            if state.dead_streaks[layer] >= cfg.dead_patience:
                out_of_patience.append(
                    {
                        "layer": layer,
                        "name": snapshot.layer_label(layer),
                        "dead_experts": dead,
                        "experts": len(shares),
                        "alive_at_baseline": alive_count,
                        "streak": state.dead_streaks[layer],
                        "dead_threshold": snapshot.dead_threshold,
                    }
                )
        return out_of_patience

    def _reseed_reference(self, snapshot: RoutingSnapshot) -> None:
        state = self.state
        state.recent = [_entropies(snapshot)]
        if state.cuts_made > 0 and state.level_at_last_cut is None:
            state.level_at_last_cut = _entropies(snapshot)
        if state.layer_balance_baseline is None and snapshot.layer_balance is not None:
            state.layer_balance_baseline = [float(v) for v in snapshot.layer_balance]
        state.reseed_reference = False

    def _baseline_entry(self) -> list[Any]:
        state = self.state
        balance = None if state.layer_balance_baseline is None else list(state.layer_balance_baseline)
        return [state.baseline, list(state.layer_baseline or []), balance]

    def _remember(self, snapshot: RoutingSnapshot) -> None:
        """Keep this step's entropies as a reference for the next `cut_window` steps (since the last cut)."""
        recent = self.state.recent
        recent.append(_entropies(snapshot))
        del recent[: max(0, len(recent) - self.config.cut_window)]

    def _sharp_fall(self, snapshot: RoutingSnapshot, below: dict[str, Any]) -> dict[str, Any]:
        """Of what is below the cut line, what also fell that far within the recent windows.

        The reference is the highest value of the last `cut_window` logging steps since the last cut
        (the baseline before any): a drop that happened long ago, or before a resume, is a level, not
        a sharp drop, and does not cut again. Routing entropy and balance are both watched: either
        dropping sharply is the field's cue to lower the learning rate.
        """
        cfg, state = self.config, self.state
        history = state.recent or [self._baseline_entry()]
        pooled_ref = max(float(entry[0]) for entry in history)
        pooled_fall = _fraction_below(pooled_ref, snapshot.entropy)
        layers = []
        for fault in below["layers"]:
            reference = max(float(entry[1][fault["layer"]]) for entry in history)
            fall = _fraction_below(reference, fault["entropy"])
            if fall >= cfg.cut_layer_drop - _SLACK:
                layers.append({**fault, "reference": reference, "fall": fall})
        balance_layers = []
        for fault in below["balance_layers"]:
            known = [float(entry[2][fault["layer"]]) for entry in history if len(entry) > 2 and entry[2] is not None]
            reference = max(known, default=fault["baseline"])
            fall = _fraction_below(reference, fault["balance"])
            if fall >= cfg.cut_balance_drop - _SLACK:
                balance_layers.append({**fault, "reference": reference, "fall": fall})
        pooled_at_fault = below["pooled_at_fault"] and pooled_fall >= cfg.cut_drop - _SLACK
        return {
            **below,
            "pooled_reference": pooled_ref,
            "pooled_fall": pooled_fall,
            "pooled_at_fault": pooled_at_fault,
            "window": len(history),
            "layers": layers,
            "balance_layers": balance_layers,
            "at_fault": pooled_at_fault or bool(layers) or bool(balance_layers),
        }

    def _continues(self, snapshot: RoutingSnapshot, below: dict[str, Any]) -> dict[str, Any]:
        """Of what is below the cut line, what fell `continue_drop` further than where it stood at the last cut."""
        cfg, state = self.config, self.state
        assert state.level_at_last_cut is not None
        pooled_level, layer_levels = state.level_at_last_cut[0], state.level_at_last_cut[1]
        margin = cfg.continue_drop - _SLACK
        pooled_fall = _fraction_below(float(pooled_level), snapshot.entropy)
        layers = [
            {**fault, "level_at_cut": layer_levels[fault["layer"]], "further": further}
            for fault in below["layers"]
            if (further := _fraction_below(float(layer_levels[fault["layer"]]), fault["entropy"])) >= margin
        ]
        pooled_at_fault = below["pooled_at_fault"] and pooled_fall >= margin
        return {
            **below,
            "balance_layers": [],  # a balance that goes on falling meets its own halt level
            "continue_drop": cfg.continue_drop,
            "pooled_level_at_cut": pooled_level,
            "pooled_further": pooled_fall,
            "pooled_at_fault": pooled_at_fault,
            "layers": layers,
            "at_fault": pooled_at_fault or bool(layers),
        }

    def _balance_below(self, snapshot: RoutingSnapshot, threshold: float) -> list[dict[str, Any]]:
        """Layers whose balance (load-share entropy) is `threshold` or more below its baseline."""
        base = self.state.layer_balance_baseline
        if base is None or snapshot.layer_balance is None:
            return []
        faults = []
        for layer, (value, reference) in enumerate(zip(snapshot.layer_balance, base, strict=True)):
            drop = _fraction_below(reference, value)
            if drop >= threshold - _SLACK:
                faults.append(
                    {"layer": layer, "name": snapshot.layer_label(layer), "balance": value, "baseline": reference, "drop": drop}
                )
        return faults

    def _unbalanced_layers(self, snapshot: RoutingSnapshot) -> list[dict[str, Any]]:
        """Layers whose balance (load-share entropy) fell `halt_balance_drop` below its baseline."""
        return self._balance_below(snapshot, self.config.halt_balance_drop)

    # ------------------------------------------------------------------ the retention check

    def retention(self, step: int, loss: float, current_lr: float, *, cut_this_step: bool = False) -> GuardAction:
        """Judge the retention loss measured at `step`. `cut_this_step`: the routing checks already cut the
        learning rate at this step, which answers a rise too (one cut per logging step)."""
        finding = self.decide_retention(step, loss, current_lr, cut_this_step=cut_this_step)
        return GuardAction(
            finding.kind,
            reasons.describe(finding.facts, self.config, step),
            factor=finding.factor,
            step=step,
            details={key: value for key, value in finding.facts.items() if not key.startswith("_")},
        )

    def decide_retention(self, step: int, loss: float, current_lr: float, *, cut_this_step: bool = False) -> Finding:
        """Check 8 (module docstring): the first measurement is the base; then halt at `halt_rise` above it,
        cut at `cut_rise` above the last reference, unless a cut of either check is cooling down. Forgetting
        does not heal by itself at a lower learning rate, so the reference moves to the level of each cut
        that answered a rise: every further `cut_rise` costs one more cut."""
        cfg, state = self.config.retention, self.state
        if not math.isfinite(current_lr) or current_lr < 0:
            raise ValueError(f"current_lr must be a finite number >= 0, got {current_lr}")
        if state.retention_last_step is not None and step <= state.retention_last_step:
            return Finding("none", {"check": "replay", "_last_step": state.retention_last_step})
        state.retention_last_step = step
        in_cooldown = self._enter_window(step)
        if not math.isfinite(loss):
            facts = {"check": "retention_non_finite", "loss": loss}
            return Finding("halt" if self.config.halt_on_nonfinite else "none", facts)
        if loss <= 0:
            raise ValueError(f"retention loss must be > 0 (a mean cross-entropy), got {loss} at step {step}")
        if state.retention_base is None:
            state.retention_base = state.retention_reference = float(loss)
            return Finding("none", {"check": "retention_base", "loss": loss, "first_step": step})
        if state.retention_reference is None:  # a fresh episode after a resumed halt: measured from here
            state.retention_reference = float(loss)
        base, reference = state.retention_base, state.retention_reference
        facts: dict[str, Any] = {
            "loss": loss,
            "base": base,
            "rise": loss / base - 1,
            "reference": reference,
            "rise_since": loss / reference - 1,
            "reference_kind": state.retention_reference_kind,
            "cuts_made": state.retention_cuts,
            "max_cuts": cfg.max_cuts,
        }
        if cfg.halt_rise is not None and facts["rise"] >= cfg.halt_rise - _SLACK:
            return Finding("halt", {"check": "retention_halt", "halt_rise": cfg.halt_rise, **facts})
        if facts["rise_since"] < cfg.cut_rise - _SLACK:
            return Finding("none", {"check": "retention_ok", "cut_rise": cfg.cut_rise, **facts})
        if cut_this_step:
            state.retention_reference = float(loss)  # the routing cut answers this rise too
            state.retention_reference_kind = "cut"
            return Finding("none", {"check": "retention_cut_by_routing", "cut_rise": cfg.cut_rise, **facts})
        if in_cooldown:  # the reference stays: a rise still standing after the cooldown is cut then
            return Finding(
                "none",
                {
                    "check": "retention_cooldown",
                    "cut_rise": cfg.cut_rise,
                    "cooldown_left": state.cooldown_left,
                    "cooldown_cut_step": state.cooldown_cut_step,
                    "cooldown_cut_by": state.cooldown_cut_by,
                    **facts,
                },
            )
        at_min_lr = current_lr <= self.config.min_lr or math.isclose(current_lr, self.config.min_lr, rel_tol=1e-9)
        if state.retention_cuts >= cfg.max_cuts or at_min_lr:
            return Finding(
                "none",
                {"check": "retention_no_cut_left", "cut_rise": cfg.cut_rise, "at_min_lr": at_min_lr, **facts},
            )
        factor, clipped = self._cut_factor(current_lr)
        state.retention_cuts += 1
        state.retention_reference = float(loss)
        state.retention_reference_kind = "cut"
        state.multiplier *= factor
        self._start_cooldown(step, "retention")
        facts.update(
            check="retention_cut",
            cut_rise=cfg.cut_rise,
            lr_before=current_lr,
            lr_after=current_lr * factor,
            factor=factor,
            clipped_to_min_lr=clipped,
            cut=state.retention_cuts,
        )
        return Finding("cut_lr", facts, factor=factor)

    def _cut_factor(self, current_lr: float) -> tuple[float, bool]:
        """guards.cut_factor, or the factor that lands exactly on min_lr if it would go below (and whether)."""
        factor = self.config.cut_factor
        if current_lr * factor < self.config.min_lr:
            return self.config.min_lr / current_lr, True
        return factor, False

    def _cut(self, step: int, drop: dict[str, Any], current_lr: float, snapshot: RoutingSnapshot) -> Finding:
        cfg, state = self.config, self.state
        # The next sharp fall, and "continues" after the last cut, are measured from here.
        state.level_at_last_cut = _entropies(snapshot)
        state.recent = [_entropies(snapshot)]
        state.settled_step = None
        factor, clipped = self._cut_factor(current_lr)
        state.cuts_made += 1
        self._start_cooldown(step, "routing")
        state.multiplier *= factor
        state.last_cut_step = step
        return Finding(
            "cut_lr",
            {
                "check": "entropy_drop_cut",
                "lr_before": current_lr,
                "lr_after": current_lr * factor,
                "factor": factor,
                "clipped_to_min_lr": clipped,
                "cut": state.cuts_made,
                "max_cuts": cfg.max_cuts,
                **drop,
            },
            factor=factor,
        )


def _fraction_below(baseline: float, value: float) -> float:
    """(baseline - value) / baseline; 0 when the baseline is not positive."""
    if baseline <= 0:
        return 0.0
    return (baseline - value) / baseline


def _non_finite_fields(snapshot: RoutingSnapshot) -> list[str]:
    """Names of the snapshot's fields holding NaN/inf (a comparison with NaN is silently False)."""
    bad = []
    if not snapshot.finite:
        bad.append("router logits")
    if not math.isfinite(snapshot.entropy):
        bad.append("pooled entropy")
    bad_layers = [snapshot.layer_label(i) for i, v in enumerate(snapshot.layer_entropy) if not math.isfinite(v)]
    if bad_layers:
        bad.append("entropy of " + ", ".join(bad_layers))
    bad_loads = [
        snapshot.layer_label(i)
        for i, shares in enumerate(snapshot.load_share)
        if not all(math.isfinite(s) for s in shares)
    ]
    if bad_loads:
        bad.append("load share of " + ", ".join(bad_loads))
    return bad


def _entropies(snapshot: RoutingSnapshot) -> list[Any]:
    """[pooled, [layer entropies], [layer balances] | None]: how the state remembers a logging step."""
    balance = None if snapshot.layer_balance is None else [float(v) for v in snapshot.layer_balance]
    return [float(snapshot.entropy), [float(v) for v in snapshot.layer_entropy], balance]


def load_limit_problem(config: GuardConfig, num_experts: int, top_k: int) -> str | None:
    """Why `max_load_ratio` can never fire for this model, or None when it can.

    With top-k routing every token makes k assignments to k different experts, so no expert's share
    exceeds 1/k, i.e. E/k x uniform: a limit at or above that switches the load halt off unannounced.
    """
    ceiling = num_experts / top_k
    if config.max_load_ratio < ceiling - _SLACK:
        return None
    return (
        f"guards.max_load_ratio {config.max_load_ratio:g} can never be reached: with top-{top_k} routing over "
        f"{num_experts} experts no expert's load share exceeds 1/{top_k}, i.e. {ceiling:g}x uniform, so the "
        f"expert-load halt would never fire; use a value below {ceiling:g} (the default is 3)"
    )
