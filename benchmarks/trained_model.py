"""The trained tiny model (`tiny-<family>-trained`): its pretraining loss, and its routing before and after.

    python benchmarks/trained_model.py                    # builds (or reuses) tiny-mixtral-trained
    python benchmarks/trained_model.py --family olmoe
    python benchmarks/trained_model.py --steps 100        # a shorter build, in its own cache folder

Prints, for the README:
- the pretraining loss curve (recorded in the model's trained.json while it was built);
- held-out cross-entropy (chunks no build ever trains on) at the seeded init and after pretraining;
- per MoE layer, the normalised routing entropy (1.0 = uniform) and the busiest expert's load share
  (x uniform) at the init (the same seed, the same router std: `initial_model`) and after pretraining,
  on the held-out chunks of every domain;
- which experts each domain prefers: per layer, the expert whose share of the domain's top-k assignments
  is highest relative to its share over all domains (its "lift"), and per layer the normalised mutual
  information between domain and chosen expert (0 = the domain says nothing about the expert).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def routing_by_domain(model, tokenizer, corpus, per_domain: int, max_length: int = 128) -> dict:
    """Per domain: the RoutingMetrics of its first `per_domain` held-out chunks (routing/capture.py)."""
    import torch

    from moe_finetune.models.trained import encode_chunks
    from moe_finetune.routing import capture_routing

    results = {}
    model.eval()
    with capture_routing(model) as capture, torch.no_grad():
        for domain in corpus.domains:
            chunks = corpus.select([domain], held_out=True)[:per_domain]
            capture.reset()
            for start in range(0, len(chunks), 32):
                input_ids, mask = encode_chunks(tokenizer, chunks[start : start + 32], max_length)
                model(input_ids=input_ids, attention_mask=mask)
            results[domain] = capture.stats()
    return results


def mutual_information(counts: list[list[float]]) -> float:
    """I(domain; expert) / sqrt(H(domain) H(expert)) of a domain x expert table of assignment counts."""
    total = sum(map(sum, counts))
    rows = [sum(row) / total for row in counts]
    cols = [sum(row[e] for row in counts) / total for e in range(len(counts[0]))]
    info = sum(
        (c / total) * math.log((c / total) / (rows[d] * cols[e]))
        for d, row in enumerate(counts)
        for e, c in enumerate(row)
        if c > 0
    )
    h_rows = -sum(p * math.log(p) for p in rows if p > 0)
    h_cols = -sum(p * math.log(p) for p in cols if p > 0)
    return info / math.sqrt(h_rows * h_cols) if h_rows > 0 and h_cols > 0 else 0.0


def affinity(by_domain: dict) -> tuple[dict[str, list[tuple[int, float]]], list[float]]:
    """Per domain and layer the preferred expert and its lift; per layer the domain/expert NMI."""
    domains = list(by_domain)
    layers = len(next(iter(by_domain.values())).load_share)
    preferred: dict[str, list[tuple[int, float]]] = {d: [] for d in domains}
    nmi = []
    for layer in range(layers):
        # every domain weighs the same in the "over all domains" share
        shares = [by_domain[d].load_share[layer] for d in domains]
        experts = len(shares[0])
        overall = [sum(s[e] for s in shares) / len(shares) for e in range(experts)]
        for d, share in zip(domains, shares, strict=True):
            lifts = [share[e] / overall[e] if overall[e] > 0 else 0.0 for e in range(experts)]
            best = max(range(experts), key=lambda e: lifts[e])
            preferred[d].append((best, lifts[best]))
        counts = [
            [s[e] * by_domain[d].tokens for e in range(experts)] for d, s in zip(domains, shares, strict=True)
        ]
        nmi.append(mutual_information(counts))
    return preferred, nmi


def pooled(by_domain: dict) -> tuple[list[float], list[float]]:
    """Per layer: token-weighted routing entropy, and the busiest expert's share x E, over all domains."""
    metrics = list(by_domain.values())
    layers = len(metrics[0].layer_entropy)
    weights = [m.tokens for m in metrics]
    entropy, load = [], []
    for layer in range(layers):
        entropy.append(
            sum(m.layer_entropy[layer] * w for m, w in zip(metrics, weights, strict=True)) / sum(weights)
        )
        experts = len(metrics[0].load_share[layer])
        share = [
            sum(m.load_share[layer][e] * w for m, w in zip(metrics, weights, strict=True)) / sum(weights)
            for e in range(experts)
        ]
        load.append(max(share) * experts)
    return entropy, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="mixtral")
    parser.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default: the shipped model's)"
    )
    parser.add_argument("--per-domain", type=int, default=64, help="held-out chunks per domain")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    from moe_finetune.models.corpus import stdlib_corpus
    from moe_finetune.models.trained import (
        DEFAULT_SETTINGS,
        PretrainSettings,
        build_trained,
        held_out_loss,
        initial_model,
        read_metadata,
    )

    torch.set_num_threads(opts.threads)
    settings = (
        DEFAULT_SETTINGS if opts.steps is None else dataclasses.replace(DEFAULT_SETTINGS, steps=opts.steps)
    )
    model_dir = build_trained(opts.family, settings=settings)
    meta = read_metadata(model_dir)
    corpus = stdlib_corpus()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    trained = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    start = initial_model(trained.config, PretrainSettings(**meta["settings"]))

    s = meta["settings"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {meta['python_version']} stdlib "
        f"(corpus fingerprint {meta['corpus_fingerprint'][:12]})"
    )
    print(
        f"model: {meta['name']} ({meta['parameters']:,} parameters), {len(meta['domains'])} domains, "
        f"stream {meta['stream_tokens']:,} tokens; {s['steps']} steps of {s['batch_size']}x{s['seq_len']} "
        f"({meta['tokens_seen']:,} tokens), AdamW lr {s['lr']:g} cosine, per-layer aux {s['aux_loss_coef']:g}, "
        f"router std {s['router_std']:g}, seed {s['seed']}, {s['threads']} torch thread(s): built in {meta['seconds']:.0f} s "
        f"({meta.get('cpu_seconds', float('nan')):.0f} s of CPU time)"
    )

    curve = meta["loss_curve"]
    shown = [row for row in curve if row["step"] % 50 == 0 or row is curve[0] or row is curve[-1]]
    print("\npretraining loss (mean over the steps since the previous entry):")
    print("| step | " + " | ".join(str(row["step"]) for row in shown) + " |")
    print("|---|" + "---|" * len(shown))
    print("| cross-entropy | " + " | ".join(f"{row['loss']:.2f}" for row in shown) + " |")
    print(
        "| per-layer aux loss (k = 2 balanced) | "
        + " | ".join(f"{row['aux_loss']:.2f}" for row in shown)
        + " |"
    )

    held = [c for d in corpus.domains for c in corpus.select([d], held_out=True)[: opts.per_domain]]
    before_loss, after_loss = held_out_loss(start, tokenizer, held), held_out_loss(trained, tokenizer, held)
    print(
        f"\nheld-out cross-entropy ({len(held)} chunks, {opts.per_domain} per domain): "
        f"init {before_loss:.2f}, trained {after_loss:.2f} (uniform over the vocabulary: {math.log(len(tokenizer)):.2f})"
    )

    before = routing_by_domain(start, tokenizer, corpus, opts.per_domain)
    after = routing_by_domain(trained, tokenizer, corpus, opts.per_domain)
    entropy_before, load_before = pooled(before)
    entropy_after, load_after = pooled(after)
    _, nmi_before = affinity(before)
    preferred, nmi_after = affinity(after)
    print(
        "\nrouting on the held-out chunks, per MoE layer (entropy: 1.00 = uniform; load: busiest expert x uniform):"
    )
    print(
        "| layer | routing entropy, init | routing entropy, trained | busiest expert, init | busiest expert, trained | domain/expert NMI, init | trained |"
    )
    print("|---|---|---|---|---|---|---|")
    for layer in range(len(entropy_after)):
        print(
            f"| {layer} | {entropy_before[layer]:.2f} | {entropy_after[layer]:.2f} | {load_before[layer]:.2f}x | "
            f"{load_after[layer]:.2f}x | {nmi_before[layer]:.3f} | {nmi_after[layer]:.3f} |"
        )

    print(
        "\nwhich expert each domain prefers (trained), per layer: expert (its share of the domain's assignments / its share over all domains):"
    )
    layers = len(entropy_after)
    print("| domain | " + " | ".join(f"layer {layer}" for layer in range(layers)) + " |")
    print("|---|" + "---|" * layers)
    for domain, picks in preferred.items():
        print(f"| {domain} | " + " | ".join(f"e{expert} {lift:.2f}x" for expert, lift in picks) + " |")


if __name__ == "__main__":
    main()
