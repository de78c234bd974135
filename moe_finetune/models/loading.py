"""Load the model and tokenizer a recipe's `model:` section names (tiny models are built here first).

Takes the section's plain values, not the Recipe, so the model layer never reaches up into the
recipe. A model that cannot be found or read is the user's to fix (exit 2, naming `model.name`);
anything else that goes wrong while loading is a bug and is left to surface as one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_finetune.errors import RecipeError
from moe_finetune.models.families import FamilySpec, family_for_config
from moe_finetune.models.tiny import build_tiny, family_of_tiny_name, is_tiny_name
from moe_finetune.sections import ModelSection


def resolve_model_path(section: ModelSection, local_path: Path | None = None) -> tuple[str, FamilySpec | None]:
    """A loadable path or hub id for the model (tiny models are built or reused here).

    `local_path` is `section.name` resolved against the recipe's folder: used when it exists.
    """
    if is_tiny_name(section.name):
        family = family_of_tiny_name(section.name)
        return str(build_tiny(family)), family
    if local_path is not None and local_path.exists():
        return str(local_path), None
    return section.name, None


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
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=q.bits == 4,
            load_in_8bit=q.bits == 8,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
            bnb_4bit_use_double_quant=q.double_quant,
        )
    return kwargs


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
    except (OSError, ValueError) as err:
        raise RecipeError(f"model.name: cannot load {section.name!r} ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    family = family or family_for_config(model.config)
    model.config.use_cache = False  # packed sequences stay separate only without a cache
    return model, tokenizer, family
