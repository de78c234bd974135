"""The project's exception types, one per exit code of the CLI contract (DESIGN.md section 2).

Library code raises these; only `cli.py` turns them into exit codes. Each message is meant to be
printed as is: it says what was wrong, where (field, file, row) and how to fix or override it.
"""

from __future__ import annotations


class MoeFinetuneError(Exception):
    """Base class: anything the CLI should report as a clean message, not a traceback."""

    exit_code: int = 1


class RecipeError(MoeFinetuneError):
    """Invalid recipe, argument or input file (exit 2). The message names the field/file/row."""

    exit_code = 2


class DataError(RecipeError):
    """A dataset that cannot be read or has a row without the fields the recipe needs (exit 2)."""


class LoraTargetError(RecipeError):
    """LoRA targets that match nothing, or expert LoRA asked for but no expert adapted (exit 2)."""


class UnknownFamilyError(RecipeError):
    """A model whose routers this toolkit does not know how to find (exit 2)."""


class OutputDirError(RecipeError):
    """An existing non-empty output directory without --overwrite (exit 2)."""


class MergeCheckError(MoeFinetuneError):
    """The merged model does not reproduce the adapted one on the probe batch (exit 1: a bug in merging,
    not in the user's input). The message gives the numbers; nothing was written."""

    exit_code = 1


class ExportCheckError(MergeCheckError):
    """The exported adapter does not reproduce the source's expert deltas, tensors or scalings (exit 1: a bug in
    exporting, not in the user's input). The message gives the numbers; nothing was written."""


class DatasetTooSmallError(MoeFinetuneError):
    """Fewer training examples than the threshold (exit 3). Raised before any model is loaded."""

    exit_code = 3


class TrainingHalted(MoeFinetuneError):
    """A guard stopped training: expert collapse, or (the retention check) forgetting (exit 4). A checkpoint
    and a report exist."""

    exit_code = 4


class TrainingInterrupted(MoeFinetuneError):
    """Ctrl-C / SIGTERM during training (exit 130). A checkpoint at the current step was saved."""

    exit_code = 130


class OutputWriteError(MoeFinetuneError):
    """A file could not be written: no space left on the device, or no permission (exit 5). The message
    names the file, what is free there, and the last complete checkpoint to go on from."""

    exit_code = 5


# How a full disk reads when it does not come as an OSError: torch.save's zip writer and safetensors' Rust
# writer turn errno 28 into messages of their own.
_DISK_FULL_WORDS = ("no space left on device", "os error 28", "storagefull", "file write failed")


def write_failure(err: BaseException) -> tuple[str, str | None] | None:
    """("no space left on device" | "permission denied", the file named, if any) when `err` (or what
    caused it) is a write the system refused; None for any other error."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            filename = current.filename if isinstance(current.filename, str) else None
            if current.errno in (errno.ENOSPC, errno.EDQUOT):
                return "no space left on device", filename
            if current.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return "permission denied", filename
        if any(words in str(current).lower() for words in _DISK_FULL_WORDS):
            return "no space left on device", None
        current = current.__cause__ or current.__context__
    return None
