"""How big is a Mixture-of-Experts model, how much of it runs per token, and what does it cost to hold?

`inspect_model("mixtral-8x7b")` builds the model on the meta device (no weights, no download, a
few milliseconds to a few seconds) and counts its parameters by role:

    routed experts   the per-token-selected experts (`...mlp.experts.gate_up_proj` / `down_proj`,
                     fused `nn.Parameter`s in transformers 5; any module path with an `experts` part)
    shared experts   experts every token goes through (`shared_expert(s)`, `shared_mlp`, and
                     Qwen2-MoE's `shared_expert_gate`)
    routers          the gate that scores experts (a `*Router` class, or a `gate`/`router` module
                     beside an `experts` module)
    embeddings       input embeddings + the output head (`lm_head`) when it is not tied
    attention        everything inside the attention block, its q/k norms included
    dense MLP        feed-forward blocks of the non-MoE layers (DeepSeek's `first_k_dense_replace`,
                     Qwen's `mlp_only_layers`)
    norms and other  layer norms, the final norm, anything else

Categories come from module class names and module paths, not from a per-family table, so a
family this file has never seen is still split sensibly. They always add up to the total.

Active parameters per token = everything except the routed experts + each MoE layer's routed
experts x top_k / num_experts (shared experts, attention, embeddings and lm_head always count).
That is the convention behind Mistral's "46.7B total / 12.9B active" for Mixtral 8x7B.

Memory to hold the weights is given two ways, because they differ by a factor of three for MoE:

* "transformers + bitsandbytes": what `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`
  really does in transformers 5. Only modules whose type is exactly `nn.Linear` are replaced by
  bitsandbytes layers; the skip list is transformers' own (`get_keys_to_not_convert`: the output
  embeddings, tied weights, the last module, plus `_keep_in_fp32_modules`). Fused expert
  `nn.Parameter`s, routers, embeddings, norms and biases stay in bf16 (fp32 where the model keeps
  them in fp32, e.g. DeepSeek-V2's router). For Mixtral 8x7B that is ~96% of the weights unquantized.
* "experts quantized too": the same, plus every routed-expert weight matrix quantized as if it
  were a Linear: what `model.quantization.bits: 4` really loads (models/quant4.py packs the fused
  experts with bitsandbytes' own 4-bit format; tests/test_expert_4bit.py checks this figure against a
  real load of a mid-size model). Embeddings and lm_head stay bf16.

Bytes per quantized weight (bitsandbytes storage; per-tensor constants under 1 KiB are ignored):

* int8 (LLM.int8, `Linear8bitLt`, `has_fp16_weights=False`): 1 byte per weight + one fp32 scale
  per output row (`SCB`). For a fused expert tensor a "row" is one output feature of one expert.
* nf4 (`Linear4bit`, blocksize 64): 4 bits per weight + one fp32 absmax per 64 weights = 4.5 bits.
* nf4 with double quantization (`bnb_4bit_use_double_quant=True`): the absmax values are themselves
  quantized to 8 bits in blocks of 256 with an fp32 absmax each: 4 + 8/64 + 32/(64*256) ~ 4.127 bits.
  transformers' default is `bnb_4bit_use_double_quant=False`, so the plain nf4 row is the default.

With a `peft.LoraConfig`, the LoRA adapter is applied to the meta model with `peft.get_peft_model`
(target modules and `target_parameters` for fused experts both work on meta) and the trainable
parameters are counted by target. Training state for them assumes AdamW: the adapter weights in the
dtype PEFT gives them (fp32: `autocast_adapter_dtype=True` upcasts adapters of a bf16 model), one
gradient per weight in that dtype, and `optimizer_bytes_per_param` of optimizer state (8 = the two
fp32 moments `exp_avg`, `exp_avg_sq`). No separate fp32 master copy is counted, because the adapter
weights already are fp32; for bf16 adapters with an fp32 master copy pass 12. Activations are not
estimated: they depend on batch, sequence length and checkpointing, not on the model alone.

Why one file of ~550 lines: the counting rules, the memory rules and the report they fill belong
together (every figure in the README's recipe table comes from here); config discovery lives in
models/configs.py.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_finetune.errors import LoraTargetError, RecipeError
from moe_finetune.models.configs import load_config, meta_model, shipped_config_for
from moe_finetune.models.families import NUM_EXPERTS_ATTRS, TOP_K_ATTRS, family_for_config, find_routers

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "CATEGORIES",
    "InspectReport",
    "LoraEstimate",
    "MemoryEstimate",
    "ParameterCounts",
    "inspect_model",
]

# bitsandbytes storage, in bytes per quantized weight (see the module docstring).
_NF4_BYTES = (4 + 32 / 64) / 8
_NF4_DOUBLE_QUANT_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
_INT8_BYTES = 1.0
_INT8_ROW_SCALE_BYTES = 4  # one fp32 `SCB` per output row

# Config attributes that name the number of routed experts and the experts chosen per token.

_ATTENTION_PARTS = {"self_attn", "attn", "attention", "self_attention", "cross_attn"}
_MLP_PARTS = {"mlp", "feed_forward", "ffn"}

CATEGORIES = (
    "routed_experts",
    "shared_experts",
    "attention",
    "embeddings",
    "routers",
    "dense_mlp",
    "norms_and_other",
)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class ParameterCounts:
    """Parameters by role. The seven categories add up to `total`."""

    total: int
    routed_experts: int
    shared_experts: int
    attention: int
    embeddings: int
    routers: int
    dense_mlp: int
    norms_and_other: int
    active: int

    def category_items(self) -> list[tuple[str, int]]:
        return [(name, getattr(self, name)) for name in CATEGORIES]


@dataclass
class MemoryEstimate:
    """Bytes to hold the weights at one precision, the two ways described in the module docstring."""

    precision: str
    transformers_bnb_bytes: int
    experts_quantized_bytes: int
    note: str = ""


@dataclass
class LoraEstimate:
    """LoRA trainable parameters (by target name) and their training state in bytes."""

    trainable: int
    by_target: dict[str, int]
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer_bytes_per_param: int
    r: Any = None
    lora_alpha: Any = None

    @property
    def state_bytes(self) -> int:
        """Adapter weights + gradients + optimizer state (activations not included)."""
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes


@dataclass
class InspectReport:
    """What `inspect_model` found. `to_dict()` is JSON-serialisable; `format()` is a terminal table."""

    model: str
    source: str
    model_type: str
    architecture: str
    num_layers: int
    num_moe_layers: int
    num_dense_layers: int
    num_experts: int | None
    top_k: int | None
    params: ParameterCounts
    memory: list[MemoryEstimate]
    lora: LoraEstimate | None = None
    notes: list[str] = field(default_factory=list)

    def memory_for(self, precision: str) -> MemoryEstimate:
        for row in self.memory:
            if row.precision == precision:
                return row
        raise KeyError(f"no memory row {precision!r}; rows: {[row.precision for row in self.memory]}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["params"]["active_fraction"] = (
            self.params.active / self.params.total if self.params.total else 0.0
        )
        if self.lora is not None:
            data["lora"]["state_bytes"] = self.lora.state_bytes
        return data

    def format(self) -> str:
        p = self.params
        lines = [
            f"{self.model}  ({self.architecture}, model_type {self.model_type})",
            f"  source: {self.source}",
        ]
        experts = (
            f"{self.num_experts} routed experts, top-{self.top_k}"
            if self.num_experts
            else "no routed experts found"
        )
        lines.append(
            f"  layers: {self.num_layers} ({self.num_moe_layers} MoE, {self.num_dense_layers} dense) · {experts}"
        )
        lines.append("")
        width = 24
        lines.append(f"  {'parameters':<{width}}{'count':>12}{'share':>9}")
        rows = [("total", p.total), *p.category_items(), ("active per token", p.active)]
        for name, count in rows:
            share = f"{100 * count / p.total:8.2f}%" if p.total else ""
            lines.append(f"  {name.replace('_', ' '):<{width}}{_fmt_count(count):>12}{share}")
        lines.append("")
        lines.append(f"  {'weights memory':<{width}}{'transformers+bnb':>18}{'experts quantized':>19}")
        for row in self.memory:
            lines.append(
                f"  {row.precision.replace('_', ' '):<{width}}{_fmt_gib(row.transformers_bnb_bytes):>18}"
                f"{_fmt_gib(row.experts_quantized_bytes):>19}"
            )
        if self.lora is not None:
            lora = self.lora
            lines.append("")
            share = f" ({100 * lora.trainable / p.total:.3f}% of total)" if p.total else ""
            lines.append(
                f"  LoRA r={lora.r} alpha={lora.lora_alpha}: {_fmt_count(lora.trainable)} trainable{share}"
            )
            for target, count in sorted(lora.by_target.items()):
                lines.append(f"    {target:<{width - 2}}{_fmt_count(count):>12}")
            lines.append(f"    {'adapter weights':<{width - 2}}{_fmt_gib(lora.weight_bytes):>12}")
            lines.append(f"    {'gradients':<{width - 2}}{_fmt_gib(lora.gradient_bytes):>12}")
            optimizer = f"optimizer ({lora.optimizer_bytes_per_param} B/param)"
            lines.append(f"    {optimizer:<{width - 2}}{_fmt_gib(lora.optimizer_bytes):>12}")
            lines.append(f"    {'LoRA training state':<{width - 2}}{_fmt_gib(lora.state_bytes):>12}")
        if self.notes:
            lines.append("")
            lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _fmt_count(count: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def _fmt_gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def _config_int(config: PretrainedConfig, attrs: tuple[str, ...]) -> int | None:
    """The first positive integer among `attrs`, looked up on the config and its text/ffn sub-configs."""
    candidates = [config]
    for sub in ("text_config", "ffn_config"):
        sub_config = getattr(config, sub, None)
        if sub_config is not None:
            candidates.append(sub_config)
    for candidate in candidates:
        for attr in attrs:
            value = candidate.get(attr) if isinstance(candidate, dict) else getattr(candidate, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers: the longest `nn.ModuleList` that is not a list of experts."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        is_layer_list = isinstance(module, nn.ModuleList) and "experts" not in name.split(".")
        if is_layer_list and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        return []
    prefix, layers = best
    return [(f"{prefix}.{index}", layer) for index, layer in enumerate(layers)]


def _experts_root(parts: list[str]) -> int | None:
    """Index of the `experts` path part (routed experts), or None."""
    return parts.index("experts") if "experts" in parts else None


def _router_paths(model: nn.Module) -> set[str] | None:
    """Module paths of the routers for a family we know (models/families.py); None for an unknown one."""
    from moe_finetune.errors import UnknownFamilyError

    try:
        family = family_for_config(model.config)
    except UnknownFamilyError:
        return None
    return set(find_routers(model, family, canonical=False)[0])


def _categorise(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Map each parameter name to a category, and each routed-expert parameter to its experts module.

    Precedence: routed experts > shared experts > routers > embeddings > attention > dense MLP >
    norms and other. Tied parameters appear once (named_parameters drops duplicates). Routers are the
    family table's router modules where the family is known, else a `*Router` class or a `gate`/`router`
    module beside an `experts` module.
    """
    modules = dict(model.named_modules())
    router_paths = _router_paths(model)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    category: dict[str, str] = {}
    experts_module_of: dict[str, str] = {}
    for param_name, _ in model.named_parameters():
        module_path = param_name.rsplit(".", 1)[0] if "." in param_name else ""
        parts = module_path.split(".") if module_path else []
        ancestors = [
            modules[".".join(parts[:i])] for i in range(len(parts) + 1) if ".".join(parts[:i]) in modules
        ]
        class_names = [type(m).__name__.lower() for m in ancestors]
        owner = modules.get(module_path)

        root = _experts_root(parts)
        if root is not None:
            category[param_name] = "routed_experts"
            experts_module_of[param_name] = ".".join(parts[: root + 1])
        elif any(part.startswith("shared_expert") or part == "shared_mlp" for part in parts):
            category[param_name] = "shared_experts"
        elif (
            any(module_path == p or module_path.startswith(p + ".") for p in router_paths)
            if router_paths is not None
            else any("router" in name for name in class_names) or _is_gate_beside_experts(parts, modules)
        ):
            category[param_name] = "routers"
        elif isinstance(owner, nn.Embedding) or (
            output_embeddings is not None and owner is output_embeddings
        ):
            category[param_name] = "embeddings"
        elif any(part in _ATTENTION_PARTS for part in parts) or any(
            "attention" in name for name in class_names[1:]
        ):
            category[param_name] = "attention"
        elif any(part in _MLP_PARTS for part in parts) or any("mlp" in name for name in class_names[1:]):
            category[param_name] = "dense_mlp"
        else:
            category[param_name] = "norms_and_other"
    return category, experts_module_of


def _is_gate_beside_experts(parts: list[str], modules: dict[str, nn.Module]) -> bool:
    """True for a `gate`/`router` module whose parent also holds an `experts` module."""
    for i, part in enumerate(parts):
        if part in {"gate", "router"}:
            parent = ".".join(parts[:i])
            if f"{parent}.experts" in modules or (parent == "" and "experts" in modules):
                return True
    return False


def _num_experts_in(module: nn.Module, config: PretrainedConfig) -> int | None:
    """Experts held by one experts module: the leading dim of a fused 3-D tensor, a ModuleList's length,
    or the config's count."""
    for param in module.parameters(recurse=False):
        if param.dim() == 3:
            return int(param.shape[0])
    if isinstance(module, nn.ModuleList):
        return len(module)
    return _config_int(config, NUM_EXPERTS_ATTRS)


def _quantizable_linears(model: nn.Module) -> set[str]:
    """Names of the modules transformers + bitsandbytes would replace by 8-/4-bit layers.

    Mirrors `replace_with_bnb_linear`: `type(module) is nn.Linear` (subclasses are left alone), minus
    transformers' skip list (`get_keys_to_not_convert` + `_keep_in_fp32_modules`).
    """
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = list(get_keys_to_not_convert(model)) + list(
            getattr(model, "_keep_in_fp32_modules", None) or []
        )
    except ImportError:  # older/newer layout: fall back to the rule it implements for causal LMs
        output = model.get_output_embeddings()
        skip = [name for name, module in model.named_modules() if module is output]

        def should_convert_module(name: str, patterns: list[str]) -> bool:
            return not any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)

    return {
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    }


def _memory_rows(model: nn.Module, category: dict[str, str]) -> list[MemoryEstimate]:
    """Weight memory at bf16, int8, nf4 and nf4 + double quant, both ways (module docstring)."""
    quantized_linears = _quantizable_linears(model)
    params = dict(model.named_parameters())

    # Weights that get quantized, as (numel, output rows, bytes as loaded); all else stays as loaded.
    native_total = 0
    linear_weights: list[tuple[int, int, int]] = []  # (numel, rows, native bytes): transformers + bnb
    expert_weights: list[tuple[int, int, int]] = []  # the same for routed experts: quantized only by us
    for name, param in params.items():
        native = param.numel() * param.element_size()
        native_total += native
        module_path, _, leaf = name.rpartition(".")
        if leaf == "weight" and module_path in quantized_linears:
            linear_weights.append((param.numel(), param.shape[0], native))  # nn.Linear: (out, in)
        elif category[name] == "routed_experts" and param.dim() >= 2 and not leaf.endswith("bias"):
            # F.linear(x, W[e]) per expert: a row is one output feature of one expert.
            expert_weights.append((param.numel(), param.numel() // param.shape[-1], native))

    def bytes_change(weights: list[tuple[int, int, int]], per_weight: float, per_row: int) -> int:
        """Bytes after quantizing these weights minus bytes before (negative: saved)."""
        return sum(math.ceil(numel * per_weight) + rows * per_row - native for numel, rows, native in weights)

    rows = [MemoryEstimate("bf16", native_total, native_total, "weights as loaded in bf16 (fp32 where kept)")]
    for precision, per_weight, per_row, note in (
        ("int8", _INT8_BYTES, _INT8_ROW_SCALE_BYTES, "LLM.int8: 1 byte/weight + fp32 scale per row"),
        ("nf4", _NF4_BYTES, 0, "4 bits + fp32 absmax per 64 = 4.5 bits/weight (transformers' default)"),
        ("nf4_double_quant", _NF4_DOUBLE_QUANT_BYTES, 0, "double quant: ~4.127 bits/weight"),
    ):
        as_transformers = native_total + bytes_change(linear_weights, per_weight, per_row)
        experts_too = as_transformers + bytes_change(expert_weights, per_weight, per_row)
        rows.append(MemoryEstimate(precision, as_transformers, experts_too, note))
    return rows


def _lora_estimate(model: nn.Module, lora_config: LoraConfig, optimizer_bytes_per_param: int) -> LoraEstimate:
    """Apply `lora_config` to the meta model with PEFT and count what it made trainable."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, copy.deepcopy(lora_config))
    except ValueError as err:
        raise LoraTargetError(f"LoRA config does not apply to {type(model).__name__}: {err}") from None

    modules = dict(peft_model.named_modules())
    by_target: dict[str, int] = {}
    trainable = weight_bytes = 0
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        trainable += param.numel()
        weight_bytes += param.numel() * param.element_size()
        # The LoRA layer that owns this parameter: the nearest ancestor that is a LoraLayer.
        parts = name.split(".")[:-1]
        target = "not LoRA (modules_to_save / bias)"
        while parts:
            module = modules.get(".".join(parts))
            if isinstance(module, ParamWrapper):
                target = module.parameter_name
                break
            if isinstance(module, LoraLayer):
                target = parts[-1]
                break
            parts.pop()
        by_target[target] = by_target.get(target, 0) + param.numel()
    if trainable == 0:
        raise LoraTargetError("the LoRA config made no parameter trainable on this model")
    return LoraEstimate(
        trainable=trainable,
        by_target=by_target,
        weight_bytes=weight_bytes,
        gradient_bytes=weight_bytes,  # one gradient per trainable weight, in its dtype
        optimizer_bytes=trainable * optimizer_bytes_per_param,
        optimizer_bytes_per_param=optimizer_bytes_per_param,
        r=lora_config.r,
        lora_alpha=lora_config.lora_alpha,
    )


def inspect_model(
    model_or_config: str | os.PathLike[str] | PretrainedConfig | PreTrainedModel,
    lora_config: LoraConfig | None = None,
    optimizer_bytes_per_param: int = 8,
) -> InspectReport:
    """Count, split and size a (MoE) causal LM built on the meta device; see the module docstring.

    `model_or_config` is anything `load_config` accepts, a `PretrainedConfig`, or a model (only its
    config is used: the model is rebuilt on meta, so quantized or PEFT-wrapped models count the same).
    With `lora_config`, PEFT applies it to the meta model and the report gets a `lora` section.
    """
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        config, name, source = model_or_config, type(model_or_config).__name__, "config object"
    elif isinstance(model_or_config, nn.Module) and isinstance(
        getattr(model_or_config, "config", None), PretrainedConfig
    ):
        config = copy.deepcopy(model_or_config.config)
        name, source = type(model_or_config).__name__, "model object (rebuilt on meta from its config)"
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    else:
        name = os.fspath(model_or_config)
        config = load_config(name)
        shipped = shipped_config_for(name)
        source = f"{shipped.repo_id} ({shipped.path})" if shipped and not Path(name).exists() else name

    model = meta_model(config, dtype=torch.bfloat16)
    category, experts_module_of = _categorise(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    totals = dict.fromkeys(CATEGORIES, 0)
    for param_name, param in params.items():
        totals[category[param_name]] += param.numel()
    total = sum(totals.values())

    top_k = _config_int(config, TOP_K_ATTRS)
    notes: list[str] = []
    routed_active = 0.0
    expert_counts: set[int] = set()
    for param_name, experts_path in experts_module_of.items():
        num_experts = _num_experts_in(modules[experts_path], config)
        if num_experts is None or top_k is None:
            raise RecipeError(
                f"{name}: found routed experts ({experts_path}) but could not read the number of experts "
                f"({'/'.join(NUM_EXPERTS_ATTRS)}) or top-k ({'/'.join(TOP_K_ATTRS)}) from the config"
            )
        expert_counts.add(num_experts)
        routed_active += params[param_name].numel() * min(top_k, num_experts) / num_experts
    active = total - totals["routed_experts"] + round(routed_active)
    if len(expert_counts) > 1:
        notes.append(f"layers differ in expert count: {sorted(expert_counts)}")

    layers = _decoder_layers(model)
    moe_layer_prefixes = {path.split(".experts")[0] for path in experts_module_of.values()}
    num_moe = sum(1 for prefix, _ in layers if any(p.startswith(prefix + ".") for p in moe_layer_prefixes))

    report = InspectReport(
        model=name,
        source=source,
        model_type=str(config.model_type),
        architecture=type(model).__name__,
        num_layers=len(layers),
        num_moe_layers=num_moe,
        num_dense_layers=len(layers) - num_moe,
        num_experts=max(expert_counts) if expert_counts else None,
        top_k=top_k if expert_counts else None,
        params=ParameterCounts(total=total, active=active, **totals),
        memory=_memory_rows(model, category),
        notes=notes,
    )
    if lora_config is not None:
        report.lora = _lora_estimate(model, lora_config, optimizer_bytes_per_param)
    return report
