"""The recipe-field reference (docs/recipe-fields.md), generated from the pydantic schema so it cannot drift.

    python -m moe_finetune.reference > docs/recipe-fields.md

Every field of every section: its dotted key (as `--set` takes it), type and bounds, default, and the
description the schema itself carries. A test checks that the committed file is what this prints.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Recipe fields

Generated from the schema (`python -m moe_finetune.reference > docs/recipe-fields.md`; a test checks it
matches). Every key can be set from the command line by its dotted path: `--set lora.r=8`. `training:` is
handed to TRL's `SFTConfig` and checked against its fields and types; the keys below are ours.
"""


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel an annotation holds (`X`, `X | None`), or None for a plain value."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def type_name(annotation: Any) -> str:
    """`Literal['a', 'b'] | None` -> `"a" \\| "b" \\| null`: what a person types in YAML."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f'`{value}`' if not isinstance(value, str) else f'`"{value}"`' for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"typing\.", "", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    words = []
    for item in metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attribute, None)
            if value is not None:
                words.append(f"{symbol} {value:g}" if isinstance(value, float) else f"{symbol} {value}")
    return ", ".join(words)


def _default(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{value!r}`"
    if info.default is PydanticUndefined:
        return "required"
    value = info.default.value if isinstance(info.default, enum.Enum) else info.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted prefix, section model), the recipe itself first, then every nested section depth first."""
    yield prefix, model
    for name, info in model.model_fields.items():
        nested = _section_of(info.annotation)
        if nested is not None:
            yield from sections(nested, f"{prefix}{name}.")


def section_table(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if _section_of(info.annotation) is not None and info.annotation is not type(None):
            kind = "section" + (" \\| null" if "None" in str(info.annotation) else "")
            rows.append(f"| `{prefix}{name}` | {kind} | {_default(info)} | see `{prefix}{name}.*` below |")
            continue
        bounds = _bounds(info.metadata)
        kind = type_name(info.annotation) + (f" ({bounds})" if bounds else "")
        description = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {kind} | {_default(info)} | {description} |")
    return rows


def recipe_reference() -> str:
    from moe_finetune.recipe import Recipe

    lines = [HEADER]
    for prefix, model in sections(Recipe):
        title = prefix.rstrip(".") or "top level"
        doc = " ".join((model.__doc__ or "").split("\n\n")[0].split()) if prefix else ""
        lines += [f"## `{title}`" if prefix else "## The top level", ""]
        if doc and not doc.startswith("Usage docs"):
            lines += [doc, ""]
        lines += section_table(prefix, model) + [""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(recipe_reference(), end="")
