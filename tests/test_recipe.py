"""Recipe validation: good recipes load with the field's defaults; each kind of bad one names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_finetune.errors import RecipeError
from moe_finetune.recipe import (
    DEFAULT_LEARNING_RATE,
    apply_overrides,
    load_recipe,
    parse_value,
    recipe_warnings,
)

REPO = Path(__file__).resolve().parents[1]


def test_smoke_recipe_loads_and_resolves_data_relative_to_the_recipe() -> None:
    recipe = load_recipe(REPO / "recipes" / "smoke.yaml")
    assert recipe.model.name == "tiny-mixtral"
    assert recipe.resolve_path(recipe.data.path) == (REPO / "data" / "instructions.jsonl.gz").resolve()


def test_defaults_follow_the_field_moe_advice(recipe_factory) -> None:
    path = recipe_factory()
    text = "".join(line for line in path.read_text().splitlines(keepends=True) if "learning_rate" not in line)
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.training_args()["learning_rate"] == DEFAULT_LEARNING_RATE
    assert recipe.lora.attention and recipe.lora.experts and not recipe.lora.router
    assert recipe.guards.enabled and recipe.monitor.enabled
    assert recipe.guards.cut_drop == pytest.approx(0.10)
    assert recipe.guards.max_load_ratio == pytest.approx(3.0)


def test_scientific_notation_without_a_dot_is_a_float(recipe_factory) -> None:
    recipe = load_recipe(recipe_factory("lora:\n  dropout: 5e-2\n"))
    assert recipe.lora.dropout == pytest.approx(0.05)
    assert parse_value("5e-6") == pytest.approx(5e-6)
    assert parse_value("true") is True
    assert parse_value("[q_proj, v_proj]") == ["q_proj", "v_proj"]


def test_overrides_set_any_field_by_dotted_path(recipe_factory) -> None:
    recipe = load_recipe(
        recipe_factory(), ["training.learning_rate=5e-6", "lora.r=8", "guards.cut_factor=0.25", "name=x"]
    )
    assert recipe.training_args()["learning_rate"] == pytest.approx(5e-6)
    assert recipe.lora.r == 8
    assert recipe.guards.cut_factor == pytest.approx(0.25)
    assert recipe.name == "x"


def test_override_without_equals_sign_is_rejected() -> None:
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_overrides({}, ["lora.r"])


def test_override_into_a_value_is_rejected() -> None:
    with pytest.raises(RecipeError, match="lora.r is a value"):
        apply_overrides({"lora": {"r": 4}}, ["lora.r.x=1"])


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ("lora:\n  rank: 8\n", ["lora.rank", "unknown key", "Allowed keys here", "r,"]),
        ("model2: {}\n", ["model2", "unknown key"]),
        ("lora:\n  r: many\n", ["lora.r", "integer"]),
        ("lora:\n  r: 0\n", ["lora.r", "greater than or equal to 1"]),
        ("guards:\n  cut_factor: 2\n", ["guards.cut_factor"]),
        ("guards:\n  halt_drop: 0.05\n", ["halt_drop"]),
    ],
)
def test_invalid_fields_are_named_with_what_is_accepted(
    recipe_factory, extra: str, fragments: list[str]
) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_factory(extra))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_literal_field_lists_allowed_values(tmp_path: Path, small_jsonl: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  name: tiny-mixtral\n  dtype: float8\ndata:\n  path: {small_jsonl}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "model.dtype" in str(info.value)
    assert "'bfloat16'" in str(info.value)


def test_missing_required_section_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: tiny-mixtral\n")
    with pytest.raises(RecipeError, match="data: required field is missing"):
        load_recipe(path)


def test_unknown_training_key_suggests_the_sftconfig_field(recipe_factory) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_factory(), ["training.learning_rat=1e-5"])
    assert "training.learning_rat" in str(info.value)
    assert "learning_rate" in str(info.value)


def test_wrongly_typed_training_value_is_rejected(recipe_factory) -> None:
    with pytest.raises(RecipeError, match="training.max_steps"):
        load_recipe(recipe_factory(), ["training.max_steps=lots"])


def test_output_dir_under_training_is_redirected_to_the_top_level(recipe_factory) -> None:
    with pytest.raises(RecipeError, match="top level"):
        load_recipe(recipe_factory(), ["training.output_dir=x"])


def test_not_a_mapping_and_not_yaml_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_departures_from_moe_defaults_warn_but_validate(recipe_factory) -> None:
    recipe = load_recipe(recipe_factory("lora:\n  router: true\n"), ["training.learning_rate=3e-4"])
    warnings = " ".join(recipe_warnings(recipe))
    assert "learning_rate" in warnings and "router" in warnings and "min_examples" in warnings


def test_resolved_recipe_round_trips(recipe_factory, tmp_path: Path) -> None:
    recipe = load_recipe(recipe_factory(), ["lora.r=4"])
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    reloaded = load_recipe(again)
    assert reloaded.lora.r == 4
    assert reloaded.training_args() == recipe.training_args()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.learning_rate=0", "training.learning_rate: 0 is not a usable learning rate (must be > 0)"),
        ("training.learning_rate=-3e-5", "training.learning_rate: -3e-05 is not a usable learning rate"),
        ("training.learning_rate=.nan", "training.learning_rate: nan is not a usable learning rate"),
        ("training.learning_rate=.inf", "must be a finite number > 0"),
        ("training.max_steps=0", "training.max_steps: 0 is not a usable step count"),
        ("training.max_steps=-2", "or -1 to train for num_train_epochs"),
        ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size: 0 is not a usable"),
        ("training.per_device_eval_batch_size=-1", "training.per_device_eval_batch_size: -1 is not a usable"),
        (
            "training.per_device_train_batch_size=true",
            "training.per_device_train_batch_size: true is not a number",
        ),
        ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps: 0 is not a usable"),
        ("training.warmup_steps=-1", "training.warmup_steps: -1 is not a usable warmup"),
        ("training.max_length=0", "training.max_length: 0 is not a usable sequence length"),
        ("training.logging_steps=0", "training.logging_steps: 0 is not a usable logging interval"),
        ("training.logging_steps=2.5", "training.logging_steps: 2.5 is not a usable logging interval"),
        ("training.save_steps=-10", "training.save_steps: -10 is not a usable checkpoint interval"),
        ("training.eval_steps=0", "training.eval_steps: 0 is not a usable evaluation interval"),
        ("training.weight_decay=-0.1", "training.weight_decay: -0.1 is not a usable weight decay"),
        ("training.max_grad_norm=-1", "training.max_grad_norm: -1 is not a usable gradient-norm limit"),
        ("training.save_total_limit=0", "training.save_total_limit: 0 is not a usable checkpoint limit"),
        ("training.adam_beta2=1", "training.adam_beta2: 1 is not a usable Adam beta (must be in [0, 1))"),
        ("training.seed=-1", "training.seed: -1 is not a usable seed"),
    ],
)
def test_training_numbers_that_make_no_run_are_refused_naming_the_field(
    recipe_factory, override: str, message: str
) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_factory(), [override])
    assert message in str(info.value)
    assert "training: training." not in str(info.value)  # the field is named once


def test_zero_epochs_are_refused_unless_max_steps_sets_the_length(recipe_factory) -> None:
    with pytest.raises(RecipeError, match="training.num_train_epochs: 0 is not a usable number of epochs"):
        load_recipe(recipe_factory(), ["training.max_steps=-1", "training.num_train_epochs=0"])
    assert load_recipe(recipe_factory(), ["training.num_train_epochs=0"]).training["max_steps"] == 4


@pytest.mark.parametrize(
    "override",
    [
        "training.logging_steps=0.1",  # fractions of the total steps, as HF reads them
        "training.save_steps=0.25",
        "training.eval_steps=0.5",
        "training.warmup_steps=0.03",
        "training.max_length=null",
        "training.save_total_limit=null",
        "training.max_grad_norm=0",
        "training.max_steps=-1",
        "training.num_train_epochs=0.5",
    ],
)
def test_fractional_intervals_and_documented_nulls_stay_valid(recipe_factory, override: str) -> None:
    key, value = override.split("=", 1)
    recipe = load_recipe(recipe_factory(), [override])
    assert recipe.training[key.removeprefix("training.")] == parse_value(value)  # kept as given, not refused


def test_restoring_callback_states_from_a_checkpoint_is_refused_saying_why_and_what_to_do(
    recipe_factory,
) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_factory(), ["training.restore_callback_states_from_checkpoint=true"])
    message = str(info.value)
    assert "training.restore_callback_states_from_checkpoint" in message
    assert "cannot see" in message and "restores its own state" in message and "remove it" in message
    allowed = load_recipe(recipe_factory(), ["training.restore_callback_states_from_checkpoint=false"])
    assert allowed.training_args()["restore_callback_states_from_checkpoint"] is False  # false, as HF's default


def test_warmup_ratio_from_older_transformers_points_to_warmup_steps(recipe_factory) -> None:
    with pytest.raises(RecipeError, match=r"training.warmup_ratio is gone .* warmup_steps: 0.1"):
        load_recipe(recipe_factory(), ["training.warmup_ratio=0.1"])


def test_a_min_lr_at_or_above_the_learning_rate_warns_that_the_guard_cannot_cut(recipe_factory) -> None:
    recipe = load_recipe(recipe_factory(), ["training.learning_rate=1e-6", "guards.min_lr=1e-6"])
    assert any("guards.min_lr" in warning and "never cut" in warning for warning in recipe_warnings(recipe))
    recipe = load_recipe(recipe_factory(), ["training.learning_rate=1e-5"])
    assert not any("guards.min_lr" in warning for warning in recipe_warnings(recipe))


def test_parameter_counts_read_right_at_every_size() -> None:
    from moe_finetune.validate import parameter_count

    assert parameter_count(3_912_448) == "3.9 M"
    assert parameter_count(46_702_792_704) == "46.70 B"
    assert parameter_count(950_000) == "950 K"
    assert parameter_count(12) == "12"
