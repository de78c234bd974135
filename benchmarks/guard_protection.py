"""Does the guard protect a trained MoE? tiny-mixtral-trained fine-tuned with it on and off.

    python benchmarks/guard_protection.py                       # the five runs (~11 min on 2 cores), the tables
    python benchmarks/guard_protection.py --runs off,on --set guards.cut_factor=0.25   # other guard settings
    python benchmarks/guard_protection.py --runs off --variant tight:guards.retention.cut_rise=0.005
    python benchmarks/guard_protection.py --no-train            # measure the runs already in --out again
    python benchmarks/guard_protection.py --domain asyncio --steps 200
    python benchmarks/guard_protection.py --data-only           # only write the recipes' datasets

The model is `tiny-mixtral-trained` (models/trained.py: pretrained on the Python stdlib, routers peaked
and specialised, built and cached on first use). The datasets are written from the same corpus
(models/corpus.py) to OUT/data: `broad.jsonl.gz` (12,000 training rows spread over every domain),
`<domain>.jsonl.gz` (every training row of one package) and `retention-<domain>.jsonl.gz` (the guard's
retention rows: 4 held-out chunks of each other domain, past the `--per-domain` that forgetting is measured
on). Held-out rows (one chunk in ten, by hash) are never trained on, in pretraining or here. The runs, all
at seed 0, through `moe_finetune.train`; "guard on" is every default, with `guards.retention.data` naming
the retention rows:

- sane (benchmarks/recipes/guard-protection-sane.yaml): LoRA r 8, router frozen, lr 1e-4, the broad
  rows; the guard must take no action;
- aggressive, guard off (guard-protection-aggressive.yaml, --set guards.enabled=false): router
  trained at lr 5e-3, no load-balancing loss, one domain;
- aggressive, guard on: the same recipe with the guard on;
- controls: the guard without its retention check (`routing`: the routing checks alone), and the guard
  on with the router frozen (`frozen`: is the forgetting routing's doing?); `--variant` adds guard-on
  runs with other settings (how the retention defaults were chosen).

For each: routing over time (routing.jsonl: routing entropy, balance, busiest expert, dead experts),
the guard's events, the task loss (held-out rows of the fine-tune domain) and forgetting (mean over the
other domains of held-out loss minus the base model's), measured on the run's final adapter or, after a
halt, on the checkpoint it halted at; the guard's kept last-healthy checkpoint is measured too.
Target: with the guard on, forgetting <= 50% of the guard-off run's at >= 80% of its task-loss gain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = REPO / "benchmarks" / "recipes"
SANE = RECIPES / "guard-protection-sane.yaml"
AGGRESSIVE = RECIPES / "guard-protection-aggressive.yaml"
BROAD_ROWS = 12_000
RETENTION_PER_DOMAIN = 4


def write_datasets(corpus, out: Path, domain: str, per_domain: int) -> dict[str, Path]:
    """The recipes' datasets from the stdlib corpus: the broad mix, one domain's training rows, and the guard's
    retention rows: RETENTION_PER_DOMAIN held-out chunks of every other domain, after the `per_domain` that
    forgetting is measured on (the guard never sees the rows it is judged by)."""
    from moe_finetune.models.corpus import retention_chunks, spread, write_rows

    data = out / "data"
    retention = retention_chunks(corpus, domain, skip=per_domain, per_domain=RETENTION_PER_DOMAIN)
    return {
        "broad": write_rows(data / "broad.jsonl.gz", spread(corpus.select(), BROAD_ROWS)),
        "domain": write_rows(data / f"{domain}.jsonl.gz", corpus.select([domain])),
        "retention": write_rows(data / f"retention-{domain}.jsonl.gz", retention),
    }


def run_recipe(recipe: Path, output_dir: Path, overrides: list[str], log: Path) -> dict:
    """Train one recipe in this process, as `moe-finetune train` does (a guard halt is an outcome, not an error)."""
    import contextlib

    from moe_finetune.errors import TrainingHalted
    from moe_finetune.recipe import load_recipe
    from moe_finetune.train import run

    start = time.perf_counter()
    halted = None
    settings = load_recipe(recipe, [*overrides, f"output_dir={output_dir}", "training.disable_tqdm=true"])
    with (
        log.open("w", encoding="utf-8") as handle,
        contextlib.redirect_stdout(handle),
        contextlib.redirect_stderr(handle),
    ):
        try:
            run(settings, overwrite=True)
        except TrainingHalted as halt:
            halted = str(halt)
    return {"seconds": time.perf_counter() - start, "halted": halted}


def read_records(path: Path) -> list[dict]:
    from moe_finetune.rundir import read_jsonl

    return list(read_jsonl(path))


def evaluated_points(run: Path, events: list[dict]) -> dict[str, Path]:
    """Where the run's weights are: its final adapter, or the checkpoint it halted at; the kept healthy one."""
    points = {}
    halts = [e for e in events if e.get("action") == "halt"]
    if (run / "adapter").is_dir():
        points["end"] = run / "adapter"
    elif halts:
        points["end"] = run / f"checkpoint-{halts[-1]['step']}"
    kept = sorted((run / "last-healthy").glob("checkpoint-*"))
    if kept:
        points["last-healthy"] = kept[-1]
    return points


def domain_losses(model, tokenizer, corpus, domains: list[str], per_domain: int) -> dict[str, float]:
    from moe_finetune.models.trained import held_out_loss

    return {
        d: held_out_loss(model, tokenizer, corpus.select([d], held_out=True)[:per_domain]) for d in domains
    }


def adapted_losses(
    model_dir: Path, adapter: Path, tokenizer, corpus, domains, per_domain
) -> dict[str, float]:
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    return domain_losses(PeftModel.from_pretrained(base, adapter), tokenizer, corpus, domains, per_domain)


def summarise(losses: dict[str, float], base: dict[str, float], domain: str) -> dict:
    others = [d for d in base if d != domain]
    worst = max(others, key=lambda d: losses[d] - base[d])
    return {
        "task": losses[domain],
        "gain": base[domain] - losses[domain],
        "forgetting": sum(losses[d] - base[d] for d in others) / len(others),
        "worst": losses[worst] - base[worst],
        "worst_domain": worst,
    }


def largest_drops(records: list[dict], baseline_steps: int) -> dict[str, float]:
    """How close a run came to the guard's lines: the largest fall below the baseline (the mean of the first
    `baseline_steps` logging steps, as the guard takes it) of pooled and per-layer routing entropy and of
    per-layer balance, and the busiest expert (x uniform), over the whole run."""
    base, rest = records[:baseline_steps], records[baseline_steps:] or records
    layers = range(len(base[0]["layers"]))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    pooled = mean([r["entropy"] for r in base])
    entropy = [mean([r["layers"][i]["entropy"] for r in base]) for i in layers]
    balance = [mean([r["layers"][i]["balance"] for r in base]) for i in layers]
    return {
        "pooled": max((pooled - r["entropy"]) / pooled for r in rest),
        "layer": max((entropy[i] - r["layers"][i]["entropy"]) / entropy[i] for r in rest for i in layers),
        "balance": max((balance[i] - r["layers"][i]["balance"]) / balance[i] for r in rest for i in layers),
        "load": max(r["load_max"] for r in records),
    }


def fmt(value: float | None, spec: str = ".2f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--domain", default="email", help="the narrow domain the aggressive runs fine-tune on"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="max_steps of every run (default: the recipes')"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "guard-protection")
    parser.add_argument(
        "--per-domain",
        type=int,
        default=64,
        help="held-out chunks per domain for the losses (the retention rows are the 4 after them)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-only", action="store_true", help="write the datasets and stop")
    parser.add_argument(
        "--no-train", action="store_true", help="measure the run directories an earlier call left in --out"
    )
    parser.add_argument(
        "--runs",
        default="sane,off,on,routing,frozen",
        help="which runs, of sane, off, on, routing (the guard without its retention check), frozen",
    )
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="one more override for every run"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
        help="one more run: the guard-on arm with these overrides (e.g. rise05:guards.retention.cut_rise=0.005); "
        "how the defaults were calibrated",
    )
    opts = parser.parse_args()
    opts.out = opts.out.resolve()  # the recipes resolve relative paths against their own folder
    # bad arguments are refused now, not after minutes of building the model and measuring the base
    known = {"sane", "off", "on", "routing", "frozen"}
    unknown = sorted({name.strip() for name in opts.runs.split(",") if name.strip()} - known)
    if unknown:
        parser.error(f"--runs: unknown run(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    for variant in opts.variant:
        name, _, settings = variant.partition(":")
        if not name or not settings or name in known or "=" not in settings:
            parser.error(f"--variant {variant!r}: give NAME:KEY=VALUE[,KEY=VALUE...] with a new NAME")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from moe_finetune.models.corpus import stdlib_corpus
    from moe_finetune.models.trained import build_trained
    from moe_finetune.sections import GuardConfig

    torch.set_num_threads(opts.threads)
    corpus = stdlib_corpus()
    data = write_datasets(corpus, opts.out, opts.domain, opts.per_domain)
    print(
        f"datasets: {data['broad']} ({BROAD_ROWS:,} rows), {data['domain']} ({len(corpus.select([opts.domain])):,} rows)"
    )
    if opts.data_only:
        return
    model_dir = build_trained("mixtral")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    domains = corpus.domains
    base = domain_losses(base_model, tokenizer, corpus, domains, opts.per_domain)

    steps = [f"training.max_steps={opts.steps}"] if opts.steps else []
    narrow = f"data.path={data['domain']}"
    keep = f"guards.retention.data={data['retention']}"
    arms = {
        "sane": (SANE, [f"data.path={data['broad']}", keep]),
        "off": (AGGRESSIVE, [narrow, "guards.enabled=false"]),
        "on": (AGGRESSIVE, [narrow, keep]),
        # controls: the guard without its retention check (routing alone, the guard this benchmark first
        # measured), and the recipe with the router frozen (is the forgetting routing's doing?)
        "routing": (AGGRESSIVE, [narrow, "guards.retention.data=null"]),
        "frozen": (AGGRESSIVE, [narrow, keep, "lora.router=false"]),
    }
    labels = {
        "sane": "sane",
        "off": "aggressive, guard off",
        "on": "aggressive, guard on",
        "routing": "aggressive, routing checks only",
        "frozen": "aggressive, router frozen, guard on",
    }
    chosen = [name.strip() for name in opts.runs.split(",") if name.strip()]
    for variant in opts.variant:
        name, _, settings = variant.partition(":")
        arms[name] = (AGGRESSIVE, [*arms["on"][1], *settings.split(",")])
        labels[name] = f"aggressive, guard on, {settings}"
        chosen.append(name)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {opts.threads} torch thread(s); "
        f"torch {torch.__version__}, transformers {transformers.__version__}; model {model_dir.name}; "
        f"fine-tune domain {opts.domain!r}; losses on {opts.per_domain} held-out chunks per domain"
    )
    results = {}
    for name in chosen:
        recipe, overrides = arms[name]
        run = opts.out / name
        if opts.no_train and (run / "routing.jsonl").is_file():
            outcome = {"seconds": math.nan, "halted": None}  # the run directory from an earlier call
        else:
            outcome = run_recipe(
                recipe, run, [*overrides, *steps, *opts.extra], opts.out / f"{name}.log"
            )
        events = read_records(run / "guard_events.jsonl")
        records = read_records(run / "routing.jsonl")
        measured = {}
        for point, path in evaluated_points(run, events).items():
            losses = adapted_losses(model_dir, path, tokenizer, corpus, domains, opts.per_domain)
            measured[point] = {"path": path, **summarise(losses, base, opts.domain)}
        results[name] = {"events": events, "records": records, "measured": measured, **outcome}
        print(
            f"  {labels[name]}: {outcome['seconds']:.0f} s, {records[-1]['step'] if records else 0} steps",
            flush=True,
        )

    base_task = base[opts.domain]
    base_other = sum(v for d, v in base.items() if d != opts.domain) / (len(base) - 1)
    print(
        f"\nbase model: held-out loss {base_task:.3f} on {opts.domain}, {base_other:.3f} on the other "
        f"{len(base) - 1} domains (mean)"
    )
    off = results.get("off", {}).get("measured", {}).get("end")

    def versus_off(m: dict, key: str) -> str:
        return f"{m[key] / off[key]:.0%}" if off is not None and off[key] > 0 else "-"

    print(
        "\n| run | steps | guard actions | routing entropy | balance, lowest layer | busiest expert | dead experts "
        "| task loss | task gain | forgetting | worst domain | gain vs guard off | forgetting vs guard off |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        records, events = result["records"], result["events"]
        actions = [
            f"{e['action']}@{e['step']}" for e in events if e["action"] in ("cut_lr", "halt", "settled")
        ]
        first, last = records[0], records[-1]
        for point, m in result["measured"].items():
            if point == "end":
                cells = [
                    labels[name],
                    str(last["step"]),
                    ", ".join(actions) or "none",
                    f"{fmt(first['entropy'])} -> {fmt(last['entropy'])}",
                    f"{fmt(first['balance_min'])} -> {fmt(last['balance_min'])}",
                    f"{fmt(last['load_max'])}x",
                    str(int(last["dead_experts"])),
                ]
            else:  # the checkpoint the guard kept: its weights, not a run of its own
                cells = [
                    f"{labels[name]}: its {point} {m['path'].name}",
                    m["path"].name.split("-")[-1],
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            cells += [
                f"{m['task']:.3f}",
                f"{m['gain']:+.3f}",
                f"{m['forgetting']:+.3f}",
                f"{m['worst_domain']} {m['worst']:+.3f}",
                versus_off(m, "gain") if name not in ("sane", "off") else "",
                versus_off(m, "forgetting") if name not in ("sane", "off") else "",
            ]
            print("| " + " | ".join(cells) + " |")
    if off is not None:
        print("\ntarget: forgetting <= 50% of the guard-off run's at >= 80% of its task-loss gain")
        for name, result in results.items():
            m = result["measured"].get("end")
            if name in ("sane", "off") or m is None or off["gain"] <= 0 or off["forgetting"] <= 0:
                continue
            forget_ratio, gain_ratio = m["forgetting"] / off["forgetting"], m["gain"] / off["gain"]
            verdict = "met" if forget_ratio <= 0.5 and gain_ratio >= 0.8 else "NOT met"
            print(f"- {labels[name]}: forgetting {forget_ratio:.0%}, gain {gain_ratio:.0%}: {verdict}")

    steps_for_baseline = GuardConfig().baseline_steps
    print(
        f"\nhow close each run came to the guard's lines (largest fall below the baseline of its first "
        f"{steps_for_baseline} logging steps; defaults: cut at 10% pooled routing entropy, 20% a layer's, 10% a "
        "layer's balance; halt at 40% / 50% / 30% and an expert over 3x uniform):"
    )
    print("| run | pooled routing entropy | a layer's routing entropy | a layer's balance | busiest expert |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        drops = largest_drops(result["records"], steps_for_baseline)
        print(
            f"| {labels[name]} | {drops['pooled']:.1%} | {drops['layer']:.1%} | {drops['balance']:.1%} | "
            f"{drops['load']:.2f}x |"
        )

    print(
        "\nrouting over time (routing.jsonl, every few logging steps): step: entropy / balance (lowest layer) / busiest expert / dead"
    )
    for name, result in results.items():
        records = result["records"]
        every = max(1, len(records) // 12)
        shown = records[::every] + ([records[-1]] if (len(records) - 1) % every else [])
        print(
            f"- {labels[name]}: "
            + "; ".join(
                f"{r['step']}: {fmt(r['entropy'])} / {fmt(r['balance_min'])} / {fmt(r['load_max'])}x / {int(r['dead_experts'])}"
                for r in shown
            )
        )
    print("\nguard events:")
    for name, result in results.items():
        for event in result["events"]:
            if event["action"] in ("cut_lr", "halt", "settled"):
                print(f"- {labels[name]}, step {event['step']}: {event['action']}: {event['reason']}")
    print(
        "\nraw numbers: "
        + json.dumps(
            {
                n: {p: {k: v for k, v in m.items() if k != "path"} for p, m in r["measured"].items()}
                for n, r in results.items()
            }
        )
    )


if __name__ == "__main__":
    main()
