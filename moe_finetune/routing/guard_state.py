"""What the guard reads, remembers and answers: its input snapshot, its checkpointed state, its action.

Kept apart from the decision itself (policy.py) so that each can be read on its own: these are plain
dataclasses of numbers (no torch, no transformers), and `GuardState.state_dict()` is derived from the
fields, so the checkpointed state is never listed by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

ActionKind = Literal["none", "cut_lr", "halt", "settled"]


@dataclass(frozen=True)
class RoutingSnapshot:
    """Routing health at one logging step, already reduced across ranks."""

    step: int
    entropy: float  # pooled normalised routing entropy, 0..1 (mean over MoE layers)
    layer_entropy: list[float]  # (L,) normalised routing entropy per MoE layer
    load_share: list[list[float]]  # (L, E) fraction of top-k assignments per expert; rows sum to 1
    finite: bool = True  # False when the router logits themselves held NaN/inf
    layer_names: list[str] | None = None  # (L,) router module names, for the reason sentences
    # An expert is dead below this multiple of uniform: the monitor's own line, so the guard and
    # routing/dead_experts agree (monitor.dead_threshold in a recipe).
    dead_threshold: float = 0.1
    # (L,) normalised entropy of each layer's load share (routing/balance per layer); derived from
    # load_share when not given, so a hand-made snapshot is judged the same way.
    layer_balance: list[float] | None = None
    top_k: int | None = None  # experts chosen per token: no load share can exceed 1/top_k

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
        if self.layer_balance is None and self.load_share:
            object.__setattr__(self, "layer_balance", [share_balance(row) for row in self.load_share])

    def layer_label(self, layer: int) -> str:
        """How a sentence names a layer: its router's module name when known."""
        return f"layer {self.layer_names[layer]}" if self.layer_names is not None else f"layer {layer}"


@dataclass(frozen=True)
class GuardAction:
    """What the adapter should do: nothing, multiply the learning rate by `factor`, or halt training."""

    kind: ActionKind  # "settled" is a fact to record, not something to do
    reason: str  # one sentence with the numbers in it, naming the layers at fault
    factor: float = 1.0  # learning-rate multiplier to apply for cut_lr (1.0 otherwise)
    step: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable: the check, layers, values


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: the action it calls for and the facts behind it (`facts["check"]` names it)."""

    kind: ActionKind
    facts: dict[str, Any]
    factor: float = 1.0


# Checkpoints written before these fields were renamed (or added) still resume.
_LEGACY_STATE_NAMES = {"load_baseline": "baseline_top_share", "alive_baseline": "alive_at_baseline"}
_ADDED_STATE_FIELDS = {
    "layer_balance_baseline",
    "balance_samples",
    "recent",
    "level_at_last_cut",
    "settled_step",
    "reseed_reference",
    "retention_base",
    "retention_reference",
    "retention_cuts",
    "retention_last_step",
    "retention_fingerprint",
    "retention_reference_kind",
    "window_step",
    "window_in_cooldown",
    "cooldown_cut_step",
    "cooldown_cut_by",
}


@dataclass
class GuardState:
    """Everything the policy remembers between logging steps; its fields are the checkpointed state."""

    baseline: float | None = None  # pooled entropy at the baseline
    layer_baseline: list[float] | None = None  # (L,) per-layer entropy at the baseline
    baseline_samples: list[list[Any]] = field(default_factory=list)  # [pooled, [layers]] while collecting
    load_samples: list[list[list[float]]] = field(default_factory=list)  # (L, E) shares while collecting
    baseline_top_share: list[float] | None = None  # (L,) each layer's largest expert share at the baseline
    alive_at_baseline: list[list[bool]] | None = None  # (L, E) experts that were alive at the baseline
    cuts_made: int = 0
    # Logging windows of cooldown still to come after the last cut, routing's or retention's (one cooldown for
    # every cut of the guard); the window it was last counted in, whether that window was one of them, and
    # which cut started it (for the sentences)
    cooldown_left: int = 0
    window_step: int | None = None
    window_in_cooldown: bool = False
    cooldown_cut_step: int | None = None
    cooldown_cut_by: str | None = None  # "routing" | "retention"
    multiplier: float = 1.0  # product of the cut factors applied so far
    dead_streaks: list[int] = field(default_factory=list)  # (L,) consecutive checks with too many dead
    last_step: int | None = None  # a step judged once is never judged again
    last_cut_step: int | None = None
    layer_balance_baseline: list[float] | None = None  # (L,) balance at the baseline
    balance_samples: list[list[float]] = field(default_factory=list)  # (L,) balances while collecting
    # [pooled entropy, [layer entropies], [layer balances]] of the logging steps since the last cut (at
    # most cut_window): the reference a sharp drop is measured from
    recent: list[list[Any]] = field(default_factory=list)
    level_at_last_cut: list[Any] | None = None  # the same, when the last cut was made
    settled_step: int | None = None  # when the run was found settled after its last cut
    # Restored from a checkpoint written before `recent` existed: the next step seeds the reference.
    reseed_reference: bool = False
    # The retention check (guards.retention): the loss on the retention rows before the first update, where
    # it stood at the last retention cut (a cut is answered by a further rise from there), the cuts it made
    retention_base: float | None = None
    retention_reference: float | None = None
    retention_cuts: int = 0
    retention_last_step: int | None = None
    retention_fingerprint: str | None = None  # which rows the base was measured on (RetentionSet.fingerprint)
    retention_reference_kind: str = "base"  # what the reference is: "base", "cut" (a cut's level), "resume"

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints (trainer_state.json / a side file)."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GuardState:
        state = {_LEGACY_STATE_NAMES.get(key, key): value for key, value in state.items()}
        names = [f.name for f in dataclasses.fields(cls)]
        missing = sorted(set(names) - set(state))
        # fields added later default for checkpoints written before them
        defaults = cls()
        missing = [name for name in missing if name not in _ADDED_STATE_FIELDS]
        if missing:
            raise ValueError(f"guard state is missing {', '.join(missing)}; was it written by GuardPolicy?")
        restored = cls(
            **{
                name: copy.deepcopy(state[name]) if name in state else copy.deepcopy(getattr(defaults, name))
                for name in names
            }
        )
        restored.baseline_samples = [[pooled, list(layers)] for pooled, layers in restored.baseline_samples]
        if "recent" not in state and restored.baseline is not None:
            restored.reseed_reference = True  # judged against the baseline level, it would cut (or halt) at once
        return restored


def share_balance(shares: list[float]) -> float:
    """Normalised entropy of one layer's load share, -sum s ln s / ln E in [0, 1] (routing/balance).

    The same definition as `routing.metrics` computes on the device; here for snapshots made by hand.
    With top-k routing no share exceeds 1/k, so a fully collapsed layer scores ln k / ln E, not 0.
    """
    if len(shares) < 2 or not all(math.isfinite(s) for s in shares):
        return math.nan
    total = sum(shares)
    if total <= 0:
        return math.nan
    return -sum(s / total * math.log(s / total) for s in shares if s > 0) / math.log(len(shares))


@dataclass
class HealthyCheckpoints:
    """Which saved checkpoint is healthy by the guard's own measure: the one `last-healthy/` keeps.

    A checkpoint belongs to the logging window it was saved in: the window that ends at the first logging
    step at or after its step (a save at a logging step belongs to the window that step closes, which the
    guard judges before the Trainer saves). It is healthy when that window was judged healthy; a save inside
    a window that later proves troubled never is, nor is one at or after the step the guard acts. Fed by
    the adapter in the order the Trainer runs: `judged` at each logging step, `saved` at each save.
    Plain numbers, checkpointed with the guard, so a resumed run knows which of its saves were healthy.
    """

    judged_step: int | None = None  # the last logging step judged
    judged_healthy: bool = False  # and whether its window was healthy
    unjudged: list[int] = field(default_factory=list)  # saves inside the window still open
    healthy: int | None = None  # the newest save inside a window judged healthy

    def judged(self, step: int, healthy: bool) -> None:
        """The window that ends at `step` was judged: the saves inside it are healthy if it was."""
        if healthy and self.unjudged:
            self.healthy = max(self.unjudged)
        self.unjudged = []
        self.judged_step, self.judged_healthy = int(step), bool(healthy)

    def saved(self, step: int) -> None:
        """A checkpoint was saved at `step` (also: a run resumed from it)."""
        if self.judged_step is not None and step <= self.judged_step:
            if step == self.judged_step and self.judged_healthy:
                self.healthy = int(step)  # saved right after its own (healthy) window was judged
            return
        self.unjudged.append(int(step))

    def before(self, step: int) -> int | None:
        """The healthy checkpoint to go back to when the guard acts at `step`, or None if none was saved."""
        return self.healthy if self.healthy is not None and self.healthy < step else None

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None) -> HealthyCheckpoints:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: copy.deepcopy(value) for key, value in (state or {}).items() if key in names})
