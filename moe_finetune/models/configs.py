"""Where a model's architecture comes from when its weights are not here: config discovery, offline first.

`validate`, `inspect` and the CLI check recipes for 46B-parameter models on a laptop with no hub access:
they need the model's `config.json` (the published ones for the shipped recipes live in
recipes/configs/), built with transformers' native class and instantiated on the meta device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_finetune.errors import RecipeError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The directory of published config.json files (recipes/configs/ in the repository). An installed
# copy elsewhere can be pointed at with MOE_FINETUNE_CONFIGS_DIR.
CONFIGS_DIR = Path(
    os.environ.get("MOE_FINETUNE_CONFIGS_DIR", Path(__file__).resolve().parents[2] / "recipes" / "configs")
)


@dataclass(frozen=True)
class ShippedConfig:
    """One published config.json shipped in recipes/configs/: its file, hub repo and short names."""

    filename: str
    repo_id: str
    aliases: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return CONFIGS_DIR / self.filename

    def names(self) -> tuple[str, ...]:
        return (Path(self.filename).stem, self.repo_id, *self.aliases)


SHIPPED_CONFIGS: dict[str, ShippedConfig] = {
    "mixtral-8x7b": ShippedConfig(
        "mixtral-8x7b-instruct-v0.1.json", "mistralai/Mixtral-8x7B-Instruct-v0.1", ("mixtral-8x7b-instruct",)
    ),
    "mixtral-8x22b": ShippedConfig("mixtral-8x22b-v0.1.json", "mistralai/Mixtral-8x22B-v0.1"),
    "qwen3-30b-a3b": ShippedConfig("qwen3-30b-a3b.json", "Qwen/Qwen3-30B-A3B"),
    "olmoe-1b-7b": ShippedConfig("olmoe-1b-7b-0924.json", "allenai/OLMoE-1B-7B-0924", ("olmoe",)),
    "deepseek-v2-lite": ShippedConfig("deepseek-v2-lite.json", "deepseek-ai/DeepSeek-V2-Lite"),
}



def shipped_config_for(name: str) -> ShippedConfig | None:
    wanted = name.strip().lower()
    for key, shipped in SHIPPED_CONFIGS.items():
        if wanted in {key, *(n.lower() for n in shipped.names())}:
            return shipped
    return None


def _config_from_dict(config_dict: dict[str, Any], source: str) -> PretrainedConfig:
    """A transformers config from a config.json dict, always with transformers' own (native) class.

    `auto_map` is dropped: it points at remote modeling code (DeepSeek-V2-Lite's config.json names
    `modeling_deepseek.DeepseekV2ForCausalLM`), which moe-finetune never runs; transformers 5 has a
    native class for every family we ship, so the native one is what gets built.
    """
    from transformers import CONFIG_MAPPING

    config_dict = dict(config_dict)
    config_dict.pop("auto_map", None)
    model_type = config_dict.get("model_type")
    if not model_type:
        raise RecipeError(f"{source}: config.json has no `model_type`, so its architecture is unknown")
    if model_type not in CONFIG_MAPPING:
        raise RecipeError(
            f"{source}: model_type {model_type!r} has no config class in this transformers; "
            "moe-finetune does not run remote code (trust_remote_code), so the family must be native"
        )
    return CONFIG_MAPPING[model_type].from_dict(config_dict)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a JSON object (a config.json), got {type(data).__name__}")
    return data


def load_config(path_or_name: str | os.PathLike[str]) -> PretrainedConfig:
    """A `transformers` config for a JSON file, a model directory, a shipped name, or a hub id.

    Resolution, in order (everything but the last step works offline):

    1. an existing JSON file: read as a config.json;
    2. an existing directory: its `config.json`;
    3. a shipped config, by short name (`"mixtral-8x7b"`), file stem (`"mixtral-8x22b-v0.1"`) or hub
       id (`"mistralai/Mixtral-8x7B-Instruct-v0.1"`), case-insensitive: the file in recipes/configs/;
    4. anything else that looks like a hub id: `AutoConfig.from_pretrained(name, trust_remote_code=False)`,
       which needs the hub or the local HF cache (without a network, huggingface_hub retries for ~25 s
       unless HF_HUB_OFFLINE=1); failing that, a `RecipeError` (exit 2) saying what was tried.

    A name that is clearly a path (`.json`, a leading `/`, `./`, `../`, `~`, or more than one `/`)
    but does not exist is a `RecipeError` at once.

    Steps 1-3 build the config with transformers' native class for its `model_type` and drop
    `auto_map`, so no remote code is ever looked for (see `_config_from_dict`).
    """
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if path.is_file():
        return _config_from_dict(_read_json(path), str(path))
    if path.is_dir():
        config_json = path / "config.json"
        if not config_json.is_file():
            raise RecipeError(
                f"{path}: a directory without config.json; pass the config.json file or a model directory"
            )
        return _config_from_dict(_read_json(config_json), str(config_json))
    if text.endswith(".json") or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1:
        # Clearly a path, not a hub id ("org/name"): say so instead of asking the hub.
        raise RecipeError(f"{text}: no such file or directory (expected a config.json or a model directory)")
    shipped = shipped_config_for(text)
    if shipped is not None:
        if not shipped.path.is_file():
            raise RecipeError(
                f"shipped config {shipped.filename} for {text!r} is missing from {CONFIGS_DIR} "
                "(set MOE_FINETUNE_CONFIGS_DIR to the recipes/configs directory)"
            )
        return _config_from_dict(_read_json(shipped.path), str(shipped.path))
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(text, trust_remote_code=False)
    except Exception as err:  # offline, unknown repo, remote-code-only model: all the same to the user
        shipped_names = ", ".join(sorted(SHIPPED_CONFIGS))
        raise RecipeError(
            f"cannot load a config for {text!r}: it is not a file, not a directory with config.json, "
            f"not a shipped config ({shipped_names}), and AutoConfig.from_pretrained failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline, download "
            "the model's config.json and pass its path."
        ) from None
    if hasattr(config, "auto_map"):
        del config.auto_map
    return config


def model_config_for(model_name: str, config_path: Path | None = None, local_path: Path | None = None) -> Any:
    """The model's transformers config, offline when possible: tiny models, local paths, shipped configs.

    `config_path` is the recipe's `model.config` (a config.json or folder) and `local_path` the
    model name resolved as a local folder, both already resolved against the recipe's directory.
    """
    from moe_finetune.models.tiny import is_tiny_name, tiny_model_dir

    if is_tiny_name(model_name):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(tiny_model_dir(model_name))
    source: str | Path = model_name
    if config_path is not None:
        source = config_path
    elif local_path is not None and local_path.exists():
        source = local_path
    try:
        return load_config(str(source))
    except RecipeError:
        raise
    except Exception as err:
        raise RecipeError(
            f"model.name: cannot read the configuration of {model_name!r} ({str(err).splitlines()[0]}); "
            "offline, set model.config to its config.json (recipes/configs/ ships the common ones)"
        ) from None


def meta_model(config: Any, dtype: Any = None) -> Any:
    """The causal LM for `config` with no storage behind it (the meta device): shapes and names only.

    `dtype` (e.g. torch.bfloat16, for memory estimates) is what the weights would be loaded in; the
    model keeps fp32 where it insists (`_keep_in_fp32_modules`).
    """
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, **kwargs)
    except (ValueError, KeyError) as err:
        raise RecipeError(
            f"transformers cannot build a causal LM for {type(config).__name__} "
            f"(model_type {config.model_type!r}): {err}"
        ) from None
