"""What each MoE family looks like to us: one small frozen spec per family, and one table.

Everything family-specific that the rest of the toolkit needs lives here: where the routers are
and how to read what they decided, which parameters are the (fused) experts, which modules are the
attention projections, and a tiny config that builds in milliseconds for tests. Adding a family
is adding one entry to `FAMILIES` (facts per family: ../shared/research/families.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_finetune.errors import UnknownFamilyError

# The part of every tiny config that does not depend on the family.
_TINY_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "use_cache": False,
}


@dataclass(frozen=True)
class FamilySpec:
    """How one MoE family routes, where its experts live, and how to build a tiny one.

    `scores` says which probabilities the mean routing distribution (prob share, aux loss) is
    computed from: "softmax" over the router logits (Mixtral, Qwen, OLMoE, GPT-OSS), or "sigmoid"
    scores normalised to sum to one (DeepSeek-V3, whose choice also adds a correction bias: the
    chosen experts are read from the router's own output, never recomputed, so the bias and the
    expert groups are honoured exactly). The per-token routing entropy is softmax(logits) in every
    family (routing/capture.py says why: normalised sigmoid scores saturate).
    """

    name: str
    model_types: tuple[str, ...]
    config_class: str
    model_class: str
    router_classes: tuple[str, ...]
    expert_parameters: tuple[str, ...]
    # The family's attention projections; variants of one family may have only some of them
    # (DeepSeek with or without query compression), so defaults keep the ones a model really has.
    attention_modules: tuple[str, ...]
    num_experts_attrs: tuple[str, ...]
    top_k_attr: str = "num_experts_per_tok"
    scores: Literal["softmax", "sigmoid"] = "softmax"
    # Index of the router logits and of the chosen top-k expert indices in the router's output.
    logits_index: int = 0
    topk_index: int = 2
    aux_loss_in_model: bool = True
    tiny_config: Mapping[str, Any] = field(default_factory=dict)

    def num_experts(self, config: Any) -> int:
        for attr in self.num_experts_attrs:
            value = getattr(config, attr, None)
            if value:
                return int(value)
        raise UnknownFamilyError(
            f"config of model_type {config.model_type!r} has none of {self.num_experts_attrs}: "
            "cannot tell how many experts it routes to"
        )

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_attr))

    def expert_target_parameters(self) -> list[str]:
        """Names for PEFT `LoraConfig(target_parameters=...)`; PEFT matches them as name suffixes."""
        return list(self.expert_parameters)


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="mixtral",
            model_types=("mixtral",),
            config_class="MixtralConfig",
            model_class="MixtralForCausalLM",
            router_classes=("MixtralTopKRouter",),
            expert_parameters=_FUSED,
            attention_modules=_ATTN,
            num_experts_attrs=("num_local_experts",),
            tiny_config={
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.01,
            },
        ),
        FamilySpec(
            name="qwen2_moe",
            model_types=("qwen2_moe",),
            config_class="Qwen2MoeConfig",
            model_class="Qwen2MoeForCausalLM",
            router_classes=("Qwen2MoeTopKRouter",),
            expert_parameters=_FUSED,
            attention_modules=_ATTN,
            num_experts_attrs=("num_experts",),
            tiny_config={
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "mlp_only_layers": [1],
                "router_aux_loss_coef": 0.01,
            },
        ),
        FamilySpec(
            name="qwen3_moe",
            model_types=("qwen3_moe",),
            config_class="Qwen3MoeConfig",
            model_class="Qwen3MoeForCausalLM",
            router_classes=("Qwen3MoeTopKRouter",),
            expert_parameters=_FUSED,
            attention_modules=_ATTN,
            num_experts_attrs=("num_experts",),
            tiny_config={
                "head_dim": 16,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "router_aux_loss_coef": 0.01,
            },
        ),
        FamilySpec(
            name="olmoe",
            model_types=("olmoe",),
            config_class="OlmoeConfig",
            model_class="OlmoeForCausalLM",
            router_classes=("OlmoeTopKRouter",),
            expert_parameters=_FUSED,
            attention_modules=_ATTN,
            num_experts_attrs=("num_experts", "num_local_experts"),
            tiny_config={
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.01,
            },
        ),
        FamilySpec(
            name="deepseek_v3",
            model_types=("deepseek_v3",),
            config_class="DeepseekV3Config",
            model_class="DeepseekV3ForCausalLM",
            router_classes=("DeepseekV3TopkRouter",),
            expert_parameters=_FUSED,
            # Multi-head latent attention: low-rank query and key/value projections.
            attention_modules=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            num_experts_attrs=("n_routed_experts", "num_local_experts"),
            scores="sigmoid",
            aux_loss_in_model=False,
            tiny_config={
                "num_key_value_heads": 4,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "num_hidden_layers": 3,
                "first_k_dense_replace": 1,
                "n_routed_experts": 8,
                "n_shared_experts": 1,
                "num_experts_per_tok": 2,
                "n_group": 2,
                "topk_group": 1,
                "routed_scaling_factor": 2.5,
                "q_lora_rank": 16,
                "kv_lora_rank": 16,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 8,
                "v_head_dim": 16,
                "head_dim": 8,
            },
        ),
        FamilySpec(
            name="deepseek_v2",
            model_types=("deepseek_v2",),
            config_class="DeepseekV2Config",
            model_class="DeepseekV2ForCausalLM",
            router_classes=("DeepseekV2TopkRouter",),
            expert_parameters=_FUSED,
            # MLA again; V2-Lite has no query compression, so q_proj instead of q_a_proj/q_b_proj.
            attention_modules=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            num_experts_attrs=("n_routed_experts", "num_experts"),
            aux_loss_in_model=False,
            tiny_config={
                "num_key_value_heads": 4,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "num_hidden_layers": 3,
                "first_k_dense_replace": 1,
                "n_routed_experts": 8,
                "n_shared_experts": 1,
                "num_experts_per_tok": 2,
                "topk_method": "greedy",
                "q_lora_rank": None,
                "kv_lora_rank": 16,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 8,
                "v_head_dim": 16,
                "head_dim": 8,
            },
        ),
        FamilySpec(
            name="gpt_oss",
            model_types=("gpt_oss",),
            config_class="GptOssConfig",
            model_class="GptOssForCausalLM",
            router_classes=("GptOssTopKRouter",),
            expert_parameters=_FUSED,
            attention_modules=_ATTN,
            num_experts_attrs=("num_local_experts",),
            tiny_config={
                "head_dim": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "sliding_window": 16,
                "router_aux_loss_coef": 0.01,
            },
        ),
    )
}

# Config attributes that name the number of routed experts and the experts chosen per token, in
# every family we know and the common ones we do not (for `inspect` on an unknown architecture).
NUM_EXPERTS_ATTRS: tuple[str, ...] = tuple(
    dict.fromkeys([a for spec in FAMILIES.values() for a in spec.num_experts_attrs] + ["moe_num_experts"])
)
TOP_K_ATTRS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [spec.top_k_attr for spec in FAMILIES.values()] + ["moe_k", "moe_top_k", "num_experts_per_token", "top_k"]
    )
)


def family_key(name: str) -> str:
    """The table key for a family name as users type it: case and `-` versus `_` do not matter
    (`deepseek-v2`, `DeepSeek_V2` and `deepseek_v2` are one family)."""
    return name.strip().lower().replace("-", "_")


def get_family(name: str) -> FamilySpec:
    """The spec for a family name, with a clear error listing the known ones."""
    key = family_key(name)
    if key not in FAMILIES:
        known = ", ".join(sorted(spec.replace("_", "-") for spec in FAMILIES))
        raise UnknownFamilyError(f"unknown MoE family {name!r}; supported families: {known} (- or _ alike)")
    return FAMILIES[key]


def family_for_config(config: Any) -> FamilySpec:
    """The spec for a transformers config, by its `model_type`."""
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    raise UnknownFamilyError(
        f"model_type {model_type!r} ({type(config).__name__}) is not a supported MoE family; "
        f"supported: {', '.join(sorted(FAMILIES))}. Adding one is a FamilySpec entry in "
        "moe_finetune/models/families.py"
    )


def family_for_model(model: Any) -> FamilySpec:
    """The spec for a (possibly PEFT-wrapped) model; names the model class when it is unknown."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnknownFamilyError(f"{type(model).__name__} has no `config`: cannot tell its MoE family")
    try:
        return family_for_config(config)
    except UnknownFamilyError as err:
        raise UnknownFamilyError(f"{type(model).__name__}: {err}") from None


def tiny_config_kwargs(spec: FamilySpec, vocab_size: int) -> dict[str, Any]:
    """Keyword arguments for a tiny random config of this family with the given vocabulary."""
    return {**_TINY_BASE, "vocab_size": vocab_size, **spec.tiny_config}


# ------------------------------------------------------------------------------------------------
# Finding a family's routers in a model, whatever wraps it

# Name segments that wrappers insert between a model and its modules: prefixes (PEFT, DDP,
# torch.compile) and suffixes (PEFT's ModulesToSaveWrapper keeps `original_module` and
# `modules_to_save.<adapter>` copies of a trainable module; LoRA layers hold a `base_layer`).
_WRAPPER_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")
_WRAPPER_SUFFIX = re.compile(r"\.(original_module|modules_to_save\.[^.]+|base_layer)$")


def strip_wrapper_names(name: str, prefixes: bool = True) -> str:
    """`base_model.model.model.layers.0.mlp.gate.original_module` -> `model.layers.0.mlp.gate`.

    With `prefixes=False` only the wrapper suffixes go, so the name stays in the wrapped model's own
    namespace (what `named_parameters()` of that same model uses).
    """
    changed = True
    while changed:
        changed = False
        if prefixes:
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        stripped = _WRAPPER_SUFFIX.sub("", name)
        if stripped != name:
            name, changed = stripped, True
    return name


def find_routers(model: Any, family: FamilySpec, canonical: bool = True) -> tuple[list[str], list[list[Any]]]:
    """Router layers in execution order: their names and, per layer, the router modules.

    Routers are found by class name from the family table, so a PEFT-wrapped, DDP-wrapped or
    compiled model works too. A layer has more than one module when PEFT keeps an original and a
    trainable copy of the router (`modules_to_save`): only the active one runs, and both feed the
    same layer slot. `canonical=True` names layers as the bare model would (`model.layers.0.mlp.gate`);
    False keeps the wrapper's prefixes (the names `model.named_parameters()` uses).
    """
    names: list[str] = []
    modules: list[list[Any]] = []
    for name, module in model.named_modules():
        if type(module).__name__ not in family.router_classes:
            continue
        key = strip_wrapper_names(name, prefixes=canonical)
        if key in names:
            modules[names.index(key)].append(module)
        else:
            names.append(key)
            modules.append([module])
    return names, modules


def unwrap_model(model: Any) -> Any:
    """The transformers model inside DDP / DataParallel / FSDP / DeepSpeed / torch.compile / PEFT wrappers."""
    from accelerate.utils import extract_model_from_parallel

    inner = model
    for _ in range(4):  # wrappers nest a few levels at most (DDP around PEFT around the model)
        inner = extract_model_from_parallel(inner, keep_torch_compile=False)
        if not callable(getattr(inner, "get_base_model", None)):
            break
        inner = inner.get_base_model()
    return inner
