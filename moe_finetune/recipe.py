"""The recipe: its sections (sections.py) composed into one model, loaded, overridden and checked.

A recipe is validated completely before anything heavy runs (no model is loaded, no directory is
created), and every error names the field at fault and what it accepts. `training:` is handed to
TRL's `SFTConfig`, so its keys are checked against that class's own fields and types.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from moe_finetune.errors import RecipeError
from moe_finetune.sections import (
    DEFAULT_MIN_EXAMPLES,
    DataSection,
    GuardConfig,
    LoraSection,
    ModelSection,
    MonitorSection,
    Section,
)

# The field's defaults for MoE fine-tuning (DESIGN.md section 4). `validate` warns on departures.
DEFAULT_LEARNING_RATE = 1e-5
MAX_MOE_LEARNING_RATE = 1e-4

# Training defaults applied under whatever the recipe says (the recipe always wins).
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": DEFAULT_LEARNING_RATE,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 1,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 3,
    "report_to": "none",
    "max_length": 512,
    "seed": 0,
}
# Keys of SFTConfig that the recipe sets elsewhere, so they may not appear under `training:`.
_TRAINING_RESERVED = {"output_dir": "output_dir (top level of the recipe)"}


class Recipe(Section):
    name: str | None = Field(None, description="a short name for the run")
    description: str | None = Field(None, description="free text")
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="passed to trl.SFTConfig (learning_rate, max_steps, logging_steps, ...)",
    )
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    guards: GuardConfig = Field(default_factory=GuardConfig)
    output_dir: str | None = Field(None, description="run directory; None = runs/<recipe file name>")

    # Where the recipe came from: relative paths in it are resolved against this directory.
    _base_dir: Path = Path(".")
    _source: str | None = None

    @field_validator("training", mode="after")
    @classmethod
    def _check_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        return validate_training_section(value)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str | None:
        """The recipe file this was loaded from (for messages that tell the user what to rerun)."""
        return self._source

    def resolve_path(self, path: str) -> Path:
        """A path from the recipe: absolute as is, else relative to the recipe file's directory."""
        candidate = Path(path).expanduser()
        return (candidate if candidate.is_absolute() else self._base_dir / candidate).resolve()

    def training_args(self) -> dict[str, Any]:
        """The SFTConfig keyword arguments: our defaults overlaid by the recipe's own."""
        return {**TRAINING_DEFAULTS, **self.training}

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data["training"] = self.training_args()
        return yaml.safe_dump(data, sort_keys=False)


@cache
def _sft_fields() -> dict[str, Any]:
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(SFTConfig) if f.init}


def validate_training_section(values: dict[str, Any]) -> dict[str, Any]:
    """Check `training:` against SFTConfig's fields and their types, coercing '1e-5'-style strings."""
    from pydantic import TypeAdapter

    fields = _sft_fields()
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in _TRAINING_RESERVED:
            raise ValueError(f"training.{key} is not allowed here: set {_TRAINING_RESERVED[key]}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"training.{key} is not an SFTConfig/TrainingArguments field.{hint}")
        try:
            adapter = TypeAdapter(fields[key])
        except Exception:  # an annotation pydantic cannot model: leave it to SFTConfig
            checked[key] = value
            continue
        try:
            checked[key] = adapter.validate_python(value)
        except ValidationError as err:
            expected = getattr(fields[key], "__name__", str(fields[key]))
            raise ValueError(
                f"training.{key}: {value!r} is not a valid {expected} ({err.errors()[0]['msg']})"
            ) from None
    return checked


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string; recipes are full of such numbers, so read them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A --set value: YAML scalars/lists/maps (`5e-6`, `true`, `[a, b]`), else the plain string."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to the raw recipe mapping (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                f"--set {item!r}: expected key.path=value, e.g. --set training.learning_rate=5e-6"
            )
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"--set {item!r}: empty key")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"--set {item!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = parse_value(raw)
    return data


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = typing.get_args(annotation) or (annotation,)
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def format_validation_error(err: ValidationError, source: str) -> str:
    """One paragraph per problem: the dotted field, what was wrong, and what is accepted."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "(recipe)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            section = _section_model(loc)
            allowed = ", ".join(section.model_fields) if section else ""
            close = difflib.get_close_matches(
                str(loc[-1]), list(section.model_fields) if section else [], n=1
            )
            hint = f" Did you mean {close[0]!r}?" if close else ""
            msg = f"unknown key.{hint} Allowed keys here: {allowed}"
        elif item["type"] == "missing":
            msg = "required field is missing"
        elif "input" in item and item["type"] not in ("value_error",):
            msg = f"{msg} (got {item['input']!r})"
        lines.append(f"{field}: {msg}")
    return f"invalid recipe {source}:\n  " + "\n  ".join(lines)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError (exit 2) naming the field at fault."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"recipe {path} must be a mapping of sections (model, lora, data, training, monitor, guards)"
        )
    data = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, str(path))) from None
    recipe._base_dir = path.resolve().parent
    recipe._source = str(path)
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / path.stem)
    return recipe


def check_files(recipe: Recipe) -> None:
    """Files the recipe names must exist (checked by validate and before training)."""
    data_path = recipe.resolve_path(recipe.data.path)
    if not data_path.exists():
        raise RecipeError(
            f"data.path: {data_path} does not exist (relative paths are relative to the recipe file's folder "
            f"{recipe.base_dir})"
        )
    if recipe.model.config is not None and not recipe.resolve_path(recipe.model.config).exists():
        raise RecipeError(f"model.config: {recipe.resolve_path(recipe.model.config)} does not exist")


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Departures from the field's MoE defaults (DESIGN.md section 4): allowed, but said out loud."""
    warnings = []
    lr = recipe.training_args().get("learning_rate", DEFAULT_LEARNING_RATE)
    if lr > MAX_MOE_LEARNING_RATE:
        warnings.append(
            f"training.learning_rate {lr:g} is above {MAX_MOE_LEARNING_RATE:g}: MoE routers tend to collapse at "
            f"high learning rates (the field recommends {DEFAULT_LEARNING_RATE:g} or lower)"
        )
    if recipe.data.min_examples < DEFAULT_MIN_EXAMPLES:
        warnings.append(
            f"data.min_examples {recipe.data.min_examples} is below {DEFAULT_MIN_EXAMPLES}: small datasets are a "
            "known cause of expert collapse"
        )
    if recipe.lora.router:
        warnings.append(
            "lora.router is true: the router is trained, which is what most often collapses routing"
        )
    if not recipe.lora.experts:
        warnings.append("lora.experts is false: the experts stay frozen and only attention adapts")
    if not recipe.guards.enabled:
        warnings.append("guards.enabled is false: routing collapse will be logged but not acted on")
    if recipe.model.quantization is not None:
        warnings.append(
            "model.quantization: bitsandbytes quantizes nn.Linear only; fused experts (most of an MoE's weights) "
            "stay in full precision, so memory shrinks far less than the bit width suggests"
        )
    return warnings
