"""Every recipe in recipes/ validates offline, documents its hardware and memory, and its figures are current.

The real recipes name full-size models (up to Mixtral 8x22B); `model.config` points at the published
config.json in recipes/configs/, so the models are built on the meta device: no weights, no network.
The figures quoted in recipes/README.md and in each recipe's comment header are recomputed here with
`moe_finetune.inspect`, so a change to the configs, the recipes or the counting fails a test instead of
leaving stale numbers behind.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_finetune.inspect import InspectReport, _fmt_count, _fmt_gib, inspect_model
from moe_finetune.models.configs import load_config, meta_model
from moe_finetune.models.families import family_for_config
from moe_finetune.models.lora import build_lora_config
from moe_finetune.models.tiny import is_tiny_name
from moe_finetune.recipe import DEFAULT_LEARNING_RATE, load_recipe, recipe_warnings
from moe_finetune.sections import LoraSection
from moe_finetune.validate import recipe_model_config, validate_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def _is_real(path: Path) -> bool:
    """A recipe for a real (hub) model, read from the raw YAML so a broken recipe still gets collected."""
    try:
        name = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["name"]
    except (yaml.YAMLError, KeyError, TypeError):
        return True
    return not is_tiny_name(str(name))


REAL_RECIPES = [p for p in RECIPES if _is_real(p)]
README = RECIPES_DIR / "README.md"
ACCELERATE_CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub: the env var for anything that reads it late, the constant for huggingface_hub itself."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _header(path: Path) -> str:
    """The leading block of comment lines."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _inspect(path: Path) -> InspectReport:
    """inspect_model with the recipe's own LoRA config, the same way `moe-finetune inspect --recipe` does."""
    recipe = load_recipe(path)
    assert recipe.model.config is not None, f"{path.name}: a real recipe needs model.config"
    return _inspect_cached(str(recipe.resolve_path(recipe.model.config)), recipe.lora.model_dump_json())


@cache
def _inspect_cached(config_path: str, lora_json: str) -> InspectReport:
    # Recipes sharing a config and a LoRA section (the three Mixtral 8x7B ones) share one computation.
    config = load_config(config_path)
    lora = LoraSection.model_validate_json(lora_json)
    lora_config = build_lora_config(meta_model(config), lora, family_for_config(config))
    return inspect_model(config, lora_config=lora_config)


def _memory(report: InspectReport, precision: str) -> Any:
    return next(row for row in report.memory if row.precision == precision)


def test_the_shipped_recipes_are_all_here():
    names = {p.stem for p in REAL_RECIPES}
    assert {
        "mixtral-8x7b-lora",
        "mixtral-8x7b-qlora",
        "mixtral-8x22b-lora",
        "qwen3-30b-a3b-lora",
        "olmoe-1b-7b-lora",
        "deepseek-v2-lite-lora",
        "mixtral-8x7b-multi-gpu",
    } <= names
    assert (RECIPES_DIR / "smoke.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_validates_offline(path: Path):
    report = validate_recipe(path, check_data=False)
    assert any(line.startswith("model: ") for line in report.lines)
    # validate raises unless every MoE layer's experts are covered; say what it checked.
    lora_line = next(line for line in report.lines if line.startswith("lora: "))
    assert "mlp.experts.gate_up_proj" in lora_line and "mlp.experts.down_proj" in lora_line


def test_a_real_recipe_validates_with_its_data():
    report = validate_recipe(RECIPES_DIR / "olmoe-1b-7b-lora.yaml", check_data=True)
    data_line = next(line for line in report.lines if line.startswith("data: "))
    count = int(re.search(r"data: ([\d,]+) training examples", data_line).group(1).replace(",", ""))
    assert count >= report.recipe.data.min_examples >= 10_000


@pytest.mark.parametrize("path", REAL_RECIPES, ids=_ids(REAL_RECIPES))
def test_real_recipe_follows_the_field_defaults(path: Path):
    recipe = load_recipe(path)
    training = recipe.training_args()
    assert recipe.model.config is not None and recipe.resolve_path(recipe.model.config).is_file()
    assert recipe.model.dtype == "bfloat16"
    assert recipe.lora.attention and recipe.lora.experts and not recipe.lora.router
    assert training["learning_rate"] <= DEFAULT_LEARNING_RATE
    assert training["lr_scheduler_type"] == "cosine" and training["warmup_steps"] > 0
    assert training["activation_checkpointing"] is True
    assert "gradient_checkpointing" not in recipe.training  # deprecated alias in transformers 5
    assert training["bf16"] is True
    assert training["logging_steps"] == 10 and training["save_steps"] > 0
    assert training["report_to"] == "none"
    assert recipe.guards.enabled and recipe.monitor.enabled
    assert recipe.data.min_examples >= 10_000
    assert recipe.data.path == "../data/instructions.jsonl.gz"
    assert recipe.output_dir == f"runs/{path.stem}"
    # validate finds nothing to point out (the QLoRA recipe quantizes its experts too)
    assert recipe_warnings(recipe) == []


def test_qlora_recipe_quantizes_through_quantization_config():
    path = RECIPES_DIR / "mixtral-8x7b-qlora.yaml"
    text = path.read_text(encoding="utf-8")
    # The removed from_pretrained kwarg may be named in a comment, never used as a setting.
    settings = [line.split("#", 1)[0] for line in text.splitlines()]
    assert not any("load_in_4bit" in line or "load_in_8bit" in line for line in settings)
    raw = yaml.safe_load(text)
    assert raw["model"]["quantization"] == {
        "bits": 4,
        "quant_type": "nf4",
        "compute_dtype": "bfloat16",
        "double_quant": True,
        "experts": True,
    }
    quantization = load_recipe(path).model.quantization
    assert quantization is not None and quantization.bits == 4 and quantization.quantize_experts
    assert load_recipe(path).lora.expert_kernel == "fast"
    # The header tells the truth about fused experts: what it loads (experts quantized) and what
    # transformers + bnb alone would have loaded.
    header = _header(path)
    report = _inspect(path)
    assert "bf16" in header and "folklore" in header
    assert _fmt_gib(_memory(report, "nf4_double_quant").transformers_bnb_bytes) in header
    loaded = _fmt_gib(_memory(report, "nf4_double_quant").experts_quantized_bytes)
    assert re.search(rf"{re.escape(loaded)}\s+<- what this recipe loads", header)
    assert _memory(report, "nf4_double_quant").experts_quantized_bytes / 1e9 <= 27  # "fits ~26 GB", now true


@pytest.mark.parametrize("path", REAL_RECIPES, ids=_ids(REAL_RECIPES))
def test_real_recipe_header_gives_hardware_and_current_memory_figures(path: Path):
    header = _header(path)
    assert re.search(r"^# Hardware:", header, re.M), f"{path.name}: no 'Hardware:' line in the header"
    assert re.search(r"memory", header, re.I), f"{path.name}: the header says nothing about memory"
    assert "10,000" in header, f"{path.name}: the header must ask for a dataset of >= 10,000 examples"
    report = _inspect(path)
    for figure in (
        _fmt_gib(_memory(report, "bf16").transformers_bnb_bytes),
        f"{_fmt_count(report.lora.trainable)} trainable",
        _fmt_gib(report.lora.state_bytes),
    ):
        assert figure in header, f"{path.name}: header lacks the current inspect figure {figure!r}"


def _readme_table() -> list[list[str]]:
    rows = []
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `recipes/"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_readme_table_lists_every_real_recipe():
    listed = [row[0].strip("`") for row in _readme_table()]
    assert sorted(listed) == sorted(f"recipes/{p.name}" for p in REAL_RECIPES)


@pytest.mark.parametrize("row", _readme_table(), ids=lambda row: row[0].strip("`"))
def test_readme_table_figures_match_inspect(row: list[str]):
    recipe_cell, model, _hardware, total, active, lora, bf16, nf4, nf4_experts = row
    path = REPO / recipe_cell.strip("`")
    recipe = load_recipe(path)
    report = _inspect(path)
    assert model.strip("`") == recipe.model.name
    expected = {
        "total": _fmt_count(report.params.total),
        "active": _fmt_count(report.params.active),
        "lora": f"{_fmt_count(report.lora.trainable)} (r={recipe.lora.r})",
        "bf16": _fmt_gib(_memory(report, "bf16").transformers_bnb_bytes),
        "nf4": _fmt_gib(_memory(report, "nf4").transformers_bnb_bytes),
        "nf4 experts quantized": _fmt_gib(_memory(report, "nf4").experts_quantized_bytes),
    }
    found = {
        "total": total,
        "active": active,
        "lora": lora,
        "bf16": bf16,
        "nf4": nf4,
        "nf4 experts quantized": nf4_experts,
    }
    assert found == expected


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=_ids(ACCELERATE_CONFIGS))
def test_accelerate_config_loads_and_names_real_mixtral_classes(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    header = _header(path)
    assert f"accelerate launch --config_file recipes/accelerate/{path.name}" in header
    for launched in re.findall(r"train (recipes/\S+\.yaml)", header):
        assert (REPO / launched).is_file(), launched

    model = meta_model(recipe_model_config(load_recipe(RECIPES_DIR / "mixtral-8x7b-multi-gpu.yaml")))
    classes = {type(m).__name__ for m in model.modules()}
    if config.distributed_type == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2  # FSDP2: frozen and trainable parameters may share a unit
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in classes
        # The recipes use the Trainer's activation checkpointing; transformers refuses both at once.
        assert fsdp["fsdp_activation_checkpointing"] is False
        assert "fsdp_use_orig_params" not in fsdp
    else:
        assert config.distributed_type == "DEEPSPEED"
        deepspeed = config.deepspeed_config
        assert deepspeed["zero_stage"] == 3
        assert deepspeed["deepspeed_moe_layer_cls_names"] in classes
        # Left to "auto" so the Trainer fills them from the recipe.
        assert "gradient_accumulation_steps" not in deepspeed and "gradient_clipping" not in deepspeed
