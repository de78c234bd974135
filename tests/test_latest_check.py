"""The upgrade check reads the lock and pip's freeze the same way, and says exactly what moved."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("latest_check", REPO / "benchmarks" / "latest_check.py")
latest_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latest_check)


def test_pins_are_read_with_normalised_names_and_without_local_labels() -> None:
    frozen = "# comment\n-e /work/main\nPyYAML==6.0.4\ntorch==2.13.0+cpu\nhuggingface_hub==2.5.0\n"
    assert latest_check.read_pins(frozen) == {"pyyaml": "6.0.4", "torch": "2.13.0", "huggingface-hub": "2.5.0"}


def test_changes_name_every_upgrade_addition_and_removal_and_nothing_else() -> None:
    locked = {"peft": "0.22.0", "trl": "1.16.0", "old": "1.0"}
    newest = {"peft": "0.23.0", "trl": "1.16.0", "new": "2.0"}
    assert latest_check.changes(locked, newest) == [
        "  + new 2.0 (new)",
        "  - old 1.0 (no longer needed)",
        "  ~ peft 0.22.0 -> 0.23.0",
    ]


def test_the_committed_lock_pins_the_stack_the_readme_names() -> None:
    pins = latest_check.read_pins((REPO / "requirements-lock.txt").read_text())
    readme = (REPO / "README.md").read_text()
    for name in ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"):
        assert f"{name} {pins[name]}" in readme, name
    assert pins["torch"] == "2.13.0"
