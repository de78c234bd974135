"""The house's layering, checked: pure modules import no training framework, and imports run one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_finetune"

_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"transformers", "trl", "peft", "accelerate", "datasets"}:
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def test_the_guard_policy_and_the_metrics_import_without_transformers_or_any_training_framework():
    code = _BLOCKER + (
        "import moe_finetune.routing.policy, moe_finetune.routing.metrics, moe_finetune.routing.reasons\n"
        "import moe_finetune.routing.affinity\n"
        "import moe_finetune.sections, moe_finetune.rundir\n"
        "from moe_finetune.routing.policy import GuardPolicy, RoutingSnapshot\n"
        "p = GuardPolicy()\n"
        "for step in (1, 2, 3, 4):\n"
        "    a = p.update(RoutingSnapshot(step, 0.8, [0.8], [[0.125] * 8]), 1e-5)\n"
        "print(a.kind)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "none"


def test_the_report_module_imports_without_torch_transformers_or_matplotlib():
    """`moe-finetune report` must start fast, and the guard imports it on its halt path: matplotlib only
    when a figure is drawn, torch and transformers never."""
    code = (
        "import sys\n"
        "import moe_finetune.report\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# Lower layers never import higher ones (DESIGN.md: cli -> train -> callbacks -> routing -> models ->
# sections, errors). Each entry: a package part and the parts it must not import.
_FORBIDDEN = {
    "errors": {"sections", "rundir", "recipe", "models", "routing", "callbacks", "train", "cli"},
    "sections": {"recipe", "models", "routing", "callbacks", "train", "cli", "data"},
    "rundir": {"recipe", "models", "routing", "callbacks", "train", "cli"},
    "models": {"recipe", "routing", "callbacks", "train", "cli", "data", "validate", "inspect"},
    "routing": {"recipe", "callbacks", "train", "cli", "data", "validate", "inspect"},
    "callbacks": {"recipe", "train", "cli", "validate", "inspect", "smoke"},
    # the report reads run directories only: below callbacks (the guard's halt writes it), above rundir
    "report": {"recipe", "models", "routing", "callbacks", "train", "cli", "data", "validate", "inspect", "smoke"},
    "report_plots": {"recipe", "models", "routing", "callbacks", "train", "cli", "data", "validate", "inspect", "smoke"},
    "data": {"recipe", "models", "routing", "train", "cli"},
}
# merge and generate sit beside train: below cli, above callbacks, routing and models; nothing below imports them
for _lower in ("errors", "sections", "rundir", "models", "routing", "callbacks", "data", "report", "report_plots"):
    _FORBIDDEN.setdefault(_lower, set()).update({"merge", "generate"})
_FORBIDDEN["merge"] = {"cli", "train", "callbacks", "generate"}
_FORBIDDEN["generate"] = {"cli", "train", "callbacks"}
# profile sits beside them too (train imports it for lora.experts: auto); its pure math is routing/affinity.py
for _lower in ("errors", "sections", "rundir", "models", "routing", "callbacks", "data", "report", "report_plots"):
    _FORBIDDEN[_lower].add("profile")
_FORBIDDEN["profile"] = {"cli", "train", "callbacks", "validate", "merge", "generate"}


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("moe_finetune."):
                parts.add(name.split(".")[1])
    return parts


def test_imports_run_only_downward():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for imported in _imported_parts(path) & _FORBIDDEN.get(part, set()):
            wrong.append(f"{path.relative_to(PACKAGE)} imports moe_finetune.{imported}")
    assert not wrong, "\n".join(sorted(wrong))
