"""How much a task's tokens use each expert, and which experts to adapt: the pure half of ESFT.

ESFT (DeepSeek, "Let the Expert Stick to His Last", EMNLP 2024) scores each expert of a layer on a sample
of the task's data in one of two ways, and adapts per layer the smallest set of experts whose scores add
up to a share `top_p` (0.2 in the paper) of the layer's total:

    average gate score  g_le = 1/N sum_t s_lte [e in topk_lt]   s = the family's routing scores
    token selection     r_le = 1/(N k) sum_t [e in topk_lt]      (the load share; each token makes k choices)

N is the number of real (non-padding) tokens; topk_lt is what the router itself chose (DeepSeek-V3's
correction bias and expert groups included, see routing/capture.py). For a softmax family s is softmax of
the logits, ESFT's own definition; for a sigmoid family (DeepSeek-V3) it is the normalised sigmoid score,
the same probabilities the capture's prob share uses. The gate score weighs how strongly each chosen
expert was chosen, the token ratio only how often.

Plain Python over lists of numbers: the profile (moe_finetune/profile.py) turns its sums into these and
the selection is exactly what the tests and the recipe's resolved mapping see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCORES = ("gate", "token")


def normalised(scores: Sequence[float]) -> list[float]:
    """Scores of one layer as shares of their total (sum 1); all nan when the total is 0 or not finite."""
    total = math.fsum(scores)
    if not math.isfinite(total) or total <= 0:
        return [math.nan] * len(scores)
    return [value / total for value in scores]


def gate_score(gate_sum: Sequence[float], tokens: float) -> list[float]:
    """ESFT's average gate score of each expert: g_e = gate_sum_e / N (nan for a layer with no tokens).

    `gate_sum_e` is the sum over real tokens of the routing score of expert e where the router chose it.
    """
    if tokens <= 0:
        return [math.nan] * len(gate_sum)
    return [value / tokens for value in gate_sum]


def token_ratio(assign_counts: Sequence[float], tokens: float, top_k: int) -> list[float]:
    """ESFT's token-selection ratio of each expert: r_e = counts_e / (N k), summing to 1 over experts."""
    if tokens <= 0:
        return [math.nan] * len(assign_counts)
    return [value / (tokens * top_k) for value in assign_counts]


def select_top_p(scores: Sequence[float], top_p: float) -> list[int]:
    """The smallest set of experts whose normalised scores add up to at least `top_p`, in expert order.

    Experts are taken highest score first (ties: lower index first, so the choice is repeatable); the
    expert that carries the sum over `top_p` is included, so at least one expert is always chosen.
    A layer with no usable scores (no tokens, all zero) chooses none.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    shares = normalised(scores)
    if any(math.isnan(share) for share in shares):
        return []
    order = sorted(range(len(shares)), key=lambda e: (-shares[e], e))
    chosen, cumulative = [], 0.0
    for expert in order:
        chosen.append(expert)
        cumulative += shares[expert]
        # the tolerance keeps a share summing to exactly top_p (0.1 + 0.1 = 0.2) from taking one more
        if cumulative >= top_p - 1e-9:
            break
    return sorted(chosen)


def select_experts(scores_by_layer: Sequence[Sequence[float]], top_p: float) -> list[list[int]]:
    """`select_top_p` for each layer's scores."""
    return [select_top_p(scores, top_p) for scores in scores_by_layer]
