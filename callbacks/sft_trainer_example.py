"""Attach the routing callbacks to a TRL SFTTrainer you already have (five lines at the end)."""

from __future__ import annotations

import tempfile

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

    # The five lines: watch routing, act on collapse, refuse small datasets.
    monitor = RoutingMonitor()
    attach(trainer, monitor, EntropyGuard(), DatasetSizeGuard(min_examples=10_000))
    trainer.train()
    print(monitor.format_table())

    logged = [k for k in trainer.state.log_history[0] if k.startswith("routing/")]
    print(f"routing metrics in the Trainer's log: {', '.join(logged)}")
    print(f"per-layer history: {args.output_dir}/routing.jsonl")


if __name__ == "__main__":
    main()
