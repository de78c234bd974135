"""Sigmoid-scored routers (DeepSeek-V3): which measured entropy responds when a router sharpens, and
which metric responds when the load collapses. Mixtral (softmax) is measured the same way, for comparison.

Sharpening = the router weights multiplied by 10 and 100, which scales every logit: the router becomes
near-deterministic without changing its ranking of experts. Each test prints its table (pytest -s).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from moe_finetune.models.families import find_routers, get_family
from moe_finetune.routing import capture_routing
from moe_finetune.routing.capture import routing_entropy_probs, routing_scores
from moe_finetune.routing.metrics import lowest_load_balance, token_entropy

SCALES = (1.0, 10.0, 100.0)
# the guard's default halt line (DESIGN.md section 5): pooled entropy 40% below its baseline
HALT_FALL = 0.40


@pytest.fixture(scope="module")
def deepseek_dir() -> Path:
    from moe_finetune.models.tiny import build_tiny

    return build_tiny("deepseek_v3")


def load(path: Path):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.config.use_cache = False
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(10, 1000, (4, 32), generator=torch.Generator().manual_seed(0))


def routers(model, family: str) -> list[torch.nn.Module]:
    return [modules[0] for modules in find_routers(model, get_family(family))[1]]


def normalised(entropy: torch.Tensor, size: int) -> float:
    return (entropy.mean() / math.log(size)).item()


def measure(model, family: str, scale: float, weights: list[torch.Tensor]) -> dict[str, float]:
    """Every candidate quantity, averaged over MoE layers, with the router weights x `scale`."""
    spec = get_family(family)
    experts, top_k = spec.num_experts(model.config), spec.top_k(model.config)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_output(module, args, output):
        outputs.append((output[0].detach().float(), output[1].detach().float()))

    layers = routers(model, family)
    handles = [router.register_forward_hook(keep_output) for router in layers]
    try:
        with torch.no_grad():
            for router, weight in zip(layers, weights, strict=True):
                router.weight.copy_(weight * scale)
        with capture_routing(model) as cap, torch.no_grad():
            model(input_ids=ids())
    finally:
        for handle in handles:
            handle.remove()
    stats = cap.stats()
    candidates: dict[str, list[float]] = {
        "normalised sigmoid": [],
        "softmax(logits)": [],
        "top-k weights": [],
    }
    for logits, topk_weights in outputs:
        candidates["normalised sigmoid"].append(
            normalised(token_entropy(routing_scores(logits, "sigmoid")), experts)
        )
        candidates["softmax(logits)"].append(
            normalised(token_entropy(routing_entropy_probs(logits)), experts)
        )
        shares = topk_weights / topk_weights.sum(-1, keepdim=True)  # the chosen experts' weights, sum 1
        candidates["top-k weights"].append(normalised(token_entropy(shares), top_k))  # by ln k: 0..1
    return {
        "routing/entropy": stats.entropy,
        **{name: sum(values) / len(values) for name, values in candidates.items()},
        "routing/balance": stats.balance,
        "routing/balance_min": stats.balance_min,
        "routing/prob_balance": stats.prob_balance,
    }


def sharpening_table(model, family: str) -> dict[float, dict[str, float]]:
    weights = [router.weight.detach().clone() for router in routers(model, family)]
    table = {scale: measure(model, family, scale, weights) for scale in SCALES}
    print(f"\n{family}: router weights x " + " -> x".join(f"{s:g}" for s in SCALES))
    for name in table[1.0]:
        print(f"  {name:<22}" + " -> ".join(f"{table[s][name]:.4f}" for s in SCALES))
    return table


def fall(table: dict[float, dict[str, float]], name: str, scale: float) -> float:
    """Relative fall of a quantity from the unsharpened router: 0.4 = 40% below."""
    return 1.0 - table[scale][name] / table[1.0][name]


def assert_the_guard_sees_sharpening(table: dict[float, dict[str, float]]) -> None:
    # what the guard watches: the routing entropy falls far past the halt line ...
    assert fall(table, "routing/entropy", 10.0) > 0.75
    assert fall(table, "routing/entropy", 100.0) > 0.95
    # ... while the load stays spread: a confident router is not a collapsed one
    for scale in SCALES:
        assert table[scale]["routing/balance_min"] > 0.9
        assert table[scale]["routing/prob_balance"] > 0.9


def test_sharpening_a_sigmoid_router_lowers_the_routing_entropy_the_guard_watches(deepseek_dir):
    table = sharpening_table(load(deepseek_dir), "deepseek_v3")
    assert_the_guard_sees_sharpening(table)
    # routing/entropy of a sigmoid router is that of softmax(logits) (capture.routing_entropy_probs)
    for scale in SCALES:
        assert table[scale]["routing/entropy"] == pytest.approx(table[scale]["softmax(logits)"], abs=1e-4)
    # why not the others: the normalised sigmoid scores saturate (positive logits -> 1) and stop near
    # ln(E/2)/ln E, never reaching the halt line; both chosen scores saturate, so the top-k weights
    # even out and their entropy hardly moves
    assert fall(table, "normalised sigmoid", 100.0) < HALT_FALL
    assert table[100.0]["normalised sigmoid"] > math.log(2) / math.log(8)
    assert fall(table, "top-k weights", 100.0) < 0.2


def test_sharpening_a_softmax_router_lowers_the_routing_entropy_the_guard_watches(tiny_mixtral_dir):
    table = sharpening_table(load(tiny_mixtral_dir), "mixtral")
    assert_the_guard_sees_sharpening(table)
    for scale in SCALES:  # a softmax router's entropy is of its own routing distribution
        assert table[scale]["routing/entropy"] == pytest.approx(table[scale]["softmax(logits)"], abs=1e-4)
    # the same scaled logits pushed through sigmoid would show the same saturation floor
    assert fall(table, "normalised sigmoid", 100.0) < HALT_FALL
    assert fall(table, "top-k weights", 100.0) > 0.9  # softmax top-k weights do sharpen


def test_a_correction_bias_that_collapses_the_load_lowers_the_balance_not_the_entropy(deepseek_dir):
    """DeepSeek-V3 chooses on sigmoid + bias: a bias that sends every token to experts 0 and 1 is a
    full collapse of the load, invisible to the per-token entropy and to the mean scores (neither
    includes the bias) but not to the balance, which sits exactly at its top-2-of-8 floor, 1/3."""
    model = load(deepseek_dir)
    with capture_routing(model) as cap, torch.no_grad():
        model(input_ids=ids())
    before = cap.stats()
    with torch.no_grad():
        for router in routers(model, "deepseek_v3"):
            router.e_score_correction_bias.copy_(torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0]))
    with capture_routing(model) as cap, torch.no_grad():
        model(input_ids=ids())
    after = cap.stats()
    print(
        f"\ndeepseek_v3, bias collapse: entropy {before.entropy:.4f} -> {after.entropy:.4f}, "
        f"balance {before.balance:.4f} -> {after.balance:.4f}, "
        f"prob_balance {before.prob_balance:.4f} -> {after.prob_balance:.4f}"
    )
    assert before.balance > 0.95
    assert after.layer_balance == pytest.approx([lowest_load_balance(8, 2)] * 2)
    assert after.balance_min == pytest.approx(1 / 3) and after.load_max == 4.0
    # (the second MoE layer sees other hidden states once the first routes differently: a hair moves)
    assert after.entropy == pytest.approx(before.entropy, rel=0.02)
    assert after.prob_balance > 0.95


def test_a_sigmoid_routers_entropy_is_of_softmax_logits_and_its_prob_share_of_normalised_scores(deepseek_dir):
    model = load(deepseek_dir)
    with capture_routing(model) as cap, torch.no_grad():
        out = model(input_ids=ids(), output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):
        logits = logits.float()
        scores = logits.sigmoid()
        torch.testing.assert_close(
            cap.sums.prob_sum[layer],
            (scores / scores.sum(-1, keepdim=True)).sum(0).double(),
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            cap.sums.entropy_sum[layer],
            token_entropy(logits.softmax(-1)).sum().double(),
            atol=1e-4,
            rtol=1e-5,
        )


def test_normalised_sigmoid_scores_and_softmax_agree_when_every_logit_is_negative():
    """s / sum s = softmax(log s) and log sigmoid(x) -> x for x << 0: the two readings part only where
    scores saturate, which is where the normalised scores stop telling sharp from flat."""
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) - 12.0
    torch.testing.assert_close(
        routing_scores(logits, "sigmoid"), routing_entropy_probs(logits), atol=1e-4, rtol=1e-4
    )
    saturated = 100.0 * torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    spread = token_entropy(routing_scores(saturated, "sigmoid")) / math.log(8)
    sharp = token_entropy(routing_entropy_probs(saturated)) / math.log(8)
    assert spread.mean() > 0.5 and sharp.mean() < 0.05
