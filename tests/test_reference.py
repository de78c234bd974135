"""docs/recipe-fields.md is the schema's own reference: regenerated, it is the committed file."""

from __future__ import annotations

from pathlib import Path

from moe_finetune.recipe import Recipe
from moe_finetune.reference import _section_of, recipe_reference, sections

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_field_reference_is_what_the_schema_generates() -> None:
    committed = (REPO / "docs" / "recipe-fields.md").read_text(encoding="utf-8")
    assert committed == recipe_reference(), "regenerate: python -m moe_finetune.reference > docs/recipe-fields.md"


def test_every_field_of_every_section_has_a_row_and_a_description() -> None:
    text = recipe_reference()
    for prefix, model in sections(Recipe):
        for name, info in model.model_fields.items():
            assert f"| `{prefix}{name}` |" in text
            if _section_of(info.annotation) is None:  # a section is described by its own table
                assert info.description, f"{prefix}{name} has no description in the schema"
