"""From a trained adapter to one a serving engine loads unmerged: vLLM and SGLang, per expert or fused.

`moe-finetune export RUN_DIR_OR_ADAPTER --format per-expert|fused` rewrites the adapter `train` saves (PEFT's
layout for `target_parameters`) into what an engine reads, checks it, and writes it beside the run. Nothing is
merged: the base stays one copy and any number of adapters ride on it.

PEFT's layout for a fused expert stack, read in peft 0.22's `ParamWrapper` (`tuners/lora/layer.py`:
`update_layer`, `get_delta_factors`, `get_delta_weight`). A stack of E experts with LoRA rank r (per expert)
has `lora_A` (E·r, in) and `lora_B` (out, r·E), and

    delta[e] = (alpha / r) · B_e · A_e,   A_e = A[e·r:(e+1)·r]   (A.reshape(E, r, in): expert-major rows)
                                          B_e = B[:, e::E]        (B.reshape(out, r, E): the expert index fastest)

where (out, in) are the expert's nn.Linear shape: `gate_up_proj` (E, 2I, H) gives A (E·r, H), B (2I, r·E), and
`down_proj` (E, H, I) gives A (E·r, I), B (H, r·E). (GPT-OSS stores its stacks transposed, (E, H, 2I) and
(E, I, H), and PEFT reads them as such: the same A and B shapes.) In the per-expert layout an expert's gate and
up projections share A_e and split B_e at I (gate first: transformers fuses `[w1; w3]` / `[gate_proj;
up_proj]` along dim 1, conversion_mapping.py); GPT-OSS interleaves gate and up rows, has no per-expert modules
in any checkpoint, and ships fused. Per-expert keys are named as the family's hub checkpoint names its expert
Linears (`...mlp.experts.{e}.{gate_proj|up_proj|down_proj}`, Mixtral `...block_sparse_moe.experts.{e}.{w1|w3|w2}`),
which is how vLLM and SGLang name the modules they attach LoRA to. The rank stays r per expert, so alpha/r (and
rsLoRA's alpha/sqrt(r)) is unchanged.

PEFT 0.17 to 0.19.0 saved non-transposed stacks the other way round (the fix is PEFT #3165, 0.19.1): A (E·r, dim1),
B (dim2, r·E) for a stack (E, dim1, dim2), with delta[e] = (alpha / r) · (B_e · A_e)ᵀ. Such files are read too:
the layout is told from the shapes, and where a stack is square (dim1 == dim2, both readings fit) from the other
stacks of the file or a `peft_version` of 0.19.1 or later; otherwise the export is refused (exit 2).

No base weights are loaded: the model is built on the meta device from its config, PEFT injects the adapter's
config into it (PEFT's own names, shapes, ranks and scalings), and each stack's reference delta is PEFT's own
`get_delta_weight` on the adapter's factors in float32 (one stack's delta at a time: for Mixtral 8x7B's gate_up,
8 x 28672 x 4096 floats, 3.8 GB). Before anything is written, the check: for every expert, (alpha/r)·B_e·A_e from
the file as written must equal that delta exactly, every other tensor must be the source's bit for bit, and the
written adapter_config.json must give every module the rank and scaling PEFT gave it. A mismatch raises
ExportCheckError (exit 1) and nothing is written; the folder is written under a temporary sibling name and
renamed into place (outputs.publish).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_finetune.errors import ExportCheckError, RecipeError
from moe_finetune.merge import ADAPTER_CONFIG, AdapterSource, read_json_object, resolve_source
from moe_finetune.models.families import FamilySpec, family_for_config, strip_wrapper_names
from moe_finetune.rundir import ADAPTER_DIR

Echo = Callable[[str], None]

FORMATS = ("per-expert", "fused")
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every saved key
FIXED_PEFT = (0, 19, 1)  # the first PEFT that saves non-transposed stacks as (E·r, in) / (out, r·E)


# ------------------------------------------------------------------------------------------------
# What each family's experts are called in its per-expert checkpoints (transformers' conversion_mapping.py:
# Mixtral renames `block_sparse_moe` to `mlp` and fuses w1|w3 -> gate_up_proj, w2 -> down_proj; qwen2_moe, and
# the families it aliases (qwen3_moe, olmoe, deepseek_v2, deepseek_v3), fuse gate_proj|up_proj and down_proj).


@dataclass(frozen=True)
class PerExpertNames:
    moe_module: str  # the MoE block's name in the checkpoint, where transformers 5 says `mlp`
    gate: str
    up: str
    down: str


_QWEN_STYLE = PerExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
PER_EXPERT_NAMES: dict[str, PerExpertNames] = {
    "mixtral": PerExpertNames("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": _QWEN_STYLE,
    "qwen3_moe": _QWEN_STYLE,
    "olmoe": _QWEN_STYLE,
    "deepseek_v2": _QWEN_STYLE,
    "deepseek_v3": _QWEN_STYLE,
}
# Families that no engine serves per expert, and why.
NO_PER_EXPERT = {
    "gpt_oss": (
        "GPT-OSS interleaves gate and up rows in one fused stack (transformers' GptOssExperts, "
        "is_concatenated=False) and its checkpoints have no per-expert modules to attach LoRA to; vLLM serves "
        "GPT-OSS expert LoRA in PEFT's fused layout: use --format fused"
    ),
}
# Families whose vLLM model stores experts as 3-D weights (`is_3d_moe_weight`) and reads PEFT's fused layout
# natively; the others read it only with --enable-mixed-moe-lora-format and `is_3d_lora_weight` on the request.
NATIVE_3D = frozenset({"gpt_oss"})

# adapter_config.json settings that change what the adapter computes and that no engine implements (vLLM's
# PEFTHelper rejects each): (key, the value that is fine, why).
_UNSERVABLE: tuple[tuple[str, Any, str], ...] = (
    ("use_dora", False, "DoRA rescales each weight by a learned magnitude, which vLLM and SGLang do not implement"),
    ("lora_bias", False, "a LoRA bias (lora_bias) is not loaded by vLLM or SGLang"),
    ("modules_to_save", None, "fully trained modules (modules_to_save: a trained router, lora.router: true) are "
     "not loaded by vLLM or SGLang; `moe-finetune merge` puts them into a model"),
    ("alora_invocation_tokens", None, "Activated LoRA (alora_invocation_tokens) is not implemented by the engines"),
    ("layer_replication", None, "layer_replication is not implemented by the engines"),
    ("trainable_token_indices", None, "trainable tokens (trainable_token_indices) are not loaded by the engines"),
    ("use_qalora", False, "QA-LoRA is not implemented by the engines"),
)
# Inits that leave the adapter a plain LoRA once trained (the others, PiSSA, OLoRA, CorDA, LoftQ ..., change the
# base weights when PEFT loads the adapter: an engine serving the published base would not see that).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


# ------------------------------------------------------------------------------------------------
# Reading the adapter


def refuse_unservable(config: dict[str, Any], where: Path) -> None:
    """Exit 2 for an adapter no engine can serve as an adapter, naming the setting and why."""
    if config.get("peft_type", "LORA") != "LORA":
        raise RecipeError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA adapters export")
    for key, fine, why in _UNSERVABLE:
        value = config.get(key, fine)
        if value not in (fine, None, False, [], {}):
            raise RecipeError(f"{where}: {key} = {value!r} cannot be exported for serving: {why}")
    if config.get("bias", "none") != "none":
        raise RecipeError(f"{where}: bias = {config['bias']!r}: the engines load no adapter biases")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        raise RecipeError(
            f"{where}: init_lora_weights = {init!r} changes the base weights when PEFT loads the adapter, which an "
            "engine serving the published base does not do; convert it to a plain LoRA with PEFT "
            "(save_pretrained(path_initial_model_for_weight_conversion=...)) first"
        )


def read_tensors(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's saved tensors (safetensors, or the older adapter_model.bin)."""
    path = adapter_dir / WEIGHTS_FILE
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)


def _version(text: str | None) -> tuple[int, ...] | None:
    numbers = re.findall(r"\d+", (text or "").split("+")[0])[:3]
    return tuple(int(n) for n in numbers) if numbers else None


# ------------------------------------------------------------------------------------------------
# The adapter as PEFT sees it: injected into the model on the meta device


@dataclass
class ExpertStack:
    """One fused expert parameter PEFT adapted: where its factors are saved, and what PEFT made of it."""

    key: str  # saved-key prefix, e.g. base_model.model.model.layers.0.mlp.experts.base_layer
    module: str  # the experts module, bare: model.layers.0.mlp.experts
    parameter: str  # gate_up_proj | down_proj
    shape: tuple[int, int, int]  # the stack, (E, dim1, dim2)
    transposed_param: bool  # stored (E, in, out) (GPT-OSS), as `is_transposed` says
    concatenated: bool  # gate and up stacked along the rows (False: interleaved, GPT-OSS)
    wrapper: Any  # PEFT's ParamWrapper on the meta model
    rank: int
    scaling: float

    @property
    def experts(self) -> int:
        return self.shape[0]

    @property
    def linear_shape(self) -> tuple[int, int]:
        """(out, in) of one expert's nn.Linear."""
        _, dim1, dim2 = self.shape
        return (dim2, dim1) if self.transposed_param else (dim1, dim2)


@dataclass
class PeftView:
    stacks: list[ExpertStack]
    modules: dict[str, tuple[int, float]]  # every other LoRA module (saved-key prefix) -> (rank, scaling)
    expected_keys: set[str]


# What PEFT says when an adapter's targets are not in the model (peft 0.22 `inject_adapter`).
_DOES_NOT_FIT = ("not found in the base model", "Target modules", "Target parameters", "size mismatch")
# A key of an adapter already in the per-expert layout: `...experts.3.w1.lora_A.weight`.
_PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.[^.]+\.lora_[AB]\.weight$")


def _lora_weight(tensor: Any) -> Any:
    import torch

    return torch.nn.Parameter(tensor, requires_grad=False)


def inject_on_meta(model_config: Any, adapter_dir: Path, family: FamilySpec) -> PeftView:
    """PEFT's own reading of the adapter config on the meta-device model: its saved keys, the stacks it wraps,
    every module's rank and scaling. An adapter that does not fit the model is the user's to fix (exit 2)."""
    import torch
    from peft import PeftConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from peft.utils import get_peft_model_state_dict

    from moe_finetune.models.configs import meta_model

    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    peft_config.inference_mode = True
    model = meta_model(model_config)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, peft_config)
    except (ValueError, KeyError, RuntimeError) as err:
        if not any(fragment in str(err) for fragment in _DOES_NOT_FIT):
            raise  # a bug: reported as one (exit 1)
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise RecipeError(
            f"the adapter {adapter_dir} does not fit the {family.name} model it names: {first_line}. Pass --base with "
            "the model it was trained on"
        ) from None
    stacks, modules = [], {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        key = name  # PEFT saves a module's factors under its name in the PeftModel, less the adapter's name
        if isinstance(module, ParamWrapper):
            experts = module.get_base_layer()
            shape = tuple(getattr(experts, module.parameter_name).shape)
            if len(shape) != 3:
                raise RecipeError(
                    f"{adapter_dir}: target parameter {strip_wrapper_names(name)}.{module.parameter_name} is not an "
                    f"expert stack (shape {shape}); only 3-D expert stacks export"
                )
            stacks.append(
                ExpertStack(
                    key=key,
                    module=strip_wrapper_names(name),
                    parameter=module.parameter_name,
                    shape=shape,  # type: ignore[arg-type]
                    transposed_param=bool(getattr(experts, "is_transposed", False)),
                    concatenated=bool(getattr(experts, "is_concatenated", True)),
                    wrapper=module,
                    rank=int(module.r["default"]),
                    scaling=float(module.scaling["default"]),
                )
            )
        else:
            modules[key] = (int(module.r["default"]), float(module.scaling["default"]))
    expected = set(get_peft_model_state_dict(peft_model).keys())
    return PeftView(stacks=stacks, modules=modules, expected_keys=expected)


@contextmanager
def _standing_in(stack: ExpertStack) -> Iterator[None]:
    """The meta model's stack replaced by a float32 CPU tensor of its shape with no storage behind it (a
    stride-0 view of one zero), so that PEFT's `get_delta_weight`, which returns the delta on the stack's device
    and in its dtype, returns it here in float32."""
    import torch

    experts = stack.wrapper.get_base_layer()
    original = experts._parameters[stack.parameter]
    experts._parameters[stack.parameter] = torch.nn.Parameter(
        torch.zeros((), dtype=torch.float32).expand(stack.shape), requires_grad=False
    )
    try:
        yield
    finally:
        experts._parameters[stack.parameter] = original


def peft_delta(stack: ExpertStack, lora_a: Any, lora_b: Any) -> Any:
    """(E, dim1, dim2) float32: PEFT's own `get_delta_weight` for factors in the current layout."""
    wrapper = stack.wrapper
    wrapper.lora_A["default"].weight = _lora_weight(lora_a.float())
    wrapper.lora_B["default"].weight = _lora_weight(lora_b.float())
    with _standing_in(stack):
        return wrapper.get_delta_weight("default")


# ------------------------------------------------------------------------------------------------
# The layouts: current (PEFT >= 0.19.1) and transposed (PEFT 0.17 - 0.19.0), told apart by shapes


def _fits(stack: ExpertStack, lora_a: Any, lora_b: Any, a_cols: int, b_rows: int) -> bool:
    rows = stack.experts * stack.rank
    return tuple(lora_a.shape) == (rows, a_cols) and tuple(lora_b.shape) == (b_rows, rows)


def stack_layout(stack: ExpertStack, lora_a: Any, lora_b: Any) -> str:
    """"current", "transposed", "either" (both readings fit, or they are the same), or "neither"."""
    _, dim1, dim2 = stack.shape
    out_features, in_features = stack.linear_shape
    current = _fits(stack, lora_a, lora_b, in_features, out_features)
    # PEFT before 0.19.1 took (E, dim1, dim2) as (E, in, out) whatever the stack stored; for a transposed stack
    # (GPT-OSS) that is right, so both versions wrote the same file.
    transposed = not stack.transposed_param and _fits(stack, lora_a, lora_b, dim1, dim2)
    if stack.transposed_param:
        return "either" if current else "neither"
    if current and transposed:
        return "either"
    return "current" if current else "transposed" if transposed else "neither"


def file_layout(stacks: list[ExpertStack], tensors: dict[str, Any], config: dict[str, Any], where: Path) -> str:
    """The one layout of the whole file; exit 2 when the shapes fit neither, contradict, or cannot tell."""
    seen: dict[str, list[str]] = {}
    for stack in stacks:
        layout = stack_layout(stack, tensors[stack.key + ".lora_A.weight"], tensors[stack.key + ".lora_B.weight"])
        seen.setdefault(layout, []).append(f"{stack.module}.{stack.parameter}")
    if "neither" in seen:
        stack = next(s for s in stacks if f"{s.module}.{s.parameter}" == seen["neither"][0])
        a, b = tensors[stack.key + ".lora_A.weight"], tensors[stack.key + ".lora_B.weight"]
        raise RecipeError(
            f"{where}: the LoRA factors of {seen['neither'][0]} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) "
            f"fit neither PEFT layout of its stack {stack.shape} at rank {stack.rank}: the adapter does not fit this "
            "base. Pass --base with the model it was trained on"
        )
    if "current" in seen and "transposed" in seen:
        raise RecipeError(
            f"{where}: the shapes contradict each other: {seen['current'][0]} is in PEFT's current layout and "
            f"{seen['transposed'][0]} in the transposed one of PEFT 0.17-0.19.0; one PEFT writes one layout"
        )
    if "current" in seen or "transposed" in seen:
        return "current" if "current" in seen else "transposed"
    square = [s for s in stacks if not s.transposed_param]
    version = config.get("peft_version")
    parsed = _version(version)
    if not square or (parsed is not None and parsed >= FIXED_PEFT):
        return "current"
    raise RecipeError(
        f"{where}: the layout of the expert LoRA cannot be told: every adapted stack is square "
        f"({', '.join(f'{s.parameter} {s.shape}' for s in square[:2])}), so PEFT's current layout and the "
        f"transposed one of PEFT 0.17-0.19.0 both fit, and the file was written by PEFT {version or '(unrecorded)'}, "
        "which may have written either (transformers patched some loads to the current layout). Re-save the adapter "
        "with PEFT 0.19.1 or later from the model it was trained with"
    )


def to_current(stack: ExpertStack, lora_a: Any, lora_b: Any) -> tuple[Any, Any]:
    """A transposed-layout pair as the current layout: delta[e] = s·(B_e·A_e)ᵀ = s·A_eᵀ·B_eᵀ, so the new
    B_e is the old A_eᵀ and the new A_e the old B_eᵀ (values moved, never recomputed)."""
    experts, rank = stack.experts, stack.rank
    _, dim1, dim2 = stack.shape
    old_a = lora_a.reshape(experts, rank, dim1)  # [e, j, :] = A_e[j]
    old_b = lora_b.reshape(dim2, rank, experts)  # [:, j, e] = B_e[:, j]
    new_a = old_b.permute(2, 1, 0).reshape(experts * rank, dim2)
    new_b = old_a.permute(2, 1, 0).reshape(dim1, rank * experts)
    return new_a.contiguous(), new_b.contiguous()


def transposed_delta(stack: ExpertStack, lora_a: Any, lora_b: Any) -> Any:
    """(E, dim1, dim2) float32: what PEFT 0.17-0.19.0's `get_delta_weight` gave for its own file (the einsum
    that peft 0.22 still runs for a stack it did not swap)."""
    import torch

    experts, rank = stack.experts, stack.rank
    weight_a = lora_a.float().reshape(experts, rank, -1)
    weight_b = lora_b.float().reshape(lora_b.shape[0], rank, experts)
    return torch.einsum("o r e, e r i -> e i o", weight_b, weight_a).mul_(stack.scaling)


# ------------------------------------------------------------------------------------------------
# The per-expert layout


def expert_factors(lora_a: Any, lora_b: Any, experts: int, rank: int, expert: int) -> tuple[Any, Any]:
    """(A_e, B_e) of one expert from a fused pair in the current layout: A rows expert-major, B columns with the
    expert index fastest (peft 0.22 `ParamWrapper.get_delta_factors`: A.reshape(E, r, in), B.reshape(out, r, E))."""
    return lora_a[expert * rank : (expert + 1) * rank], lora_b[:, expert::experts]


def per_expert_module(stack: ExpertStack, names: PerExpertNames) -> str:
    """`model.layers.0.mlp.experts` -> `model.layers.0.block_sparse_moe.experts` (the checkpoint's own name)."""
    head, sep, _ = stack.module.rpartition(".mlp.experts")
    if not sep or not stack.module.endswith(".mlp.experts"):
        raise RecipeError(f"the expert stack {stack.module}.{stack.parameter} is not under an `mlp.experts` module")
    return f"{head}.{names.moe_module}.experts"


def per_expert_projections(stack: ExpertStack, names: PerExpertNames) -> tuple[str, ...]:
    if stack.parameter == "gate_up_proj":
        return (names.gate, names.up)
    if stack.parameter == "down_proj":
        return (names.down,)
    raise RecipeError(
        f"target parameter {stack.module}.{stack.parameter} has no per-expert form (gate_up_proj and down_proj do)"
    )


def split_stack(stack: ExpertStack, lora_a: Any, lora_b: Any, names: PerExpertNames) -> dict[str, Any]:
    """Per-expert keys -> tensors (copies: safetensors keeps no shared storage) of one fused pair."""
    module = per_expert_module(stack, names)
    projections = per_expert_projections(stack, names)
    out_features, _ = stack.linear_shape
    split = out_features // len(projections)  # gate_up: gate rows [0, I), up rows [I, 2I)
    written: dict[str, Any] = {}
    for expert in range(stack.experts):
        a_e, b_e = expert_factors(lora_a, lora_b, stack.experts, stack.rank, expert)
        for index, projection in enumerate(projections):
            key = f"{PREFIX}{module}.{expert}.{projection}"
            written[key + ".lora_A.weight"] = a_e.clone().contiguous()
            written[key + ".lora_B.weight"] = b_e[index * split : (index + 1) * split].clone().contiguous()
    return written


def per_expert_product(
    stack: ExpertStack, written: dict[str, Any], names: PerExpertNames, expert: int
) -> Any:
    """(out, in) float32 (alpha/r)·B_e·A_e of one expert from the written per-expert tensors (gate above up)."""
    import torch

    module = per_expert_module(stack, names)
    rows = []
    for projection in per_expert_projections(stack, names):
        key = f"{PREFIX}{module}.{expert}.{projection}"
        rows.append(written[key + ".lora_B.weight"].float() @ written[key + ".lora_A.weight"].float())
    return torch.cat(rows).mul_(stack.scaling)


def fused_product(stack: ExpertStack, written: dict[str, Any], expert: int) -> Any:
    """(out, in) float32 (alpha/r)·B_e·A_e of one expert from a written fused pair."""
    a_e, b_e = expert_factors(
        written[stack.key + ".lora_A.weight"].float(),
        written[stack.key + ".lora_B.weight"].float(),
        stack.experts,
        stack.rank,
        expert,
    )
    return (b_e @ a_e).mul_(stack.scaling)


# ------------------------------------------------------------------------------------------------
# adapter_config.json for an engine


def _module_name(key: str) -> str:
    """A saved-key prefix as the engines and PEFT's patterns see it: without `base_model.model.`."""
    return key.removeprefix(PREFIX)


def resolve_rank_scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The (rank, scaling) PEFT and vLLM give `module` under `config` (first matching pattern key wins, matched
    as a dotted suffix: peft `get_pattern_key`, vLLM `PEFTHelper.get_rank_and_scaling`)."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = ranks.get(get_pattern_key(list(ranks), module), config["r"])
    alpha = alphas.get(get_pattern_key(list(alphas), module), config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return int(rank), float(scale)


def _alpha_of(stack: ExpertStack) -> float:
    return float(stack.wrapper.lora_alpha["default"])


def _still_matching(patterns: dict[str, Any] | None, modules: list[str]) -> dict[str, Any]:
    """The source's pattern keys that still name a module of the export (as PEFT matches them: a dotted suffix,
    `get_pattern_key`); the ones that named only expert stacks are replaced by the per-expert keys."""
    return {
        key: value
        for key, value in (patterns or {}).items()
        if any(re.match(rf"(.*\.)?({key})$", module) for module in modules)
    }


def per_expert_config(
    config: dict[str, Any], stacks: list[ExpertStack], names: PerExpertNames, others: list[str]
) -> dict[str, Any]:
    """The source config for per-expert modules: no target_parameters, target_modules naming the per-expert
    projections, and (when the source had patterns) one explicit pattern per adapted stack, placed before the
    source's keys that still name one of the `others` (the attention modules ...), so every per-expert module keeps
    its stack's rank and alpha and every other module its own."""
    import peft

    written = dict(config)
    written.pop("target_parameters", None)
    projections = list(dict.fromkeys(p for stack in stacks for p in per_expert_projections(stack, names)))
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        expert_pattern = rf".*\.experts\.\d+\.(?:{'|'.join(map(re.escape, projections))})"
        written["target_modules"] = f"(?:{targets})|{expert_pattern}" if projections else targets
    elif not isinstance(targets, str):
        written["target_modules"] = list(dict.fromkeys([*(targets or []), *projections]))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        ranks, alphas = {}, {}
        for stack in stacks:
            module = per_expert_module(stack, names)
            key = rf"{re.escape(module)}\.\d+\.(?:{'|'.join(map(re.escape, per_expert_projections(stack, names)))})"
            ranks[key] = stack.rank
            alphas[key] = _alpha_of(stack)
        written["rank_pattern"] = {**ranks, **_still_matching(config.get("rank_pattern"), others)}
        written["alpha_pattern"] = {**alphas, **_still_matching(config.get("alpha_pattern"), others)}
    written["peft_version"] = peft.__version__  # the layout is current whatever wrote the source
    return written


def fused_config(config: dict[str, Any]) -> dict[str, Any]:
    """The source config as engines read a fused adapter: target_modules present (vLLM requires the field),
    target_parameters kept (PEFT needs them to load it back; vLLM ignores them), and the writer recorded as the
    installed PEFT, so no reader takes a converted file for PEFT 0.17-0.19.0's transposed layout."""
    import peft

    written = dict(config)
    if written.get("target_modules") is None:
        written["target_modules"] = []
    written["peft_version"] = peft.__version__
    return written


# ------------------------------------------------------------------------------------------------
# The check


@dataclass
class ExportCheck:
    """How the written adapter compares with PEFT's own reading of the source."""

    format: str
    source_layout: str  # "current" | "transposed"
    stacks: int
    layers: int
    expert_deltas: int
    max_diff: float
    passed_through: int
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def line(self) -> str:
        read = " (read from PEFT 0.17-0.19.0's transposed layout)" if self.source_layout == "transposed" else ""
        if not self.stacks:
            experts = "no expert LoRA (attention only)"
        else:
            experts = (
                f"{self.expert_deltas} expert deltas of {self.stacks} fused stacks in {self.layers} MoE layers{read}: "
                f"(alpha/r)·B_e·A_e from the written file vs PEFT's get_delta_weight, max |diff| {self.max_diff:.2e}"
            )
        verdict = "ok" if self.ok else f"MISMATCH ({'; '.join(self.mismatches[:3])})"
        return (
            f"export check ({self.format}, float32): {experts}; {self.passed_through} other tensors unchanged; "
            f"every module's rank and scaling as PEFT loads the source: {verdict}"
        )


def check_export(
    source: dict[str, Any],
    current: dict[str, tuple[Any, Any]],
    layout: str,
    view: PeftView,
    written: dict[str, Any],
    written_config: dict[str, Any],
    fmt: str,
    names: PerExpertNames | None,
) -> ExportCheck:
    """Every expert's delta from the written tensors against PEFT's `get_delta_weight` of the source (exact in
    float32), every other tensor against the source's, every written module's rank and scaling against PEFT's."""
    import torch

    mismatches: list[str] = []
    max_diff = 0.0
    deltas = 0
    for stack in view.stacks:
        lora_a, lora_b = current[stack.key]
        reference = peft_delta(stack, lora_a, lora_b)  # (E, dim1, dim2)
        if layout == "transposed":
            old = transposed_delta(
                stack, source[stack.key + ".lora_A.weight"], source[stack.key + ".lora_B.weight"]
            )
            if not torch.equal(old, reference):
                mismatches.append(f"{stack.module}.{stack.parameter}: the transposed reading changed the delta")
        for expert in range(stack.experts):
            try:
                if fmt == "per-expert":
                    product = per_expert_product(stack, written, names, expert)  # type: ignore[arg-type]
                else:
                    product = fused_product(stack, written, expert)
            except KeyError as err:
                mismatches.append(f"{stack.module}.{stack.parameter} expert {expert}: {err} is not in the file")
                continue
            expected = reference[expert].t() if stack.transposed_param else reference[expert]
            diff = float((product - expected).abs().max()) if product.shape == expected.shape else math.inf
            max_diff = max(max_diff, diff)
            deltas += 1
            if not torch.equal(product, expected):
                mismatches.append(f"{stack.module}.{stack.parameter} expert {expert}: |diff| {diff:.2e}")
    passed = [key for key in source if not key.startswith(tuple(stack.key + ".lora_" for stack in view.stacks))]
    for key in passed:
        if key not in written or not torch.equal(written[key], source[key]):
            mismatches.append(f"{key} was not passed through unchanged")
    mismatches += _scaling_mismatches(view, written, written_config, names if fmt == "per-expert" else None)
    layers = len({stack.module for stack in view.stacks})
    return ExportCheck(fmt, layout, len(view.stacks), layers, deltas, max_diff, len(passed), mismatches)


def _scaling_mismatches(
    view: PeftView, written: dict[str, Any], config: dict[str, Any], names: PerExpertNames | None
) -> list[str]:
    """Each written module's (rank, scaling) under the written config against what PEFT gave its source module,
    and each rank against its written lora_A (per expert: its rows; fused: its rows over E)."""
    # saved-key prefix -> (name the patterns see, rank, scaling, experts in its lora_A)
    wanted = {key: (_module_name(key), rank, scaling, 1) for key, (rank, scaling) in view.modules.items()}
    for stack in view.stacks:
        if names is None:
            # fused: PEFT and vLLM match patterns against the stack's parameter name, not its wrapper's
            wanted[stack.key] = (f"{stack.module}.{stack.parameter}", stack.rank, stack.scaling, stack.experts)
            continue
        module = per_expert_module(stack, names)
        for expert in range(stack.experts):
            for projection in per_expert_projections(stack, names):
                key = f"{PREFIX}{module}.{expert}.{projection}"
                wanted[key] = (_module_name(key), stack.rank, stack.scaling, 1)
    problems = []
    for key, (name, rank, scaling, experts) in wanted.items():
        got_rank, got_scaling = resolve_rank_scaling(config, name)
        lora_a = written.get(key + ".lora_A.weight")
        rows = None if lora_a is None else lora_a.shape[0] // experts
        if (got_rank, got_scaling) != (rank, scaling) or (rows is not None and rows != rank):
            problems.append(
                f"{name}: rank {got_rank}, scaling {got_scaling:g}, lora_A rank {rows} "
                f"(PEFT: rank {rank}, scaling {scaling:g})"
            )
    return problems


# ------------------------------------------------------------------------------------------------
# Writing


def default_output(adapter_dir: Path, run_dir: Path | None, fmt: str) -> Path:
    """RUN_DIR/export-<format> for a run; a sibling `<adapter>-<format>` for a bare adapter folder."""
    if run_dir is not None and adapter_dir == run_dir / ADAPTER_DIR:
        return run_dir / f"export-{fmt}"
    return adapter_dir.with_name(f"{adapter_dir.name}-{fmt}")


def check_output(output: Path, overwrite: bool, protected: list[Path]) -> None:
    """The export's --output rules (outputs.check_command_output)."""
    from moe_finetune.outputs import check_command_output

    check_command_output(output, overwrite, "export", protected, "export")


def _tokenizer_files(adapter_dir: Path) -> list[Path]:
    from moe_finetune.outputs import TOKENIZER_PATTERNS

    return sorted(
        path for path in adapter_dir.iterdir()
        if path.is_file() and any(pattern.fullmatch(path.name) for pattern in TOKENIZER_PATTERNS)
    )


def serving_lines(fmt: str, family: FamilySpec, base: str, output: Path, max_rank: int, name: str) -> list[str]:
    """How to serve what was written (the engines' own flags; none of them ran here); `name` is what requests
    ask for as their "model"."""
    lines = []
    if fmt == "per-expert":
        lines.append(f"vLLM:   vllm serve {base} --enable-lora --lora-modules {name}={output} --max-lora-rank {max_rank}")
        lines.append(
            f"SGLang: python -m sglang.launch_server --model-path {base} --enable-lora --lora-paths {name}={output} "
            f"--max-lora-rank {max_rank}"
        )
    elif family.name in NATIVE_3D:
        lines.append(f"vLLM:   vllm serve {base} --enable-lora --lora-modules {name}={output} --max-lora-rank {max_rank}")
        lines.append("SGLang: reads expert LoRA per expert only (it drops PEFT's fused keys), which this family has not")
    else:
        module = json.dumps({"name": name, "path": str(output), "is_3d_lora_weight": True})
        lines.append(
            f"vLLM:   vllm serve {base} --enable-lora --enable-mixed-moe-lora-format --lora-modules '{module}' "
            f"--max-lora-rank {max_rank}"
        )
        lines.append("SGLang: needs the per-expert layout (moe-finetune export ... --format per-expert)")
    return lines


def _max_rank(config: dict[str, Any]) -> int:
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


# ------------------------------------------------------------------------------------------------
# The command


@dataclass
class ExportResult:
    output: Path
    format: str
    family: str
    check: ExportCheck
    files: list[str]
    serving: list[str]


def _model_config(source: AdapterSource) -> Any:
    from moe_finetune.models.configs import model_config_for

    local = Path(source.model.name).expanduser()
    return model_config_for(source.model.name, local_path=local if local.exists() else None)


def _base_for_serving(source: AdapterSource) -> str:
    from moe_finetune.models.tiny import is_tiny_name, tiny_model_dir

    return str(tiny_model_dir(source.model.name)) if is_tiny_name(source.model.name) else source.model.name


def export_adapter(
    path: str | Path,
    output: str | Path | None = None,
    *,
    format: str,
    base: str | None = None,
    overwrite: bool = False,
    echo: Echo = print,
) -> ExportResult:
    """Write the adapter of a run (or an adapter folder) in `format` ("per-expert" or "fused") for an engine.

    Exit 2 (RecipeError) for what cannot be expressed or does not fit; ExportCheckError (exit 1) when the
    written adapter would not reproduce the source, and then nothing is written.
    """
    if format not in FORMATS:
        raise RecipeError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    source = resolve_source(path, base)
    adapter_dir = source.adapter_dir
    target = Path(output).expanduser() if output is not None else default_output(adapter_dir, source.run_dir, format)
    protected = [adapter_dir] + ([source.run_dir] if source.run_dir is not None else [])
    check_output(target, overwrite, protected)

    config = read_json_object(adapter_dir / ADAPTER_CONFIG)
    refuse_unservable(config, adapter_dir / ADAPTER_CONFIG)
    model_config = _model_config(source)
    family = family_for_config(model_config)
    names = None
    if format == "per-expert":
        if family.name in NO_PER_EXPERT:
            raise RecipeError(f"--format per-expert: {NO_PER_EXPERT[family.name]}")
        names = PER_EXPERT_NAMES.get(family.name)
        if names is None:
            raise RecipeError(f"--format per-expert: no per-expert names are known for the {family.name} family")

    tensors = read_tensors(adapter_dir)
    already = next((key for key in tensors if _PER_EXPERT_KEY.search(key)), None)
    if already is not None:
        raise RecipeError(
            f"{adapter_dir} is already in the per-expert layout ({already}); export reads the fused adapter `train` "
            "writes (PEFT's target_parameters), and an engine reads this one as it is"
        )
    view = inject_on_meta(model_config, adapter_dir, family)
    unexpected = sorted(set(tensors) - view.expected_keys)
    missing = sorted(view.expected_keys - set(tensors))
    if unexpected or missing:
        what = f"keys PEFT does not expect: {', '.join(unexpected[:3])}" if unexpected else (
            f"keys PEFT expects are missing: {', '.join(missing[:3])}"
        )
        raise RecipeError(f"{adapter_dir}: the adapter does not fit the {family.name} model it names ({what})")
    for stack in view.stacks:
        if format == "per-expert" and (stack.transposed_param or not stack.concatenated):
            raise RecipeError(
                f"--format per-expert: {stack.module} stores gate and up interleaved or transposed, which has no "
                "per-expert form; use --format fused"
            )
    layout = file_layout(view.stacks, tensors, config, adapter_dir)

    current: dict[str, tuple[Any, Any]] = {}
    for stack in view.stacks:
        pair = tensors[stack.key + ".lora_A.weight"], tensors[stack.key + ".lora_B.weight"]
        current[stack.key] = to_current(stack, *pair) if layout == "transposed" else pair

    stack_keys = tuple(stack.key + ".lora_" for stack in view.stacks)
    written: dict[str, Any] = {key: value for key, value in tensors.items() if not key.startswith(stack_keys)}
    if format == "per-expert":
        for stack in view.stacks:
            written.update(split_stack(stack, *current[stack.key], names))  # type: ignore[arg-type]
        others = [_module_name(key) for key in view.modules]
        written_config = per_expert_config(config, view.stacks, names, others)  # type: ignore[arg-type]
    else:
        for stack in view.stacks:
            # vLLM reads a fused file's `experts.base_layer` as gate_up_proj and `experts` as down_proj
            wanted = ".experts.base_layer" if stack.parameter == "gate_up_proj" else ".experts"
            if not stack.key.endswith(wanted):
                raise RecipeError(
                    f"--format fused: PEFT saves {stack.module}.{stack.parameter} as {stack.key.rsplit('.', 1)[-1]}, "
                    f"where vLLM expects `{wanted.lstrip('.')}` (it reads experts.base_layer as gate_up_proj and "
                    "experts as down_proj): an adapter on gate_up_proj alone cannot be served fused; use --format "
                    "per-expert"
                )
            written[stack.key + ".lora_A.weight"], written[stack.key + ".lora_B.weight"] = current[stack.key]
        written_config = fused_config(config)
    written = {key: value.contiguous() for key, value in written.items()}

    base_name = _base_for_serving(source)
    name = (source.run_dir or adapter_dir).name
    serving = serving_lines(format, family, base_name, target, _max_rank(written_config), name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        check = _write_and_check(
            staging, written, written_config, tensors, current, layout, view, format, names, adapter_dir
        )
        echo(check.line())
        if not check.ok:
            raise ExportCheckError(
                f"the exported adapter does not reproduce the source ({check.line()}). Nothing was written. This is "
                "a bug in exporting (please report it with the adapter's adapter_config.json)"
            )
        from moe_finetune.outputs import EXPORT_MARKER, publish
        from moe_finetune.rundir import write_whole

        marker = {
            "adapter": str(adapter_dir.resolve()),
            "base": source.model.name,
            "family": family.name,
            "format": format,
            "source_layout": layout,
            "check": check.line(),
            "serve": serving,
        }
        write_whole(staging / EXPORT_MARKER, json.dumps(marker, indent=2) + "\n")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p.name for p in target.iterdir())
    echo(f"exported adapter written to {target} ({format}, {len(written)} tensors, {len(files)} files); serve it with")
    for line in serving:
        echo(f"  {line}")
    return ExportResult(target, format, family.name, check, files, serving)


def _write_and_check(
    staging: Path,
    written: dict[str, Any],
    written_config: dict[str, Any],
    source: dict[str, Any],
    current: dict[str, tuple[Any, Any]],
    layout: str,
    view: PeftView,
    fmt: str,
    names: PerExpertNames | None,
    adapter_dir: Path,
) -> ExportCheck:
    """Write the folder's files into `staging`, read them back as an engine would, and check them."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from moe_finetune.rundir import write_whole

    save_file(written, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    write_whole(staging / ADAPTER_CONFIG, json.dumps(written_config, indent=2, sort_keys=True) + "\n")
    for path in _tokenizer_files(adapter_dir):
        shutil.copy2(path, staging / path.name)
    LoraConfig.from_pretrained(str(staging))  # PEFT reads the config it will be checked against
    read_back = load_file(str(staging / WEIGHTS_FILE))
    read_config = json.loads((staging / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return check_export(source, current, layout, view, read_back, read_config, fmt, names)
