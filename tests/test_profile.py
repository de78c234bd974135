"""`moe-finetune profile`: the routing of a recipe's data on the base model, checked against an independent
computation from `output_router_logits`, and ESFT's expert selection (routing/affinity.py) as pure math."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_finetune.cli import main
from moe_finetune.models.families import find_routers
from moe_finetune.models.loading import load_model_and_tokenizer
from moe_finetune.profile import (
    batches,
    format_table,
    measure_profile,
    profile_loaded,
    sample_token_ids,
)
from moe_finetune.recipe import load_recipe
from moe_finetune.routing.affinity import gate_score, normalised, select_top_p, token_ratio
from moe_finetune.train import load_training_data

# ------------------------------------------------------------------------------------------------
# the pure half


def test_top_p_takes_the_fewest_highest_scoring_experts_whose_share_reaches_top_p():
    scores = [0.05, 0.30, 0.10, 0.25, 0.30]  # shares as given (they sum to 1)
    assert select_top_p(scores, 0.2) == [1]  # one expert already holds 0.30
    assert select_top_p(scores, 0.5) == [1, 4]  # 0.60; ties go to the lower index first
    assert select_top_p(scores, 0.61) == [1, 3, 4]
    assert select_top_p(scores, 1.0) == [0, 1, 2, 3, 4]


def test_top_p_normalises_the_scores_and_a_share_exactly_at_top_p_takes_no_extra_expert():
    # unnormalised gate scores: shares 0.1, 0.1, 0.8; 0.8 alone passes 0.2
    assert select_top_p([1.0, 1.0, 8.0], 0.2) == [2]
    # ten experts of 0.1 each: 0.1 + 0.1 reaches 0.2 exactly (no rounding drift into a third)
    assert select_top_p([1.0] * 10, 0.2) == [0, 1]


def test_a_layer_without_tokens_selects_no_expert_and_top_p_outside_0_1_is_refused():
    assert select_top_p([0.0, 0.0, 0.0], 0.2) == []
    assert select_top_p(gate_score([1.0, 2.0], 0), 0.2) == []
    with pytest.raises(ValueError, match="top_p"):
        select_top_p([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="top_p"):
        select_top_p([1.0, 2.0], 1.5)


def test_token_ratio_sums_to_one_and_gate_score_is_the_mean_chosen_score_per_token():
    # 4 tokens, top-2: 8 assignments
    assert token_ratio([4, 2, 2, 0], 4, 2) == [0.5, 0.25, 0.25, 0.0]
    assert gate_score([1.2, 0.8, 0.0], 4) == [0.3, 0.2, 0.0]
    assert math.fsum(normalised([3.0, 1.0])) == 1.0
    assert all(math.isnan(v) for v in normalised([0.0, 0.0]))


# ------------------------------------------------------------------------------------------------
# the measurement against an independent computation


def _recipe(tmp_path: Path, data: Path, model: str):
    text = (
        f"model:\n  name: {model}\n"
        f"data:\n  path: {data}\n  min_examples: 10\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "training:\n  per_device_train_batch_size: 4\n  max_length: 24\n"
    )
    path = tmp_path / f"{model}.yaml"
    path.write_text(text, encoding="utf-8")
    return load_recipe(path)


@pytest.fixture
def varied_jsonl(tmp_path: Path) -> Path:
    """Rows of different lengths, so every batch has padding the profile must leave out."""
    path = tmp_path / "varied.jsonl"
    rows = [
        {"prompt": f"Question {i}: " + "what is the sum " * (1 + i % 5), "completion": f" {i * 7} units"}
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _deepseek_choice(router: torch.nn.Module, logits: torch.Tensor, k: int) -> torch.Tensor:
    """DeepSeek-V3's choice written out: sigmoid + correction bias, best group(s) by their top-2 sum, top-k."""
    choice = logits.sigmoid() + router.e_score_correction_bias.float()
    n, experts = choice.shape
    groups = router.num_group
    group_scores = choice.view(n, groups, experts // groups).topk(2, dim=-1).values.sum(-1)  # (N, groups)
    best = group_scores.topk(router.topk_group, dim=-1).indices
    allowed = torch.zeros(n, groups, dtype=torch.bool).scatter_(1, best, True)
    allowed = allowed.unsqueeze(-1).expand(n, groups, experts // groups).reshape(n, experts)
    return choice.masked_fill(~allowed, -math.inf).topk(k, dim=-1).indices


def _expected(model, family, rows, batch_size, pad_id):
    """Per layer (tokens, entropy, balance, load share, gate score) from output_router_logits alone."""
    experts, k = family.num_experts(model.config), family.top_k(model.config)
    routers = [group[0] for group in find_routers(model, family)[1]]
    totals = None
    for batch in batches(rows, batch_size, pad_id):
        with torch.no_grad():
            out = model(**batch, output_router_logits=True)
        keep = batch["attention_mask"].reshape(-1).bool()
        layers = []
        for router, logits in zip(routers, out.router_logits, strict=True):
            logits = logits.float().reshape(-1, experts)[keep]
            if family.scores == "sigmoid":
                chosen = _deepseek_choice(router, logits, k)
                scores = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
            else:
                chosen = logits.topk(k, dim=-1).indices
                scores = logits.softmax(-1)
            probs = logits.softmax(-1)  # the per-token entropy is of softmax(logits) in every family
            entropy = -(probs * probs.log()).sum(-1).sum()
            counts = torch.zeros(experts).index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel()))
            picked = torch.zeros_like(scores).scatter_(1, chosen, scores.gather(1, chosen))
            layers.append(torch.cat([keep.sum().reshape(1).float(), entropy.reshape(1), counts, picked.sum(0)]))
        stacked = torch.stack(layers).double()
        totals = stacked if totals is None else totals + stacked
    result = []
    for row in totals:
        tokens, entropy, counts, picked = row[0], row[1], row[2 : 2 + experts], row[2 + experts :]
        share = counts / counts.sum()
        balance = -(share * share.clamp_min(1e-300).log()).sum() / math.log(experts)
        result.append(
            (int(tokens), float(entropy / tokens / math.log(experts)), float(balance), share.tolist(),
             (picked / tokens).tolist())
        )
    return result


@pytest.mark.parametrize("model_name", ["tiny-mixtral", "tiny-deepseek_v3"])
def test_profile_numbers_equal_an_independent_computation_from_output_router_logits(
    tmp_path, varied_jsonl, model_name
):
    recipe = _recipe(tmp_path, varied_jsonl, model_name)
    data, _ = load_training_data(recipe)
    model, tokenizer, family = load_model_and_tokenizer(recipe.model)
    if family.scores == "sigmoid":  # a correction bias that moves the choice: the router's own is what counts
        for router in (group[0] for group in find_routers(model, family)[1]):
            router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, router.e_score_correction_bias.numel()))
    rows = sample_token_ids(data, tokenizer, 300, 24)
    assert sum(map(len, rows)) == 300 and max(map(len, rows)) <= 24
    assert len({len(ids) for ids in rows}) > 1  # padding in the batches
    profile = measure_profile(model, family, rows, batch_size=4, pad_id=tokenizer.pad_token_id)
    expected = _expected(model, family, rows, 4, tokenizer.pad_token_id)

    assert profile.tokens == 300 and [layer.tokens for layer in profile.layers] == [300] * len(expected)
    for layer, (tokens, entropy, balance, share, gate) in zip(profile.layers, expected, strict=True):
        assert layer.tokens == tokens
        assert layer.entropy == pytest.approx(entropy, abs=1e-5)
        assert layer.balance == pytest.approx(balance, abs=1e-5)
        assert layer.load_share == pytest.approx(share, abs=1e-9)
        assert layer.gate_score == pytest.approx(gate, abs=1e-5)
    assert [layer.name for layer in profile.layers] == find_routers(model, family)[0]
    assert not model.training  # given back in the mode it came in (from_pretrained: eval)


def test_profile_leaves_the_model_in_training_mode_when_it_came_in_training(tmp_path, varied_jsonl):
    recipe = _recipe(tmp_path, varied_jsonl, "tiny-mixtral")
    data, _ = load_training_data(recipe)
    model, tokenizer, family = load_model_and_tokenizer(recipe.model)
    model.train()
    profile = profile_loaded(recipe, model, tokenizer, family, data, samples=64, echo=lambda _line: None)
    assert model.training and profile.tokens == 64
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in model.modules())
    table = format_table(profile)
    assert "entropy" in table and all(f"\n{layer.layer:>5}" in table for layer in profile.layers)


def test_profile_command_writes_profile_json_and_a_heatmap(tmp_path, varied_jsonl, capsys):
    recipe = _recipe(tmp_path, varied_jsonl, "tiny-mixtral")
    out = tmp_path / "prof"
    assert main(["profile", str(recipe.source), "--samples", "200", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "routing profile: tiny-mixtral" in printed and "200 tokens" in printed
    data = json.loads((out / "profile.json").read_text())
    assert data["tokens"] == 200 and data["num_experts"] == 8 and data["top_k"] == 2
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    for layer in data["layers"]:
        assert math.fsum(layer["load_share"]) == pytest.approx(1.0)
        assert 0 < layer["entropy"] <= 1 and 0 < layer["balance"] <= 1
    # the selection recorded is the one top_p 0.2 gives on the recorded scores
    for score, key in (("gate", "gate_score"), ("token", "load_share")):
        expected = {str(row["layer"]): select_top_p(row[key], 0.2) for row in data["layers"]}
        assert data["selection"][score] == expected
    png = (out / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_profile_refuses_a_sample_of_no_tokens_with_exit_2(tmp_path, varied_jsonl, capsys):
    recipe = _recipe(tmp_path, varied_jsonl, "tiny-mixtral")
    assert main(["profile", str(recipe.source), "--samples", "0", "--output-dir", str(tmp_path / "p")]) == 2
    assert "--samples" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_validate_profile_prints_the_table_and_what_auto_would_adapt(tmp_path, varied_jsonl, capsys):
    recipe = _recipe(tmp_path, varied_jsonl, "tiny-mixtral")
    code = main(["validate", str(recipe.source), "--profile", "128", "--set", "lora.experts=auto"])
    out = capsys.readouterr().out
    assert code == 0
    assert "routing profile: tiny-mixtral" in out and "128 tokens" in out
    assert "lora.experts: auto would adapt {0: [" in out and "routed (batch" not in out
    assert not (tmp_path / "run").exists()  # validation writes nothing
