"""LoRA targets: attention as modules, fused experts as parameters, and no silent frozen experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from moe_finetune.errors import LoraTargetError
from moe_finetune.models.families import get_family
from moe_finetune.models.lora import apply_lora, build_lora_config, check_targets
from moe_finetune.sections import LoraSection

MIXTRAL = get_family("mixtral")


@pytest.fixture
def model(tiny_mixtral_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)


def test_default_targets_adapt_attention_and_every_layers_experts(model) -> None:
    peft_model, cov = apply_lora(model, LoraSection(r=4), MIXTRAL)
    layers = model.config.num_hidden_layers
    assert cov.attention_modules == 4 * layers and cov.attention_layers == layers
    assert cov.expert_layers == cov.moe_layers == layers
    assert cov.expert_parameters == ["down_proj", "gate_up_proj"]
    assert not cov.router_trainable
    assert 0 < cov.trainable < cov.total
    assert "experts 2/2 MoE layers x 8 experts" in cov.line()
    routers = [p for n, p in peft_model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert routers and not any(p.requires_grad for p in routers)


def test_router_can_be_made_trainable_on_request(model) -> None:
    _, cov = apply_lora(model, LoraSection(r=4, router=True), MIXTRAL)
    assert cov.router_trainable


def test_attention_only_adapter_is_allowed_when_asked_for(model) -> None:
    _, cov = apply_lora(model, LoraSection(r=4, experts=False), MIXTRAL)
    assert cov.expert_layers == 0 and cov.attention_modules > 0
    assert "experts frozen" in cov.line()


def test_unknown_attention_target_names_the_field_and_lists_modules(model) -> None:
    with pytest.raises(LoraTargetError) as info:
        check_targets(model, LoraSection(target_modules=["query"]), MIXTRAL)
    assert "lora.target_modules" in str(info.value) and "q_proj" in str(info.value)


def test_expert_target_that_matches_nothing_is_an_error_not_a_frozen_adapter(model) -> None:
    with pytest.raises(LoraTargetError, match="lora.target_parameters"):
        check_targets(model, LoraSection(target_parameters=["mlp.experts.w1"]), MIXTRAL)


def test_experts_of_only_some_layers_is_an_error(model) -> None:
    with pytest.raises(LoraTargetError, match="1 of 2 MoE"):
        check_targets(model, LoraSection(target_parameters=["layers.0.mlp.experts.down_proj"]), MIXTRAL)


def test_nothing_to_train_is_an_error(model) -> None:
    with pytest.raises(LoraTargetError, match="nothing to train"):
        build_lora_config(model, LoraSection(attention=False, experts=False), MIXTRAL)


def test_targets_are_checked_on_a_meta_device_model(tiny_mixtral_dir: Path) -> None:
    import torch

    config = transformers.AutoConfig.from_pretrained(tiny_mixtral_dir)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    config = build_lora_config(meta, LoraSection(), MIXTRAL)
    assert set(config.target_parameters) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


def _trainable_modules(peft_model) -> set[str]:
    """Modules (in the base model's own names) whose full weights train (not LoRA A/B)."""
    names = set()
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad and ".modules_to_save." in name:
            names.add(name.split(".modules_to_save.")[0].removeprefix("base_model.model."))
    return names


def test_router_training_on_qwen2_moe_trains_exactly_the_routers_not_the_shared_expert_gate() -> None:
    from moe_finetune.models.tiny import build_tiny

    qwen = get_family("qwen2_moe")
    model = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(qwen))
    routers = {f"model.layers.{i}.mlp.gate" for i in range(model.config.num_hidden_layers)} - {
        f"model.layers.{i}.mlp.gate" for i in model.config.mlp_only_layers
    }
    assert any(name.endswith("shared_expert_gate") for name, _ in model.named_modules())  # the look-alike
    peft_model, cov = apply_lora(model, LoraSection(r=4, router=True), qwen)
    assert cov.router_trainable
    assert _trainable_modules(peft_model) == routers
    frozen = [p for n, p in peft_model.named_parameters() if "shared_expert_gate" in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_router_training_on_mixtral_still_trains_every_router(model, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    peft_model, cov = apply_lora(model, LoraSection(r=4, router=True), MIXTRAL)
    routers = {f"model.layers.{i}.mlp.gate" for i in range(model.config.num_hidden_layers)}
    assert cov.router_trainable and _trainable_modules(peft_model) == routers
    # The adapter saved with these names loads the trained routers back.
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".modules_to_save." in name:
                parameter.add_(1.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(model.name_or_path)
    reloaded = dict(PeftModel.from_pretrained(base, tmp_path / "adapter").named_parameters())
    for name, parameter in peft_model.named_parameters():
        if ".modules_to_save." in name:
            assert torch.equal(reloaded[name], parameter), name
