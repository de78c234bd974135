"""Routing metrics: hand-computed cases, HF's aux loss as the reference, and invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_finetune.routing.metrics import (
    RoutingMetrics,
    RoutingSums,
    aux_loss,
    balance,
    combine_sums,
    dead_experts,
    drop_fraction,
    js_divergence,
    layer_aux_loss,
    load_cv,
    load_max,
    load_share,
    lowest_load_balance,
    max_over_layers,
    mean_over_layers,
    min_over_layers,
    normalised_entropy,
    overflow_assignments,
    pooled_drop_fraction,
    pooled_z_loss,
    prob_share,
    summarise,
    token_entropy,
    topk_set_change,
    z_loss,
)

FAST = settings(max_examples=50, deadline=None)
NAN = float("nan")


def sums_from_logits(logits_per_layer, top_k, attention_mask=None, capacity_factor=1.25):
    """What the capture hooks accumulate, built by hand: logits (B*T, E) per layer, mask (B, T)."""
    num_experts = logits_per_layer[0].shape[-1]
    names = [f"layers.{i}.mlp.gate" for i in range(len(logits_per_layer))]
    sums = RoutingSums.zeros(len(logits_per_layer), num_experts, top_k, names)
    for layer, logits in enumerate(logits_per_layer):
        mask = torch.ones(logits.shape[0]) if attention_mask is None else attention_mask.reshape(-1).float()
        probs = logits.softmax(dim=-1)  # (N, E)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        counts = (torch.nn.functional.one_hot(chosen, num_experts).sum(dim=1) * mask[:, None]).sum(0)  # (E,)
        sums.tokens[layer] += mask.sum()
        sums.assign_counts[layer] += counts
        sums.prob_sum[layer] += (probs * mask[:, None]).sum(0)
        sums.entropy_sum[layer] += (token_entropy(probs) * mask).sum()
        sums.z_sum[layer] += (logits.logsumexp(dim=-1) ** 2 * mask).sum()
        sums.overflow[layer] += overflow_assignments(counts, top_k, capacity_factor)
    return sums


def uniform_sums(num_layers=2, num_experts=8, top_k=2, tokens=16):
    """A router that spreads tokens and probability perfectly evenly (dyadic numbers: exact)."""
    sums = RoutingSums.zeros(num_layers, num_experts, top_k, [f"l{i}" for i in range(num_layers)])
    sums.tokens += tokens
    sums.assign_counts += tokens * top_k / num_experts
    sums.prob_sum += tokens / num_experts
    sums.entropy_sum += tokens * math.log(num_experts)
    return sums


def collapsed_sums(num_experts=8, top_k=2, tokens=16):
    """One layer where every token is certain of expert 0 and top-k also takes expert 1."""
    sums = RoutingSums.zeros(1, num_experts, top_k, ["l0"])
    sums.tokens += tokens
    sums.assign_counts[0, :top_k] = tokens
    sums.prob_sum[0, 0] = tokens
    return sums


# -----------------------------------------------------------------------------
# entropy


def test_token_entropy_of_hand_computed_rows():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_entropy(probs), torch.tensor([math.log(4), math.log(2), 0.0]))


def test_token_entropy_of_saturated_softmax_is_zero_not_nan():
    probs = torch.tensor([[1e4, 0.0, -1e4]]).softmax(-1)  # exact zeros after softmax
    assert torch.equal(token_entropy(probs), torch.zeros(1))


def test_uniform_router_has_normalised_entropy_one():
    sums = uniform_sums()
    entropy = normalised_entropy(sums.entropy_sum, sums.tokens, sums.num_experts)
    torch.testing.assert_close(entropy, torch.ones(2))


def test_collapsed_router_has_normalised_entropy_zero():
    sums = collapsed_sums()
    assert normalised_entropy(sums.entropy_sum, sums.tokens, 8).tolist() == [0.0]


def test_normalised_entropy_of_hand_computed_layers():
    # layer 0: 4 tokens each split evenly over 2 of 4 experts -> ln2 / ln4 = 0.5
    entropy = normalised_entropy(torch.tensor([4 * math.log(2)]), torch.tensor([4.0]), num_experts=4)
    torch.testing.assert_close(entropy, torch.tensor([0.5]))


def test_layer_without_tokens_has_nan_entropy():
    entropy = normalised_entropy(torch.tensor([3.0, 0.0]), torch.tensor([4.0, 0.0]), num_experts=4)
    assert not math.isnan(entropy[0]) and math.isnan(entropy[1])


def test_normalised_entropy_refuses_a_single_expert():
    with pytest.raises(ValueError, match="at least 2 experts"):
        normalised_entropy(torch.zeros(1), torch.ones(1), num_experts=1)


# -----------------------------------------------------------------------------
# load


def test_uniform_router_has_even_load():
    share = load_share(uniform_sums().assign_counts)
    torch.testing.assert_close(share, torch.full((2, 8), 1 / 8))
    assert load_max(share).tolist() == [1.0, 1.0]
    assert load_cv(share).tolist() == [0.0, 0.0]
    assert dead_experts(share).tolist() == [0.0, 0.0]


def test_collapsed_top2_of_8_router_has_load_max_four_and_six_dead_experts():
    share = load_share(collapsed_sums().assign_counts)
    assert share.tolist() == [[0.5, 0.5, 0, 0, 0, 0, 0, 0]]
    assert load_max(share).tolist() == [4.0]  # E / k
    torch.testing.assert_close(load_cv(share), torch.tensor([math.sqrt(3.0)]))  # sqrt(E/k - 1)
    assert dead_experts(share).tolist() == [6.0]  # E - k


def test_load_cv_of_hand_computed_shares():
    # shares 0.4, 0.1, 0.4, 0.1: mean 0.25, population std 0.15 -> cv 0.6
    torch.testing.assert_close(load_cv(torch.tensor([[0.4, 0.1, 0.4, 0.1]])), torch.tensor([0.6]))


def test_dead_expert_is_strictly_below_threshold_times_uniform():
    # E = 4, threshold 0.1 -> dead below 0.025 (0.03125 = 1/32 is alive, 0.0078125 = 1/128 is dead)
    share = torch.tensor([[0.5, 0.4609375, 0.03125, 0.0078125]])
    assert dead_experts(share, threshold=0.1).tolist() == [1.0]
    assert dead_experts(share, threshold=0.125).tolist() == [1.0]  # 1/32 is not below 1/32
    assert dead_experts(share, threshold=0.5).tolist() == [2.0]


def test_prob_share_is_mean_routing_probability():
    share = prob_share(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), torch.tensor([4.0, 0.0]))
    assert share[0].tolist() == [0.75, 0.25] and share[1].isnan().all()


def test_layer_without_assignments_has_nan_load_and_no_dead_count():
    share = load_share(torch.tensor([[2.0, 2.0], [0.0, 0.0]]))
    assert share[1].isnan().all()
    assert math.isnan(load_max(share)[1]) and math.isnan(load_cv(share)[1])
    assert math.isnan(dead_experts(share)[1])


# -----------------------------------------------------------------------------
# balance: entropy of the load share and of the mean routing distribution


def test_balance_of_hand_computed_shares():
    shares = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(balance(shares), torch.tensor([1.0, 0.5, 0.0]))  # ln 4, ln 2, 0 over ln 4


def test_collapsed_top2_of_8_layer_has_load_balance_one_third_and_prob_balance_zero():
    sums = collapsed_sums()  # every token: experts 0 and 1 chosen, all probability on expert 0
    load_balance = balance(load_share(sums.assign_counts))
    torch.testing.assert_close(load_balance, torch.tensor([math.log(2) / math.log(8)]))
    assert load_balance.item() == pytest.approx(lowest_load_balance(8, 2)) == pytest.approx(1 / 3)
    assert balance(prob_share(sums.prob_sum, sums.tokens)).tolist() == [0.0]
    metrics = summarise(sums)
    assert metrics.balance == metrics.balance_min == pytest.approx(1 / 3) and metrics.prob_balance == 0.0


def test_a_confident_router_can_be_perfectly_balanced():
    # 8 tokens, top-1 of 8, each token certain of a different expert: entropy 0, balance 1
    sums = RoutingSums.zeros(1, 8, 1, ["l0"])
    sums.tokens += 8
    sums.assign_counts += 1
    sums.prob_sum += 1
    metrics = summarise(sums)
    assert metrics.entropy == 0.0
    assert metrics.balance == pytest.approx(1.0) and metrics.prob_balance == pytest.approx(1.0)


def test_balance_of_a_layer_without_tokens_is_nan_and_pooling_skips_it():
    values = balance(load_share(torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])))
    assert values[0].item() == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(4))
    assert math.isnan(values[1]) and min_over_layers(values) == values[0]


def test_balance_refuses_a_single_expert():
    with pytest.raises(ValueError, match="at least 2 experts"):
        balance(torch.ones(1, 1))


def test_lowest_load_balance_is_ln_k_over_ln_e():
    assert lowest_load_balance(8, 1) == 0.0
    assert lowest_load_balance(8, 2) == pytest.approx(1 / 3)
    assert lowest_load_balance(64, 8) == pytest.approx(0.5)
    assert lowest_load_balance(8, 8) == 1.0
    with pytest.raises(ValueError, match="top_k"):
        lowest_load_balance(8, 9)


# -----------------------------------------------------------------------------
# aux loss and z-loss


def test_uniform_router_aux_loss_equals_top_k():
    for top_k in (1, 2, 4):
        sums = uniform_sums(top_k=top_k)
        assert aux_loss(sums.assign_counts, sums.prob_sum, sums.tokens).item() == top_k
        assert layer_aux_loss(sums.assign_counts, sums.prob_sum, sums.tokens).tolist() == [top_k, top_k]


def test_collapsed_router_aux_loss_equals_num_experts():
    sums = collapsed_sums()
    # f = [1, 1, 0...], P = [1, 0, ...]: E * 1 * 1
    assert aux_loss(sums.assign_counts, sums.prob_sum, sums.tokens).item() == 8.0


def test_pooled_aux_loss_is_not_the_mean_of_layer_aux_losses():
    # E = 2, k = 1, one token per layer: layer 0 sure of expert 0, layer 1 sure of expert 1
    counts = prob = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tokens = torch.tensor([1.0, 1.0])
    assert layer_aux_loss(counts, prob, tokens).tolist() == [2.0, 2.0]
    assert aux_loss(counts, prob, tokens).item() == 1.0  # pooled f = P = [0.5, 0.5]


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
def test_aux_loss_matches_transformers_load_balancing_loss_func(masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    batch, seq, num_experts, top_k, num_layers = 3, 7, 8, 2, 3
    logits = tuple(2 * torch.randn(batch * seq, num_experts, generator=gen) for _ in range(num_layers))
    mask = None
    if masked:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :3] = 0  # left padding
        mask[2, 5:] = 0  # right padding
    sums = sums_from_logits(logits, top_k, mask)

    expected = load_balancing_loss_func(logits, num_experts, top_k, mask)
    got = aux_loss(sums.assign_counts, sums.prob_sum, sums.tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert summarise(sums).aux_loss == pytest.approx(expected.item(), abs=1e-5)
    for layer in range(num_layers):  # one layer alone is HF's loss over a one-layer tuple
        expected_layer = load_balancing_loss_func(logits[layer : layer + 1], num_experts, top_k, mask)
        got_layer = layer_aux_loss(sums.assign_counts, sums.prob_sum, sums.tokens)[layer]
        torch.testing.assert_close(got_layer, expected_layer, atol=1e-5, rtol=1e-5)


def test_z_loss_is_mean_squared_logsumexp_per_layer():
    torch.testing.assert_close(
        z_loss(torch.tensor([12.0, 0.0]), torch.tensor([4.0, 0.0])), torch.tensor([3.0, NAN]), equal_nan=True
    )
    assert pooled_z_loss(torch.tensor([12.0, 3.0]), torch.tensor([4.0, 2.0])).item() == 2.5


def test_z_loss_from_logits_matches_direct_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = ln 2, ln 4
    sums = sums_from_logits((logits,), top_k=1)
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(sums.z_sum, sums.tokens).item() == pytest.approx(expected)


# -----------------------------------------------------------------------------
# capacity overflow


def test_overflow_counts_assignments_over_continuous_capacity():
    # 4 tokens, top-2 of 4 experts: 8 assignments, capacity 1.25 * 8 / 4 = 2.5 -> 6 - 2.5 = 3.5 over
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # batch of two forwards
    assert overflow_assignments(counts, top_k=2, capacity_factor=1.25).tolist() == [3.5, 0.0]
    assert overflow_assignments(counts[0], top_k=2, capacity_factor=2.0).item() == 2.0  # capacity 4


def test_drop_fraction_is_overflow_over_assignments():
    overflow = torch.tensor([3.5, 0.0, 0.0])
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        drop_fraction(overflow, counts), torch.tensor([0.4375, 0.0, NAN]), equal_nan=True
    )
    assert pooled_drop_fraction(overflow, counts).item() == 3.5 / 16


# -----------------------------------------------------------------------------
# drift


def test_topk_set_change_ignores_order_within_top_k():
    before = torch.tensor([[[0, 1], [2, 3], [4, 5]]])  # (L=1, N=3, k=2)
    after = torch.tensor([[[1, 0], [2, 4], [5, 4]]])
    assert topk_set_change(before, after).item() == pytest.approx(1 / 3)
    assert topk_set_change(before, before.flip(-1)).item() == 0.0


def test_topk_set_change_counts_only_valid_tokens_in_every_layer():
    before = torch.tensor([[[0, 1], [2, 3]], [[0, 1], [2, 3]]])  # (L=2, N=2, k=2)
    after = torch.tensor([[[0, 1], [2, 7]], [[0, 6], [2, 3]]])
    assert topk_set_change(before, after).item() == 0.5
    assert topk_set_change(before, after, valid=torch.tensor([True, False])).item() == 0.5
    assert topk_set_change(before, after, valid=torch.tensor([False, True])).item() == 0.5
    assert topk_set_change(before, before, valid=torch.tensor([False, True])).item() == 0.0


def test_topk_set_change_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        topk_set_change(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long))


def test_js_divergence_of_hand_computed_pairs():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    # third row: m = [0.75, 0.25]; KL(p||m) = log2(4/3); KL(q||m) = (log2(2/3) + 1) / 2
    third = (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    torch.testing.assert_close(js_divergence(p, q), torch.tensor([1.0, 0.0, third]))


# -----------------------------------------------------------------------------
# pooling and summarise


def test_pooled_helpers_skip_nan_layers():
    values = torch.tensor([0.5, NAN, 0.9])
    assert mean_over_layers(values).item() == pytest.approx(0.7)
    assert min_over_layers(values).item() == 0.5
    assert max_over_layers(values).item() == pytest.approx(0.9)
    all_nan = torch.tensor([NAN, NAN])
    assert all(math.isnan(f(all_nan).item()) for f in (mean_over_layers, min_over_layers, max_over_layers))


def test_summarise_uniform_router():
    metrics = summarise(uniform_sums(num_layers=3, top_k=2))
    assert isinstance(metrics, RoutingMetrics)
    assert metrics.pooled() == pytest.approx(
        {
            "routing/entropy": 1.0,
            "routing/entropy_min": 1.0,
            "routing/balance": 1.0,
            "routing/balance_min": 1.0,
            "routing/prob_balance": 1.0,
            "routing/load_max": 1.0,
            "routing/load_cv": 0.0,
            "routing/dead_experts": 0.0,
            "routing/aux_loss": 2.0,
            "routing/z_loss": 0.0,
            "routing/drop_fraction": 0.0,
        }
    )
    assert metrics.finite and metrics.tokens == 16 and metrics.dead_experts == 0


def test_summarise_skips_a_layer_without_tokens():
    sums = RoutingSums.zeros(2, 8, 2, ["busy", "idle"])
    sums.tokens[0] = 32
    sums.assign_counts[0, :2] = 32  # every token picks experts 0 and 1 ...
    sums.prob_sum[0, :2] = 16  # ... with probability 0.5 each
    sums.entropy_sum[0] = 32 * math.log(2)  # normalised: ln 2 / ln 8 = 1/3
    metrics = summarise(sums)

    assert metrics.finite and metrics.tokens == 32
    assert metrics.layer_entropy[0] == pytest.approx(1 / 3) and math.isnan(metrics.layer_entropy[1])
    assert metrics.entropy == pytest.approx(1 / 3) and metrics.entropy_min == pytest.approx(1 / 3)
    assert metrics.load_max == 4.0 and metrics.load_cv == pytest.approx(math.sqrt(3))
    assert metrics.dead_experts == 6 and math.isnan(metrics.layer_dead_experts[1])
    assert (
        metrics.aux_loss == 8.0 and metrics.layer_aux_loss[0] == 8.0 and math.isnan(metrics.layer_aux_loss[1])
    )
    assert all(math.isnan(x) for x in metrics.load_share[1] + metrics.prob_share[1])
    assert math.isnan(metrics.layer_z_loss[1]) and metrics.z_loss == 0.0
    # all load on experts 0 and 1 (share 1/2 each), and so is the mean probability: both at 1/3
    assert metrics.layer_balance[0] == pytest.approx(1 / 3) and math.isnan(metrics.layer_balance[1])
    assert metrics.layer_prob_balance[0] == pytest.approx(1 / 3) and math.isnan(metrics.layer_prob_balance[1])
    assert metrics.balance == metrics.balance_min == pytest.approx(1 / 3)
    assert metrics.prob_balance == pytest.approx(1 / 3)


def test_summarise_flags_non_finite_sums():
    sums = uniform_sums()
    sums.z_sum[1] = float("inf")
    assert summarise(sums).finite is False
    sums.z_sum[1] = NAN
    assert summarise(sums).finite is False
    assert summarise(uniform_sums()).finite is True


def test_summarise_from_real_logits_is_consistent_with_the_functions():
    gen = torch.Generator().manual_seed(1)
    logits = tuple(torch.randn(40, 4, generator=gen) for _ in range(2))
    sums = sums_from_logits(logits, top_k=2, capacity_factor=1.0)
    metrics = summarise(sums, capacity_factor=1.0)
    share = load_share(sums.assign_counts)
    torch.testing.assert_close(torch.tensor(metrics.load_share), share)
    assert metrics.layer_load_max == pytest.approx(load_max(share).tolist())
    assert metrics.drop_fraction == pytest.approx(
        pooled_drop_fraction(sums.overflow, sums.assign_counts).item()
    )
    assert metrics.tokens == 40 and metrics.capacity_factor == 1.0


def test_pooled_has_exactly_the_logger_keys():
    assert set(summarise(uniform_sums()).pooled()) == {
        "routing/entropy",
        "routing/entropy_min",
        "routing/balance",
        "routing/balance_min",
        "routing/prob_balance",
        "routing/load_max",
        "routing/load_cv",
        "routing/dead_experts",
        "routing/aux_loss",
        "routing/z_loss",
        "routing/drop_fraction",
    }


def test_per_layer_gives_one_record_per_layer_with_load_and_prob():
    records = summarise(uniform_sums(num_layers=2, num_experts=4)).per_layer()
    assert [r["layer"] for r in records] == ["l0", "l1"]
    assert records[0]["load"] == [0.25] * 4 and records[0]["prob"] == [0.25] * 4
    assert records[0]["entropy"] == pytest.approx(1.0) and records[0]["tokens"] == 16
    assert records[0]["balance"] == pytest.approx(1.0) and records[0]["prob_balance"] == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# RoutingSums


def test_routing_sums_zeros_have_the_right_shapes():
    sums = RoutingSums.zeros(3, 8, 2, ["a", "b", "c"], device="cpu")
    assert sums.tokens.shape == (3,) and sums.assign_counts.shape == (3, 8) and sums.prob_sum.shape == (3, 8)
    assert sums.entropy_sum.shape == sums.z_sum.shape == sums.overflow.shape == (3,)
    with pytest.raises(ValueError, match="layer names"):
        RoutingSums.zeros(2, 8, 2, ["a"])


def test_as_tensor_from_tensor_round_trip():
    gen = torch.Generator().manual_seed(2)
    sums = sums_from_logits(tuple(torch.randn(10, 8, generator=gen) for _ in range(3)), top_k=2)
    flat = sums.as_tensor()
    assert flat.dim() == 1 and flat.dtype == torch.float64 and flat.numel() == 3 * 4 + 2 * 3 * 8
    back = sums.from_tensor(flat)
    for name in ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum", "overflow"):
        assert torch.equal(getattr(back, name), getattr(sums, name)), name
        assert getattr(back, name).dtype == torch.float32
    assert (back.num_experts, back.top_k, back.layer_names) == (8, 2, sums.layer_names)
    doubled = sums.from_tensor(flat * 2)  # what an all_reduce over two identical ranks gives
    assert torch.equal(doubled.assign_counts, 2 * sums.assign_counts)
    with pytest.raises(ValueError, match="1-D tensor"):
        sums.from_tensor(flat[:-1])


def test_adding_routing_sums_adds_every_sum():
    total = uniform_sums() + uniform_sums() + uniform_sums()
    assert total.tokens.tolist() == [48.0, 48.0] and total.assign_counts[0, 0].item() == 12.0
    assert summarise(total).aux_loss == 2.0
    assert torch.equal(total.to("cpu").prob_sum, total.prob_sum)


def test_adding_sums_of_different_models_is_refused():
    with pytest.raises(ValueError, match="different models"):
        uniform_sums(num_experts=8) + uniform_sums(num_experts=4)


def split_by_layer(sums: RoutingSums, owner: list[int], parts: int) -> list[RoutingSums]:
    """What per-device capture keeps: part d holds the rows of the layers on device d, zeros elsewhere."""
    pieces = []
    for device in range(parts):
        rows = torch.tensor([owner_ == device for owner_ in owner])
        piece = RoutingSums.zeros(
            len(owner), sums.num_experts, sums.top_k, sums.layer_names, dtype=torch.float64
        )
        for name in ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum", "overflow"):
            full = getattr(sums, name).double()
            mask = rows.reshape(rows.shape + (1,) * (full.dim() - 1))
            getattr(piece, name).copy_(torch.where(mask, full, 0.0))
        pieces.append(piece)
    return pieces


def test_sums_kept_per_device_combine_to_the_single_device_sums():
    gen = torch.Generator().manual_seed(4)
    whole = sums_from_logits(tuple(torch.randn(12, 8, generator=gen) for _ in range(4)), top_k=2)
    parts = split_by_layer(whole, owner=[0, 0, 1, 1], parts=2)
    combined = combine_sums(parts)
    for name in ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum", "overflow"):
        torch.testing.assert_close(getattr(combined, name), getattr(whole, name).double(), msg=name)
    assert (combined.num_experts, combined.top_k, combined.layer_names) == (8, 2, whole.layer_names)
    assert combined.tokens.dtype == torch.float64 and combined.device == torch.device("cpu")
    assert summarise(combined).pooled() == pytest.approx(summarise(whole).pooled(), rel=1e-5)
    # the same as adding them on one device, and the all_reduce round trip still works on the result
    torch.testing.assert_close(combine_sums(parts).assign_counts, (parts[0] + parts[1]).assign_counts)
    assert torch.equal(combined.from_tensor(combined.as_tensor()).prob_sum, combined.prob_sum)


def test_combined_sums_are_a_copy_and_a_single_part_combines_to_itself():
    part = uniform_sums()
    combined = combine_sums([part], device="cpu")
    part.tokens.zero_()  # a reset of the running sums after the log
    assert combined.tokens.tolist() == [16.0, 16.0]
    assert combined.tokens.dtype == part.tokens.dtype  # the first part's dtype


def test_combining_sums_of_different_models_or_none_is_refused():
    with pytest.raises(ValueError, match="different models"):
        combine_sums([uniform_sums(num_experts=8), uniform_sums(num_experts=4)])
    with pytest.raises(ValueError, match="at least one"):
        combine_sums([])


# -----------------------------------------------------------------------------
# invariants

logits_rows = st.integers(2, 8).flatmap(
    lambda num_experts: st.lists(
        st.lists(st.floats(-50, 50), min_size=num_experts, max_size=num_experts), min_size=1, max_size=6
    )
)


@FAST
@given(logits_rows)
def test_normalised_entropy_is_between_zero_and_one(rows):
    probs = torch.tensor(rows).softmax(-1)
    num_tokens, num_experts = probs.shape
    entropy_sum = token_entropy(probs).sum().reshape(1)
    entropy = normalised_entropy(entropy_sum, torch.tensor([float(num_tokens)]), num_experts)
    assert 0.0 <= entropy.item() <= 1.0


@FAST
@given(
    st.lists(
        st.lists(st.floats(0, 1e6), min_size=8, max_size=8).filter(lambda r: sum(r) > 0),
        min_size=1,
        max_size=4,
    ),
    st.permutations(range(8)),
)
def test_balance_is_between_zero_and_one_and_ignores_expert_order(counts, order):
    share = load_share(torch.tensor(counts, dtype=torch.float64))
    values = balance(share)
    assert ((values >= 0) & (values <= 1)).all()
    torch.testing.assert_close(balance(share[:, list(order)]), values)


@FAST
@given(st.integers(2, 16), st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_balance_is_one_when_even_and_zero_when_one_expert_takes_all(num_experts, seed, layers):
    even = torch.full((layers, num_experts), 1.0 / num_experts, dtype=torch.float64)
    torch.testing.assert_close(balance(even), torch.ones(layers, dtype=torch.float64))
    winner = torch.randint(num_experts, (layers,), generator=torch.Generator().manual_seed(seed))
    one_hot = torch.nn.functional.one_hot(winner, num_experts).double()
    assert balance(one_hot).tolist() == [0.0] * layers


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 16), st.data())
def test_top_k_load_balance_never_falls_below_ln_k_over_ln_e(seed, num_experts, data):
    """Whatever k distinct experts each token picks (collapse included), the share stays <= 1/k."""
    top_k = data.draw(st.integers(1, num_experts))
    tokens = data.draw(st.integers(1, 20))
    collapsed = data.draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1 if collapsed else tokens, num_experts, generator=gen).expand(tokens, num_experts)
    chosen = scores.topk(top_k, dim=-1).indices  # (N, k), distinct experts per token
    counts = torch.zeros(1, num_experts, dtype=torch.float64).index_add_(
        1, chosen.reshape(-1), torch.ones(1, chosen.numel(), dtype=torch.float64)
    )
    value = balance(load_share(counts)).item()
    floor = lowest_load_balance(num_experts, top_k)
    assert value >= floor - 1e-9
    if collapsed:  # every token picked the same k experts: exactly at the floor
        assert value == pytest.approx(floor, abs=1e-9)


@FAST
@given(logits_rows)
def test_mean_distribution_balance_is_at_least_the_mean_token_entropy(rows):
    """Entropy is concave: the mean routing distribution is never less even than its tokens are."""
    probs = torch.tensor(rows, dtype=torch.float64).softmax(-1)
    num_tokens, num_experts = probs.shape
    tokens = torch.tensor([float(num_tokens)], dtype=torch.float64)
    entropy = normalised_entropy(token_entropy(probs).sum().reshape(1), tokens, num_experts)
    prob_balance = balance(prob_share(probs.sum(0, keepdim=True), tokens))
    assert (prob_balance >= entropy - 1e-9).all() and 0.0 <= prob_balance.item() <= 1.0


@FAST
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 2), min_size=1, max_size=5))
def test_combining_per_device_sums_equals_the_single_device_sums(seed, owner):
    gen = torch.Generator().manual_seed(seed)
    whole = sums_from_logits(tuple(3 * torch.randn(6, 4, generator=gen) for _ in owner), top_k=2)
    combined = combine_sums(split_by_layer(whole, owner, parts=3))
    assert torch.equal(combined.as_tensor(), whole.as_tensor())


@FAST
@given(
    st.lists(
        st.lists(st.floats(0, 1e6), min_size=8, max_size=8).filter(lambda r: sum(r) > 0),
        min_size=1,
        max_size=4,
    )
)
def test_load_shares_sum_to_one_and_load_max_is_at_least_one(counts):
    share = load_share(torch.tensor(counts, dtype=torch.float64))
    torch.testing.assert_close(share.sum(-1), torch.ones(len(counts), dtype=torch.float64))
    assert (load_max(share) >= 1 - 1e-9).all() and (load_cv(share) >= 0).all()


@FAST
@given(logits_rows, logits_rows)
def test_js_divergence_is_symmetric_and_between_zero_and_one(rows_a, rows_b):
    num_experts = min(len(rows_a[0]), len(rows_b[0]))
    n = min(len(rows_a), len(rows_b))
    p = torch.tensor(rows_a)[:n, :num_experts].softmax(-1)
    q = torch.tensor(rows_b)[:n, :num_experts].softmax(-1)
    forward, backward = js_divergence(p, q), js_divergence(q, p)
    assert ((forward >= 0) & (forward <= 1)).all()
    assert torch.equal(forward, backward)
    assert torch.allclose(js_divergence(p, p), torch.zeros(n), atol=1e-6)


@FAST
@given(
    st.lists(
        st.lists(st.integers(0, 1000), min_size=8, max_size=8).filter(lambda r: sum(r) > 0),
        min_size=1,
        max_size=5,
    ),
    st.floats(0.25, 4.0),
)
def test_drop_fraction_is_in_zero_one(forwards, capacity_factor):
    counts = torch.tensor(forwards, dtype=torch.float32)  # (F, E), one row per forward
    overflow = overflow_assignments(counts, top_k=2, capacity_factor=capacity_factor).sum().reshape(1)
    drop = drop_fraction(overflow, counts.sum(0, keepdim=True)).item()
    assert 0.0 <= drop < 1.0


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 12), st.integers(1, 4))
def test_topk_set_change_is_a_share_and_ignores_permutations(seed, num_layers, num_tokens, top_k):
    gen = torch.Generator().manual_seed(seed)
    before = torch.rand(num_layers, num_tokens, 8, generator=gen).topk(top_k, dim=-1).indices
    after = torch.rand(num_layers, num_tokens, 8, generator=gen).topk(top_k, dim=-1).indices
    shuffled = before[..., torch.randperm(top_k, generator=gen)]
    assert 0.0 <= topk_set_change(before, after).item() <= 1.0
    assert topk_set_change(before, shuffled).item() == 0.0
