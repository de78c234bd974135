"""`moe-finetune generate`: an adapter or a merged model answers a prompt, and says which experts it used."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from moe_finetune.cli import main
from moe_finetune.generate import (
    AnswerRouting,
    answer_routing,
    format_routing_table,
    generate_answer,
    load_for_generation,
    prompt_ids,
    stop_token_ids,
)
from moe_finetune.merge import merge_adapter
from moe_finetune.routing.capture import RoutingCapture

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, _private_model_cache: Path) -> Path:
    """The smoke recipe, trained for 3 steps (its adapter is what `generate` is pointed at)."""
    out = tmp_path_factory.mktemp("generate-smoke") / "run"
    overrides = [
        "training.max_steps=3",
        "training.save_steps=100",
        "training.per_device_train_batch_size=4",
        "training.max_length=64",
        "data.max_examples=48",
        "data.min_examples=10",
        "data.eval_fraction=0",
        "monitor.enabled=false",
        "guards.enabled=false",
    ]
    argv = ["train", str(REPO / "recipes" / "smoke.yaml"), "--output-dir", str(out)]
    for item in overrides:
        argv += ["--set", item]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0, printed.getvalue()[-2000:]
    return out


@pytest.fixture(scope="session")
def random_run(tmp_path_factory: pytest.TempPathFactory, random_adapter: Path) -> Path:
    """A run-shaped folder (adapter/ + recipe.resolved.yaml) with a random, non-zero adapter: no training."""
    run = tmp_path_factory.mktemp("generate-random") / "run"
    shutil.copytree(random_adapter, run / "adapter")
    recipe = {"model": {"name": "tiny-mixtral"}, "lora": {"r": 4, "expert_kernel": "peft"}}
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    return run


@pytest.mark.slow
def test_generate_answers_with_the_smoke_run_s_adapter_and_shows_which_experts_it_used(
    smoke_run: Path, tmp_path: Path, capsys
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is 12 plus 30?\n")
    code, out, err = cli(
        capsys, "generate", str(smoke_run), "--prompt-file", str(prompt), "--max-new-tokens", "6", "--routing"
    )
    assert code == 0, err
    assert f"generate: adapter {smoke_run / 'adapter'} on tiny-mixtral (float32, " in out
    assert "chat template" in out
    assert "new tokens after a" in out
    table = out[out.index("routing of the answer's") :].splitlines()
    assert table[1].split()[:3] == ["layer", "e0", "e1"]
    assert [line.split()[:2] for line in table[2:4]] == [["layer", "0"], ["layer", "1"]]


def test_routing_of_the_answer_is_what_the_routers_chose_while_decoding(tiny_mixtral_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_mixtral_dir)
    with RoutingCapture(model) as capture:
        answer = generate_answer(model, tokenizer, "Sort 5, 2, 9.", max_new_tokens=10)
        decoded = capture.sums.assign_counts  # (L, E): prefill plus every decoding step
    ids = prompt_ids(tokenizer, "Sort 5, 2, 9.", plain=False) + answer.answer_ids
    assert len(answer.answer_ids) >= 2
    # decoding routed every position but the last token's (it was produced, never fed back)
    forced = answer_routing(model, ids[:-1], prompt_length=0)
    assert torch.equal(decoded.round().long(), torch.tensor(forced.counts))
    per_answer = answer_routing(model, ids, prompt_length=answer.prompt_tokens)
    assert per_answer.tokens == len(answer.answer_ids)
    assert all(sum(layer) == per_answer.tokens * per_answer.top_k for layer in per_answer.counts)


def test_a_chat_prompt_is_one_user_turn_of_the_template_and_stops_at_its_turn_end(
    tiny_mixtral_dir: Path,
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_mixtral_dir)
    chat = tokenizer.decode(prompt_ids(tokenizer, "hello", plain=False))
    assert chat == "<|user|>\nhello<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(prompt_ids(tokenizer, "hello", plain=True)) == "hello"
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in stop_token_ids(tokenizer, model, plain=False)
    assert end not in stop_token_ids(tokenizer, model, plain=True)
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer, model, plain=True)


def test_a_merged_model_gives_the_adapter_s_answer(random_run: Path, tmp_path: Path) -> None:
    merge_adapter(random_run, tmp_path / "merged", echo=lambda _line: None)
    adapter = load_for_generation(random_run)
    merged = load_for_generation(tmp_path / "merged")
    assert merged.description.startswith(f"model {tmp_path / 'merged'}")
    prompt = "Translate 'water' into French."
    from_adapter = generate_answer(adapter.model, adapter.tokenizer, prompt, max_new_tokens=12)
    from_merged = generate_answer(merged.model, merged.tokenizer, prompt, max_new_tokens=12)
    assert from_merged.answer_ids == from_adapter.answer_ids


def test_an_adapter_trained_on_the_fast_kernel_answers_on_it_as_on_peft_s_path(
    random_run: Path, tmp_path: Path
) -> None:
    fast_run = tmp_path / "fast-run"
    (fast_run / "adapter").mkdir(parents=True)
    for file in (random_run / "adapter").iterdir():
        (fast_run / "adapter" / file.name).write_bytes(file.read_bytes())
    recipe = yaml.safe_load((random_run / "recipe.resolved.yaml").read_text())
    recipe["lora"]["expert_kernel"] = "fast"
    (fast_run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    fast = load_for_generation(fast_run)
    assert "the fast expert LoRA kernel" in fast.description
    peft = load_for_generation(random_run)
    prompt = "Reverse the word 'router'."
    fast_answer = generate_answer(fast.model, fast.tokenizer, prompt, max_new_tokens=10, routing=True)
    peft_answer = generate_answer(peft.model, peft.tokenizer, prompt, max_new_tokens=10, routing=True)
    assert fast_answer.answer_ids == peft_answer.answer_ids
    assert fast_answer.routing.counts == peft_answer.routing.counts


def test_bad_inputs_exit_2_with_a_message_naming_them(random_run: Path, tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, "generate", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "generate", str(tmp_path / "empty"), "--prompt", "hi")
    assert code == 2 and "has no adapter" in err
    code, _, err = cli(capsys, "generate", str(random_run))
    assert code == 2 and "--prompt TEXT or --prompt-file FILE" in err
    code, _, err = cli(capsys, "generate", str(random_run), "--prompt", "hi", "--prompt-file", "p.txt")
    assert code == 2 and "one of them" in err
    code, _, err = cli(capsys, "generate", str(random_run), "--prompt-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "--prompt-file: cannot read" in err
    code, _, err = cli(capsys, "generate", str(random_run), "--prompt", "  ")
    assert code == 2 and "the prompt is empty" in err
    code, _, err = cli(capsys, "generate", str(random_run), "--prompt", "hi", "--max-new-tokens", "0")
    assert code == 2 and "--max-new-tokens: 0" in err
    assert "Traceback" not in err


def test_the_routing_table_has_a_column_per_expert_and_lists_the_busiest_of_many() -> None:
    few = AnswerRouting(
        ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], [[3, 1, 0, 0], [0, 0, 2, 2]], 2, 2
    )
    lines = format_routing_table(few).splitlines()
    assert lines[0].startswith("routing of the answer's 2 tokens: share of each layer's 4 top-2 assignments")
    assert lines[1].split() == ["layer", "e0", "e1", "e2", "e3", "used"]
    assert lines[2].split() == ["layer", "0", "75%", "25%", ".", ".", "2/4"]
    assert lines[3].split() == ["layer", "1", ".", ".", "50%", "50%", "2/4"]
    counts = [0] * 64
    counts[40], counts[3], counts[17] = 5, 2, 1
    many = AnswerRouting(["model.layers.5.mlp.gate"], [counts], 4, 2)
    row = format_routing_table(many).splitlines()[2]
    assert row.split() == ["layer", "5", "3/64", "e40", "62%,", "e3", "25%,", "e17", "12%"]
