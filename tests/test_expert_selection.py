"""`lora.experts: auto | {layer: [experts]}`: LoRA on the experts a task uses (ESFT), in PEFT's own format.

The factors keep PEFT's full shapes and the experts left out have their slices of lora_A and lora_B held at
zero (models/lora.py, `mask_experts`), on both expert kernels; an `auto` run chooses from a routing profile
of its data on the base model and records the explicit mapping in recipe.resolved.yaml.
"""

from __future__ import annotations

import pytest
import torch
import transformers
import yaml

from moe_finetune.errors import LoraTargetError, RecipeError
from moe_finetune.models.families import find_routers, get_family, tiny_config_kwargs
from moe_finetune.models.lora import apply_lora
from moe_finetune.sections import LoraSection

E, R = 8, 4
SELECTION = {0: [1, 3], 1: [0]}


def tiny_mixtral(seed: int = 0):
    spec = get_family("mixtral")
    config = transformers.MixtralConfig(**tiny_config_kwargs(spec, vocab_size=128))
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config)


def expert_factors(peft_model):
    """(layer, parameter, lora_A (r·E, in), lora_B (out, r·E)) of every expert ParamWrapper."""
    from peft.tuners.lora.layer import ParamWrapper

    found = []
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            layer = int(name.split(".layers.")[1].split(".")[0])
            found.append((layer, module.parameter_name, module.lora_A["default"].weight, module.lora_B["default"].weight))
    return found


def slices(weight_a, weight_b, expert):
    """Expert `expert`'s rows of lora_A (expert-major) and columns of lora_B (expert-minor)."""
    return weight_a.view(E, R, -1)[expert], weight_b.view(weight_b.shape[0], R, E)[:, :, expert]


def batch(seed: int = 3):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("kernel", ["fast", "peft"])
def test_experts_left_out_get_no_delta_and_no_gradient_and_stay_zero_through_adamw(kernel):
    model, cov = apply_lora(tiny_mixtral(), LoraSection(r=R, experts=SELECTION, expert_kernel=kernel), get_family("mixtral"))
    assert cov.expert_kernel == kernel
    factors = expert_factors(model)
    assert {layer for layer, *_ in factors} == {0, 1} and len(factors) == 4
    with torch.no_grad():  # B starts at zero in PEFT: give the chosen experts a delta, as training would
        for layer, _, weight_a, weight_b in factors:
            for expert in SELECTION[layer]:
                slices(weight_a, weight_b, expert)[1].normal_(0, 0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(2):
        optimizer.zero_grad()
        model(**batch(step)).loss.backward()
        for layer, name, weight_a, weight_b in factors:
            for expert in range(E):
                a, b = slices(weight_a, weight_b, expert)
                grad_a, grad_b = slices(weight_a.grad, weight_b.grad, expert)
                if expert in SELECTION[layer]:
                    assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0, (layer, name, expert)
                else:
                    assert not a.any() and not b.any(), (layer, name, expert)
                    assert not grad_a.any() and not grad_b.any(), (layer, name, expert)
        optimizer.step()
    for layer, _, weight_a, weight_b in factors:
        for expert in set(range(E)) - set(SELECTION[layer]):
            a, b = slices(weight_a, weight_b, expert)
            assert not a.any() and not b.any()


def test_the_coverage_line_names_the_adapted_experts_and_counts_only_what_trains():
    everything, full = apply_lora(tiny_mixtral(), LoraSection(r=R), get_family("mixtral"))
    model, cov = apply_lora(tiny_mixtral(), LoraSection(r=R, experts=SELECTION), get_family("mixtral"))
    assert cov.expert_selection == SELECTION
    masked = sum(
        (E - len(SELECTION[layer])) * R * (weight_a.shape[1] + weight_b.shape[0])
        for layer, _, weight_a, weight_b in expert_factors(model)
    )
    assert masked > 0 and cov.trainable == full.trainable - masked
    line = cov.line()
    assert "experts 3 of 16 (layer 0: 1,3; layer 1: 0)" in line and f"trainable parameters {cov.trainable:,}" in line
    assert "experts 2/2 MoE layers x 8 experts" in full.line()


def test_experts_true_all_and_false_keep_their_meaning():
    assert LoraSection(experts="all").experts is True
    _, cov = apply_lora(tiny_mixtral(), LoraSection(r=R, experts="all"), get_family("mixtral"))
    assert cov.expert_selection is None and cov.expert_layers == 2
    _, cov = apply_lora(tiny_mixtral(), LoraSection(r=R, experts=False), get_family("mixtral"))
    assert cov.expert_parameters == []


@pytest.mark.parametrize(
    ("experts", "message"),
    [({5: [0]}, "layer 5 is not an MoE layer"), ({0: [8]}, "names expert 8"), ("auto", "routing profile")],
)
def test_a_mapping_the_model_does_not_have_or_an_unresolved_auto_is_refused(experts, message):
    with pytest.raises(LoraTargetError, match=message):
        apply_lora(tiny_mixtral(), LoraSection(r=R, experts=experts), get_family("mixtral"))


def test_a_bad_experts_value_in_a_recipe_is_refused_naming_the_field(recipe_factory):
    from moe_finetune.recipe import load_recipe

    with pytest.raises(RecipeError, match="lora.experts"):
        load_recipe(recipe_factory("lora:\n  experts: some\n"))
    with pytest.raises(RecipeError, match="lora.experts_score"):
        load_recipe(recipe_factory("lora:\n  experts: auto\n  experts_score: both\n"))


def test_validate_checks_a_mapping_against_the_model_without_its_weights(recipe_factory, capsys):
    from moe_finetune.cli import main

    assert main(["validate", str(recipe_factory("lora:\n  experts: {0: [1, 9]}\n"))]) == 2
    assert "layer 0 names expert 9, but the model has 8 experts" in capsys.readouterr().err
    assert main(["validate", str(recipe_factory("lora:\n  experts: {0: [1, 7], 1: []}\n"))]) == 0


# ------------------------------------------------------------------------------------------------
# auto: a router skewed towards known experts


FAVOURED = {0: [2, 5], 1: [6]}


def skew_routers(model, favoured=FAVOURED, amount: float = 8.0):
    """Mixtral's router with `amount` added to the logits of the favoured experts of each layer."""
    spec = get_family("mixtral")
    for layer, group in enumerate(find_routers(model, spec)[1]):
        router = group[0]
        bias = torch.zeros(router.num_experts)
        bias[favoured[layer]] = amount

        def forward(hidden, router=router, bias=bias):
            logits = torch.nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight) + bias
            top, index = logits.float().softmax(-1).topk(router.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), index

        router.forward = forward
    return model


def test_auto_on_a_router_skewed_towards_known_experts_selects_exactly_those(recipe_factory):
    from moe_finetune.models.loading import load_model_and_tokenizer
    from moe_finetune.profile import choose_experts
    from moe_finetune.recipe import load_recipe
    from moe_finetune.train import load_training_data

    # two favoured experts share layer 0's gate score (unevenly: their own logits differ): top_p 0.9 needs both;
    # layer 1's one favoured expert holds nearly all of its gate score (e^8 over the rest)
    recipe = load_recipe(recipe_factory("lora:\n  experts: auto\n  experts_top_p: 0.9\n"))
    data, _ = load_training_data(recipe)
    model, tokenizer, family = load_model_and_tokenizer(recipe.model)
    skew_routers(model)
    assert choose_experts(recipe, model, tokenizer, family, data, echo=lambda _l: None) == FAVOURED
    # token-selection ratio: every token picks both of layer 0's favoured experts (0.5 each, so one reaches
    # top_p 0.5, the lower index on the tie) and layer 1's favoured one with one of its two choices (0.5)
    recipe.lora.experts_score, recipe.lora.experts_top_p = "token", 0.5
    assert choose_experts(recipe, model, tokenizer, family, data, echo=lambda _l: None) == {0: [2], 1: [6]}


def test_an_auto_run_records_its_experts_and_its_adapter_changes_only_them_under_plain_peft(
    recipe_factory, tmp_path, tiny_mixtral_dir, monkeypatch, capsys
):
    from peft import PeftModel

    import moe_finetune.train as train_module
    from moe_finetune.cli import main
    from moe_finetune.recipe import load_recipe

    loader = train_module.load_model_and_tokenizer

    def skewed(*args, **kwargs):
        model, tokenizer, family = loader(*args, **kwargs)
        return skew_routers(model), tokenizer, family

    monkeypatch.setattr(train_module, "load_model_and_tokenizer", skewed)
    recipe = recipe_factory()
    # guards off: the skewed routers start at routing entropy ~0.02, where the guard (now judging against
    # this profile from the first logging step) reads any wobble as a halving; this test is about selection
    code = main(["train", str(recipe), "--set", "lora.r=4", "--set", "lora.experts=auto",
                 "--set", "lora.experts_top_p=0.9", "--set", "training.learning_rate=5e-3",
                 "--set", "guards.enabled=false"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "lora.experts: auto (gate score, top_p 0.9)" in out
    assert "experts 3 of 16 (layer 0: 2,5; layer 1: 6)" in out and "on the fast kernel" in out
    resolved = tmp_path / "run" / "recipe.resolved.yaml"
    assert yaml.safe_load(resolved.read_text())["lora"]["experts"] == {"0": [2, 5], "1": [6]}  # JSON keys
    assert load_recipe(resolved).lora.experts == FAVOURED  # rerunning the resolved recipe adapts the same

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters() if ".experts." in n}
    merged = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").merge_and_unload()
    after = dict(merged.named_parameters())
    assert before
    for name, weight in before.items():  # (E, out, in) stacks: expert e is weight[e]
        layer = int(name.split(".layers.")[1].split(".")[0])
        for expert in range(E):
            changed = not torch.equal(after[name][expert], weight[expert])
            assert changed == (expert in FAVOURED[layer]), (name, expert)


def test_with_auto_the_guard_judges_against_the_profile_measured_before_any_update(recipe_factory):
    from moe_finetune.callbacks.guard import EntropyGuard
    from moe_finetune.recipe import load_recipe
    from moe_finetune.train import build_trainer

    # baseline_steps 50: without the profile the guard would still be collecting its baseline after 4 steps
    recipe = load_recipe(recipe_factory("lora:\n  experts: auto\nguards:\n  baseline_steps: 50\n"))
    lines: list[str] = []
    trainer = build_trainer(recipe, echo=lines.append)
    assert any(line.startswith("guard baseline: the routing profile of 343 tokens") for line in lines)
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, EntropyGuard))
    preset = guard.preset_baseline
    assert preset is not None and len(preset["layer_entropy"]) == 2 and len(preset["load_share"][0]) == 8
    trainer.train()
    assert guard.policy.layer_baseline == pytest.approx(preset["layer_entropy"])
    assert guard.policy.baseline == pytest.approx(sum(preset["layer_entropy"]) / 2)
    assert guard.policy.state.layer_balance_baseline is not None


_AGREE_SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
from moe_finetune.profile import RoutingProfile
from moe_finetune.train import as_rank_zero_measured

dist.init_process_group("gloo")
rank = dist.get_rank()
# each rank measured something else (as a last bit of a kernel can make it): all must take rank 0's
measured = RoutingProfile(model="m", family="mixtral", num_experts=8, top_k=2, tokens=100 + rank, examples=1)
agreed = as_rank_zero_measured(measured)
json.dump({"tokens": agreed.tokens}, open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_every_rank_chooses_its_experts_from_rank_zeros_profile(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    from moe_finetune.train import as_rank_zero_measured

    alone = object()
    assert as_rank_zero_measured(alone) is alone  # one process: nothing to agree with
    script = tmp_path / "agree.py"
    script.write_text(_AGREE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["tokens"] for r in (0, 1)] == [100, 100]
