"""Which folders a command may write into or replace, and how it replaces one without losing it.

`--overwrite` used to mean `shutil.rmtree(whatever you typed)`: `--output-dir .` erased the repository it
ran in. Now a command replaces only a folder this project wrote (a run directory, a merged model, an exported
adapter) that holds nothing but what the project writes, and never a folder that matters whatever it holds: the
working directory or one above it, the home folder, a filesystem root, a git work tree, or a folder holding what
the command reads (its recipe, data, model or adapter). The old folder is moved aside by one rename and deleted
only once the new one is complete, so an interrupted replace leaves it whole. No torch: `train` checks all
of this before any model loads.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from moe_finetune.errors import OutputDirError
from moe_finetune.rundir import (
    ADAPTER_DIR,
    EVENTS_FILE,
    KEPT_CHECKPOINT_DIR,
    REPORT_FILE,
    RESOLVED_RECIPE_FILE,
    RETENTION_FILE,
    ROUTING_FILE,
    ROUTING_PROBE_FILE,
    RUN_SUMMARY_FILE,
)

# The top-level names of a run directory: ours, TRL's model card (README.md), the Trainer's TensorBoard
# folder (runs/), and what `merge` and `profile` write into a run by default (merged/, profile/).
RUN_NAMES = frozenset(
    {
        RESOLVED_RECIPE_FILE,
        RUN_SUMMARY_FILE,
        ROUTING_FILE,
        ROUTING_PROBE_FILE,
        EVENTS_FILE,
        RETENTION_FILE,
        REPORT_FILE,
        ADAPTER_DIR,
        KEPT_CHECKPOINT_DIR,
        "README.md",
        "runs",
        "merged",
        "profile",
    }
)
RUN_PATTERNS = (
    re.compile(r"checkpoint-\d+"),
    re.compile(r"[^/]*\.png"),
    re.compile(r"\..*\.tmp.*"),
    re.compile(r"export-(per-expert|fused)"),  # what `export` writes into a run by default
)
RUN_MARKERS = (RUN_SUMMARY_FILE, RESOLVED_RECIPE_FILE)

# `merge` writes this beside the model it saves: what it merged, and the mark that the folder is its own.
MERGE_MARKER = "moe_finetune_merge.json"
# The files of a tokenizer as `save_pretrained` writes them (a merged model and an export carry the run's own).
TOKENIZER_PATTERNS = (
    re.compile(r"(tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab)\.(json|txt|model)"),
    re.compile(r"merges\.txt|chat_template\.(jinja|json)"),
)
MERGE_PATTERNS = (
    re.compile(r"config\.json|generation_config\.json"),
    re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?"),
    *TOKENIZER_PATTERNS,
    re.compile(r"README\.md"),
    re.compile(re.escape(MERGE_MARKER)),
)

# `export` writes this beside the adapter it re-emits for an engine: the format, the check, how to serve it.
EXPORT_MARKER = "moe_finetune_export.json"
EXPORT_PATTERNS = (
    re.compile(r"adapter_config\.json|adapter_model\.safetensors"),
    *TOKENIZER_PATTERNS,
    re.compile(re.escape(EXPORT_MARKER)),
)

# What each kind of folder holds (names, patterns), the files that mark it as ours, and what it is called.
_KINDS: dict[str, tuple[frozenset[str], Sequence[re.Pattern[str]], tuple[str, ...], str]] = {
    "run": (RUN_NAMES, RUN_PATTERNS, RUN_MARKERS, "run directory"),
    "merge": (frozenset({MERGE_MARKER}), MERGE_PATTERNS, (MERGE_MARKER,), "merged model"),
    "export": (frozenset({EXPORT_MARKER}), EXPORT_PATTERNS, (EXPORT_MARKER,), "serving adapter"),
}

ASIDE_INFIX = ".replaced-"  # `.NAME.replaced-PID`: the old folder while its replacement is written


def _matches(name: str, names: Iterable[str], patterns: Sequence[re.Pattern[str]]) -> bool:
    return name in names or any(pattern.fullmatch(name) for pattern in patterns)


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """The top-level names in `folder` that a run directory (`kind` "run"), a merged model ("merge") or an
    exported adapter ("export") never holds: what the project did not write."""
    names, patterns, _, _ = _KINDS[kind]
    return sorted(entry.name for entry in folder.iterdir() if not _matches(entry.name, names, patterns))


def is_project_folder(folder: Path, kind: str) -> bool:
    return any((folder / marker).is_file() for marker in _KINDS[kind][2])


def _holds(folder: Path, path: Path) -> bool:
    """`path` is `folder` or lies inside it."""
    return folder == path or folder in path.parents


def never_replace_reason(folder: Path, reads: Sequence[Path] = ()) -> str | None:
    """Why `folder` may never be deleted whatever it holds, or None. `reads`: files and folders the
    command reads (recipe, data, model, adapter), none of which may sit inside the folder."""
    resolved = folder.resolve()
    cwd = Path.cwd().resolve()
    if _holds(resolved, cwd):
        return "it is the current working directory" if resolved == cwd else "the current working directory is in it"
    home = Path(os.path.expanduser("~")).resolve()
    if _holds(resolved, home):
        return "it is the home folder" if resolved == home else "the home folder is in it"
    if resolved == Path(resolved.anchor) or os.path.ismount(resolved):
        return "it is the root of a filesystem"
    if (resolved / ".git").exists():
        return "it is a git work tree"
    for path in reads:
        read = Path(path).expanduser().resolve()
        if _holds(resolved, read):
            return f"it holds {path}, which this command reads"
    return None


def check_output_path(path: Path, flag: str) -> None:
    """Exit 2 for an output path that cannot be a folder of ours: a symbolic link (dangling or not: the
    folder written would be another than the one named), a path under a file, or a file."""
    if path.is_symlink():
        target = os.readlink(path)
        state = "" if path.exists() else ", which does not exist"
        raise OutputDirError(
            f"{flag}: {path} is a symbolic link (to {target}{state}); give the real folder instead of the link"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputDirError(f"{flag}: {path} is under {parent}, which is a file, not a folder")
            break
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{flag}: {path} exists and is not a directory")


def check_replaceable(path: Path, flag: str, kind: str, *, reads: Sequence[Path] = ()) -> None:
    """Exit 2 unless the existing folder `path` is one `--overwrite` may replace: this project's own
    (`kind` "run", "merge" or "export"), holding only what the project writes, and not a folder to keep
    whatever it holds."""
    reason = never_replace_reason(path, reads)
    if reason is not None:
        raise OutputDirError(
            f"{flag}: {path} will not be replaced: {reason}. Nothing was changed; give another {flag}"
        )
    _, _, markers, what = _KINDS[kind]
    if not is_project_folder(path, kind):
        marker = " or ".join(markers)
        raise OutputDirError(
            f"{flag}: {path} is not a {what} written by moe-finetune (it has no {marker}), so --overwrite "
            f"will not delete it. Nothing was changed; give another {flag}, or remove the folder yourself"
        )
    foreign = foreign_entries(path, kind)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputDirError(
            f"{flag}: {path} holds files moe-finetune did not write ({shown}), so --overwrite will not "
            f"delete it. Nothing was changed; move them out, give another {flag}, or remove the folder yourself"
        )


def aside_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{ASIDE_INFIX}{os.getpid()}")


def left_aside(path: Path) -> list[Path]:
    """Folders an earlier replace of `path` moved aside and did not get to delete (a process killed
    while the new one was written): the old output, whole."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}{ASIDE_INFIX}*"))


def move_aside(path: Path) -> Path:
    """Rename `path` to a hidden sibling (one rename: the old folder is whole at every moment)."""
    aside = aside_name(path)
    path.rename(aside)
    return aside


def put_back(aside: Path, path: Path) -> None:
    """Undo `move_aside`: whatever was written at `path` since is removed, the old folder returns."""
    if path.exists():
        shutil.rmtree(path)
    aside.rename(path)


def discard(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def publish(staging: Path, output: Path) -> None:
    """Put the finished folder `staging` at `output` by renames only, so `output` is never half-written; an
    old `output` is moved aside first and deleted once the new one is in place."""
    aside = None
    if output.is_dir():
        if any(output.iterdir()):
            aside = move_aside(output)
        else:
            output.rmdir()
    try:
        staging.rename(output)
    except BaseException:
        if aside is not None:
            aside.rename(output)
        raise
    discard(aside)


def check_command_output(output: Path, overwrite: bool, kind: str, reads: Sequence[Path], verb: str) -> None:
    """`--output` of `merge` / `export` (`verb`): not a link or a file, not a folder holding what the command
    reads, not a non-empty folder without --overwrite, and with it only a folder of this `kind` of ours."""
    check_output_path(output, "--output")
    resolved = output.expanduser().resolve()
    for path in reads:
        inside = Path(path).resolve()
        if resolved == inside or resolved in inside.parents:
            raise OutputDirError(
                f"--output {output} would replace {path}, which this {verb} reads: choose another folder"
            )
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"--output {output} already exists and is not empty; pass --overwrite to replace it, or --output "
                "to write elsewhere"
            )
        check_replaceable(output, "--output", kind, reads=reads)
