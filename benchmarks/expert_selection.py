"""`lora.experts: auto` (ESFT) on the bundled multi-domain data: which experts each domain picks, and what
adapting only those costs against adapting all.

    python benchmarks/expert_selection.py                          # the tiny random Mixtral, ~1 minute
    python benchmarks/expert_selection.py --model tiny-mixtral-trained --tokens 4096

1. Domains. Each domain of data/instructions.jsonl.gz is profiled on the base model (moe_finetune/profile.py,
   `--tokens` tokens of its rows, gate score, top_p 0.2). How much two domains' choices overlap is the mean
   over layers of the Jaccard index of their expert sets. Baseline, measured in the same run: each domain
   against ANOTHER sample of the same domain (its rows split in two halves). The ratio cross / within says
   whether domains pick different experts (well below 1) or the choice is noise (about 1).
2. Cost. The same model with expert LoRA on all experts and with the experts `auto` picks on the whole data
   (both on the fast kernel, r 16): trainable parameters (the coverage line's count) and the median time
   of a training step (forward, backward, AdamW), the two arms interleaved step by step on the same batches.
   Masked experts keep PEFT's full factors (models/lora.py says why), so step time and optimizer memory are
   expected to equal all's: the saving is in what trains.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def jaccard(first: list[int], second: list[int]) -> float:
    union = set(first) | set(second)
    return len(set(first) & set(second)) / len(union) if union else 1.0


def overlap(a: dict[int, list[int]], b: dict[int, list[int]]) -> float:
    return statistics.mean(jaccard(a[layer], b[layer]) for layer in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mixtral")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens profiled per domain sample")
    parser.add_argument("--top-p", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per arm")
    args = parser.parse_args()

    import torch

    from moe_finetune.data import LoadedData
    from moe_finetune.models.loading import load_model_and_tokenizer
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.profile import measure_profile, sample_token_ids
    from moe_finetune.sections import LoraSection, ModelSection

    torch.set_num_threads(1)
    with gzip.open(REPO / "data" / "instructions.jsonl.gz", "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    domains = sorted({row["domain"] for row in rows})
    model, tokenizer, family = load_model_and_tokenizer(ModelSection(name=args.model))
    pad = tokenizer.pad_token_id or 0

    def select(sample: list[dict]) -> dict[int, list[int]]:
        data = LoadedData(train=sample, eval=None, schema="prompt_completion", path=Path("bundled"), total_rows=len(sample))
        ids = sample_token_ids(data, tokenizer, args.tokens, 512)
        return measure_profile(model, family, ids, batch_size=8, pad_id=pad).selection("gate", args.top_p)

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread")
    print(f"model: {args.model}; {args.tokens} tokens per sample; gate score, top_p {args.top_p}\n")
    halves = {}
    for domain in domains:
        own = [row for row in rows if row["domain"] == domain]
        halves[domain] = (select(own[0::2]), select(own[1::2]))
        print(f"{domain:<22} " + "; ".join(f"L{k}: {v}" for k, v in halves[domain][0].items()))
    within = statistics.mean(overlap(a, b) for a, b in halves.values())
    cross = statistics.mean(overlap(halves[x][0], halves[y][0]) for x, y in itertools.combinations(domains, 2))
    print(f"\nexpert-set overlap (mean Jaccard over layers): same domain, other sample {within:.3f} (baseline); "
          f"between domains {cross:.3f}; ratio {cross / within:.2f}")

    chosen = select(rows[::7])
    ids = torch.randint(5, tokenizer.vocab_size, (args.steps + 2, 4, 128), generator=torch.Generator().manual_seed(0))
    arms = {}
    for name, experts in (("all", True), ("auto", chosen)):
        fresh, _, _ = load_model_and_tokenizer(ModelSection(name=args.model))
        torch.manual_seed(0)
        peft_model, cov = apply_lora(fresh, LoraSection(r=16, alpha=32, experts=experts), family)
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
        arms[name] = (peft_model, optimizer, cov, [])

    def step(arm, batch) -> float:
        peft_model, optimizer, _, _ = arm
        start = time.perf_counter()
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for index, batch in enumerate(ids):  # interleaved; the first two steps of each arm are warm-up
        for arm in arms.values():
            seconds = step(arm, batch)
            if index >= 2:
                arm[3].append(seconds)
    for name, (_, optimizer, cov, times) in arms.items():
        state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        print(f"{name:>5}: trainable {cov.trainable:,}; optimizer state {state:,} values; "
              f"median step {statistics.median(times) * 1000:.1f} ms")
    (_, _, cov_all, t_all), (_, _, cov_auto, t_auto) = arms["all"], arms["auto"]
    print(f"auto / all: trainable {cov_auto.trainable / cov_all.trainable:.3f}; "
          f"step time {statistics.median(t_auto) / statistics.median(t_all):.2f}")
    print(cov_auto.line())


if __name__ == "__main__":
    main()
