"""The same callbacks on a plain transformers.Trainer (any Trainer subclass works the same way)."""

from __future__ import annotations

import tempfile

import datasets
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from moe_finetune.callbacks import DatasetSizeGuard, EntropyGuard, RoutingMonitor, attach
from moe_finetune.models.tiny import BUNDLED_DATA, build_tiny


def main() -> None:
    model_dir = build_tiny("mixtral")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        model,
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.down_proj"]),
    )
    raw = datasets.load_dataset("json", data_files=str(BUNDLED_DATA), split="train")
    tokenized = raw.map(
        lambda row: tokenizer(row["prompt"] + row["completion"], truncation=True, max_length=64),
        remove_columns=raw.column_names,
    )
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="trainer-example-"),
        max_steps=6,
        logging_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        report_to="none",
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )

    monitor = RoutingMonitor()
    attach(trainer, monitor, EntropyGuard(), DatasetSizeGuard(min_examples=10_000))
    trainer.train()
    print(monitor.format_table())
    entry = next(e for e in trainer.state.log_history if "routing/entropy" in e)
    print(f"step {entry['step']}: routing/entropy {entry['routing/entropy']:.3f}, loss {entry['loss']:.3f}")


if __name__ == "__main__":
    main()
