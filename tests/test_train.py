"""End to end through the CLI: train a few steps, reload the adapter, and every exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from moe_finetune.cli import main

pytestmark = pytest.mark.slow


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_the_run_directory_and_a_loadable_adapter(
    recipe_factory, tmp_path: Path, tiny_mixtral_dir: Path, capsys
) -> None:
    recipe = recipe_factory()
    code, out, err = _run(
        capsys, "train", str(recipe), "--set", "lora.r=4", "--set", "training.learning_rate=5e-3"
    )
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").exists()
    assert (run / "checkpoint-4").is_dir()
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["lora"]["r"] == 4
    assert resolved["training"]["learning_rate"] == pytest.approx(5e-3)
    assert "LoRA coverage" in out and "experts 2/2 MoE layers" in out
    assert "done: 4 steps" in out

    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "adapter")
    batch = tokenizer(["What is 2 plus 2?"], return_tensors="pt")
    with torch.no_grad():
        before = base(**batch).logits.clone()
        adapted = PeftModel.from_pretrained(base, run / "adapter")
        after = adapted(**batch).logits
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    trained_b = [name for name, value in saved.items() if "lora_B" in name and value.abs().max() > 0]
    # PEFT starts every B at zero: each one of the attention and expert targets moved in training
    assert len(trained_b) == sum("lora_B" in name for name in saved) > 0
    assert any("experts" in name for name in trained_b) and any("self_attn" in name for name in trained_b)
    loaded = get_peft_model_state_dict(adapted)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[name], saved[name]) for name in saved)
    # and the adapter loaded on the base model changes what it predicts, beyond float noise
    assert (after - before).abs().max() > 1e-4


def test_existing_run_directory_is_refused_without_overwrite(recipe_factory, tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier work")
    code, _, err = _run(capsys, "train", str(recipe_factory()))
    assert code == 2
    assert "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "run" / "keep.txt").exists()


def test_small_dataset_exits_3_before_anything_is_written(recipe_factory, tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, "train", str(recipe_factory()), "--set", "data.min_examples=10000")
    assert code == 3
    assert "40 training examples" in err and "10,000" in err
    assert not (tmp_path / "run").exists()


def test_validate_accepts_a_good_recipe(recipe_factory, capsys) -> None:
    code, out, _ = _run(capsys, "validate", str(recipe_factory()))
    assert code == 0
    assert "is valid" in out and "tiny-mixtral (mixtral" in out


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("lora:\n  target_modules: [query]\n", "lora.target_modules"),
        ("lora:\n  rank: 3\n", "lora.rank"),
        ("lora:\n  r: x\n", "lora.r"),
    ],
)
def test_validate_rejects_bad_recipes_with_exit_2(recipe_factory, capsys, extra: str, fragment: str) -> None:
    code, _, err = _run(capsys, "validate", str(recipe_factory(extra)))
    assert code == 2
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["validate", "train"])
def test_lora_on_the_router_alone_is_refused_with_exit_2_saying_what_to_turn_on(
    recipe_factory, tmp_path: Path, capsys, command: str
) -> None:
    recipe = recipe_factory("lora:\n  attention: false\n  experts: false\n  router: true\n")
    code, _, err = _run(capsys, command, str(recipe))
    assert code == 2, err
    assert "lora.router: true with lora.attention and lora.experts both false" in err
    assert "Set lora.attention: true" in err and "Traceback" not in err and "internal error" not in err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_validate_names_a_missing_data_file(recipe_factory, tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, "validate", str(recipe_factory(data_path=tmp_path / "absent.jsonl")))
    assert code == 2
    assert "data.path" in err and "absent.jsonl" in err


def test_bad_row_exits_2_naming_the_row(recipe_factory, tmp_path: Path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "c"}\n')
    code, _, err = _run(capsys, "train", str(recipe_factory(data_path=data)))
    assert code == 2
    assert "line 2 is missing the field 'completion'" in err
    assert not (tmp_path / "run").exists()


def test_build_trainer_gives_a_guarded_trainer_without_writing_anything(
    recipe_factory, tmp_path: Path
) -> None:
    from moe_finetune import build_trainer, load_recipe
    from moe_finetune.callbacks import EntropyGuard, RoutingMonitor

    trainer = build_trainer(load_recipe(recipe_factory(), ["training.max_steps=2"]), echo=lambda line: None)
    kinds = {type(c) for c in trainer.callback_handler.callbacks}
    assert {RoutingMonitor, EntropyGuard} <= kinds
    assert not any((tmp_path / "run").rglob("*"))  # at most the empty folder TrainingArguments makes
    trainer.train()
    assert any("routing/entropy" in entry for entry in trainer.state.log_history)
