"""Fast LoRA on fused experts (models/experts.py) against its slow oracle, PEFT's merged-stack path.

Every test runs both paths on one model with the same weights: `use_peft_expert_lora` puts PEFT's
ParamWrapper back in charge, `use_fast_expert_lora` the routed-token kernel. On every family: logits,
every LoRA gradient, greedy generation with the cache (fp32, tight) and bf16 against the fp32 truth.
PEFT's other operations (several adapters, unload, merge, ...) are in test_peft_contract.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.nn.utils import parametrize

from moe_finetune.models.experts import (
    LORA_EXPERTS_IMPLEMENTATION,
    use_fast_expert_lora,
    use_peft_expert_lora,
)
from moe_finetune.models.families import FAMILIES, get_family, tiny_config_kwargs
from moe_finetune.models.lora import apply_lora
from moe_finetune.routing import capture_routing
from moe_finetune.sections import LoraSection

VOCAB = 128
FAMILY_NAMES = sorted(FAMILIES)  # every supported family has fused, transformers-dispatched experts


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    spec = get_family(family)
    config = getattr(transformers, spec.config_class)(**tiny_config_kwargs(spec, vocab_size=VOCAB))
    torch.manual_seed(seed)
    return getattr(transformers, spec.model_class)(config).to(dtype)


def lora_model(family: str, r: int = 4, dtype: torch.dtype = torch.float32, **lora):
    # PEFT's own path unless a test asks otherwise: it is the reference the fast kernel must equal.
    lora.setdefault("expert_kernel", "peft")
    peft_model, cov = apply_lora(
        tiny_model(family, dtype=dtype), LoraSection(r=r, **lora), get_family(family)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at zero, which would hide every error in B's layout
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return peft_model, cov


def padded_batch(seed: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0  # right padding
    attention_mask[2, :5] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def step(peft_model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradient of every trainable (LoRA) parameter, with the routing hooks on."""
    peft_model.zero_grad(set_to_none=True)
    with capture_routing(peft_model) as capture:
        out = peft_model(**batch)
        out.loss.backward()
    assert capture.stats() is not None
    grads = {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def experts_modules(peft_model) -> list[torch.nn.Module]:
    return [m for m in peft_model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "has_gate")]


def record_parametrized(peft_model) -> list[bool]:
    """Hooks that note, at each experts forward, whether PEFT had parametrized the weight (merged stack)."""
    seen: list[bool] = []
    for experts in experts_modules(peft_model):
        experts.register_forward_pre_hook(lambda m, _: seen.append(parametrize.is_parametrized(m)))
    return seen


def assert_same(reference, fast, atol=1e-5) -> None:
    ref_logits, ref_grads = reference
    fast_logits, fast_grads = fast
    torch.testing.assert_close(fast_logits, ref_logits, atol=atol, rtol=1e-4)
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(
            fast_grads[name], grad, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
    expert_grads = [g for n, g in ref_grads.items() if ".experts." in n]
    assert expert_grads and all(g.abs().sum() > 0 for g in expert_grads)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fast_kernel_gives_peft_logits_and_every_lora_gradient(family: str) -> None:
    peft_model, cov = lora_model(family, expert_kernel="peft")
    assert cov.expert_kernel == "peft"
    batch = padded_batch()
    seen = record_parametrized(peft_model)
    reference = step(peft_model, batch)
    assert seen and all(seen)  # the oracle really is PEFT's merged stack
    assert use_fast_expert_lora(peft_model) is None
    seen.clear()
    fast = step(peft_model, batch)
    assert seen and not any(seen)  # and the fast path never merges
    assert_same(reference, fast)
    use_peft_expert_lora(peft_model)
    torch.testing.assert_close(step(peft_model, batch)[0], reference[0], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_fast_kernel_matches_peft_under_gradient_checkpointing(family: str, use_reentrant: bool) -> None:
    peft_model, _ = lora_model(family)
    peft_model.train()
    batch = padded_batch()
    reference = step(peft_model, batch)  # PEFT, no checkpointing: the oracle
    peft_model.enable_input_require_grads()
    peft_model.get_base_model().activation_checkpointing_enable({"use_reentrant": use_reentrant})
    assert use_fast_expert_lora(peft_model) is None
    assert_same(reference, step(peft_model, batch))


def test_unaligned_rank_takes_the_loop_and_still_matches() -> None:
    # r = 3 gives strides torch's CPU grouped_mm refuses (not 16-byte multiples): the per-expert loop runs.
    peft_model, _ = lora_model("mixtral", r=3)
    batch = padded_batch()
    reference = step(peft_model, batch)
    use_fast_expert_lora(peft_model)
    assert_same(reference, step(peft_model, batch))


def test_expert_kernel_fast_keeps_peft_names_and_says_so() -> None:
    fast_model, fast_cov = lora_model("mixtral", expert_kernel="fast")
    peft_model, peft_cov = lora_model("mixtral", expert_kernel="peft")
    assert LoraSection().expert_kernel == "fast"  # the default, once its step time and memory were measured
    assert fast_cov.expert_kernel == "fast" and "on the fast kernel" in fast_cov.line()
    assert "kernel" not in peft_cov.line()
    names = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert names(fast_model) == names(peft_model)
    assert fast_model.get_base_model().config._experts_implementation == LORA_EXPERTS_IMPLEMENTATION
    assert_same(step(peft_model, padded_batch()), step(fast_model, padded_batch()))


def test_fast_path_adapter_reloads_with_plain_peft_and_merges_to_the_same_model(tmp_path) -> None:
    from peft import PeftModel

    fast_model, _ = lora_model("qwen3_moe", expert_kernel="fast", dropout=0.1)
    fast_model.eval()
    batch = padded_batch()
    with torch.no_grad():
        logits = fast_model(**batch).logits
    fast_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.0

    reloaded = PeftModel.from_pretrained(tiny_model("qwen3_moe"), tmp_path / "adapter").eval()
    assert reloaded.get_base_model().config._experts_implementation != LORA_EXPERTS_IMPLEMENTATION
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, atol=1e-5, rtol=1e-4)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-5, rtol=1e-4)
        # merge_and_unload from the fast path itself gives the same model too.
        torch.testing.assert_close(
            fast_model.merge_and_unload()(**batch).logits, logits, atol=1e-5, rtol=1e-4
        )


def test_disabled_adapter_on_the_fast_path_is_the_base_model() -> None:
    fast_model, _ = lora_model("olmoe", expert_kernel="fast")
    base = tiny_model("olmoe").eval()
    fast_model.eval()
    batch = padded_batch()
    with torch.no_grad(), fast_model.disable_adapter():
        torch.testing.assert_close(fast_model(**batch).logits, base(**batch).logits, atol=1e-5, rtol=1e-4)


def test_lora_dropout_acts_on_experts_on_the_fast_path_in_training_only() -> None:
    fast_model, cov = lora_model("mixtral", expert_kernel="fast", dropout=0.5, attention=False)
    assert cov.expert_kernel == "fast"
    plain_model, _ = lora_model("mixtral", expert_kernel="fast", attention=False)
    batch = padded_batch()
    fast_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast_model(**batch).logits, plain_model.eval()(**batch).logits)
    fast_model.train()
    torch.manual_seed(0)
    first = fast_model(**batch)
    second = fast_model(**batch)
    assert not torch.allclose(first.logits, second.logits)  # only expert LoRA is on: expert dropout did it
    first.loss.backward()
    assert all(p.grad is not None for n, p in fast_model.named_parameters() if p.requires_grad)


def test_family_the_kernel_cannot_serve_falls_back_to_peft_and_the_line_says_so() -> None:
    model = tiny_model("mixtral")
    for experts in [m for m in model.modules() if hasattr(m, "has_gate")]:
        experts.has_post_expert_norm = True  # a layout the fast kernel does not implement
    peft_model, cov = apply_lora(model, LoraSection(r=4, expert_kernel="fast"), get_family("mixtral"))
    assert cov.expert_kernel == "peft"
    assert "on PEFT's kernel (fast kernel unavailable:" in cov.line() and "post-expert norm" in cov.line()
    assert peft_model.get_base_model().config._experts_implementation != LORA_EXPERTS_IMPLEMENTATION


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_with_the_cache_gives_peft_tokens_and_scores(family: str) -> None:
    # Prefill runs every prompt token through the experts, each decoding step one token per row, on the cache.
    peft_model, _ = lora_model(family)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding, as generation wants it
    settings = dict(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, use_cache=True,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    peft_model.eval()
    seen = record_parametrized(peft_model)
    with torch.no_grad():
        reference = peft_model.generate(**settings)
        assert seen and all(seen)
        assert use_fast_expert_lora(peft_model) is None
        seen.clear()
        fast = peft_model.generate(**settings)
    assert seen and not any(seen)
    assert torch.equal(fast.sequences, reference.sequences)
    for fast_scores, reference_scores in zip(fast.scores, reference.scores, strict=True):
        torch.testing.assert_close(fast_scores, reference_scores, atol=1e-5, rtol=1e-4)


def _copy_parameters(source, target) -> None:
    with torch.no_grad():
        values = dict(source.named_parameters())
        for name, param in target.named_parameters():
            param.copy_(values[name].to(param.dtype))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_fast_kernel_is_as_exact_as_peft_bf16_against_the_fp32_truth(family: str) -> None:
    """bf16 is judged against the fp32 computation of the same weights: the fast kernel's error must be
    small beside the LoRA's own effect on the logits and no larger than PEFT's own bf16 error.

    Not a fixed atol: a bf16 rounding can flip a near-tied routing choice (measured: one token in
    layer 1 of OLMoE on the fast path, none on PEFT's), which moves that token's gradient between
    experts, so gradients are compared in aggregate and each within PEFT's error plus a tenth of its norm
    (a wrong factor layout gives errors of the order of the gradient itself)."""
    model16, _ = lora_model(family, dtype=torch.bfloat16)
    model32, _ = lora_model(family)
    _copy_parameters(model16, model32)  # the fp32 truth of exactly the bf16 weights
    batch = padded_batch()
    truth = step(model32, batch)
    with torch.no_grad(), model32.disable_adapter():
        base = model32(**batch).logits
    peft16 = step(model16, batch)
    assert use_fast_expert_lora(model16) is None
    fast16 = step(model16, batch)
    assert fast16[0].dtype == torch.bfloat16

    def logits_error(result):
        return (result[0].float() - truth[0]).abs().mean()

    effect = (truth[0] - base).abs().mean()
    assert logits_error(fast16) < 0.1 * effect
    assert logits_error(fast16) <= 1.5 * logits_error(peft16)

    def grad_errors(result):
        return {name: (result[1][name].float() - grad).norm() for name, grad in truth[1].items()}

    fast_errors, peft_errors = grad_errors(fast16), grad_errors(peft16)
    total = lambda errors: torch.stack(list(errors.values())).norm()  # noqa: E731
    assert total(fast_errors) <= 1.5 * total(peft_errors)
    for name, grad in truth[1].items():
        assert fast_errors[name] <= peft_errors[name] + 0.1 * grad.norm(), name


# ------------------------------------------------------------------------------------------------
# Two CPU ranks (gloo): FSDP2 `fully_shard` per decoder layer (the shipped recipes/accelerate/fsdp.yaml
# wrapping) and DDP, each against the gradients one process gets on PEFT's path for both ranks' batches.

_RANKS_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["TEST_DIR"])
from test_expert_lora import lora_model, padded_batch

dist.init_process_group("gloo")
rank, mode = dist.get_rank(), sys.argv[1]
model, cov = lora_model("mixtral", expert_kernel="fast")
assert cov.expert_kernel == "fast"
if mode == "fsdp":
    from torch.distributed.fsdp import fully_shard
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    wrapped = model
else:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
wrapped(**padded_batch(seed=10 + rank)).loss.backward()
grads = {}
for name, param in model.named_parameters():
    if param.requires_grad:
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name.replace("module.", "")] = grad.tolist()
if rank == 0:
    reference, _ = lora_model("mixtral", expert_kernel="peft")
    for seed in (10, 11):
        (reference(**padded_batch(seed=seed)).loss / 2).backward()
    worst = max(
        (torch.tensor(grads[n]) - p.grad).abs().max().item()
        for n, p in reference.named_parameters() if p.requires_grad
    )
    json.dump({"worst": worst, "count": len(grads)}, open(os.environ["OUT"], "w"))
# Rank 1 waits for rank 0's reference: a gloo group torn down while its peer still works aborts
# the process now and then ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_fast_kernel_gradients_on_two_cpu_ranks_match_one_process(mode: str, tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_DIR": str(Path(__file__).parent), "OUT": str(out)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(script), mode]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["count"] > 0 and result["worst"] < 1e-5, result


@pytest.mark.slow
def test_train_on_the_fast_kernel_says_so_and_saves_an_adapter_plain_peft_loads(
    recipe_factory, tmp_path, tiny_mixtral_dir, capsys
) -> None:
    from peft import PeftModel

    from moe_finetune.cli import main

    recipe = recipe_factory()
    code = main(["train", str(recipe), "--set", "lora.r=4", "--set", "lora.expert_kernel=fast",
                 "--set", "lora.dropout=0.1", "--set", "training.learning_rate=5e-3"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "experts 2/2 MoE layers x 8 experts (down_proj, gate_up_proj) on the fast kernel" in out
    adapter = tmp_path / "run" / "adapter"
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    reloaded = PeftModel.from_pretrained(base, adapter)
    expert_b = [p for n, p in reloaded.named_parameters() if ".experts." in n and "lora_B" in n]
    assert expert_b and all(p.abs().sum() > 0 for p in expert_b)  # the experts really trained
