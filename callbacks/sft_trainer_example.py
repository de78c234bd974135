"""Attach the routing callbacks to a TRL SFTTrainer you already have (five lines at the end)."""

from __future__ import annotations

import json
import tempfile
import textwrap
from pathlib import Path

import datasets
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from moe_finetune.callbacks import DatasetSizeGuard, EntropyGuard, RoutingMonitor, attach
from moe_finetune.models.tiny import BUNDLED_DATA, build_tiny


def main() -> None:
    model_dir = build_tiny("mixtral")  # a tiny random Mixtral, built locally and cached
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )
    dataset = datasets.load_dataset("json", data_files=str(BUNDLED_DATA), split="train")
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sft-example-"),
        max_steps=6,
        logging_steps=2,
        per_device_train_batch_size=4,
        max_length=64,
        learning_rate=1e-4,
        report_to="none",
        bf16=False,
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)

    # Rows the model should keep knowing (here: a stdlib module's docstring), for the guard's retention check.
    keep = Path(args.output_dir) / "keep.jsonl"
    rows = textwrap.wrap(json.__doc__ or "", 200)
    keep.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows), encoding="utf-8")

    # The five lines: watch routing, act on collapse and on forgetting, refuse small datasets.
    monitor = RoutingMonitor()
    guard = EntropyGuard({"retention": {"data": str(keep)}})
    attach(trainer, monitor, guard, DatasetSizeGuard(min_examples=10_000))
    trainer.train()
    print(monitor.format_table())
    checks = [json.loads(line) for line in (Path(args.output_dir) / "retention.jsonl").read_text().splitlines()]
    print(f"retention loss: {checks[0]['loss']:.3f} before any update, {checks[-1]['loss']:.3f} at step {checks[-1]['step']}")

    logged = [k for k in trainer.state.log_history[0] if k.startswith("routing/")]
    print(f"routing metrics in the Trainer's log: {', '.join(logged)}")
    print(f"per-layer history: {args.output_dir}/routing.jsonl")


if __name__ == "__main__":
    main()
