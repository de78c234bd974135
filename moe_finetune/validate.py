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
from moe_finetune.models.configs import meta_model, model_config_for
from moe_finetune.models.families import family_for_config
from moe_finetune.models.lora import build_lora_config
from moe_finetune.recipe import Recipe, check_files, load_recipe, recipe_warnings
from moe_finetune.routing.policy import load_limit_problem


@dataclass
class ValidationReport:
    recipe: Recipe
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def recipe_model_config(recipe: Recipe) -> Any:
    """The config of the recipe's model (models/configs.py finds it offline where it can)."""
    return model_config_for(
        recipe.model.name,
        config_path=recipe.resolve_path(recipe.model.config) if recipe.model.config else None,
        local_path=recipe.resolve_path(recipe.model.name),
    )


def validate_recipe(
    path: str | Path, overrides: list[str] | None = None, check_data: bool = True, profile_samples: int | None = None
) -> ValidationReport:
    recipe = load_recipe(path, overrides)
    check_files(recipe)
    report = ValidationReport(recipe=recipe, warnings=recipe_warnings(recipe))
    if check_data:
        from moe_finetune.train import load_training_data

        data, _ = load_training_data(recipe)  # refused (exit 3) exactly as `train` would refuse it
        report.lines.append(f"data: {data.num_train:,} training examples ({data.schema}) in {data.path}")
        retention = recipe.guards.retention
        if recipe.guards.enabled and retention.data is not None:
            from moe_finetune.train import read_retention_rows

            loaded = read_retention_rows(recipe)
            report.lines.append(f"retention check: {len(loaded.rows):,} rows of {recipe.resolve_path(retention.data)}")

    config = recipe_model_config(recipe)
    family = family_for_config(config)
    if recipe.guards.enabled:
        problem = load_limit_problem(recipe.guards, family.num_experts(config), family.top_k(config))
        if problem is not None:
            raise RecipeError(problem)
    model = meta_model(config)
    lora_config = build_lora_config(model, recipe.lora, family)
    total = sum(p.numel() for p in model.parameters())
    report.lines.append(
        f"model: {recipe.model.name} ({family.name}, {parameter_count(total)} parameters, "
        f"{family.num_experts(config)} experts, top-{family.top_k(config)})"
    )
    report.lines.append(
        f"lora: r={recipe.lora.r}, modules {sorted(lora_config.target_modules or [])}, "
        f"expert parameters {sorted(lora_config.target_parameters or [])}, "
        f"router {'trainable' if recipe.lora.router else 'frozen'}"
    )
    if profile_samples is not None:
        # --profile: the base model's weights are read after all, to route a sample of the data (profile.py)
        from moe_finetune.profile import format_table, measure_recipe

        def note(line: str) -> None:  # notes go in the report; the progress lines do not
            if not line.startswith("profile: "):
                report.lines.append(line)

        profile = measure_recipe(recipe, samples=profile_samples, echo=note)
        lora = recipe.lora
        report.lines.extend(format_table(profile, lora.experts_score, lora.experts_top_p).splitlines())
        if lora.experts == "auto":
            chosen = profile.selection(lora.experts_score, lora.experts_top_p)
            report.lines.append(f"lora.experts: auto would adapt {chosen}")
    return report


def parameter_count(count: int) -> str:
    """3.9 M, 46.70 B, 950 K: a count that reads right at every size (a tiny model is not "0.00 B")."""
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 0)):
        if count >= scale:
            return f"{count / scale:.{digits}f} {unit}"
    return str(count)
