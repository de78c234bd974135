"""Reading YAML as recipes are read everywhere: numbers like `1e-5` as floats, and aliases bounded.

A recipe is read by `load_recipe`, and a run's resolved recipe by `report` and `merge`: one reader for all,
so a "billion laughs" is refused wherever it turns up. Only PyYAML: the report imports it without the
schema, torch or transformers.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# A recipe reuses an anchor a few times (a shared block, a model name); aliases that expand to more
# nodes than this are a "billion laughs" (9 aliases of 9 aliases, 9 levels deep: 534 bytes that
# validation would expand to 2.8 GB), refused before anything walks the expanded value.
MAX_ALIAS_NODES = 10_000


class AliasExpansionError(yaml.YAMLError):
    """A document whose aliases expand beyond MAX_ALIAS_NODES nodes, or into themselves."""

    def __init__(self, anchor_line: int, recursive: bool) -> None:
        super().__init__(anchor_line, recursive)
        self.anchor_line = anchor_line
        self.recursive = recursive


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_alias_expansion(root: yaml.Node, limit: int = MAX_ALIAS_NODES) -> None:
    """Raise AliasExpansionError where the composed document's aliases expand past `limit` nodes.

    The composer gives every alias the anchored node itself, so the document is a graph of its
    distinct nodes. Walked depth first, each node is entered once; every further reference to it
    (an alias) repeats its whole expanded subtree, whose size is known by then (memoised), so the
    nodes the aliases add are summed without expanding anything, and the walk stops at the bound.
    A reference to a node still being walked is an alias inside its own anchor: it never ends.
    """
    sizes: dict[int, int] = {}  # id(node) -> nodes in its expansion, capped just past the limit
    walking: set[int] = set()
    added = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            walking.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(child)] for child in _children(node)))
        elif key in walking:
            raise AliasExpansionError(node.start_mark.line + 1, recursive=True)
        elif key in sizes:
            added += sizes[key]
            if added > limit:
                raise AliasExpansionError(node.start_mark.line + 1, recursive=False)
        else:
            walking.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(_children(node)))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string; recipes are full of such numbers, so read them as floats.

    Aliases are checked (check_alias_expansion) between composing the document and constructing it.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        check_alias_expansion(node)
        return super().construct_document(node)


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


def read_yaml(text: str) -> Any:
    """YAML as recipes are read everywhere (a resolved recipe in a run too): numbers like `1e-5` as
    floats, and aliases bounded (AliasExpansionError, a yaml.YAMLError) before anything is built."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
