"""--overwrite never deletes what the project did not write; what a crash half-wrote is never trusted.

Every refusal is checked against real folders in tmp_path, byte for byte afterwards, and before any model
loads (a model load would take seconds and is made to fail loudly here).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from moe_finetune.cli import main
from moe_finetune.outputs import (
    check_replaceable,
    foreign_entries,
    move_aside,
    never_replace_reason,
    put_back,
)
from moe_finetune.rundir import checkpoint_problem, checkpoint_steps

REPO = Path(__file__).resolve().parents[1]
# the module, not the `train` function moe_finetune/__init__.py exports under the same name
train_module = importlib.import_module("moe_finetune.train")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (and .git's) by relative path -> sha256: 'still there, byte for byte'."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_model_load(monkeypatch):
    """A refusal must come before any model loads."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(train_module, "load_model_and_tokenizer", refuse)


def _user_folder(folder: Path, **files: str) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return _tree(folder)


# ------------------------------------------------------------------------------------------------
# Folders that are never replaced, whatever they hold


def test_overwrite_of_the_working_directory_that_is_a_git_repository_is_refused_and_nothing_changes(
    recipe_factory, tmp_path: Path, monkeypatch, capsys, no_model_load
) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    before = _user_folder(repo, **{"train.py": "print('mine')\n", "notes.md": "# notes\n"})
    recipe = recipe_factory()
    monkeypatch.chdir(repo)
    code, _, err = _run(capsys, "train", str(recipe), "--output-dir", ".", "--overwrite")
    assert code == 2, err
    assert "current working directory" in err and "Traceback" not in err and "internal error" not in err
    assert _tree(repo) == before and (repo / ".git").is_dir()


def test_a_git_work_tree_is_never_replaced_even_when_it_looks_like_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _user_folder(run, **{"run_summary.json": "{}", "recipe.resolved.yaml": "a: 1\n"})
    subprocess.run(["git", "init", "-q", str(run)], check=True)
    assert "git work tree" in never_replace_reason(run)


def test_overwrite_of_the_home_folder_is_refused(
    recipe_factory, tmp_path: Path, monkeypatch, capsys, no_model_load
) -> None:
    home = tmp_path / "home"
    before = _user_folder(home, **{".bashrc": "export A=1\n", "thesis.txt": "chapter 1"})
    monkeypatch.setenv("HOME", str(home))
    code, _, err = _run(capsys, "train", str(recipe_factory()), "--output-dir", str(home), "--overwrite")
    assert code == 2 and "home folder" in err
    assert _tree(home) == before


def test_a_folder_above_the_working_directory_or_home_and_a_filesystem_root_are_never_replaced(
    tmp_path: Path, monkeypatch
) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert "working directory is in it" in never_replace_reason(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(inner))
    assert "home folder is in it" in never_replace_reason(tmp_path / "a")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert never_replace_reason(Path("/")) is not None
    monkeypatch.chdir(inner)
    monkeypatch.setenv("HOME", str(inner))
    assert never_replace_reason(Path("/")) is not None  # '/' holds both, and is a filesystem root


@pytest.mark.parametrize("which", ["data", "recipes"])
def test_overwrite_of_the_folder_holding_the_recipe_or_its_data_is_refused(
    which: str, tmp_path: Path, small_jsonl: Path, capsys, no_model_load
) -> None:
    recipes, data = tmp_path / "recipes", tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_bytes(small_jsonl.read_bytes())
    (data / "make_dataset.py").write_text("# how the rows were made\n")
    recipes.mkdir()
    recipe = recipes / "r.yaml"
    recipe.write_text(
        "model:\n  name: tiny-mixtral\ndata:\n  path: ../data/rows.jsonl\n  min_examples: 10\n"
        "training:\n  max_steps: 2\n  max_length: 32\n"
    )
    # a run's own marker inside does not make the input folder replaceable
    (tmp_path / which / "run_summary.json").write_text("{}")
    before = _tree(tmp_path)
    code, _, err = _run(capsys, "train", str(recipe), "--output-dir", str(tmp_path / which), "--overwrite")
    assert code == 2, err
    assert "which this command reads" in err
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Folders the project did not write


def test_overwrite_of_a_users_own_folder_is_refused_naming_what_is_in_it(
    recipe_factory, tmp_path: Path, capsys, no_model_load
) -> None:
    precious = tmp_path / "precious"
    before = _user_folder(precious, **{"thesis.txt": "five years of work"})
    code, _, err = _run(capsys, "train", str(recipe_factory()), "--output-dir", str(precious), "--overwrite")
    assert code == 2
    assert "not a run directory written by moe-finetune" in err and "remove the folder yourself" in err
    assert _tree(precious) == before


def test_a_run_directory_holding_a_users_file_is_refused_naming_the_file(
    recipe_factory, tmp_path: Path, capsys, no_model_load
) -> None:
    run = tmp_path / "run"
    before = _user_folder(
        run, **{"run_summary.json": "{}", "recipe.resolved.yaml": "a: 1\n", "my-notes.txt": "do not lose"}
    )
    (run / "checkpoint-2").mkdir()
    before = _tree(run)
    code, _, err = _run(capsys, "train", str(recipe_factory()), "--overwrite")
    assert code == 2 and "my-notes.txt" in err and "did not write" in err
    assert _tree(run) == before


def test_foreign_entries_knows_every_name_a_run_and_a_merged_model_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    names = [
        "recipe.resolved.yaml", "run_summary.json", "routing.jsonl", "routing_probe.pt", "guard_events.jsonl",
        "retention.jsonl", "report.md", "training.png", "README.md", ".run_summary.json.tmp",
    ]  # fmt: skip
    _user_folder(run, **{name: "x" for name in names})
    for folder in ("adapter", "checkpoint-10", "last-healthy", "merged", "profile", "runs"):
        (run / folder).mkdir()
    (run / "checkpoint-10" / "anything.bin").write_text("the Trainer's own files are its business")
    assert foreign_entries(run, "run") == []
    (run / "data.csv").write_text("mine")
    assert foreign_entries(run, "run") == ["data.csv"]

    merged = tmp_path / "merged"
    names = [
        "moe_finetune_merge.json", "config.json", "generation_config.json", "model.safetensors",
        "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
    ]  # fmt: skip
    _user_folder(merged, **{name: "x" for name in names})
    assert foreign_entries(merged, "merge") == []
    (merged / "notes.txt").write_text("mine")
    assert foreign_entries(merged, "merge") == ["notes.txt"]


def test_merge_overwrite_of_a_folder_it_did_not_write_is_refused(
    random_adapter, tmp_path: Path, capsys
) -> None:
    mine = tmp_path / "mine"
    before = _user_folder(mine, **{"notes.txt": "mine", "config.json": "{}"})
    code, _, err = _run(capsys, "merge", str(random_adapter), "--output", str(mine), "--overwrite")
    assert code == 2 and "not a merged model written by moe-finetune" in err
    assert _tree(mine) == before


# ------------------------------------------------------------------------------------------------
# Paths that cannot be a folder of ours


@pytest.mark.parametrize("shape", ["symlink", "dangling symlink", "under a file"])
def test_output_paths_that_are_links_or_under_a_file_exit_2_before_the_model_loads(
    shape: str, recipe_factory, tmp_path: Path, capsys, no_model_load
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    if shape == "symlink":
        output = tmp_path / "link"
        output.symlink_to(real)
        expected = "symbolic link"
    elif shape == "dangling symlink":
        output = tmp_path / "dangling"
        output.symlink_to(tmp_path / "nowhere")
        expected = "does not exist"
    else:
        (tmp_path / "afile").write_text("a file")
        output = tmp_path / "afile" / "sub"
        expected = "which is a file"
    code, _, err = _run(capsys, "train", str(recipe_factory()), "--output-dir", str(output), "--overwrite")
    assert code == 2, err
    assert expected in err and "internal error" not in err
    assert list(real.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Replacing a run of ours: by renames, never losing the old one


def test_move_aside_and_put_back_return_the_old_folder_byte_for_byte(tmp_path: Path) -> None:
    run = tmp_path / "run"
    before = _user_folder(run, **{"run_summary.json": "{}", "routing.jsonl": "{}\n"})
    aside = move_aside(run)
    assert not run.exists() and _tree(aside) == before
    run.mkdir()
    (run / "half-written").write_text("new attempt")
    put_back(aside, run)
    assert _tree(run) == before and not aside.exists()


def test_check_replaceable_accepts_a_run_of_ours(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _user_folder(run, **{"run_summary.json": "{}", "report.md": "# r"})
    check_replaceable(run, "output_dir", "run")  # no error


@pytest.mark.slow
def test_overwrite_replaces_a_run_of_ours_and_a_failure_before_the_first_step_puts_it_back(
    recipe_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    recipe = recipe_factory()
    code, _, err = _run(capsys, "train", str(recipe))
    assert code == 0, err
    run = tmp_path / "run"
    first = _tree(run)

    import transformers

    def broken_train(self, *args, **kwargs):
        raise RuntimeError("the trainer broke before its first step")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "train", broken_train)
        code, _, err = _run(capsys, "train", str(recipe), "--overwrite")
    assert code == 1 and "broke before its first step" in err
    assert _tree(run) == first  # the old run is back, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run")) == []

    code, out, err = _run(capsys, "train", str(recipe), "--overwrite", "--set", "training.max_steps=2")
    assert code == 0, err
    assert "done: 2 steps" in out and not (run / "checkpoint-4").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run")) == []  # nothing left aside


def test_a_failure_before_the_first_step_leaves_a_folder_that_existed_before(
    recipe_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    empty = tmp_path / "run"
    empty.mkdir()

    def broken(*_args, **_kwargs):
        raise RuntimeError("no model today")

    monkeypatch.setattr(train_module, "load_model_and_tokenizer", broken)
    code, _, _ = _run(capsys, "train", str(recipe_factory()))
    assert code == 1 and empty.is_dir()


# ------------------------------------------------------------------------------------------------
# Nothing half-written is trusted


def _whole_checkpoint(folder: Path, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    save_file({"w": torch.ones(64, 64)}, str(checkpoint / "adapter_model.safetensors"))
    torch.save({"state": torch.zeros(128)}, checkpoint / "optimizer.pt")
    (checkpoint / "adapter_config.json").write_text("{}")
    return checkpoint


@pytest.mark.parametrize("damaged", ["trainer_state.json", "adapter_model.safetensors", "optimizer.pt"])
def test_a_checkpoint_with_a_file_cut_short_is_not_complete(damaged: str, tmp_path: Path) -> None:
    _whole_checkpoint(tmp_path, 5)
    checkpoint = _whole_checkpoint(tmp_path, 6)
    assert checkpoint_problem(checkpoint) is None and checkpoint_steps(tmp_path) == [5, 6]
    path = checkpoint / damaged
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert damaged in checkpoint_problem(checkpoint)
    assert checkpoint_steps(tmp_path) == [5]
    assert checkpoint_steps(tmp_path, complete_only=False) == [5, 6]


def test_report_names_a_damaged_checkpoint_and_continues_from_the_whole_one(tmp_path: Path) -> None:
    from moe_finetune.report import write_report

    run = tmp_path / "run"
    _whole_checkpoint(run, 5)
    state = _whole_checkpoint(run, 6) / "trainer_state.json"
    state.write_text(state.read_text()[:10])
    (run / "run_summary.json").write_text(json.dumps({"status": "running", "max_steps": 10}))
    report = write_report(run)
    assert any("checkpoint-6 is not whole" in note for note in report.notes)
    assert "checkpoint-5 with `--resume`" in report.verdict.line


def test_report_of_a_run_whose_adapter_is_cut_short_is_not_healthy(tmp_path: Path) -> None:
    from moe_finetune.report import write_report

    run = tmp_path / "run"
    _whole_checkpoint(run, 2)
    adapter = run / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "tokenizer.json").write_text('{"model": {"vocab": ')  # cut short
    (run / "run_summary.json").write_text(json.dumps({"status": "running", "max_steps": 2}))
    report = write_report(run)
    assert report.verdict.kind == "stopped"
    assert any("adapter/ is not whole" in note for note in report.notes)


# ------------------------------------------------------------------------------------------------
# A full disk, for real: a small tmpfs


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MiB tmpfs; the test fills it with a ballast file at the moment it wants the disk full."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class _FillTheDisk:
    """A callback that fills the disk (bar `leave` bytes) at a chosen moment of training."""

    def __init__(self, folder: Path, event: str, step: int, leave: int) -> None:
        self.folder, self.event, self.step, self.leave = folder, event, step, leave

    def fill(self) -> None:
        import shutil

        free = shutil.disk_usage(self.folder).free
        with open(self.folder / "ballast", "wb") as handle:
            handle.truncate(0)
            block = b"\0" * (1 << 20)
            remaining = free - self.leave
            while remaining > 0:
                try:
                    handle.write(block[: min(len(block), remaining)])
                    handle.flush()
                except OSError:
                    break
                remaining -= len(block)

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def handler(args, state, control, **_kwargs):
            if name == self.event and state.global_step == self.step and not (self.folder / "ballast").exists():
                self.fill()
            return None

        return handler


def _with_callback(monkeypatch, callback) -> None:
    real = train_module.build_trainer

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", build)


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_is_named_and_the_last_whole_checkpoint_resumes(
    recipe_factory, small_disk: Path, monkeypatch, capsys
) -> None:
    run = small_disk / "run"
    recipe = recipe_factory(extra="")
    # fill the disk once checkpoint-2 is saved, leaving less than checkpoint-4 needs
    with monkeypatch.context() as patch:
        _with_callback(patch, _FillTheDisk(small_disk, "on_save", 2, leave=20_000))
        code, _, err = _run(capsys, "train", str(recipe), "--output-dir", str(run))
    assert code == 5, err
    assert "no space left on device while writing" in err and "bytes free" in err
    assert f"{run / 'checkpoint-2'}" in err and "internal error" not in err
    assert checkpoint_steps(run, complete_only=False) == [2, 4]
    assert checkpoint_steps(run) == [2]  # the cut-short checkpoint-4 is never chosen
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "failed" and "no space left" in summary["error"]

    (small_disk / "ballast").unlink()
    from moe_finetune.report import write_report

    report = write_report(run)
    assert report.verdict.kind == "failed" and "checkpoint-2 with `--resume`" in report.verdict.line
    code, out, err = _run(capsys, "train", str(recipe), "--output-dir", str(run), "--resume")
    assert code == 0, err
    assert "done: 4 steps" in out


@pytest.mark.slow
def test_a_disk_that_fills_while_the_adapter_is_saved_leaves_no_adapter_to_trust(
    recipe_factory, small_disk: Path, monkeypatch, capsys
) -> None:
    run = small_disk / "run"
    with monkeypatch.context() as patch:
        _with_callback(patch, _FillTheDisk(small_disk, "on_train_end", 4, leave=4_000))
        code, _, err = _run(capsys, "train", str(recipe_factory()), "--output-dir", str(run))
    assert code == 5, err
    assert "no space left on device" in err
    assert not (run / "adapter").exists()
    assert [p.name for p in run.iterdir() if p.name.startswith(".adapter")] == []
    (small_disk / "ballast").unlink()
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "failed"
    code, _, err = _run(capsys, "merge", str(run))
    assert code == 2 and "has no adapter" in err


@pytest.mark.parametrize("command", ["merge", "generate"])
def test_merge_and_generate_refuse_an_adapter_cut_short_naming_the_file(
    command: str, random_adapter, tmp_path: Path, capsys
) -> None:
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(random_adapter, adapter)
    tokenizer = adapter / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:4096])
    extra = ["--output", str(tmp_path / "out")] if command == "merge" else ["--prompt", "hi"]
    code, _, err = _run(capsys, command, str(adapter), *extra)
    assert code == 2, err
    assert "not a whole adapter" in err and "tokenizer.json" in err and "internal error" not in err


class _SecondSignal:
    """Stands for a second Ctrl-C arriving in step 3: KeyboardInterrupt at once, mid-run."""

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def handler(args, state, control, **_kwargs):
            if name == "on_step_end" and state.global_step == 3:
                raise KeyboardInterrupt
            return None

        return handler


@pytest.mark.slow
def test_a_second_signal_mid_run_names_the_last_complete_checkpoint_and_the_report_says_interrupted(
    recipe_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    _with_callback(monkeypatch, _SecondSignal())
    code, _, err = _run(capsys, "train", str(recipe_factory()))
    assert code == 130, err
    assert f"last complete checkpoint is {tmp_path / 'run' / 'checkpoint-2'}" in err and "--resume" in err
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["status"] == "interrupted"


def test_write_failure_knows_a_full_disk_and_a_refused_write_in_each_form_the_stack_raises_them() -> None:
    import errno

    from moe_finetune.errors import write_failure

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/r/trainer_state.json")
    assert write_failure(full) == ("no space left on device", "/runs/r/trainer_state.json")
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")  # fmt: skip
    assert write_failure(torch_zip) == ("no space left on device", None)
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure(rust) == ("no space left on device", None)
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/runs/r/adapter")
        except PermissionError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert write_failure(outer) == ("permission denied", "/runs/r/adapter")
    assert write_failure(ValueError("a bug")) is None


# ------------------------------------------------------------------------------------------------
# The run's lifecycle: a resume says what it does


@pytest.mark.slow
def test_resume_says_where_it_resumes_counts_what_it_trained_and_a_finished_run_writes_nothing(
    recipe_factory, tmp_path: Path, capsys
) -> None:
    recipe = recipe_factory()
    run = tmp_path / "run"
    code, _, err = _run(capsys, "train", str(recipe), "--set", "training.max_steps=2")
    assert code == 0, err
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["resume_command"].endswith("--resume")  # pasted as is, it continues
    code, out, err = _run(capsys, "train", str(recipe), "--resume")
    assert code == 0, err
    assert f"resuming from {run / 'checkpoint-2'} (step 2 of 4)" in out
    assert "done: 4 steps (2 trained now, resumed at step 2)" in out
    before = _tree(run)
    code, out, err = _run(capsys, "train", str(recipe), "--resume")
    assert code == 0, err
    assert "already finished at step 4 of 4" in out and "nothing was written" in out
    assert _tree(run) == before
