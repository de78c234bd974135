"""The CPython standard library as a text corpus split into domains: real text every machine has.

The tiny *trained* models (models/trained.py) are pretrained on it, and the guard-protection benchmark
fine-tunes them on one domain of it and measures forgetting on the others, so nothing is downloaded
and every machine with the same Python minor version reads the same corpus:

- files: every `*.py` under `sysconfig.get_paths()["stdlib"]`, in sorted order, leaving out test
  suites (`test`, `tests`, `idle_test` folders, `test_*.py`) and `site-packages`;
- domain: the top-level package a file belongs to (`email`, `json`, `asyncio`, `xml`, `http`, ...);
  top-level modules (`os.py`, `typing.py`, ...) and packages with less than `MIN_DOMAIN_CHARS` of
  source form one broad domain, `modules`;
- chunks: each file cut at line boundaries into pieces of at most `CHUNK_CHARS` characters (source and
  docstrings alike: both are what a model of this code has to know);
- split: one chunk in `HELDOUT_EVERY` is held out, chosen by a hash of (file, chunk index), never by
  position or a random draw, so the split is the same on every machine and no held-out chunk is ever
  pretrained or fine-tuned on.

The stdlib differs between Python versions (distutils left in 3.12, lib2to3 in 3.13), so a corpus
carries its Python version and a fingerprint of every file it read; a model built from it records
both and is rebuilt when either differs. Pure Python: no torch, no tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Folders holding test suites or third-party code, wherever they appear under the stdlib.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
# A package with less source than this is too small to be a domain of its own: it joins `modules`.
MIN_DOMAIN_CHARS = 40_000
BROAD_DOMAIN = "modules"
CHUNK_CHARS = 400
HELDOUT_EVERY = 10
# Chunks shorter than this (a lone `pass`, the tail of a file) carry too little text to learn from.
MIN_CHUNK_CHARS = 40


@dataclass(frozen=True)
class Chunk:
    """One piece of one stdlib file: the unit of pretraining text, fine-tuning rows and held-out rows."""

    domain: str
    path: str  # relative to the stdlib root, with forward slashes
    index: int  # position of the chunk in its file
    text: str

    @property
    def held_out(self) -> bool:
        # a hash, not the index: held-out chunks are spread over every file, and no ordering of
        # files or chunks can shift which ones they are
        digest = hashlib.sha1(f"{self.path}:{self.index}".encode()).digest()
        return int.from_bytes(digest[:4], "big") % HELDOUT_EVERY == 0


@dataclass(frozen=True)
class Corpus:
    """The stdlib's chunks, in a fixed order (domain files sorted by path, chunks in file order)."""

    root: str
    python_version: str  # major.minor: the stdlib changes between minor versions
    fingerprint: str  # sha256 over every included file's path and bytes
    chunks: tuple[Chunk, ...]

    @property
    def domains(self) -> list[str]:
        """The domains in sorted order (`modules` among them)."""
        return sorted({chunk.domain for chunk in self.chunks})

    def select(self, domains: Iterable[str] | None = None, *, held_out: bool = False) -> list[Chunk]:
        """The chunks of the given domains (all when None) on one side of the split, in corpus order."""
        wanted = None if domains is None else set(domains)
        if wanted is not None:
            unknown = sorted(wanted - set(self.domains))
            if unknown:
                raise ValueError(
                    f"unknown stdlib domain(s) {', '.join(unknown)}; this Python {self.python_version} "
                    f"stdlib has: {', '.join(self.domains)}"
                )
        return [
            chunk
            for chunk in self.chunks
            if chunk.held_out == held_out and (wanted is None or chunk.domain in wanted)
        ]

    def metadata(self) -> dict[str, Any]:
        """What a model built from this corpus records, so a cache from another stdlib is never reused."""
        return {"python_version": self.python_version, "corpus_fingerprint": self.fingerprint}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _included(relative: Path) -> bool:
    if any(part in EXCLUDED_DIRS for part in relative.parts[:-1]):
        return False
    return not relative.name.startswith("test_")


def stdlib_files(root: Path) -> list[Path]:
    """The included `*.py` files under `root`, relative to it, sorted by their POSIX path."""
    files = [path.relative_to(root) for path in root.rglob("*.py") if path.is_file()]
    return sorted((path for path in files if _included(path)), key=lambda p: p.as_posix())


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` at line boundaries into pieces of at most `max_chars` (a longer line is cut where it must)."""
    pieces: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a long string literal or a data table row
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def _top_level(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else BROAD_DOMAIN


def read_corpus(root: Path | None = None) -> Corpus:
    """Read, split and fingerprint the stdlib under `root` (the running Python's when None)."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library folder {root} does not exist")
    files = stdlib_files(root)
    fingerprint = hashlib.sha256()
    texts: list[tuple[str, str, str]] = []  # (posix path, top level, text)
    sizes: dict[str, int] = {}
    for relative in files:
        data = (root / relative).read_bytes()
        posix = relative.as_posix()
        fingerprint.update(posix.encode() + b"\0" + hashlib.sha256(data).digest())
        # the stdlib is UTF-8 (PEP 3120); a stray byte must not stop the build
        text = data.decode("utf-8", errors="replace")
        top = _top_level(relative)
        texts.append((posix, top, text))
        sizes[top] = sizes.get(top, 0) + len(text)
    chunks = []
    for posix, top, text in texts:
        domain = top if sizes[top] >= MIN_DOMAIN_CHARS else BROAD_DOMAIN
        for index, piece in enumerate(chunk_text(text)):
            if len(piece.strip()) >= MIN_CHUNK_CHARS:
                chunks.append(Chunk(domain, posix, index, piece))
    if not chunks:
        raise FileNotFoundError(f"no Python source found under {root}")
    return Corpus(
        root=str(root),
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        fingerprint=fingerprint.hexdigest(),
        chunks=tuple(chunks),
    )


@functools.lru_cache(maxsize=2)
def stdlib_corpus(root: str | None = None) -> Corpus:
    """`read_corpus`, once per process (about a second: the stdlib is ~12 MB of source)."""
    return read_corpus(None if root is None else Path(root))


def spread(chunks: Sequence[Chunk], count: int) -> list[Chunk]:
    """`count` chunks spread evenly over `chunks` (all of them when there are fewer), in their order.

    A deterministic sample that covers every domain and file in proportion, where the first `count`
    would be the alphabetically first packages only.
    """
    if count >= len(chunks):
        return list(chunks)
    return [chunks[i * len(chunks) // count] for i in range(count)]


def retention_chunks(corpus: Corpus, exclude: str, *, skip: int, per_domain: int) -> list[Chunk]:
    """Held-out chunks of every domain but `exclude` (the fine-tune's), `per_domain` of each after its first
    `skip` (the ones forgetting is measured on): rows the guard's retention check can watch without ever
    seeing those it is judged by. A domain with `skip` held-out chunks or fewer gives none."""
    return [
        chunk
        for domain in corpus.domains
        if domain != exclude
        for chunk in corpus.select([domain], held_out=True)[skip : skip + per_domain]
    ]


def rows(chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
    """Training rows as the project's data loader reads them: `text`, plus `domain` and `source` to trace them."""
    return [{"text": c.text, "domain": c.domain, "source": f"{c.path}#{c.index}"} for c in chunks]


def write_rows(path: Path, chunks: Sequence[Chunk]) -> Path:
    """Write chunks as a JSON Lines file (gzipped when the name ends in .gz), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows(chunks)).encode("utf-8")
    if path.name.endswith(".gz"):
        # a fixed header (no name, mtime 0): the same rows give the same bytes
        with open(staging, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as out:
            out.write(lines)
    else:
        staging.write_bytes(lines)
    staging.replace(path)
    return path
