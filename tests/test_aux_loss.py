"""The per-layer load-balancing loss: its value, that it balances each layer, that it is added once, that it trains."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_finetune.callbacks import PerLayerAuxLoss
from moe_finetune.callbacks.aux_loss import LOG_KEY
from moe_finetune.models.families import get_family
from moe_finetune.routing import capture_routing
from moe_finetune.routing.load_balancing import RouterLogitsTap, installed_tap, layer_balancing_loss


def load(path: Path):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.config.use_cache = False
    return model


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def deepseek_dir(_private_model_cache: Path) -> Path:
    from moe_finetune.models.tiny import build_tiny

    return build_tiny("deepseek_v3")


def padded_batch() -> dict[str, torch.Tensor]:
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [0] * 2 + [1] * 6])
    return {"input_ids": ids(3, 8), "attention_mask": mask}


# --------------------------------------------------------------------------- the value


def test_per_layer_loss_equals_transformers_loss_of_each_layer_on_its_own(tiny_mixtral_dir):
    model = load(tiny_mixtral_dir).train()
    family = get_family("mixtral")
    num_experts, top_k = family.num_experts(model.config), family.top_k(model.config)
    batch = padded_batch()
    tap = RouterLogitsTap(model)
    tap.begin()
    out = model(**batch, output_router_logits=True)
    got = tap.take()
    tap.remove()
    # independent: transformers' own function, given one layer's logits at a time
    each = [
        load_balancing_loss_func((logits,), num_experts, top_k, batch["attention_mask"])
        for logits in out.router_logits
    ]
    assert len(each) == 2
    assert got.item() == pytest.approx(torch.stack(each).mean().item(), rel=1e-5)
    pooled = load_balancing_loss_func(tuple(out.router_logits), num_experts, top_k, batch["attention_mask"])
    assert got.item() != pytest.approx(pooled.item(), rel=1e-6)  # really per layer, not the pooled number


def test_opposite_skews_read_balanced_pooled_but_not_per_layer():
    # layer 0 sends its tokens to experts 0-3, layer 1 to experts 4-7: each layer uses half its experts
    num_experts, top_k, tokens = 8, 2, 512
    gen = torch.Generator().manual_seed(0)
    favour = torch.zeros(2, num_experts)
    favour[0, :4] = 4.0
    favour[1, 4:] = 4.0
    logits = [torch.randn(tokens, num_experts, generator=gen) + favour[layer] for layer in range(2)]
    pooled = load_balancing_loss_func(tuple(logits), num_experts, top_k).item()
    per_layer = [
        layer_balancing_loss(layer_logits, layer_logits.softmax(-1).topk(top_k).indices, num_experts).item()
        for layer_logits in logits
    ]
    assert pooled == pytest.approx(top_k, rel=0.05)  # "perfectly balanced"
    assert min(per_layer) > 1.8 * top_k  # each layer reads its collapse (4 of 8 experts: up to 2k)
    uniform = torch.zeros(tokens, num_experts)
    chosen = torch.arange(tokens * top_k).reshape(tokens, top_k) % num_experts
    assert layer_balancing_loss(uniform, chosen, num_experts).item() == pytest.approx(top_k)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_per_layer_loss_uses_the_values_routing_jsonl_reports(family, tiny_mixtral_dir, deepseek_dir):
    """The loss's layer terms are the monitor's per-layer `aux_loss` (router's own choice, family scores)."""
    model = load(tiny_mixtral_dir if family == "mixtral" else deepseek_dir).train()
    batch = padded_batch()
    tap = RouterLogitsTap(model)
    with capture_routing(model) as cap:
        tap.begin()
        model(**batch)
        got = tap.take()
    tap.remove()
    stats = cap.stats()
    assert got.item() == pytest.approx(sum(stats.layer_aux_loss) / len(stats.layer_aux_loss), rel=1e-5)


# --------------------------------------------------------------------------- gradient


def router_grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]


def aux_only_grads(model, **checkpointing) -> list[torch.Tensor]:
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    model.zero_grad(set_to_none=True)
    tap = RouterLogitsTap(model)
    tap.begin()
    out = model(**padded_batch(), labels=ids(3, 8))
    aux = tap.take()
    tap.remove()
    # the task loss too, so that checkpointing really recomputes inside the backward
    (aux + 0.0 * out.loss).backward()
    if not aux.requires_grad:
        return []
    return router_grads(model)


def test_gradient_reaches_a_trainable_router_also_under_non_reentrant_checkpointing(tiny_mixtral_dir):
    plain = aux_only_grads(load(tiny_mixtral_dir).train())
    assert len(plain) == 2 and all(g.abs().sum() > 0 for g in plain)
    checkpointed = aux_only_grads(load(tiny_mixtral_dir).train(), use_reentrant=False)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)


def test_reentrant_checkpointing_leaves_the_loss_without_gradient_as_transformers_does(tiny_mixtral_dir):
    model = load(tiny_mixtral_dir).train()
    assert aux_only_grads(model, use_reentrant=True) == []


def test_per_layer_loss_on_the_fast_expert_lora_path(tiny_mixtral_dir):
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    if "expert_kernel" not in LoraSection.model_fields:
        pytest.skip("no fast expert LoRA path in this build")
    model, coverage = apply_lora(
        load(tiny_mixtral_dir), LoraSection(expert_kernel="fast"), get_family("mixtral")
    )
    assert coverage.expert_kernel == "fast", coverage.fast_kernel_fallback
    model.train()
    tap = RouterLogitsTap(model)
    with capture_routing(model) as cap:
        tap.begin()
        model(**padded_batch())
        aux = tap.take()
    tap.remove()
    layer_aux = cap.stats().layer_aux_loss
    assert aux.item() == pytest.approx(sum(layer_aux) / len(layer_aux), rel=1e-5)
    aux.backward()
    reached = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert any(
        "self_attn" in n and "lora_B" in n for n in reached
    )  # upstream of the routers (A's wait for B)
    assert any("layers.0.mlp.experts" in n for n in reached)  # layer 0's expert LoRA, through the fast kernel


# --------------------------------------------------------------------------- on a Trainer


def sft_trainer(model_dir: Path, tmp_path: Path, rows: int = 8, **args):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list(
        [{"prompt": f"What is {i} plus {i}? ", "completion": f"{2 * i}"} for i in range(rows)]
    )
    config = SFTConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        bf16=False,
        use_cpu=True,
        max_length=32,
        per_device_train_batch_size=rows,
        logging_steps=1,
        save_strategy="no",
        dataloader_pin_memory=False,
        **args,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SFTTrainer(model=load(model_dir), args=config, train_dataset=data, processing_class=tokenizer)


def expected_parts(model, inputs) -> tuple[float, float]:
    """(task loss of the model's own forward, the independent per-layer loss)."""
    family = get_family("mixtral")
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            labels=inputs["labels"],
            output_router_logits=True,
        )
    mask = inputs.get("attention_mask")
    each = [
        load_balancing_loss_func(
            (logits,), family.num_experts(model.config), family.top_k(model.config), mask
        )
        for logits in out.router_logits
    ]
    # the model's forward added its own pooled term to out.loss: take it back out to get the task loss
    task = out.loss - model.config.router_aux_loss_coef * out.aux_loss
    return task.item(), torch.stack(each).mean().item()


def test_the_loss_is_added_exactly_once_on_sft_trainer(tiny_mixtral_dir, tmp_path):
    trainer = sft_trainer(tiny_mixtral_dir, tmp_path, max_steps=1, learning_rate=0.0)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01  # TRL's own would be on
    aux = PerLayerAuxLoss().attach(trainer).callback_handler.callbacks[-1]
    assert isinstance(aux, PerLayerAuxLoss) and aux.coefficient == 0.01
    assert not trainer.aux_loss_enabled and not trainer.model.config.output_router_logits  # TRL's term off
    assert installed_tap(trainer.model) is aux.tap

    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.01
    task, per_layer = expected_parts(model, batch)
    expected = task + 0.01 * per_layer
    model.config.output_router_logits = False
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # and in the Trainer's own log: one step over the whole dataset at lr 0 logs that same total
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["loss"] == pytest.approx(expected, abs=1e-4)
    assert "aux_loss" not in entry  # TRL's pooled term was not computed
    assert entry[LOG_KEY] == pytest.approx(per_layer, rel=1e-4)


def test_a_plain_trainer_gets_it_once_with_the_models_own_term_off(tiny_mixtral_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = load(tiny_mixtral_dir)
    model.config.output_router_logits = True  # the model's forward would add its pooled term
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    aux = PerLayerAuxLoss(coef=0.05)
    aux.attach(trainer)
    assert not model.config.output_router_logits
    batch = {"input_ids": ids(2, 8), "labels": ids(2, 8)}
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    model.config.output_router_logits = True
    coef_before = model.config.router_aux_loss_coef
    task, per_layer = expected_parts(model, batch)
    expected = task + 0.05 * per_layer
    model.config.output_router_logits = False
    assert coef_before == model.config.router_aux_loss_coef
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_averages_the_term_over_the_micro_batches():
    class FakeTrainer:
        loss_is_scaled_for_ga = None
        model_accepts_loss_kwargs = True
        compute_loss_func = None
        current_gradient_accumulation_steps = 4

    training = torch.nn.Linear(1, 1).train()
    divisor = PerLayerAuxLoss._accumulation_divisor
    assert (
        divisor(FakeTrainer(), training, num_items_in_batch=100) == 4
    )  # the Trainer leaves scaling to the loss
    assert (
        divisor(FakeTrainer(), training, num_items_in_batch=None) == 1
    )  # the Trainer divides the whole loss
    assert divisor(FakeTrainer(), training.eval(), num_items_in_batch=100) == 1  # evaluation: no accumulation


def test_passed_as_a_bare_callback_it_says_how_to_attach_it():
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        PerLayerAuxLoss().on_train_begin(None, None, None)


# --------------------------------------------------------------------------- recipes


def test_recipe_default_is_per_layer_installed_once_and_the_start_up_check_says_so(recipe_factory):
    from moe_finetune import build_trainer, load_recipe

    lines: list[str] = []
    recipe = load_recipe(recipe_factory())
    assert recipe.model.aux_loss == "per_layer"
    trainer = build_trainer(recipe, echo=lines.append)
    printed = "\n".join(lines)
    assert "aux loss: ON, per layer, added once by PerLayerAuxLoss: loss += 0.01" in printed
    assert "transformers' pooled term is off" in printed and "WARNING" not in printed
    assert not trainer.aux_loss_enabled and installed_tap(trainer.model) is not None


def test_recipe_aux_loss_off_adds_none_and_transformers_is_trls_own(recipe_factory):
    from moe_finetune import build_trainer, load_recipe

    lines: list[str] = []
    # `--set` values are read as YAML, where a bare `off` is false: still "off"
    trainer = build_trainer(load_recipe(recipe_factory(), ["model.aux_loss=off"]), echo=lines.append)
    assert not trainer.aux_loss_enabled and installed_tap(trainer.model) is None
    assert any(line.startswith("aux loss: OFF") for line in lines)
    lines.clear()
    trainer = build_trainer(load_recipe(recipe_factory(), ["model.aux_loss=transformers"]), echo=lines.append)
    assert trainer.aux_loss_enabled and installed_tap(trainer.model) is None
    assert any("added once by TRL's SFTTrainer" in line for line in lines)


def test_per_layer_on_deepseek_v3_is_its_own_sigmoid_balance_loss_when_a_coefficient_is_given(
    deepseek_dir, tmp_path
):
    from moe_finetune.aux_check import check_aux_loss

    trainer = sft_trainer(deepseek_dir, tmp_path, max_steps=1, router_aux_loss_coef=0.001)
    # transformers' softmax loss on DeepSeek-V3 is refused by the check (it fails at the first step) ...
    assert check_aux_loss(trainer.model, trainer.args).problems
    PerLayerAuxLoss().attach(trainer)
    check = check_aux_loss(trainer.model, trainer.args)
    # ... the per-layer one (normalised sigmoid scores, the router's bias-steered choice) trains
    assert not check.problems and check.added_by == "PerLayerAuxLoss" and "sigmoid scores" in check.lines[0]
    trainer.train()
    assert trainer.state.log_history[0][LOG_KEY] > 0


# --------------------------------------------------------------------------- two ranks

_RANKS_SCRIPT = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
from moe_finetune import build_trainer, load_recipe
from moe_finetune.callbacks.aux_loss import LOG_KEY

recipe = load_recipe(sys.argv[1], ["model.aux_loss=per_layer", f"output_dir={sys.argv[2]}/run", "training.max_steps=2",
                                   "training.logging_steps=1", "training.save_steps=1000"])
trainer = build_trainer(recipe, echo=lambda line: None)
trainer.train()
lora = {n: p.detach().float().sum().item() for n, p in trainer.model.named_parameters() if "lora_" in n}
rank = int(os.environ["RANK"])
logged = [e.get(LOG_KEY) for e in trainer.state.log_history if "loss" in e]
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as handle:
    json.dump({"world": int(os.environ["WORLD_SIZE"]), "trl_aux": trainer.aux_loss_enabled, "lora": lora,
               "logged": logged}, handle)
"""


@pytest.mark.slow
def test_two_ranks_train_with_the_per_layer_loss_and_stay_in_step(recipe_factory, tmp_path):
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys

    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert launcher
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [launcher, "--nproc_per_node", "2", "--master_port", str(port), str(script)]
    done = subprocess.run(
        [*command, str(recipe_factory()), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert not ranks[0]["trl_aux"] and not ranks[1]["trl_aux"]  # TRL's pooled term off on every rank
    assert ranks[0]["lora"] == pytest.approx(ranks[1]["lora"], rel=1e-6)  # DDP kept the ranks in step
    assert len(ranks[0]["logged"]) == 2 and all(value > 0 for value in ranks[0]["logged"])


def test_our_attach_installs_the_per_layer_loss_with_the_other_callbacks(tiny_mixtral_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    from moe_finetune.callbacks import RoutingMonitor, attach

    model = load(tiny_mixtral_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    aux = PerLayerAuxLoss(coef=0.05)
    attach(trainer, RoutingMonitor(), aux)
    assert aux.tap is not None and aux in trainer.callback_handler.callbacks
    assert sum(isinstance(c, PerLayerAuxLoss) for c in trainer.callback_handler.callbacks) == 1
    batch = {"input_ids": ids(2, 8), "labels": ids(2, 8)}
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    model.config.output_router_logits = True
    task, per_layer = expected_parts(model, batch)
    assert loss.item() == pytest.approx(task + 0.05 * per_layer, rel=1e-5)
