"""`lora.experts: auto` (ESFT) on the bundled multi-domain data: which experts each domain picks, and what
adapting only those costs against adapting all.

    python benchmarks/expert_selection.py                          # the tiny random Mixtral, ~1 minute
    python benchmarks/expert_selection.py --model tiny-mixtral-trained --tokens 4096
    python benchmarks/expert_selection.py --forgetting             # part 3 only: four fine-tunes, ~8 minutes
    python benchmarks/expert_selection.py --forgetting --lr 5e-3 --domain asyncio --max-steps 150

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
3. Forgetting (`--forgetting`, instead of 1 and 2). tiny-mixtral-trained (models/trained.py, pretrained on
   the stdlib split by package into domains) fine-tuned on one narrow domain (`--domain`) by
   benchmarks/recipes/expert-selection-forgetting.yaml, twice per learning rate (`--lr`) on the same budget
   (steps, r 8, seed 0, data): with `lora.experts: all` and with `auto` (top_p `--top-p`); router frozen,
   no aux loss, guards off, so that neither run is cut or halted. Datasets, the in-process run and the
   losses are benchmarks/guard_protection.py's: task = held-out loss on the fine-tune domain, forgetting =
   mean over the other domains of held-out loss minus the base model's, on the run's final adapter.
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


FORGETTING_RECIPE = REPO / "benchmarks" / "recipes" / "expert-selection-forgetting.yaml"


def adapted_experts(run: Path, num_experts: int, moe_layers: int) -> str:
    """What the run adapted, from its recipe.resolved.yaml (where `auto` is written out as its mapping)."""
    import yaml

    experts = yaml.safe_load((run / "recipe.resolved.yaml").read_text(encoding="utf-8"))["lora"]["experts"]
    if experts is True:
        return f"all {moe_layers * num_experts} ({moe_layers} layers x {num_experts})"
    chosen = sum(len(e) for e in experts.values())
    return f"{chosen} of {moe_layers * num_experts}: " + "; ".join(
        f"L{layer} {','.join(map(str, e))}" for layer, e in experts.items()
    )


def trainable_parameters(log: Path) -> int:
    """The run's own count, from the coverage line it printed (masked experts' slices left out)."""
    import re

    found = re.findall(r"trainable parameters ([\d,]+) of", log.read_text(encoding="utf-8"))
    return int(found[-1].replace(",", ""))


def forgetting(args: argparse.Namespace) -> None:
    """Part 3: `all` against `auto`, the same fine-tune of a pretrained tiny MoE, on forgetting."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from benchmarks.guard_protection import (
        adapted_losses,
        domain_losses,
        run_recipe,
        summarise,
        write_datasets,
    )
    from moe_finetune.models.corpus import stdlib_corpus
    from moe_finetune.models.trained import build_trained

    torch.set_num_threads(1)
    args.out = args.out.resolve()  # the recipe resolves relative paths against its own folder
    transformers.utils.logging.disable_progress_bar()  # a weight-loading bar per adapter load says nothing here
    corpus = stdlib_corpus()
    data = write_datasets(corpus, args.out, args.domain, args.per_domain)["domain"]
    model_dir = build_trained("mixtral")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = base_model.config
    base = domain_losses(base_model, tokenizer, corpus, corpus.domains, args.per_domain)
    rates = [float(rate) for rate in args.lr.split(",")]
    common = [f"data.path={data}", f"lora.experts_top_p={args.top_p}"]
    common += [f"training.max_steps={args.max_steps}"] if args.max_steps else []
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, 1 torch thread; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; model {model_dir.name}; recipe "
        f"{FORGETTING_RECIPE.name}; fine-tune domain {args.domain!r} ({len(corpus.select([args.domain])):,} rows); "
        f"losses on {args.per_domain} held-out chunks of each of {len(base)} domains"
    )
    rows = []
    for rate in rates:
        pair = {}
        for arm in ("all", "auto"):
            run = args.out / f"{arm}-lr{rate:g}"
            log = args.out / f"{arm}-lr{rate:g}.log"
            overrides = [*common, f"lora.experts={arm}", f"training.learning_rate={rate}"]
            outcome = run_recipe(FORGETTING_RECIPE, run, overrides, log)
            if outcome["halted"] is not None:
                raise SystemExit(f"{run} halted ({outcome['halted']}): guards are meant to be off; see {log}")
            losses = adapted_losses(
                model_dir, run / "adapter", tokenizer, corpus, corpus.domains, args.per_domain
            )
            pair[arm] = {
                **summarise(losses, base, args.domain),
                "experts": adapted_experts(run, config.num_local_experts, config.num_hidden_layers),
                "trainable": trainable_parameters(log),
                "seconds": outcome["seconds"],
            }
            print(f"  lr {rate:g}, experts {arm}: {outcome['seconds']:.0f} s", flush=True)
        rows.append((rate, pair))

    others = [d for d in base if d != args.domain]
    print(
        f"\nbase model: held-out loss {base[args.domain]:.3f} on {args.domain}, "
        f"{statistics.mean(base[d] for d in others):.3f} on the other {len(others)} domains (mean)\n"
    )
    print(
        "| arm | experts adapted | trainable parameters | task loss | task gain vs base | forgetting (mean, "
        "other domains) | worst domain | forgetting auto / all | gain auto / all |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rate, pair in rows:
        everything = pair["all"]
        for arm, m in pair.items():
            ratios = ["", ""]
            if arm == "auto":
                ratios = [
                    f"{m[key] / everything[key]:.2f}" if everything[key] > 0 else "-"
                    for key in ("forgetting", "gain")
                ]
            print(
                f"| lr {rate:g}, `{arm}` | {m['experts']} | {m['trainable']:,} | {m['task']:.3f} | {m['gain']:+.3f} | "
                f"{m['forgetting']:+.3f} | {m['worst_domain']} {m['worst']:+.3f} | "
                + " | ".join(ratios)
                + " |"
            )
    print(f"\ntotal fine-tune time {sum(m['seconds'] for _, pair in rows for m in pair.values()):.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-mixtral")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens profiled per domain sample")
    parser.add_argument("--top-p", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per arm")
    forgetting_part = parser.add_argument_group(
        "part 3, forgetting (tiny-mixtral-trained; --model is ignored)"
    )
    forgetting_part.add_argument(
        "--forgetting", action="store_true", help="run part 3 instead of parts 1 and 2"
    )
    forgetting_part.add_argument("--domain", default="email", help="the narrow domain fine-tuned on")
    forgetting_part.add_argument(
        "--lr", default="5e-3,1e-3", help="learning rates, comma-separated: a pair of runs each"
    )
    forgetting_part.add_argument(
        "--max-steps", type=int, default=None, help="steps of every run (default: the recipe's)"
    )
    forgetting_part.add_argument(
        "--per-domain", type=int, default=64, help="held-out chunks per domain for the losses"
    )
    forgetting_part.add_argument("--out", type=Path, default=REPO / "runs" / "expert-selection")
    args = parser.parse_args()
    if args.forgetting:
        forgetting(args)
        return

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
        data = LoadedData(
            train=sample, eval=None, schema="prompt_completion", path=Path("bundled"), total_rows=len(sample)
        )
        ids = sample_token_ids(data, tokenizer, args.tokens, 512)
        return measure_profile(model, family, ids, batch_size=8, pad_id=pad).selection("gate", args.top_p)

    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread"
    )
    print(f"model: {args.model}; {args.tokens} tokens per sample; gate score, top_p {args.top_p}\n")
    halves = {}
    for domain in domains:
        own = [row for row in rows if row["domain"] == domain]
        halves[domain] = (select(own[0::2]), select(own[1::2]))
        print(f"{domain:<22} " + "; ".join(f"L{k}: {v}" for k, v in halves[domain][0].items()))
    within = statistics.mean(overlap(a, b) for a, b in halves.values())
    cross = statistics.mean(
        overlap(halves[x][0], halves[y][0]) for x, y in itertools.combinations(domains, 2)
    )
    print(
        f"\nexpert-set overlap (mean Jaccard over layers): same domain, other sample {within:.3f} (baseline); "
        f"between domains {cross:.3f}; ratio {cross / within:.2f}"
    )

    chosen = select(rows[::7])
    ids = torch.randint(
        5, tokenizer.vocab_size, (args.steps + 2, 4, 128), generator=torch.Generator().manual_seed(0)
    )
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
        print(
            f"{name:>5}: trainable {cov.trainable:,}; optimizer state {state:,} values; "
            f"median step {statistics.median(times) * 1000:.1f} ms"
        )
    (_, _, cov_all, t_all), (_, _, cov_auto, t_auto) = arms["all"], arms["auto"]
    print(
        f"auto / all: trainable {cov_auto.trainable / cov_all.trainable:.3f}; "
        f"step time {statistics.median(t_auto) / statistics.median(t_all):.2f}"
    )
    print(cov_auto.line())


if __name__ == "__main__":
    main()
