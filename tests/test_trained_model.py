"""The tiny model trained on the Python stdlib: a corpus every machine reads alike, a deterministic cached
build, routers that are peaked, and the guard on it: quiet on a sane fine-tune, catching an aggressive one."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

from moe_finetune.errors import UnknownFamilyError
from moe_finetune.models import trained
from moe_finetune.models.corpus import (
    BROAD_DOMAIN,
    MIN_DOMAIN_CHARS,
    Chunk,
    chunk_text,
    read_corpus,
    retention_chunks,
    spread,
    stdlib_corpus,
    write_rows,
)
from moe_finetune.models.tiny import family_of_tiny_name, is_tiny_name

REPO = Path(__file__).resolve().parents[1]
SANE = REPO / "benchmarks" / "recipes" / "guard-protection-sane.yaml"
AGGRESSIVE = REPO / "benchmarks" / "recipes" / "guard-protection-aggressive.yaml"
# A few steps on a sliver of the stdlib: the whole build path (corpus, tokenizer, loop, cache) in seconds.
QUICK = dataclasses.replace(
    trained.DEFAULT_SETTINGS,
    steps=3,
    batch_size=2,
    seq_len=32,
    vocab_size=400,
    domain_chars=3_000,
    log_every=1,
)


def _fake_stdlib(root: Path) -> Path:
    """A stdlib-shaped folder: one package big enough to be a domain, a small one, tests, site-packages."""
    line = "def handler(message):\n    return message.get_payload()  # parse the header\n"
    (root / "email").mkdir(parents=True)
    (root / "email" / "parser.py").write_text(line * (MIN_DOMAIN_CHARS // len(line) + 1))
    (root / "email" / "test").mkdir()
    (root / "email" / "test" / "test_parser.py").write_text("assert True\n" * 100)
    (root / "json").mkdir()
    (root / "json" / "__init__.py").write_text('"""JSON encoder and decoder."""\nimport re\n' * 20)
    (root / "site-packages" / "thirdparty").mkdir(parents=True)
    (root / "site-packages" / "thirdparty" / "x.py").write_text("x = 1\n" * 100)
    (root / "os.py").write_text('"""OS routines for NT or Posix."""\nimport sys\n' * 20)
    (root / "test_os.py").write_text("import os\n" * 100)
    return root


def test_the_corpus_leaves_out_tests_and_site_packages_and_folds_small_packages_into_one_domain(tmp_path):
    corpus = read_corpus(_fake_stdlib(tmp_path))
    paths = {chunk.path for chunk in corpus.chunks}
    assert paths == {"email/parser.py", "json/__init__.py", "os.py"}
    assert corpus.domains == ["email", BROAD_DOMAIN]  # json is under MIN_DOMAIN_CHARS: it joins os.py
    assert {c.domain for c in corpus.chunks if c.path == "json/__init__.py"} == {BROAD_DOMAIN}
    with pytest.raises(ValueError, match="unknown stdlib domain.*asyncio.*has: email, modules"):
        corpus.select(["asyncio"])


def test_the_corpus_is_the_same_whatever_order_the_file_system_lists_it_in(tmp_path, monkeypatch):
    root = _fake_stdlib(tmp_path)
    first = read_corpus(root)
    listed = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(sorted(listed(self, pattern))))
    second = read_corpus(root)
    assert second.chunks == first.chunks and second.fingerprint == first.fingerprint


def test_held_out_chunks_are_chosen_by_file_and_position_alone_and_are_about_one_in_ten():
    corpus = stdlib_corpus()
    chunk = corpus.chunks[0]
    moved = Chunk("elsewhere", chunk.path, chunk.index, "other text")
    assert moved.held_out == chunk.held_out  # neither the domain nor the text decides the split
    share = len(corpus.select(held_out=True)) / len(corpus.chunks)
    assert 0.08 < share < 0.12
    assert not set(corpus.select(held_out=True)) & set(corpus.select())


def test_changing_one_stdlib_file_changes_the_fingerprint_and_so_the_model_cache_key(tmp_path):
    root = _fake_stdlib(tmp_path)
    before = read_corpus(root)
    (root / "os.py").write_text((root / "os.py").read_text() + "# patched\n")
    after = read_corpus(root)
    assert after.fingerprint != before.fingerprint
    spec = family_of_tiny_name("tiny-mixtral-trained")
    assert trained._cache_key(spec, QUICK, after) != trained._cache_key(spec, QUICK, before)


def test_chunks_are_cut_at_line_ends_within_the_limit_and_lose_nothing():
    text = "short line\n" * 30 + "x" * 950 + "\nend\n"
    pieces = chunk_text(text, max_chars=100)
    assert "".join(pieces) == text
    assert all(len(piece) <= 100 for piece in pieces)
    assert all(piece.endswith("\n") for piece in pieces[:3])  # cut at line ends where lines fit


def test_spread_takes_an_even_sample_in_order():
    chunks = [Chunk("d", "f.py", i, str(i)) for i in range(10)]
    assert [c.index for c in spread(chunks, 5)] == [0, 2, 4, 6, 8]
    assert spread(chunks, 20) == chunks


def test_trained_names_resolve_to_their_family_and_an_unknown_one_is_refused_naming_the_field():
    assert is_tiny_name("tiny-mixtral-trained")
    assert family_of_tiny_name("tiny-mixtral-trained").name == "mixtral"
    assert family_of_tiny_name("tiny-olmoe-trained").name == "olmoe"
    with pytest.raises(UnknownFamilyError, match="model.name.*tiny-mixtral-trained, tiny-olmoe-trained"):
        trained.build_trained(family_of_tiny_name("tiny-gpt-oss-trained"), echo=None)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_two_builds_give_the_same_weights_and_tokenizer_and_a_third_reuses_the_cache(
    tmp_path, family, monkeypatch
):
    first = trained.build_trained(family, cache_dir=tmp_path / "a", settings=QUICK, echo=None)
    second = trained.build_trained(family, cache_dir=tmp_path / "b", settings=QUICK, echo=None)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert trained.read_metadata(first)["loss_curve"] == trained.read_metadata(second)["loss_curve"]

    def no_pretraining(*args, **kwargs):
        raise AssertionError("a cached model was pretrained again")

    monkeypatch.setattr(trained, "pretrain", no_pretraining)
    assert trained.build_trained(family, cache_dir=tmp_path / "a", settings=QUICK, echo=None) == first


def test_the_build_records_the_python_version_and_corpus_fingerprint(tmp_path):
    import transformers

    model_dir = trained.build_trained("mixtral", cache_dir=tmp_path, settings=QUICK, echo=None)
    meta = trained.read_metadata(model_dir)
    corpus = stdlib_corpus()
    assert (
        meta["python_version"] == corpus.python_version and meta["corpus_fingerprint"] == corpus.fingerprint
    )
    assert meta["domains"] == corpus.domains and [row["step"] for row in meta["loss_curve"]] == [1, 2, 3]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.router_aux_loss_coef == QUICK.aux_loss_coef  # what fine-tuning recipes inherit


# ------------------------------------------------------------------------------------------------
# the shipped model: built once per session (about a minute on 2 cores) in the tests' private cache


@pytest.fixture(scope="session")
def trained_mixtral(_private_model_cache: Path) -> Path:
    from moe_finetune.models.tiny import tiny_model_dir

    return tiny_model_dir("tiny-mixtral-trained")


@pytest.fixture(scope="module")
def guard_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The benchmark's datasets: 12,000 rows over every domain, and the `email` package's rows."""
    folder = tmp_path_factory.mktemp("stdlib-data")
    corpus = stdlib_corpus()
    return {
        "broad": write_rows(folder / "broad.jsonl.gz", spread(corpus.select(), 12_000)),
        "email": write_rows(folder / "email.jsonl.gz", corpus.select(["email"])),
        # the benchmark's retention rows: held-out chunks of the other domains, past the 64 it measures on
        "retention": write_rows(
            folder / "retention.jsonl.gz", retention_chunks(corpus, "email", skip=64, per_domain=4)
        ),
    }


def _train(recipe: Path, *overrides: str) -> tuple[int, str]:
    from moe_finetune.cli import main

    out = io.StringIO()
    args = ["train", str(recipe), "--overwrite"]
    for override in overrides:
        args += ["--set", override]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(args)
    return code, out.getvalue()


def _actions(run: Path) -> list[dict]:
    path = run / "guard_events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["action"] in ("cut_lr", "halt", "settled")]


@pytest.mark.slow
def test_pretraining_peaks_the_routers_and_the_loss_falls(trained_mixtral: Path):
    import torch
    import transformers

    from moe_finetune.routing import capture_routing

    meta = trained.read_metadata(trained_mixtral)
    curve = meta["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"] - 2.0
    assert curve[-1]["aux_loss"] < 2.5  # per-layer balancing kept every layer near k = 2
    corpus = stdlib_corpus()
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_mixtral)
    model = transformers.AutoModelForCausalLM.from_pretrained(trained_mixtral)
    start = trained.initial_model(model.config, trained.PretrainSettings(**meta["settings"]))
    held = [c for d in corpus.domains for c in corpus.select([d], held_out=True)[:4]]
    input_ids, mask = trained.encode_chunks(tokenizer, held)
    entropy = {}
    for label, candidate in (("init", start), ("trained", model)):
        with capture_routing(candidate) as capture, torch.no_grad():
            candidate.eval()(input_ids=input_ids, attention_mask=mask)
            entropy[label] = capture.stats().entropy
    assert entropy["trained"] < 0.85 * entropy["init"] and entropy["trained"] < 0.7
    assert trained.held_out_loss(model, tokenizer, held) < trained.held_out_loss(start, tokenizer, held) - 2.0


@pytest.mark.slow
def test_a_sane_fine_tune_of_the_trained_model_makes_no_guard_action(trained_mixtral, guard_data, tmp_path):
    """The guard at its defaults, the retention check included: a sane fine-tune forgets nothing to act on."""
    run = tmp_path / "sane"
    code, out = _train(
        SANE,
        f"data.path={guard_data['broad']}",
        f"guards.retention.data={guard_data['retention']}",
        f"output_dir={run}",
        "training.max_steps=40",
    )
    assert code == 0, out[-3000:]
    assert _actions(run) == [], out[-3000:]
    assert "done: 40 steps" in out
    checks = [json.loads(line) for line in (run / "retention.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert max(c["rise"] for c in checks) < 0.01
    assert "[guard] retention check: " in out and "before any update" in out
    assert "**Retention:** loss on the retention rows" in (run / "report.md").read_text()


@pytest.mark.slow
def test_an_aggressive_fine_tune_of_the_trained_model_is_caught_by_the_retention_check_at_once(
    trained_mixtral, guard_data, tmp_path
):
    """Routers trained at 5e-3 without a balancing loss on one package: the other packages' loss is 1% up
    after five steps (the benchmark: retention cuts at steps 5, 30, 95 and 180), long before routing moves."""
    run = tmp_path / "aggressive"
    code, out = _train(
        AGGRESSIVE,
        f"data.path={guard_data['email']}",
        f"guards.retention.data={guard_data['retention']}",
        f"output_dir={run}",
        "training.max_steps=20",
    )
    assert code == 0, out[-3000:]
    actions = _actions(run)
    assert actions and actions[0]["action"] == "cut_lr" and actions[0]["step"] <= 10, out[-3000:]
    assert actions[0]["details"]["check"] == "retention_cut"
    assert "the model is forgetting what it knew" in actions[0]["reason"]
    assert actions[0]["lr_after"] == pytest.approx(2.5e-3)


@pytest.mark.slow
def test_without_the_retention_check_the_routing_checks_catch_the_aggressive_fine_tune_before_its_last_step(
    trained_mixtral, guard_data, tmp_path
):
    """The routing checks alone: on the trained model the load stays spread (no halt), but routing sharpens
    fast and the guard cuts the rate: pooled routing entropy 11-12% below its baseline at step 35 on the
    machine the benchmark first ran on, at step 55 on an AMD EPYC. The pretraining is deterministic on one
    machine, but CPUs with other float kernels build slightly different weights, so the step is not pinned."""
    run = tmp_path / "aggressive"
    code, out = _train(
        AGGRESSIVE, f"data.path={guard_data['email']}", f"output_dir={run}", "training.max_steps=90"
    )
    assert code == 0, out[-3000:]
    actions = _actions(run)
    assert actions and actions[0]["action"] == "cut_lr" and actions[0]["step"] < 90, out[-3000:]
    assert "routing entropy" in actions[0]["reason"]
    assert actions[0]["lr_after"] == pytest.approx(2.5e-3)
