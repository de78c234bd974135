"""Every supported MoE family, on its tiny random model: routers found and read right, padding and
gradient-checkpoint recomputes left out, PEFT wrapping transparent, the aux-loss check true, smoke runs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from moe_finetune.aux_check import aux_gradient_receivers, check_aux_loss, describe_aux_loss
from moe_finetune.models.families import FAMILIES, get_family
from moe_finetune.routing import capture_routing
from moe_finetune.routing.metrics import RoutingSums, overflow_assignments

REQUIRED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
ALL = sorted(FAMILIES)
SUM_FIELDS = ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum")


@pytest.fixture(scope="module")
def family_dirs() -> dict[str, Path]:
    from moe_finetune.models.tiny import build_tiny

    return {name: build_tiny(name) for name in ALL}


def load(path: Path):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.config.use_cache = False
    return model.eval()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_sums(model, **inputs) -> RoutingSums:
    with capture_routing(model) as cap, torch.no_grad():
        model(**inputs)
    return cap.sums


def assert_sums_close(actual: RoutingSums, expected: RoutingSums) -> None:
    for name in SUM_FIELDS:
        torch.testing.assert_close(
            getattr(actual, name), getattr(expected, name), atol=1e-4, rtol=1e-5, msg=name
        )


def lora(model, family: str, **section):
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    wrapped, _ = apply_lora(model, LoraSection(**section), get_family(family))
    return wrapped


def test_the_issue_families_are_all_supported():
    assert set(REQUIRED) <= set(FAMILIES)


@pytest.mark.parametrize("family", ALL)
def test_one_layer_per_moe_layer_with_loads_summing_to_one(family, family_dirs):
    model = load(family_dirs[family])
    with capture_routing(model) as cap, torch.no_grad():
        out = model(input_ids=ids(2, 8), output_router_logits=True)
    stats = cap.stats()
    # transformers returns one router-logits tensor per MoE layer (dense layers have none)
    assert cap.num_layers == len(out.router_logits) < model.config.num_hidden_layers + 1
    assert len(stats.load_share) == cap.num_layers
    for row in stats.load_share:
        assert len(row) == cap.num_experts and sum(row) == pytest.approx(1.0)
    assert all(0.0 < value <= 1.0 for value in stats.layer_entropy)
    assert stats.tokens == 16 and stats.finite


@pytest.mark.parametrize("family", ALL)
def test_padding_rows_are_left_out(family, family_dirs):
    model = load(family_dirs[family])
    a, b = ids(1, 6, seed=1), ids(1, 4, seed=2)
    separate = run_sums(model, input_ids=a) + run_sums(model, input_ids=b)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 2, dtype=torch.long)], dim=1)])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    padded = run_sums(model, input_ids=batch, attention_mask=mask)
    assert_sums_close(padded, separate)
    torch.testing.assert_close(padded.overflow, overflow_assignments(padded.assign_counts, padded.top_k))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", ALL)
def test_gradient_checkpointing_recomputes_are_not_counted(family, reentrant, family_dirs):
    batch = {"input_ids": ids(2, 6), "labels": ids(2, 6)}
    plain = load(family_dirs[family]).train()
    with capture_routing(plain) as expected:
        plain(**batch).loss.backward()

    model = load(family_dirs[family]).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    with capture_routing(model) as cap:
        model(**batch).loss.backward()  # backward re-runs every router
    assert cap.sums.tokens.tolist() == [12.0] * cap.num_layers
    assert_sums_close(cap.sums, expected.sums)


@pytest.mark.parametrize("family", ALL)
def test_a_peft_wrapped_model_reports_what_the_bare_model_does(family, family_dirs):
    batch = {"input_ids": ids(2, 7)}
    bare = load(family_dirs[family])
    expected = run_sums(bare, **batch)
    wrapped = lora(load(family_dirs[family]), family).eval()  # LoRA B starts at 0: same outputs
    with capture_routing(wrapped) as cap, torch.no_grad():
        wrapped(**batch)
    assert cap.layer_names == [name for name in expected.layer_names]
    assert_sums_close(cap.sums, expected)


# --------------------------------------------------------------------------- DeepSeek-V3 routing


def deepseek_choice(logits: torch.Tensor, bias: torch.Tensor, config) -> torch.Tensor:
    """DeepSeek-V3's rule, re-implemented: sigmoid + bias, best `topk_group` of `n_group` groups (each
    scored by its top-2), then top-k inside them. Returns (N, k) expert indices."""
    scores = logits.sigmoid() + bias
    groups = scores.view(-1, config.n_group, scores.shape[-1] // config.n_group)
    group_score = groups.topk(2, dim=-1).values.sum(-1)  # (N, n_group)
    keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(config.topk_group, dim=-1).indices, 1.0)
    allowed = keep.unsqueeze(-1).expand_as(groups).reshape(scores.shape).bool()
    return scores.masked_fill(~allowed, float("-inf")).topk(config.num_experts_per_tok, dim=-1).indices


def assignment_counts(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(experts, dtype=torch.float64).index_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=torch.float64)
    )


def test_deepseek_v3_loads_follow_the_biased_grouped_choice(family_dirs):
    model = load(family_dirs["deepseek_v3"])
    config = model.config
    generator = torch.Generator().manual_seed(7)
    routers = [layer.mlp.gate for layer in model.model.layers[config.first_k_dense_replace :]]
    with torch.no_grad():
        for router in routers:
            router.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, generator=generator))
    with capture_routing(model) as cap, torch.no_grad():
        out = model(input_ids=ids(3, 10), output_router_logits=True)

    changed_by_bias = 0
    for layer, (router, logits) in enumerate(zip(routers, out.router_logits, strict=True)):
        chosen = deepseek_choice(logits.float(), router.e_score_correction_bias, config)
        torch.testing.assert_close(cap.sums.assign_counts[layer], assignment_counts(chosen, 8))
        unbiased = logits.float().sigmoid().topk(config.num_experts_per_tok, dim=-1).indices
        changed_by_bias += int(not torch.equal(assignment_counts(unbiased, 8), assignment_counts(chosen, 8)))
        # probabilities come from the scores without the bias, normalised to sum 1 (the per-token
        # entropy is of softmax(logits) instead: tests/test_sigmoid_routing.py says why)
        scores = logits.float().sigmoid()
        torch.testing.assert_close(
            cap.sums.prob_sum[layer],
            (scores / scores.sum(-1, keepdim=True)).sum(0).double(),
            atol=1e-5,
            rtol=1e-5,
        )
    assert changed_by_bias > 0, "the random bias should change which experts are chosen"


# --------------------------------------------------------------------------- aux-loss check


def randomise_lora_b(model) -> None:
    """LoRA B starts at zero, which zeroes every LoRA A gradient; make both visible to the measurement."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)


AUX_FAMILIES = [name for name in ALL if FAMILIES[name].aux_loss_in_model]


@pytest.mark.parametrize("family", AUX_FAMILIES)
def test_aux_check_names_exactly_the_tensors_its_gradient_reaches(family, family_dirs):
    model = lora(load(family_dirs[family]), family).train()
    model.config.output_router_logits = True
    randomise_lora_b(model)
    check = check_aux_loss(model)
    assert check.in_loss and check.added_by == "model" and not check.router_trainable
    assert set(check.receivers) == set(aux_gradient_receivers(model, ids(2, 6)))
    # a frozen router does not make the aux loss a mere metric: the adapters upstream still train on it
    assert check.receivers and "cannot change the router weights" in check.lines[-1]


def test_aux_check_says_a_trained_router_receives_the_gradient(family_dirs):
    model = lora(load(family_dirs["mixtral"]), "mixtral", router=True).train()
    model.config.output_router_logits = True
    randomise_lora_b(model)
    check = check_aux_loss(model)
    assert check.router_trainable and "reaches the router weights" in check.lines[-1]
    measured = aux_gradient_receivers(model, ids(2, 6))
    assert any("mlp.gate" in name for name in measured) and set(check.receivers) == set(measured)


def test_aux_check_says_only_a_metric_when_nothing_upstream_trains(family_dirs):
    model = load(family_dirs["mixtral"]).train()
    model.config.output_router_logits = True
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("lm_head"))
    check = check_aux_loss(model)
    assert check.in_loss and check.receivers == [] and "only a metric" in check.lines[-1]
    assert aux_gradient_receivers(model, ids(2, 6)) == []


def test_aux_check_says_reentrant_checkpointing_cuts_the_aux_gradient(family_dirs):
    model = lora(load(family_dirs["mixtral"]), "mixtral", router=True).train()
    model.config.output_router_logits = True
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    check = check_aux_loss(model)
    assert check.reentrant_checkpointing and not check.trains_something
    assert "use_reentrant=True" in check.lines[-1] and "only a metric" in check.lines[-1]
    assert aux_gradient_receivers(model, ids(2, 6)) == []  # measured: nothing, not even the router


def sft_args(**kwargs):
    from trl import SFTConfig

    return SFTConfig(output_dir="unused", report_to="none", bf16=False, **kwargs)


def test_aux_check_follows_sft_trainer_coefficient_and_checkpointing(family_dirs):
    model = lora(load(family_dirs["mixtral"]), "mixtral")
    assert model.config.output_router_logits is False  # SFTTrainer turns it on itself
    check = check_aux_loss(model, sft_args())
    assert (check.in_loss, check.added_by, check.coefficient) == (True, "SFTTrainer", 0.01)
    assert "added once by TRL's SFTTrainer" in check.lines[0]
    assert not check_aux_loss(model, sft_args(router_aux_loss_coef=0.0)).in_loss
    reentrant = check_aux_loss(model, sft_args(gradient_checkpointing_kwargs={"use_reentrant": True}))
    assert reentrant.reentrant_checkpointing and reentrant.receivers == []
    assert not check_aux_loss(model).in_loss  # a plain loop: the config flag is off, so nothing adds it


def test_aux_check_warns_that_deepseek_v3_has_no_aux_loss_to_add(family_dirs):
    model = lora(load(family_dirs["deepseek_v3"]), "deepseek_v3")
    assert not check_aux_loss(model).in_loss
    assert "add no load-balancing loss" in describe_aux_loss(model)[0]
    forced = check_aux_loss(model, sft_args(router_aux_loss_coef=0.01))
    assert forced.in_loss and forced.problems and "set router_aux_loss_coef to 0" in forced.problems[0]


# --------------------------------------------------------------------------- smoke


@pytest.mark.parametrize("family", ALL)
def test_smoke_trains_every_family_and_prints_its_routing_table(family, family_dirs):
    from moe_finetune.smoke import run_smoke

    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_smoke(family, steps=3, echo=lines.append, rows=16)
    assert result.ok and result.steps == 3
    assert [record["step"] for record in result.routing_records] == [1, 2, 3]
    printed = "\n".join(lines)
    assert "aux loss:" in printed and "layer" in printed
    for name in result.metrics.layer_names:
        assert name.removeprefix("model.") in result.table
