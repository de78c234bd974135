"""`moe_finetune.inspect`: parameter counts, memory and LoRA estimates of real MoE models on meta.

Every model here is full size (up to Mixtral 8x22B's 141B parameters) but built on the meta device
from the published config.json in recipes/configs/, so nothing is allocated and nothing downloaded.
"""

from __future__ import annotations

import json
import math

import pytest
from peft import LoraConfig

from moe_finetune.errors import LoraTargetError, RecipeError
from moe_finetune.inspect import CATEGORIES, InspectReport, inspect_model
from moe_finetune.models.configs import SHIPPED_CONFIGS, load_config

B = 1e9

# Published (total, active) in billions, from each model's card / paper.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),  # mistral.ai/news/mixtral-of-experts
    "mixtral-8x22b": (141.0, 39.0),  # mistral.ai/news/mixtral-8x22b
    "qwen3-30b-a3b": (30.5, 3.3),  # Qwen/Qwen3-30B-A3B model card (29.9B non-embedding)
    "olmoe-1b-7b": (6.9, 1.3),  # OLMoE paper, arXiv:2409.02060
    "deepseek-v2-lite": (15.7, 2.4),  # DeepSeek-V2 paper, arXiv:2405.04434, appendix B
}


@pytest.fixture(scope="module")
def reports() -> dict[str, InspectReport]:
    return {name: inspect_model(name) for name in SHIPPED_CONFIGS}


def within(measured: float, published: float, tolerance: float = 0.01) -> bool:
    return abs(measured - published) <= tolerance * published


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_total_parameters_match_the_published_figure_within_1_percent(reports, name):
    assert within(reports[name].params.total / B, PUBLISHED[name][0]), reports[name].params


@pytest.mark.parametrize("name", ["mixtral-8x7b", "mixtral-8x22b"])
def test_mixtral_active_parameters_match_the_published_figure_within_1_percent(reports, name):
    # Mistral's convention is ours: all non-expert weights (embeddings and lm_head included) + 2/8
    # of the experts. 8x7B: 12.88 B vs 12.9 B; 8x22B: 39.15 B vs 39 B.
    assert within(reports[name].params.active / B, PUBLISHED[name][1]), reports[name].params


def test_olmoe_active_parameters_round_to_the_published_1_3_b(reports):
    # Measured 1.282 B against the published "1.3 B": 1.4% apart, only because the figure has two
    # significant digits (1.282 rounds to 1.3). Every other convention is further away: without the
    # input embedding 1.179 B, without both embeddings 1.076 B. So we test the published precision
    # and pin the exact count: 0.477 B always-active + 8/64 of 6.442 B routed experts.
    params = reports["olmoe-1b-7b"].params
    assert round(params.active / B, 1) == 1.3
    assert params.active == 1_282_017_280


def test_qwen3_active_parameters_truncate_to_the_published_3_3_b(reports):
    # Measured 3.353 B against the published "3.3 B" (1.6% apart). Qwen truncates to one decimal
    # rather than rounding: the same card gives 30.5 B total (we count 30.532 B) and 29.9 B
    # non-embedding (29.910 B); Qwen1.5-MoE-A2.7B's "2.0 B non-embedding activated" is 2.07 B by
    # the same arithmetic. No embedding convention lands within 1% of 3.3 (3.04 B without the input
    # embedding, 2.73 B without both), so we test the truncation and the non-embedding total.
    params = reports["qwen3-30b-a3b"].params
    assert math.floor(params.active / B * 10) / 10 == 3.3
    assert within((params.total - params.embeddings) / B, 29.9)
    assert params.active == 3_353_032_704


def test_deepseek_v2_lite_active_parameters_follow_the_config_not_the_published_2_4_b(reports):
    # The published "2.4 B activated" cannot be reproduced from the published config under any
    # counting: with all embeddings 2.661 B, without the input embedding 2.451 B (+2.1%), without
    # input embedding and lm_head 2.242 B (-6.6%). The total (15.706 B vs 15.7 B) matches, so the
    # config is right. Users report the same ~2.6 B (github.com/deepseek-ai/DeepSeek-V2/issues/73,
    # open, unanswered). For the full DeepSeek-V2 the same counting gives 235.7 B / 21.4 B against
    # the published 236 B / 21 B. So we pin the count the config implies, derived by hand below.
    report = reports["deepseek-v2-lite"]
    h, layers, experts, width, vocab = 2048, 27, 64, 1408, 102400
    routed_per_layer = experts * 3 * h * width
    moe_layers = layers - 1  # first_k_dense_replace = 1
    assert report.params.routed_experts == moe_layers * routed_per_layer
    always_active = report.params.total - report.params.routed_experts
    assert report.params.active == always_active + moe_layers * routed_per_layer * 6 // 64 == 2_661_150_208
    assert report.params.embeddings == 2 * vocab * h
    assert round((report.params.active - vocab * h) / B, 2) == 2.45


@pytest.mark.parametrize("name", list(SHIPPED_CONFIGS))
def test_categories_add_up_to_the_total(reports, name):
    params = reports[name].params
    assert sum(count for _, count in params.category_items()) == params.total
    assert [category for category, _ in params.category_items()] == list(CATEGORIES)
    assert 0 < params.active < params.total


def test_mixtral_8x7b_categories_match_the_closed_form_counts(reports):
    params = reports["mixtral-8x7b"].params
    vocab, h, layers, experts, width, kv = 32000, 4096, 32, 8, 14336, 8 * 128
    assert params.routed_experts == layers * experts * 3 * h * width == 45_097_156_608
    assert params.attention == layers * (2 * h * h + 2 * h * kv)
    assert params.routers == layers * experts * h
    assert params.embeddings == 2 * vocab * h  # untied lm_head counts
    assert params.norms_and_other == layers * 2 * h + h
    assert params.shared_experts == params.dense_mlp == 0
    assert params.active == params.total - params.routed_experts + params.routed_experts // 4


def test_deepseek_dense_first_layer_and_shared_experts_are_found(reports):
    report = reports["deepseek-v2-lite"]
    assert (report.num_layers, report.num_moe_layers, report.num_dense_layers) == (27, 26, 1)
    assert (report.num_experts, report.top_k) == (64, 6)
    assert report.params.dense_mlp == 3 * 2048 * 10944  # layer 0's dense MLP
    assert report.params.shared_experts == 26 * 3 * 2048 * (2 * 1408)  # 2 shared experts per MoE layer
    assert report.params.routers == 26 * 64 * 2048


def test_nf4_as_transformers_does_it_leaves_mixtral_experts_in_bf16(reports):
    # bitsandbytes through quantization_config only replaces nn.Linear: Mixtral's fused experts
    # (96.6% of its weights) stay bf16, so "4-bit Mixtral" still needs ~85 GiB, not ~25.
    report = reports["mixtral-8x7b"]
    bf16 = report.memory_for("bf16").transformers_bnb_bytes
    nf4 = report.memory_for("nf4")
    assert bf16 == 2 * report.params.total
    assert nf4.transformers_bnb_bytes > 0.95 * bf16
    assert nf4.transformers_bnb_bytes > 3 * nf4.experts_quantized_bytes
    assert 22 * 2**30 < nf4.experts_quantized_bytes < 27 * 2**30
    dq = report.memory_for("nf4_double_quant").experts_quantized_bytes
    int8 = report.memory_for("int8").experts_quantized_bytes
    assert dq < nf4.experts_quantized_bytes < int8 < bf16


def test_to_dict_is_json_serialisable_and_format_is_a_readable_table(reports):
    report = inspect_model("olmoe", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params"]["total"] == reports["olmoe-1b-7b"].params.total
    assert data["lora"]["trainable"] == report.lora.trainable
    assert {row["precision"] for row in data["memory"]} == {"bf16", "int8", "nf4", "nf4_double_quant"}

    text = reports["mixtral-8x7b"].format()
    assert "46.70 B" in text and "12.88 B" in text and "86.99 GiB" in text
    table = [line for line in text.splitlines() if "B " in line and "%" in line]
    assert len({line.index("%") for line in table}) == 1  # the share column is aligned


def test_hub_id_resolves_offline_to_the_shipped_file(monkeypatch):
    import transformers

    def no_network(*args, **kwargs):
        raise AssertionError("load_config went to the hub for a shipped config")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    for name in ("mistralai/Mixtral-8x7B-Instruct-v0.1", "MIXTRAL-8x7B", "mixtral-8x7b-instruct-v0.1"):
        config = load_config(name)
        assert (config.model_type, config.num_local_experts, config.hidden_size) == ("mixtral", 8, 4096)
    assert "mistralai/Mixtral-8x7B-Instruct-v0.1" in inspect_model("mixtral-8x7b").source


def test_deepseek_v2_lite_builds_with_the_native_class_without_remote_code():
    with open(SHIPPED_CONFIGS["deepseek-v2-lite"].path) as handle:
        published = json.load(handle)
    assert "auto_map" in published  # kept as published ...
    config = load_config("deepseek-ai/DeepSeek-V2-Lite")
    assert type(config).__name__ == "DeepseekV2Config"
    assert not hasattr(config, "auto_map")  # ... and dropped on load
    assert inspect_model(config).architecture == "DeepseekV2ForCausalLM"


@pytest.mark.parametrize("name", list(SHIPPED_CONFIGS))
def test_shipped_files_keep_the_published_identity_fields(name):
    with open(SHIPPED_CONFIGS[name].path) as handle:
        published = json.load(handle)
    config = load_config(name)
    assert published["model_type"] == config.model_type
    assert published["architectures"] == config.architectures
    assert published["tie_word_embeddings"] is False


def test_load_config_accepts_a_file_and_a_directory(tmp_path):
    source = SHIPPED_CONFIGS["olmoe-1b-7b"].path
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(source.read_text())
    for where in (source, str(source), tmp_path / "model"):
        assert load_config(where).num_experts == 64
    assert inspect_model(tmp_path / "model").params.total == inspect_model("olmoe").params.total


def test_missing_paths_and_bad_files_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_config(str(tmp_path / "missing" / "config.json"))
    with pytest.raises(RecipeError, match="without config.json"):
        load_config(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "alien.json").write_text(json.dumps({"model_type": "no_such_family_xyz"}))
    with pytest.raises(RecipeError, match="remote code"):
        load_config(tmp_path / "alien.json")


def test_lora_on_mixtral_attention_counts_r_times_in_plus_out():
    lora = inspect_model(
        "mixtral-8x7b", LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    ).lora
    h, kv, layers, r = 4096, 1024, 32, 16
    expected = {
        "q_proj": layers * r * (h + h),
        "k_proj": layers * r * (h + kv),
        "v_proj": layers * r * (h + kv),
        "o_proj": layers * r * (h + h),
    }
    assert lora.by_target == expected
    assert lora.trainable == sum(expected.values()) == 13_631_488
    assert lora.weight_bytes == lora.gradient_bytes == 4 * lora.trainable  # PEFT keeps adapters in fp32
    assert lora.optimizer_bytes == 8 * lora.trainable
    assert lora.state_bytes == 16 * lora.trainable


def test_lora_on_fused_experts_counts_r_times_in_plus_out_per_expert():
    config = LoraConfig(
        r=16, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    lora = inspect_model("mixtral-8x7b", config, optimizer_bytes_per_param=12).lora
    h, width, layers, experts, r = 4096, 14336, 32, 8, 16
    assert lora.by_target == {
        "gate_up_proj": layers * experts * r * (h + 2 * width),
        "down_proj": layers * experts * r * (width + h),
    }
    assert lora.optimizer_bytes == 12 * lora.trainable


def test_lora_targets_that_match_nothing_are_a_lora_target_error():
    with pytest.raises(LoraTargetError):
        inspect_model("olmoe", LoraConfig(r=8, target_modules=["no_such_proj"]))


def test_shared_expert_gate_dense_layers_and_tied_embeddings_are_categorised_from_a_model():
    # A tiny Qwen2-MoE passed as a model instance: only its config is used, rebuilt on meta.
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    h, vocab, experts, width, shared_width = 32, 128, 4, 16, 24
    config = Qwen2MoeConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=40,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=shared_width,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=experts,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        tie_word_embeddings=True,
    )
    report = inspect_model(AutoModelForCausalLM.from_config(config))
    params = report.params
    assert (report.num_moe_layers, report.num_dense_layers) == (2, 1)
    assert params.embeddings == vocab * h  # tied: counted once
    assert params.dense_mlp == 3 * h * 40
    assert params.shared_experts == 2 * (3 * h * shared_width + h)  # + shared_expert_gate (h -> 1)
    assert params.routers == 2 * experts * h
    assert params.active == params.total - params.routed_experts + params.routed_experts // 2
