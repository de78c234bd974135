"""The recipe: its sections (sections.py) composed into one model, loaded, overridden and checked.

A recipe is validated completely before anything heavy runs (no model is loaded, no directory is
created), and every error names the field at fault and what it accepts. `training:` is handed to
TRL's `SFTConfig`, so its keys are checked against that class's own fields and types.

Why one file of ~400 lines: loading, `--set` overrides, the `training:` checks against SFTConfig
and the error formatting are the recipe's whole contract with the user; its sections live in sections.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from moe_finetune.errors import RecipeError
from moe_finetune.sections import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_MIN_EXAMPLES,
    MAX_MOE_LEARNING_RATE,
    DataSection,
    GuardConfig,
    LoraSection,
    ModelSection,
    MonitorSection,
    Section,
)
from moe_finetune.yamlread import MAX_ALIAS_NODES, AliasExpansionError, read_yaml

# The field's defaults for MoE fine-tuning (DESIGN.md section 4). `validate` warns on departures.

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
# Keys that older transformers had and recipes still carry, with what replaced them.
_TRAINING_REPLACED = {
    "warmup_ratio": "warmup_steps (in transformers 5 a value below 1 is a fraction of all steps: warmup_steps: 0.1)",
}

_STEPS_OR_FRACTION = "must be > 0: a whole number of steps, or a fraction below 1 of all training steps"
_SEED = ("seed", lambda v: 0 <= v < 2**32, "must be between 0 and 2**32 - 1")

# Numbers SFTConfig takes without complaint that make no run (or not the run asked for): field ->
# (what it is, whether a value is usable, what is accepted). Non-finite values are refused for all of
# them; None passes where SFTConfig allows it (max_length, save_total_limit, eval_steps).
_TRAINING_BOUNDS: dict[str, tuple[str, Callable[[float], bool], str]] = {
    "learning_rate": ("learning rate", lambda v: v > 0, "must be > 0"),
    "max_steps": (
        "step count",
        lambda v: v >= 1 or v == -1,
        "must be >= 1, or -1 to train for num_train_epochs",
    ),
    "per_device_train_batch_size": ("batch size", lambda v: v >= 1, "must be >= 1"),
    "per_device_eval_batch_size": ("batch size", lambda v: v >= 1, "must be >= 1"),
    "gradient_accumulation_steps": ("accumulation count", lambda v: v >= 1, "must be >= 1"),
    "warmup_steps": (
        "warmup",
        lambda v: v >= 0,
        "must be >= 0: a number of steps, or a fraction below 1 of all training steps",
    ),
    "max_length": ("sequence length", lambda v: v >= 1, "must be >= 1, or null for no truncation"),
    # HF reads a value below 1 as a fraction of all training steps, and refuses a fractional one above 1.
    "logging_steps": ("logging interval", lambda v: v > 0 and (v < 1 or v == int(v)), _STEPS_OR_FRACTION),
    "save_steps": ("checkpoint interval", lambda v: v > 0 and (v < 1 or v == int(v)), _STEPS_OR_FRACTION),
    "eval_steps": ("evaluation interval", lambda v: v > 0 and (v < 1 or v == int(v)), _STEPS_OR_FRACTION),
    "weight_decay": ("weight decay", lambda v: v >= 0, "must be >= 0"),
    "max_grad_norm": ("gradient-norm limit", lambda v: v >= 0, "must be >= 0; 0 turns clipping off"),
    "save_total_limit": (
        "checkpoint limit",
        lambda v: v >= 1,
        "must be >= 1, or null to keep every checkpoint",
    ),
    # A beta of 1 makes Adam's bias correction divide by zero.
    "adam_beta1": ("Adam beta", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "adam_beta2": ("Adam beta", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "adam_epsilon": ("Adam epsilon", lambda v: v >= 0, "must be >= 0"),
    # numpy refuses other seeds, but only once training starts (after the model has loaded).
    "seed": _SEED,
    "data_seed": _SEED,
}

_RESTORE_CALLBACKS_REFUSED = (
    "training.restore_callback_states_from_checkpoint: true is not supported: on resume transformers would "
    "replace the routing guard and monitor with copies rebuilt from the checkpoint, which `train` cannot see, "
    "so a guard halt would end the run with exit 0 instead of 4. The guard already restores its own state "
    "(baseline, cuts, halt) from the checkpoint without this option: remove it from the recipe."
)


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
    _overrides: list[str] = []

    @field_validator("training", mode="after")
    @classmethod
    def _check_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        return validate_training_section(value)

    @model_validator(mode="after")
    def _four_bit_experts_need_the_fast_kernel(self) -> Recipe:
        # Caught here, so validate says so offline, not after a 23 GB download and pack.
        q = self.model.quantization
        if q is not None and q.quantize_experts and self.lora.experts and self.lora.expert_kernel == "peft":
            raise ValueError(
                "lora.expert_kernel: peft cannot adapt 4-bit experts (PEFT would merge B·A into the packed bytes); "
                "use lora.expert_kernel: fast, or model.quantization.experts: false"
            )
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str | None:
        """The recipe file this was loaded from (for messages that tell the user what to rerun)."""
        return self._source

    @property
    def overrides(self) -> list[str]:
        """The `--set key.path=value` overrides applied on load, so a printed command can repeat them."""
        return list(self._overrides)

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


# How much of a value a message echoes: enough to recognise it, never the whole of a large one.
MAX_SHOWN_CHARS = 200


def _brief_repr() -> reprlib.Repr:
    # reprlib stops walking a value at these limits, so even a value of millions of nodes costs
    # a few hundred steps to show (repr() would build it whole before any cut).
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxlist, shown.maxtuple, shown.maxdict, shown.maxset = 3, 8, 8, 8, 8
    shown.maxstring = shown.maxother = shown.maxlong = 80
    return shown


_BRIEF = _brief_repr()


def brief(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """A value as messages show it: its repr, cut to `limit` characters with '...' where it is longer."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A number as a person typed it: 0 not 0.0, 1e-05, nan."""
    return format(value, "g") if isinstance(value, float) else brief(value)


def _check_training_numbers(values: dict[str, Any], raw: dict[str, Any]) -> None:
    """Refuse numbers that make no run (`_TRAINING_BOUNDS`), naming the field and what it accepts."""
    for key, (noun, usable, accepted) in _TRAINING_BOUNDS.items():
        if key not in values or values[key] is None:
            continue
        value = values[key]
        if isinstance(raw[key], bool):  # pydantic reads true as 1: a typo, not a number
            raise ValueError(f"training.{key}: {str(raw[key]).lower()} is not a number ({noun})")
        if not math.isfinite(value):
            raise ValueError(
                f"training.{key}: {_show(value)} is not a usable {noun} "
                f"(must be a finite number {accepted.removeprefix('must be ')})"
            )
        if not usable(value):
            raise ValueError(f"training.{key}: {_show(value)} is not a usable {noun} ({accepted})")
    epochs = values.get("num_train_epochs")
    if epochs is not None:
        if isinstance(raw["num_train_epochs"], bool):
            raise ValueError(
                f"training.num_train_epochs: {str(raw['num_train_epochs']).lower()} is not a number"
            )
        if not math.isfinite(epochs):
            raise ValueError(
                f"training.num_train_epochs: {_show(epochs)} is not a usable number of epochs (must be a finite "
                "number > 0)"
            )
        # max_steps > 0 overrides the epochs; without it (-1, SFTConfig's default) they decide the run's length.
        if epochs <= 0 and values.get("max_steps", -1) <= 0:
            raise ValueError(
                f"training.num_train_epochs: {_show(epochs)} is not a usable number of epochs (must be > 0, "
                "unless max_steps sets the run's length)"
            )


def validate_training_section(values: dict[str, Any]) -> dict[str, Any]:
    """Check `training:` against SFTConfig's fields and their types, coercing '1e-5'-style strings, and
    refuse the numbers and options SFTConfig accepts that make no run or one `train` cannot watch."""
    from pydantic import TypeAdapter

    fields = _sft_fields()
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in _TRAINING_RESERVED:
            raise ValueError(f"training.{key} is not allowed here: set {_TRAINING_RESERVED[key]}")
        if key in _TRAINING_REPLACED and key not in fields:
            raise ValueError(f"training.{key} is gone from transformers 5: use {_TRAINING_REPLACED[key]}")
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
                f"training.{key}: {brief(value)} is not a valid {expected} ({err.errors()[0]['msg']})"
            ) from None
    _check_training_numbers(checked, values)
    if checked.get("restore_callback_states_from_checkpoint") is True:
        raise ValueError(_RESTORE_CALLBACKS_REFUSED)
    return checked


def parse_value(text: str) -> Any:
    """A --set value: YAML scalars/lists/maps (`5e-6`, `true`, `[a, b]`), else the plain string."""
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to the raw recipe mapping (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                f"--set {brief(item)}: expected key.path=value, e.g. --set training.learning_rate=5e-6"
            )
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"--set {brief(item)}: empty key")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"--set {brief(item)}: {where} is a value ({brief(child)}), not a section")
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


def format_validation_error(err: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    """One paragraph per problem: the dotted field, what was wrong, and what is accepted; a field that a
    `--set` put there says so, since the recipe file is then not where to look."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "(recipe)"
        given = _override_for(field, overrides or [])
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
            msg = f"{msg} (got {brief(item['input'])})"
        # `training:` messages already start with their dotted key (training.learning_rate: ...).
        line = msg if msg.startswith(f"{field}.") else f"{field}: {msg}"
        if given is not None:
            line += f" [from --set {given if len(given) <= MAX_SHOWN_CHARS else given[:MAX_SHOWN_CHARS] + '...'}]"
        lines.append(_bounded_line(line))
    return f"invalid recipe {source}:\n  " + "\n  ".join(lines)


def _override_for(field: str, overrides: list[str]) -> str | None:
    """The last `--set KEY=VALUE` whose key is `field` or a section above it (or below: `training.x.y`)."""
    for override in reversed(overrides):
        key = override.partition("=")[0].strip()
        if key and (field == key or field.startswith(f"{key}.") or key.startswith(f"{field}.")):
            return override
    return None


def _bounded_line(text: str, limit: int = 4 * MAX_SHOWN_CHARS) -> str:
    """One problem's line, its middle cut where a validator echoed a long value: the field named at
    the start and what is accepted at the end both stay."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return f"{text[:head]} ... {text[-(limit - head - 5) :]}"


def _alias_message(path: Path, err: AliasExpansionError) -> str:
    if err.recursive:
        return (
            f"recipe {path}: the YAML alias of the value anchored at line {err.anchor_line} is inside that value, "
            "so it would expand without end; refused before validation. Write the value out instead of the alias."
        )
    return (
        f"recipe {path}: its YAML aliases expand to more than {MAX_ALIAS_NODES:,} nodes (at the value anchored "
        f"at line {err.anchor_line}: each *alias repeats its anchor's whole value, and aliases of aliases "
        "multiply), which is a YAML bomb rather than a recipe; refused before validation. Use each anchor a few "
        "times, not nested in repeated layers."
    )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError (exit 2) naming the field at fault."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except AliasExpansionError as err:
        raise RecipeError(_alias_message(path, err)) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    except RecursionError:  # PyYAML composes nested values recursively
        raise RecipeError(
            f"recipe {path} is nested too deeply to read (thousands of levels of [ or {{)"
        ) from None
    except ValueError as err:  # a scalar YAML resolves but Python cannot build: 2024-02-30, a 5000-digit int
        raise RecipeError(
            f"recipe {path} holds a value that cannot be read: {str(err)[:MAX_SHOWN_CHARS]}"
        ) from None
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
        raise RecipeError(format_validation_error(err, str(path), overrides)) from None
    recipe._base_dir = path.resolve().parent
    recipe._source = str(path)
    recipe._overrides = list(overrides or [])
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
    retention = recipe.guards.retention.data
    if recipe.guards.enabled and retention is not None and not recipe.resolve_path(retention).exists():
        raise RecipeError(
            f"guards.retention.data: {recipe.resolve_path(retention)} does not exist (relative paths are relative "
            f"to the recipe file's folder {recipe.base_dir})"
        )


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
    elif recipe.guards.max_cuts > 0 and recipe.guards.min_lr >= lr:
        warnings.append(
            f"guards.min_lr {recipe.guards.min_lr:g} is not below training.learning_rate {lr:g}: the guard can never "
            "cut the learning rate, so the first collapse it sees halts training"
        )
    if recipe.model.quantization is not None and not recipe.model.quantization.quantize_experts:
        warnings.append(
            "model.quantization: without experts quantized, bitsandbytes quantizes nn.Linear only; fused experts "
            "(most of an MoE's weights) stay in full precision, so memory shrinks far less than the bit width "
            "suggests (model.quantization.experts: true, in 4-bit, quantizes them too)"
        )
    return warnings
