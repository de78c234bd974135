"""Tiny MoE models *pretrained* on real text: the Python standard library (models/corpus.py).

The tiny random models (models/tiny.py) have near-uniform routers with nothing to lose; what a user of a
real MoE fears is a model whose routers are peaked and specialised forgetting what it knew. So
`tiny-<family>-trained` (a recipe's `model.name`) is the same kind of model pretrained from scratch on
the stdlib's source and docstrings, with a BPE tokenizer trained on the same text:

- deterministic: the corpus is read in sorted order and split by hashes (corpus.py), the init, the
  batches and the optimizer are seeded, and the loop runs on a fixed number of threads, so two builds on
  one machine give the same weights (floating-point kernels may differ between CPUs);
- bounded: `PretrainSettings` (300 steps, under two minutes on one core: it is built once per CI run);
- balanced: a load-balancing loss for *each* MoE layer (transformers' `load_balancing_loss_func` on one
  layer's logits, averaged over layers: DESIGN.md section 3 measured that the pooled loss lets single
  layers collapse while reading "balanced");
- a router init of std `router_std`, the router-logit scale of a hidden-4096 Mixtral (at the default
  0.02 a hidden-128 router stays near-uniform and learns little);
- cached like the tiny random models (under $MOE_FINETUNE_CACHE), keyed by the settings, the
  architecture, the torch/transformers versions and the corpus's Python version and fingerprint, which
  `trained.json` in the model folder records with the loss curve: a cache built from another stdlib is
  never reused.

A plain PyTorch loop, not a Trainer: models/ sits below the callbacks and the training code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_finetune.errors import UnknownFamilyError
from moe_finetune.models.corpus import Chunk, Corpus, stdlib_corpus
from moe_finetune.models.families import FamilySpec, get_family
from moe_finetune.models.tiny import TINY_PREFIX, TRAINED_SUFFIX, cache_root, train_tokenizer, write_model_dir

METADATA_FILE = "trained.json"
# Bumped whenever what `build_trained` writes changes, so stale caches are not reused.
_CACHE_VERSION = "1"

_SHARED_SIZES: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "use_cache": False,
}
# Per family: how its config names the experts (8 experts, top-2, expert width 256).
TRAINED_SIZES: dict[str, dict[str, Any]] = {
    "mixtral": {**_SHARED_SIZES, "intermediate_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {**_SHARED_SIZES, "intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2},
}


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the pretrained weights (all of it enters the cache key)."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # cosine decay from lr to this fraction of it
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01  # per-layer load-balancing loss, also the saved config's coefficient
    router_std: float = 0.11
    vocab_size: int = 2048
    # Each domain contributes at most this many characters (spread over its files), so the large ones
    # (`modules`, `encodings`) do not drown the small ones.
    domain_chars: int = 150_000
    seed: int = 0
    # One thread, fixed: the floating-point reductions (and so the weights) are the same every build, and
    # tiny models gain nothing from intra-op threads on a shared CPU (tests/conftest.py says the same).
    threads: int = 1
    log_every: int = 25


DEFAULT_SETTINGS = PretrainSettings()


def trained_name(family: str | FamilySpec) -> str:
    """The recipe name of a family's trained tiny model: `tiny-mixtral-trained`, `tiny-olmoe-trained`."""
    spec = family if isinstance(family, FamilySpec) else get_family(family)
    return f"{TINY_PREFIX}{spec.name.replace('_', '-')}{TRAINED_SUFFIX}"


def _spec(family: str | FamilySpec) -> FamilySpec:
    spec = family if isinstance(family, FamilySpec) else get_family(family)
    if spec.name not in TRAINED_SIZES:
        known = ", ".join(trained_name(name) for name in sorted(TRAINED_SIZES))
        raise UnknownFamilyError(
            f"model.name: there is no trained tiny model of the {spec.name} family; there are {known} "
            f"(and tiny-{spec.name.replace('_', '-')}, a random one)"
        )
    return spec


# ------------------------------------------------------------------------------------------------
# the text


def pretraining_chunks(corpus: Corpus, domain_chars: int) -> list[Chunk]:
    """The training side of every domain, at most `domain_chars` of each, spread evenly over its chunks."""
    chosen: list[Chunk] = []
    for domain in corpus.domains:
        chunks = corpus.select([domain])
        total = sum(len(chunk.text) for chunk in chunks)
        stride = max(1, math.ceil(total / domain_chars))
        chosen.extend(chunks[::stride])
    return chosen


def token_stream(tokenizer: Any, chunks: Sequence[Chunk]) -> list[int]:
    """The chunks' tokens end to end, an end-of-text token wherever the text is not contiguous."""
    encoded = tokenizer([chunk.text for chunk in chunks], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    previous: Chunk | None = None
    for chunk, ids in zip(chunks, encoded, strict=True):
        adjacent = previous is not None and previous.path == chunk.path and previous.index + 1 == chunk.index
        if previous is not None and not adjacent:
            stream.append(tokenizer.eos_token_id)
        stream.extend(ids)
        previous = chunk
    return stream


# ------------------------------------------------------------------------------------------------
# the model and its pretraining


def trained_config(
    family: str | FamilySpec, tokenizer: Any, settings: PretrainSettings = DEFAULT_SETTINGS
) -> Any:
    """The transformers config of the trained tiny model of `family` for this tokenizer."""
    import transformers

    spec = _spec(family)
    return getattr(transformers, spec.config_class)(
        **TRAINED_SIZES[spec.name],
        vocab_size=len(tokenizer),
        router_aux_loss_coef=settings.aux_loss_coef,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )


def initial_model(config: Any, settings: PretrainSettings = DEFAULT_SETTINGS) -> Any:
    """The model as pretraining starts it: seeded init, routers at std `router_std` (also the "before"
    of the README's routing table)."""
    import torch
    import transformers

    spec = _spec(config.model_type)
    torch.manual_seed(settings.seed)
    model = getattr(transformers, spec.model_class)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, settings.router_std)
    return model


def per_layer_balancing_loss(model: Any, router_logits: Sequence[Any]) -> Any:
    """Mean over MoE layers of each layer's own Switch load-balancing loss (uniform routing scores k).

    transformers' `load_balancing_loss_func` given one layer's logits is exactly that layer's loss
    (f and P over its own tokens); given all layers at once it would pool them (DESIGN.md section 3).
    """
    pooled_loss = importlib.import_module(type(model).__module__).load_balancing_loss_func
    spec = _spec(model.config.model_type)
    experts, top_k = spec.num_experts(model.config), spec.top_k(model.config)
    losses = [pooled_loss((logits,), experts, top_k) for logits in router_logits]
    return sum(losses) / len(losses)


def _learning_rate(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up to `lr`, then cosine decay to `final_lr_fraction` x `lr` at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.final_lr_fraction
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def pretrain(model: Any, stream: Sequence[int], settings: PretrainSettings) -> list[dict[str, float]]:
    """Train `model` in place on random windows of `stream`; the loss curve, one entry per `log_every` steps.

    The task loss is the next-token cross-entropy; the per-layer balancing loss is added with
    `aux_loss_coef` (the model's own pooled term is computed by transformers but not added: its
    coefficient is zeroed on the instance for the loop).
    """
    import torch

    tokens = torch.tensor(stream, dtype=torch.long)
    if tokens.numel() <= settings.seq_len + 1:
        raise ValueError(f"the pretraining stream has {tokens.numel()} tokens, fewer than one window")
    generator = torch.Generator().manual_seed(settings.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    coef_before = model.router_aux_loss_coef
    model.router_aux_loss_coef = 0.0
    model.train()
    curve: list[dict[str, float]] = []
    task_sum, aux_sum, count = 0.0, 0.0, 0
    try:
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, settings)
            starts = torch.randint(
                0, tokens.numel() - settings.seq_len, (settings.batch_size,), generator=generator
            )
            batch = torch.stack([tokens[s : s + settings.seq_len] for s in starts.tolist()])
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
            aux = per_layer_balancing_loss(model, out.router_logits)
            (out.loss + settings.aux_loss_coef * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task_sum, aux_sum, count = (
                task_sum + out.loss.detach().item(),
                aux_sum + aux.detach().item(),
                count + 1,
            )
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
                curve.append({"step": step + 1, "loss": task_sum / count, "aux_loss": aux_sum / count})
                task_sum, aux_sum, count = 0.0, 0.0, 0
    finally:
        model.router_aux_loss_coef = coef_before
    model.eval()
    return curve


# ------------------------------------------------------------------------------------------------
# the cache


def _cache_key(spec: FamilySpec, settings: PretrainSettings, corpus: Corpus) -> str:
    import torch
    import transformers

    blob = json.dumps(
        [
            _CACHE_VERSION,
            spec.name,
            TRAINED_SIZES[spec.name],
            dataclasses.asdict(settings),
            corpus.metadata(),
            torch.__version__,
            transformers.__version__,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """What `build_trained` recorded about a model: settings, Python version, corpus fingerprint, loss curve."""
    return json.loads((Path(model_dir) / METADATA_FILE).read_text(encoding="utf-8"))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_trained(
    family: str | FamilySpec = "mixtral",
    *,
    cache_dir: Path | None = None,
    settings: PretrainSettings = DEFAULT_SETTINGS,
    corpus: Corpus | None = None,
    echo: Callable[[str], None] | None = _say,
) -> Path:
    """Build (or reuse) the trained tiny model of `family`; return its `save_pretrained` directory.

    A cached copy is reused only when it was built with the same settings, architecture, library
    versions and stdlib (Python version and corpus fingerprint, recorded in `trained.json`).
    """
    import torch

    spec = _spec(family)
    corpus = corpus if corpus is not None else stdlib_corpus()
    root = cache_dir if cache_dir is not None else cache_root()
    # the key holds the corpus's Python version and fingerprint: another stdlib is another folder
    target = root / f"{trained_name(spec)}-{_cache_key(spec, settings, corpus)}"
    if all((target / name).is_file() for name in ("config.json", "tokenizer.json", METADATA_FILE)):
        return target
    root.mkdir(parents=True, exist_ok=True)
    if echo is not None:
        echo(
            f"building {trained_name(spec)}: pretraining {settings.steps} steps on the Python "
            f"{corpus.python_version} stdlib (under two minutes on one core; cached in {root})"
        )
    start, cpu_start = time.perf_counter(), time.process_time()
    chunks = pretraining_chunks(corpus, settings.domain_chars)
    tokenizer = train_tokenizer((chunk.text for chunk in chunks), vocab_size=settings.vocab_size)
    stream = token_stream(tokenizer, chunks)
    config = trained_config(spec, tokenizer, settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        model = initial_model(config, settings)
        curve = pretrain(model, stream, settings)
    finally:
        torch.set_num_threads(threads)
    metadata = {
        "name": trained_name(spec),
        "family": spec.name,
        **corpus.metadata(),
        "domains": corpus.domains,
        "settings": dataclasses.asdict(settings),
        "stream_tokens": len(stream),
        "tokens_seen": settings.steps * settings.batch_size * settings.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),  # what the build costs on a quiet core
        "torch": torch.__version__,
    }
    return write_model_dir(target, model, tokenizer, {METADATA_FILE: json.dumps(metadata, indent=1) + "\n"})


# ------------------------------------------------------------------------------------------------
# held-out text, for the benchmarks and tests: how well a model (base or fine-tuned) knows a domain


def encode_chunks(tokenizer: Any, chunks: Sequence[Chunk], max_length: int = 128) -> tuple[Any, Any]:
    """Chunks as one right-padded batch: (input_ids, attention_mask), each chunk its own sequence."""
    from moe_finetune.models.tokens import pad_batch, padding_id

    encoded = tokenizer([chunk.text for chunk in chunks], add_special_tokens=False)["input_ids"]
    return pad_batch([ids[:max_length] for ids in encoded], padding_id(tokenizer))


def held_out_loss(
    model: Any, tokenizer: Any, chunks: Sequence[Chunk], *, batch_size: int = 32, max_length: int = 128
) -> float:
    """Mean next-token cross-entropy over every real token of `chunks` (padding left out), no grad."""
    import torch

    from moe_finetune.models.tokens import summed_token_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            input_ids, mask = encode_chunks(tokenizer, chunks[start : start + batch_size], max_length)
            summed, tokens = summed_token_loss(model, input_ids, mask)
            total += summed
            count += tokens
    model.train(was_training)
    return total / max(count, 1)
