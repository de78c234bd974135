"""No Trainer at all: a hand-written PyTorch loop with capture_routing and GuardPolicy.

The pure pieces work anywhere: `capture_routing` fills per-layer sums during your forwards,
`cap.stats()` turns them into metrics (one host sync), and `GuardPolicy.update` says whether to do
nothing, cut the learning rate, or halt. What to do about it is your loop's business.
"""

from __future__ import annotations

import gzip
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_finetune.callbacks import GuardConfig, GuardPolicy, RoutingSnapshot
from moe_finetune.models.tiny import BUNDLED_DATA, build_tiny
from moe_finetune.routing import capture_routing


def batches(tokenizer, size: int = 8, count: int = 40):
    with gzip.open(BUNDLED_DATA, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(size * count), handle, strict=False)]
    for start in range(0, len(rows), size):
        texts = [r["prompt"] + r["completion"] for r in rows[start : start + size]]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        yield batch


def main() -> None:
    torch.manual_seed(0)
    model_dir = build_tiny("mixtral")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Train only the routers, fast: the quickest way to watch routing change (and the guard react).
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith("mlp.gate.weight")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    policy = GuardPolicy(GuardConfig())
    log_every = 4

    with capture_routing(model) as cap:
        # The baseline: routing before the first update, on one batch without gradients. (Without it the
        # policy averages its first `baseline_steps` windows, which a fast collapse is already inside.)
        with torch.no_grad():
            model(**next(batches(tokenizer)))
        start = cap.stats()
        cap.reset()
        policy.set_baseline(start.entropy, start.layer_entropy, start.load_share, start.dead_threshold)
        print(f"routing before the first update: entropy {start.entropy:.3f}, load max {start.load_max:.2f}x")
        for step, batch in enumerate(batches(tokenizer), start=1):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % log_every:
                continue
            metrics = cap.stats()  # the window's routing, then start a new window
            cap.reset()
            snapshot = RoutingSnapshot(
                step=step,
                entropy=metrics.entropy,
                layer_entropy=metrics.layer_entropy,
                load_share=metrics.load_share,
                finite=metrics.finite,
                layer_names=metrics.layer_names,
            )
            lr = optimizer.param_groups[0]["lr"]
            action = policy.update(snapshot, lr)
            print(
                f"step {step:3d}  loss {loss.item():.3f}  routing entropy {metrics.entropy:.3f}  "
                f"load max {metrics.load_max:.2f}x  lr {lr:.2e}  -> {action.kind}"
            )
            if action.kind == "cut_lr":
                for group in optimizer.param_groups:
                    group["lr"] *= action.factor
                print(f"  cut: {action.reason}")
            elif action.kind == "halt":
                print(f"  halt: {action.reason}")
                break


if __name__ == "__main__":
    main()
