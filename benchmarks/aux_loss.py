"""transformers' pooled aux loss vs the per-layer one: the same tiny pretraining run, same seed, and the cost.

    python benchmarks/aux_loss.py                      # ~12 minutes on one core (2 arms x 600 steps + timing)
    python benchmarks/aux_loss.py --steps 200 --quick  # a few minutes
    python benchmarks/aux_loss.py --arms off,transformers,per_layer,per_layer@0.04

Quality: a tiny Mixtral (hidden 128, 4 layers, 8 experts top-2, byte vocabulary) pretrained from the
same random init on the same byte stream of Python stdlib source (16 x 128 tokens per step, AdamW lr
1e-3), once per arm. Router weights start at std 0.11, the router-logit scale of a hidden-4096 Mixtral
(DESIGN.md section 3: at std 0.02 and hidden 128 routing stays near-uniform and nothing is learned about
balancing). Every `--every` steps the training window's routing (routing/capture.py, the monitor's
numbers) gives per layer the busiest expert's share x E and the dead experts (< 0.1 x uniform); the
task loss (cross-entropy, the aux term left out) is the window's mean; held-out cross-entropy at the end.
An arm is `transformers` (load_balancing_loss_func over output_router_logits: all layers pooled),
`per_layer` (RouterLogitsTap: each layer on its own, averaged over layers) or `off`, optionally
`@coef` (default --coef).

Cost: one model, steps alternating in ABBA blocks between transformers' loss and the per-layer one
(same batch sizes; the first step of each block dropped); the ratio of medians per layer-loss
step / transformers-loss step. Target <= 1.01.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "use_cache": False,
}
BATCH, LENGTH, LR, ROUTER_STD = 16, 128, 1e-3, 0.11


def byte_stream(max_bytes: int = 1_200_000):
    """Python stdlib source as bytes (the machine's own stdlib: no download), as a LongTensor."""
    import torch

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def build_model(seed: int, coef: float):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**SIZES, router_aux_loss_coef=coef, output_router_logits=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, ROUTER_STD)
    return model


def batches(stream, seed: int):
    """An endless, seeded sequence of (BATCH, LENGTH+0) windows from the training part of the stream."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, stream.numel() - LENGTH - 1, (BATCH,), generator=gen)
        yield torch.stack([stream[s : s + LENGTH] for s in starts.tolist()])


def parse_arm(arm: str, default_coef: float) -> tuple[str, str, float]:
    kind, _, coef = arm.partition("@")
    if kind not in ("off", "transformers", "per_layer"):
        raise SystemExit(f"unknown arm {arm!r}: off, transformers or per_layer, optionally @coef")
    return arm, kind, 0.0 if kind == "off" else float(coef or default_coef)


class Loss:
    """One training objective: task cross-entropy + coef x the arm's aux loss (added once)."""

    def __init__(self, model, kind: str, coef: float) -> None:
        from moe_finetune.routing.load_balancing import RouterLogitsTap

        self.model, self.kind, self.coef = model, kind, coef
        self.tap = RouterLogitsTap(model) if kind == "per_layer" else None

    def __call__(self, ids):
        if self.kind == "transformers":
            # what a transformers user gets: the model adds config.router_aux_loss_coef x its pooled loss
            self.model.config.router_aux_loss_coef = self.coef
            out = self.model(input_ids=ids, labels=ids, output_router_logits=True)
            return out.loss, (out.loss - self.coef * out.aux_loss).detach()
        if self.kind == "per_layer":
            self.tap.begin()
            out = self.model(input_ids=ids, labels=ids)
            return out.loss + self.coef * self.tap.take(), out.loss
        out = self.model(input_ids=ids, labels=ids)
        return out.loss, out.loss

    def remove(self) -> None:
        if self.tap is not None:
            self.tap.remove()


def train_arm(kind: str, coef: float, steps: int, every: int, seed: int, train, held_out) -> list[dict]:
    import torch

    from moe_finetune.routing import capture_routing

    model = build_model(seed, coef).train()
    objective = Loss(model, kind, coef)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    data = batches(train, seed + 1)
    rows, task_sum = [], 0.0
    with capture_routing(model, train_only=True) as cap:
        for step in range(1, steps + 1):
            loss, task = objective(next(data))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task_sum += task.item()
            if step % every == 0 or step == steps:
                stats = cap.stats()
                cap.reset()
                window = every if step % every == 0 else step % every
                rows.append(
                    {
                        "step": step,
                        "task_loss": task_sum / window,
                        "load_max": [float(v) for v in stats.layer_load_max],
                        "dead": [int(v) for v in stats.layer_dead_experts],
                        "pooled_aux": float(stats.aux_loss),
                        "layer_aux": [float(v) for v in stats.layer_aux_loss],
                    }
                )
                task_sum = 0.0
    objective.remove()
    model.eval()
    with torch.no_grad():
        windows = held_out[: (held_out.numel() // LENGTH) * LENGTH].reshape(-1, LENGTH)[:64]
        rows[-1]["held_out"] = model(input_ids=windows, labels=windows).loss.item()
    return rows


def time_losses(steps_per_block: int, blocks: int, seed: int, train, coef: float) -> tuple[float, float]:
    """Median step seconds with transformers' loss and with the per-layer one, ABBA blocks on one model."""
    import torch

    model = build_model(seed, coef).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    arms = {"transformers": Loss(model, "transformers", coef), "per_layer": Loss(model, "per_layer", coef)}
    per_layer_tap = arms["per_layer"].tap
    data = batches(train, seed + 2)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    order = ["transformers", "per_layer", "per_layer", "transformers"]
    for block in range(blocks):
        name = order[block % 4]
        for i in range(steps_per_block + 1):
            ids = next(data)
            start = time.perf_counter()
            loss, _ = arms[name](ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:  # the first step of a block is warm-up
                seconds[name].append(time.perf_counter() - start)
    for objective in arms.values():
        objective.remove()
    assert not per_layer_tap.active
    return statistics.median(seconds["transformers"]), statistics.median(seconds["per_layer"])


def fmt_layers(values: list[float], spec: str) -> str:
    return " / ".join(format(v, spec) for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--coef", type=float, default=0.01)
    parser.add_argument("--arms", default="transformers,per_layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer timing blocks")
    opts = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    torch.set_num_threads(opts.threads)
    stream = byte_stream()
    split = int(stream.numel() * 0.95)
    train, held_out = stream[:split], stream[split:]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores ({opts.threads} threads); "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"model: Mixtral hidden {SIZES['hidden_size']}, {SIZES['num_hidden_layers']} layers, "
        f"{SIZES['num_local_experts']} experts top-{SIZES['num_experts_per_tok']}, byte vocab, router std {ROUTER_STD}; "
        f"data: {stream.numel():,} bytes of stdlib source; {opts.steps} steps of {BATCH}x{LENGTH}, AdamW lr {LR}, "
        f"seed {opts.seed}"
    )

    results = {}
    for arm in opts.arms.split(","):
        name, kind, coef = parse_arm(arm.strip(), opts.coef)
        start = time.perf_counter()
        results[name] = train_arm(kind, coef, opts.steps, opts.every, opts.seed, train, held_out)
        print(f"  {name} (coef {coef:g}): {time.perf_counter() - start:.0f} s", flush=True)

    print(
        "\nper-layer busiest expert (x uniform) / dead experts / task loss, training window ending at the step:"
    )
    print(
        "| arm | step | load max per layer | dead per layer | task loss | transformers' pooled aux | mean per-layer aux |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for row in rows:
            print(
                f"| {name} | {row['step']} | {fmt_layers(row['load_max'], '.2f')} | "
                f"{fmt_layers(row['dead'], 'd')} | {row['task_loss']:.3f} | {row['pooled_aux']:.3f} | "
                f"{sum(row['layer_aux']) / len(row['layer_aux']):.3f} |"
            )
    print("\nat the end:")
    print("| arm | load max per layer | worst layer | dead experts | held-out CE |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        last = rows[-1]
        print(
            f"| {name} | {fmt_layers(last['load_max'], '.2f')} | {max(last['load_max']):.2f} | "
            f"{sum(last['dead'])} | {last['held_out']:.3f} |"
        )

    blocks, per_block = (8, 5) if opts.quick else (16, 8)
    hf, ours = time_losses(per_block, blocks, opts.seed, train, opts.coef)
    print(
        f"\nstep time, ABBA, {blocks} blocks x {per_block} steps: transformers' loss {hf * 1000:.1f} ms, "
        f"per-layer {ours * 1000:.1f} ms, ratio {ours / hf:.3f} (target <= 1.01)"
    )
    if not math.isfinite(ours / hf):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
