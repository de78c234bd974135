"""The CUDA path: the same oracles as the CPU tests, on a GPU. Skipped without one; run by
benchmarks/gpu_check.sh on a machine that has one (`pytest -m cuda`).

No CUDA figure or result exists until that script has run on a GPU: these tests have never run on the
machine the project is developed on (no GPU there). What each pins down:
- the fast expert kernel gives PEFT's logits and LoRA gradients on CUDA, in float32 and in bfloat16
  (grouped_mm, the experts backend transformers picks on CUDA);
- 4-bit experts packed on CUDA dequantize to exactly what bitsandbytes' CUDA backend gives per expert,
  and a 4-bit model trains on CUDA with LoRA gradients equal to its dequantized copy's;
- a whole guarded `train` run on CUDA in bf16 (TRL's default there) finishes and writes its adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"),
]

def _cpu_helpers():
    """The CPU tests' own helpers, so both devices are held to the same oracle."""
    import test_expert_lora

    return test_expert_lora


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_kernel_gives_peft_logits_and_lora_gradients_on_cuda(family: str, dtype: torch.dtype) -> None:
    from moe_finetune.models.experts import use_fast_expert_lora, use_peft_expert_lora

    helpers = _cpu_helpers()
    peft_model, _ = helpers.lora_model(family, dtype=dtype)
    peft_model.to("cuda")
    batch = _to(helpers.padded_batch(), "cuda")
    use_peft_expert_lora(peft_model)
    ref_logits, ref_grads = helpers.step(peft_model, batch)
    use_fast_expert_lora(peft_model)
    logits, grads = helpers.step(peft_model, batch)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(logits.float(), ref_logits.float(), **tolerance)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].float().abs().max().clamp_min(1e-6)
        error = (grad.float() - ref_grads[name].float()).abs().max() / scale
        assert error < (1e-3 if dtype == torch.float32 else 5e-2), (name, float(error))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_experts_packed_on_cuda_dequantize_to_what_bitsandbytes_cuda_gives(quant_type: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from moe_finetune.models.quant4 import dequantize_expert, pack_expert_stack

    weight = (torch.randn(4, 256, 128) * 0.05).to("cuda", torch.bfloat16)
    module = torch.nn.Module()
    pack_expert_stack(
        module, "w", weight, blocksize=64, quant_type=quant_type, double_quant=True, compute_dtype=torch.bfloat16
    )
    for e in range(4):
        data, state = bnb.functional.quantize_4bit(
            weight[e].contiguous(), blocksize=64, compress_statistics=True, quant_type=quant_type
        )
        torch.testing.assert_close(
            dequantize_expert(module, "w", e), bnb.functional.dequantize_4bit(data, state), atol=0, rtol=0
        )


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_4bit_model_on_cuda_trains_with_the_gradients_of_its_dequantized_copy(family: str) -> None:
    pytest.importorskip("bitsandbytes")
    import test_expert_4bit as helpers

    from moe_finetune.models.quant4 import dequantized_copy

    model = helpers.load_4bit(family, compute_dtype="float32")
    reference = dequantized_copy(model)
    quantized, _ = helpers._lora(model, family)
    plain, _ = helpers._lora(reference, family)
    with torch.no_grad():
        plain.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    quantized.to("cuda").train()
    plain.to("cuda").train()
    batch = _to(helpers._padded_batch(), "cuda")
    logits, grads = helpers._step(quantized, batch)
    ref_logits, ref_grads = helpers._step(plain, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_a_guarded_train_run_on_cuda_in_bf16_finishes_and_saves_its_adapter(recipe_factory, tmp_path: Path) -> None:
    from moe_finetune.train import train

    result = train(recipe_factory(), ["training.bf16=true", "lora.r=4"])
    assert result.global_step == 4
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert torch.cuda.max_memory_allocated() > 0
