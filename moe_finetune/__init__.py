"""moe-finetune: LoRA fine-tuning of Mixture-of-Experts models that watches (and protects) the routers.

The public names are imported lazily, so `moe-finetune validate` and `--help` stay fast and do not
pull torch or transformers in before they are needed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "RoutingMonitor": "moe_finetune.callbacks",
    "EntropyGuard": "moe_finetune.callbacks",
    "DatasetSizeGuard": "moe_finetune.callbacks",
    "attach": "moe_finetune.callbacks",
    "PerLayerAuxLoss": "moe_finetune.callbacks",
    "capture_routing": "moe_finetune.routing",
    "load_recipe": "moe_finetune.recipe",
    "Recipe": "moe_finetune.recipe",
    "train": "moe_finetune.train",
    "build_trainer": "moe_finetune.train",
    "run": "moe_finetune.train",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_finetune' has no attribute {name!r}")
