"""`moe-finetune validate`: everything that can be checked without weights or training.

The architecture is instantiated on the `meta` device (no memory, no download of weights), so a
recipe for a 46B-parameter model is checked in seconds on a laptop: schema, files, dataset rows
and size, and that every LoRA target exists and the experts of every MoE layer are covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_finetune.errors import RecipeError
from moe_finetune.models.families import family_for_config
from moe_finetune.models.lora import build_lora_config
from moe_finetune.models.tiny import build_tiny, family_of_tiny_name, is_tiny_name
from moe_finetune.recipe import Recipe, check_files, load_recipe, recipe_warnings


@dataclass
class ValidationReport:
    recipe: Recipe
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def model_config_for(recipe: Recipe) -> Any:
    """The model's transformers config, offline when possible: tiny models, local paths, shipped configs."""
    from transformers import AutoConfig

    name = recipe.model.name
    if is_tiny_name(name):
        return AutoConfig.from_pretrained(build_tiny(family_of_tiny_name(name)))
    source: str | Path = name
    if recipe.model.config is not None:
        source = recipe.resolve_path(recipe.model.config)
    elif recipe.resolve_path(name).exists():
        source = recipe.resolve_path(name)
    try:
        from moe_finetune.inspect import load_config
    except ImportError:  # pragma: no cover - inspect ships with the package
        load_config = None
    try:
        if load_config is not None:
            return load_config(str(source))
        return AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    except RecipeError:
        raise
    except Exception as err:
        raise RecipeError(
            f"model.name: cannot read the configuration of {name!r} ({str(err).splitlines()[0]}); offline, "
            "set model.config to its config.json (recipes/configs/ ships the common ones)"
        ) from None


def meta_model(config: Any) -> Any:
    """The architecture with no storage behind it: shapes and module names only."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def validate_recipe(
    path: str | Path, overrides: list[str] | None = None, check_data: bool = True
) -> ValidationReport:
    recipe = load_recipe(path, overrides)
    check_files(recipe)
    report = ValidationReport(recipe=recipe, warnings=recipe_warnings(recipe))
    if check_data:
        from moe_finetune.callbacks.dataset_size import check_dataset_size
        from moe_finetune.data import load_data

        data = load_data(recipe.data, recipe.resolve_path(recipe.data.path))
        check_dataset_size(data.num_train, recipe.data.min_examples, str(data.path))
        report.lines.append(f"data: {data.num_train:,} training examples ({data.schema}) in {data.path}")

    config = model_config_for(recipe)
    spec = family_for_config(config)
    model = meta_model(config)
    lora_config = build_lora_config(model, recipe.lora, spec)
    total = sum(p.numel() for p in model.parameters())
    report.lines.append(
        f"model: {recipe.model.name} ({spec.name}, {total / 1e9:.2f} B parameters, "
        f"{spec.num_experts(config)} experts, top-{spec.top_k(config)})"
    )
    report.lines.append(
        f"lora: r={recipe.lora.r}, modules {sorted(lora_config.target_modules or [])}, "
        f"expert parameters {sorted(lora_config.target_parameters or [])}, "
        f"router {'trainable' if recipe.lora.router else 'frozen'}"
    )
    return report
