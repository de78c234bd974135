"""Upgrade on purpose: the newest versions the ranges allow, in a fresh venv, against the tested lock.

    python benchmarks/latest_check.py                # build, say what changed, run ruff, the suite and the demos
    python benchmarks/latest_check.py --write-lock   # ... and, when all of it passes, write the new lock

A fresh machine resolves `pip install -e '.[dev]'` to whatever is newest that day, not to what CI tested;
this is that machine, on purpose. It builds a venv in a temporary folder (nothing of yours is touched),
installs torch at the lock's version first and holds it there (an unpinned torch would pull a multi-GB CUDA
build; `--torch` tries another version, `--newest-torch` lets it upgrade), then the project with
`--upgrade --upgrade-strategy eager` and no other constraint, prints every package whose version differs from requirements-lock.txt, and runs `ruff check`, `pytest -q` and
the two demos (collapse + its recovery, sharpening) at 1 and 2 threads. The demos are judged by their
story, as tests/test_guard_integration.py does: the collapse demo cuts before it halts (exit 4) and its
recovery from last-healthy at lr 1e-5 runs to the end; the sharpening demo cuts, settles and finishes.
Exit 0 only when all of it passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-lock.txt"
HEADER_LINES = 3  # the lock's comment lines, kept when it is rewritten


def read_pins(text: str) -> dict[str, str]:
    """`name==version` lines as {normalised name: version} (comments, editable and URL lines skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e", "-")) or "==" not in line:
            continue
        name, _, version = line.partition("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0].strip()
    return pins


def changes(locked: dict[str, str], newest: dict[str, str]) -> list[str]:
    """One line per package that differs: upgraded, added or gone."""
    lines = []
    for name in sorted(set(locked) | set(newest)):
        old, new = locked.get(name), newest.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"  + {name} {new} (new)")
        elif new is None:
            lines.append(f"  - {name} {old} (no longer needed)")
        else:
            lines.append(f"  ~ {name} {old} -> {new}")
    return lines


def sh(command: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO, log: Path | None = None) -> int:
    print("$ " + " ".join(command), flush=True)
    if log is None:
        return subprocess.run(command, cwd=cwd, env=env).returncode
    with log.open("w") as handle:
        return subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode


def actions(run: Path) -> list[str]:
    path = run / "guard_events.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f"{e['action']}@{e['step']}" for e in events if e.get("action") in ("cut_lr", "halt", "settled")]


def demos(venv: Path, threads: int, work: Path) -> list[tuple[str, bool, str]]:
    """The two demos' stories at `threads` threads: (name, passed, what happened)."""
    cli = str(venv / "bin" / "moe-finetune")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    results = []
    collapse = work / f"collapse-{threads}"
    code = sh([cli, "train", "recipes/demo-collapse.yaml", "--output-dir", str(collapse)], env=env,
              log=work / f"collapse-{threads}.log")  # fmt: skip
    story = actions(collapse)
    kinds = [a.split("@")[0] for a in story]
    ok = code == 4 and "cut_lr" in kinds and "halt" in kinds and kinds.index("cut_lr") < kinds.index("halt")
    results.append((f"demo-collapse, {threads} thread(s)", ok, f"exit {code}: {' '.join(story) or 'no action'}"))
    kept = sorted((collapse / "last-healthy").glob("checkpoint-*"))
    if kept:
        code = sh([cli, "train", "recipes/demo-collapse.yaml", "--output-dir", str(collapse), "--resume",
                   str(kept[-1]), "--set", "training.learning_rate=1e-5"], env=env,
                  log=work / f"recovery-{threads}.log")  # fmt: skip
        results.append((f"  its recovery from {kept[-1].name}", code == 0, f"exit {code}"))
    else:
        results.append(("  its recovery", False, "no last-healthy checkpoint to recover from"))
    sharpening = work / f"sharpening-{threads}"
    code = sh([cli, "train", "recipes/demo-sharpening.yaml", "--output-dir", str(sharpening)], env=env,
              log=work / f"sharpening-{threads}.log")  # fmt: skip
    story = actions(sharpening)
    kinds = [a.split("@")[0] for a in story]
    ok = code == 0 and "cut_lr" in kinds and "settled" in kinds and "halt" not in kinds
    results.append((f"demo-sharpening, {threads} thread(s)", ok, f"exit {code}: {' '.join(story) or 'no action'}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-lock", action="store_true", help="write the new set into requirements-lock.txt")
    parser.add_argument("--torch", help="torch version to install first (default: the lock's)")
    parser.add_argument(
        "--newest-torch", action="store_true", help="let torch upgrade too (on this machine: 2.14.1, a CUDA build)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts for the demos")
    parser.add_argument("--no-tests", action="store_true", help="skip ruff and pytest (the demos still run)")
    parser.add_argument("--keep", action="store_true", help="keep the venv and the demo runs (path printed)")
    args = parser.parse_args(argv)

    locked = read_pins(LOCK.read_text())
    torch = args.torch or locked.get("torch")
    work = Path(tempfile.mkdtemp(prefix="moe-latest-"))
    venv = work / "venv"
    start = time.perf_counter()
    passed = False
    try:
        # torch stays where it was installed: an eager upgrade would otherwise take the newest torch the range
        # allows, a multi-GB CUDA build (`--newest-torch` asks for exactly that)
        hold = work / "torch.txt"
        hold.write_text(f"torch=={torch}\n")
        upgrade = [str(venv / "bin/pip"), "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-e", ".[dev]"]
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin/pip"), "install", "-q", f"torch=={torch}"],
            upgrade if args.newest_torch else upgrade + ["-c", str(hold)],
        ]
        for step in steps:
            if sh(step) != 0:
                print("latest-check: the install failed (see above)")
                return 1
        frozen = subprocess.run([str(venv / "bin/pip"), "freeze"], capture_output=True, text=True, check=True).stdout
        newest = read_pins(frozen)
        diff = changes(locked, newest)
        print("\nAgainst requirements-lock.txt:" if diff else "\nThe newest set is the lock's: nothing changed.")
        print("\n".join(diff))

        results: list[tuple[str, bool, str]] = []
        if not args.no_tests:
            results.append(("ruff check", sh([str(venv / "bin/ruff"), "check", "."]) == 0, ""))
            code = sh([str(venv / "bin/python"), "-m", "pytest", "-q"], log=work / "pytest.log")
            tail = (work / "pytest.log").read_text().strip().splitlines()[-1:] or [""]
            results.append(("pytest -q", code == 0, tail[0]))
        for threads in args.threads:
            results += demos(venv, threads, work)

        print(f"\nlatest-check ({time.perf_counter() - start:.0f} s; logs in {work}, kept on a failure or --keep):")
        for name, ok, what in results:
            print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + what if what else ''}")
        passed = bool(results) and all(ok for _, ok, _ in results)
        if args.write_lock:
            if not passed:
                print("latest-check: not all passed; the lock is left as it was")
            else:
                header = LOCK.read_text().splitlines()[:HEADER_LINES]
                body = [f"{name}=={version}" for name, version in sorted(newest.items()) if name != "moe-finetune"]
                LOCK.write_text("\n".join(header + body) + "\n")
                print(f"latest-check: wrote {len(body)} pins into {LOCK.name}")
        return 0 if passed else 1
    finally:
        if not args.keep and passed:
            shutil.rmtree(work, ignore_errors=True)  # a failure keeps its logs to read


if __name__ == "__main__":
    sys.exit(main())
