"""Load the model and tokenizer a recipe's `model:` section names (tiny models are built here first).

Takes the section's plain values, not the Recipe, so the model layer never reaches up into the
recipe. A model that cannot be found or read is the user's to fix (exit 2, naming `model.name`), and
so is a quantization that the installed bitsandbytes cannot do here (exit 2, naming
`model.quantization`); anything else that goes wrong while loading is a bug and is left to surface as one.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from moe_finetune.errors import RecipeError
from moe_finetune.models.families import FamilySpec, family_for_config
from moe_finetune.models.tiny import family_of_tiny_name, is_tiny_name, tiny_model_dir
from moe_finetune.sections import ModelSection


def resolve_model_path(section: ModelSection, local_path: Path | None = None) -> tuple[str, FamilySpec | None]:
    """A loadable path or hub id for the model (tiny models, random or trained, are built or reused here).

    `local_path` is `section.name` resolved against the recipe's folder: used when it exists.
    """
    if is_tiny_name(section.name):
        return str(tiny_model_dir(section.name)), family_of_tiny_name(section.name)
    if local_path is not None and local_path.exists():
        return str(local_path), None
    if Path(section.name).expanduser().exists():  # a folder named as is (the caller resolved nothing)
        return str(Path(section.name).expanduser()), None
    if looks_like_a_path(section.name):
        where = f" ({local_path})" if local_path is not None and str(local_path) != section.name else ""
        raise RecipeError(
            f"model.name: no such folder {section.name!r}{where}; relative paths are relative to the recipe's "
            "folder (a hub id is written ORG/NAME)"
        )
    check_hub_reachable(section.name, section.revision)
    return section.name, None


def looks_like_a_path(name: str) -> bool:
    """A model name a person meant as a folder: ./x, ../x, /x, ~/x, a/b/c or a Windows path (a hub id is ORG/NAME)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_hub_reachable(repo_id: str, revision: str | None = None, timeout: float = 5.0) -> None:
    """A hub model not in the local cache needs the hub: when it cannot be reached, say so in one line now,
    instead of after a minute of transformers' retries (12 'Retrying' lines). Offline mode and a cached
    model skip the check."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    try:
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id: transformers' own message says what is wrong with it
        return
    if isinstance(cached, str):
        return
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        raise RecipeError(
            f"model.name: {repo_id!r} is not in the local Hugging Face cache and the hub ({endpoint.hostname}) "
            f"cannot be reached from here ({err.strerror or err}). Download it where there is a network "
            "(`hf download ID`) and point model.name at that folder, or copy the cache here and set "
            "HF_HUB_OFFLINE=1"
        ) from None


def from_pretrained_kwargs(section: ModelSection) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments the section asks for."""
    import torch
    import transformers

    kwargs: dict[str, Any] = {"trust_remote_code": section.trust_remote_code}
    if section.revision:
        kwargs["revision"] = section.revision
    if section.dtype != "auto":
        kwargs["dtype"] = getattr(torch, section.dtype)
    if section.experts_implementation:
        kwargs["experts_implementation"] = section.experts_implementation
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    if section.quantization is not None:
        q = section.quantization
        if q.quantize_experts:
            from moe_finetune.models.quant4 import experts_quantization_config

            # transformers' bitsandbytes 4-bit plus the fused experts, packed as each stack is read
            kwargs["quantization_config"] = experts_quantization_config(
                quant_type=q.quant_type,
                compute_dtype=getattr(torch, q.compute_dtype),
                double_quant=q.double_quant,
                blocksize=q.blocksize,
            )
        else:
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=q.bits == 4,
                load_in_8bit=q.bits == 8,
                bnb_4bit_quant_type=q.quant_type,
                bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                bnb_4bit_use_double_quant=q.double_quant,
            )
    return kwargs


# ValueErrors that transformers 5 raises when a path or hub id holds no model or tokenizer it can read
# (measured on 5.24); any other ValueError while loading is a bug and surfaces as one (exit 1).
_UNREADABLE_MESSAGES = (
    "Unrecognized model in",  # no config.json, or one without model_type
    "does not recognize this architecture",  # a model_type this transformers does not know
    "Unrecognized configuration class",  # a config that is not a causal LM
    "Unrecognized model identifier",
    "trust_remote_code=True",  # custom modeling code the recipe did not allow
    "Couldn't instantiate the backend tokenizer",  # no tokenizer files
    "specified in the tokenizer config was not found",
)

# Where bitsandbytes failures are raised: the package itself, and transformers' code that drives it.
_QUANTIZATION_CODE = (
    "/bitsandbytes/",
    "/transformers/quantizers/",
    "/transformers/integrations/bitsandbytes.py",
)


def is_unreadable_model_error(err: BaseException) -> bool:
    """Whether `err` means "no model (or tokenizer) can be read there", as opposed to a bug."""
    if isinstance(err, OSError):  # not found, no weights file, bad JSON, hub unreachable (HfHubHTTPError too)
        return True
    if type(err).__module__.split(".")[0] == "safetensors":  # a truncated or corrupt weights file
        return True
    if type(err).__name__ in ("HFValidationError", "HfUriError"):  # a string that is no hub id
        return True
    return isinstance(err, ValueError) and any(fragment in str(err) for fragment in _UNREADABLE_MESSAGES)


def is_quantization_error(err: BaseException) -> bool:
    """Whether `err` is bitsandbytes (or transformers' bitsandbytes set-up) refusing to quantize here:
    not installed, too old, or without a backend for this machine's devices."""
    # NotImplementedError (bitsandbytes without a kernel for this device) is a RuntimeError.
    if not isinstance(err, (ImportError, RuntimeError, ValueError, OSError)):
        return False
    if isinstance(err, ImportError) and (err.name or "").startswith("bitsandbytes"):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    if any(marker in frame.filename.replace("\\", "/") for frame in frames for marker in _QUANTIZATION_CODE):
        return True
    return "bitsandbytes" in str(err).lower()


def _quantization_problem(section: ModelSection, err: BaseException) -> RecipeError:
    q = section.quantization
    assert q is not None
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    return RecipeError(
        f"model.quantization: bitsandbytes cannot load {section.name!r} in {q.bits}-bit on this machine "
        f"({type(err).__name__}: {first_line}). Install a bitsandbytes with a backend for your device "
        "(`pip install -U bitsandbytes`: CUDA GPUs, or its CPU backend on a machine without one), or remove "
        "model.quantization to load the model unquantized"
    )


def check_experts_packed(model: Any, section: ModelSection) -> None:
    """A recipe that asked for 4-bit experts gets them, or exit 2: never a silently bf16 "QLoRA" run."""
    from moe_finetune.models.quant4 import unpacked_expert_stacks

    missing = unpacked_expert_stacks(model)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise RecipeError(
            f"model.quantization.experts: {section.name!r} loaded with {len(missing)} fused expert stack(s) not "
            f"in 4-bit ({shown}): this model's experts are not a layout the 4-bit experts path knows. Set "
            "model.quantization.experts: false to quantize nn.Linear modules only"
        )


def load_model_and_tokenizer(section: ModelSection, local_path: Path | None = None) -> tuple[Any, Any, FamilySpec]:
    """The causal LM, its tokenizer (with a pad token) and its family spec."""
    import transformers

    path, family = resolve_model_path(section, local_path)
    kwargs = from_pretrained_kwargs(section)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")}
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        if section.quantization is not None and is_quantization_error(err):
            raise _quantization_problem(section, err) from None
        if not is_unreadable_model_error(err):
            raise  # a bug in transformers or in moe-finetune: reported as one (exit 1), with its traceback
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        remote_code = "trust_remote_code" in str(err)
        hint = " (set model.trust_remote_code: true if you trust it)" if remote_code else ""
        raise RecipeError(f"model.name: cannot load {section.name!r} ({first_line}){hint}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if section.quantization is not None:
        from moe_finetune.models.quant4 import keep_linear4bit_trainable

        keep_linear4bit_trainable(model)
        if section.quantization.quantize_experts:
            check_experts_packed(model, section)
    family = family or family_for_config(model.config)
    model.config.use_cache = False  # packed sequences stay separate only without a cache
    return model, tokenizer, family
