"""From a trained adapter to a model people can serve: load the base, apply the adapter, merge, check, write.

`moe-finetune merge RUN_DIR_OR_ADAPTER` writes an ordinary `save_pretrained` folder (sharded safetensors,
config, generation config, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without PEFT, so
vLLM, TGI or plain transformers can serve it.

Memory stays near one copy of the model plus one layer. What PEFT's `merge_and_unload` does (peft 0.21,
`tuners/lora/layer.py`): attention LoRA (`lora.Linear.merge`) adds `s·B·A` into the weight in place, one module
at a time; an expert LoRA on a fused stack (`ParamWrapper.merge`, from `target_parameters`) builds that stack's
delta with an einsum (E x out x in), scales it out of place and adds it: two stacks' worth of extra memory per
parameter. Here the stacks are folded in place first (`fold_expert_lora`: one `baddbmm_` with PEFT's own
factors, as its forward folds them), so PEFT only unwraps them. A trained router (`lora.router: true`) is a
`modules_to_save` copy: unloading puts the trained copy in the router's place. The save restores the
checkpoint's own weight layout one shard at a time (`_save_weights_shard_by_shard`). Measured by
benchmarks/merge_memory.py (README "Serve it").

Two facts decide what is loaded:
- The base is always loaded unquantized. An adapter trained on a 4-bit base (`model.quantization`) is merged
  into the full-precision weights, never into quantized ones (a delta added to NF4 blocks would be rounded
  away, and quantized weights are not a checkpoint other tools load); the output says so.
- Both expert LoRA kernels (`lora.expert_kernel: peft | fast`) save PEFT's own adapter format, so the
  reference here is PEFT's path whichever kernel trained it (models/experts.py is tested equal to it). PEFT's
  path builds one layer's `W + s·B·A` stacks at a time during the probe: that is the "one layer". (The fast
  kernel, tried as the reference, peaked higher on the CPU in bf16: 1.39x against 1.18x of what loading costs.)

Before anything is written, the merged model must reproduce the adapted one on a probe batch: logits within
the dtype's tolerance and the same top-k experts in every MoE layer (a flip is excused only at a near-tie
that the two models' rounding can explain). A mismatch raises MergeCheckError (exit 1) with the numbers.
The folder is written under a temporary sibling name and renamed into place: never a half-written output.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe_finetune.errors import MergeCheckError, RecipeError
from moe_finetune.models.families import FamilySpec, family_for_model, find_routers
from moe_finetune.models.loading import from_pretrained_kwargs, is_unreadable_model_error, resolve_model_path
from moe_finetune.models.tiny import is_tiny_name
from moe_finetune.routing.capture import read_router_output
from moe_finetune.rundir import ADAPTER_DIR, RESOLVED_RECIPE_FILE, adapter_problem, checkpoint_steps
from moe_finetune.sections import LoraSection, ModelSection
from moe_finetune.yamlread import read_yaml

Echo = Callable[[str], None]

DTYPES = ("auto", "bfloat16", "float16", "float32")
MERGED_DIR = "merged"  # the default output inside a run directory
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Saving holds one shard's reverted weights (and safetensors' buffer) at a time, so the shard size is the memory
# the save adds: 2 GB stays under one MoE layer of Mixtral 8x7B (2.8 GB in bf16). Every serving stack reads
# sharded folders with an index.
DEFAULT_SHARD_SIZE = "2GB"

# Largest |merged - adapted| logit allowed, as a fraction of max(1, the adapted model's largest |logit|) on the
# probe. The two compute the same function in a different rounding order (W·x + s·B·A·x against (W + s·B·A)·x),
# so in 16 bits they differ by the dtype's own noise. Measured on the seven tiny families (2 MoE layers, LoRA r 4
# with B ~ N(0, 0.05), trained routers; logit scale ~0.7): merged - adapted up to 4.1e-2 in bfloat16 and 3.1e-3
# in float16, while the adapted model itself differs from its float32 self by up to 2.9e-2 and 2.7e-3 (the
# merged one by as much: 2.1e-2, 3.2e-3), and 1.4e-6 in float32. The limits are 32 units of rounding of each
# 16-bit type (2^-8 for bfloat16, 2^-11 for float16), three to five times the worst measured, for deeper models.
LOGIT_TOLERANCE = {"float32": 1e-4, "float16": 32 * 2.0**-11, "bfloat16": 32 * 2.0**-8}

# Probe texts: short, of different kinds, so the probe's tokens reach many experts.
PROBE_TEXTS = (
    "What is 12 plus 30? The answer is 42.",
    "Write a Python function that returns the square of x.\ndef square(x):\n    return x * x",
    "Translate 'water' into French, then into German: eau, Wasser.",
    "Sort the numbers 5, 2, 9, 14, 3 in ascending order and explain each step briefly.",
)


# ------------------------------------------------------------------------------------------------
# What to merge: the adapter, the base it names, and what the recipe said about them


@dataclass
class AdapterSource:
    """An adapter folder, the base model it goes onto, and the run's recipe sections when there is one."""

    adapter_dir: Path
    run_dir: Path | None
    model: ModelSection  # how the base is loaded here: always unquantized
    base_from: str  # where the base's name came from, for messages
    lora: LoraSection | None
    trained_quantized: dict[str, Any] | None  # the recipe's `model.quantization`, when it had one


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def find_adapter(path: str | Path) -> tuple[Path, Path | None]:
    """(adapter folder, run directory or None) for a run directory or an adapter folder; exit 2 otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RecipeError(f"{path} does not exist: give a run directory (with adapter/) or an adapter folder")
    if not path.is_dir():
        raise RecipeError(f"{path} is a file: give a run directory (with adapter/) or an adapter folder")
    if _is_adapter_dir(path / ADAPTER_DIR):
        return path / ADAPTER_DIR, path
    if _is_adapter_dir(path):
        run_dir = path.parent if (path.parent / RESOLVED_RECIPE_FILE).is_file() else None
        return path, run_dir
    checkpoints = [
        f"checkpoint-{step}"
        for step in checkpoint_steps(path, complete_only=False)
        if _is_adapter_dir(path / f"checkpoint-{step}")
    ]
    hint = (
        f"; its checkpoints hold adapters ({', '.join(checkpoints[-3:])}): pass one of them"
        if checkpoints
        else " (a run writes adapter/ only when it finishes)"
    )
    raise RecipeError(
        f"{path} has no adapter: neither {path / ADAPTER_DIR / ADAPTER_CONFIG} nor {path / ADAPTER_CONFIG}{hint}"
    )


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or exit 2 naming the file (unreadable, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RecipeError(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} is not a JSON object")
    return data


def _read_recipe_sections(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw `model:` and `lora:` sections of a run's resolved recipe (the other sections are not needed
    here, and validating them would import the trainer)."""
    path = run_dir / RESOLVED_RECIPE_FILE
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, RecursionError, ValueError) as err:
        raise RecipeError(f"{path} cannot be read ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise RecipeError(f"{path} has no model: section")
    return data["model"], data.get("lora") or {}


def resolve_source(path: str | Path, base: str | None = None, dtype: str = "auto") -> AdapterSource:
    """Which adapter, onto which base, loaded how. `base` (--base) wins; then the run's recipe for a tiny
    model (rebuilt locally, the same every time); then the adapter's `base_model_name_or_path` when that
    exists here (PEFT records the path the run really loaded); then the recipe's `model.name` (a hub id)."""
    if dtype not in DTYPES:
        raise RecipeError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    adapter_dir, run_dir = find_adapter(path)
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise RecipeError(
            f"{adapter_dir} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})"
        )
    problem = adapter_problem(adapter_dir)
    if problem is not None:
        steps = checkpoint_steps(run_dir) if run_dir is not None else []
        whole = f"; the run's newest whole checkpoint is {run_dir / f'checkpoint-{steps[-1]}'}" if steps else ""
        raise RecipeError(f"{adapter_dir} is not a whole adapter: {problem} (a write cut short){whole}")
    config = read_json_object(adapter_dir / ADAPTER_CONFIG)
    named = config.get("base_model_name_or_path") or None
    raw_model, raw_lora = _read_recipe_sections(run_dir) if run_dir is not None else ({}, {})
    recipe_name = raw_model.get("name")

    if base:
        name, base_from = base, "--base"
    elif recipe_name and is_tiny_name(recipe_name):
        name, base_from = recipe_name, f"{run_dir / RESOLVED_RECIPE_FILE} model.name"
    elif named and (is_tiny_name(named) or Path(named).expanduser().exists()):
        name, base_from = named, f"{adapter_dir / ADAPTER_CONFIG} base_model_name_or_path"
    elif recipe_name:
        name, base_from = recipe_name, f"{run_dir / RESOLVED_RECIPE_FILE} model.name"
    elif named:
        name, base_from = named, f"{adapter_dir / ADAPTER_CONFIG} base_model_name_or_path"
    else:
        raise RecipeError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base model (base_model_name_or_path): pass --base"
        )

    same_as_recipe = name == recipe_name
    settings = {
        "name": name,
        "dtype": dtype,
        "trust_remote_code": bool(raw_model.get("trust_remote_code", False)),
        "revision": raw_model.get("revision") if same_as_recipe else None,
        "attn_implementation": raw_model.get("attn_implementation"),
        "quantization": None,  # never merged into quantized weights
    }
    try:
        model = ModelSection.model_validate(settings)
        lora = LoraSection.model_validate(raw_lora) if run_dir is not None else None
    except ValueError as err:
        raise RecipeError(f"{run_dir / RESOLVED_RECIPE_FILE}: {err}") from None
    quantized = raw_model.get("quantization")
    return AdapterSource(
        adapter_dir=adapter_dir,
        run_dir=run_dir,
        model=model,
        base_from=base_from,
        lora=lora,
        trained_quantized=quantized if isinstance(quantized, dict) else None,
    )


def quantization_note(source: AdapterSource, dtype_name: str) -> str | None:
    """The sentence that says an adapter trained on a quantized base goes into the full-precision weights."""
    q = source.trained_quantized
    if q is None:
        return None
    bits = q.get("bits", 4)
    return (
        f"note: the run trained on a {bits}-bit base (model.quantization); its adapter is merged into the "
        f"unquantized {dtype_name} base weights, never into quantized ones. The merged model therefore answers "
        f"like the adapter on the full-precision base, which differs from the {bits}-bit training model by "
        "the quantization error"
    )


# ------------------------------------------------------------------------------------------------
# Loading


def load_base(source: AdapterSource) -> tuple[Any, Any]:
    """The base model (unquantized, on the CPU) and the tokenizer (the adapter's own when it has one: the
    run saved the tokenizer it trained with, pad token and chat template included)."""
    import transformers

    local = Path(source.model.name).expanduser()
    try:
        path, _ = resolve_model_path(source.model, local if local.exists() else None)
    except RecipeError as err:  # no such folder, an unreachable hub: said with where the name came from
        raise RecipeError(
            f"cannot load the base model {source.model.name!r} (named by {source.base_from}): "
            f"{str(err).removeprefix('model.name: ')}. Pass --base with the model the adapter was trained on"
        ) from None
    kwargs = from_pretrained_kwargs(source.model)
    tokenizer_from = (
        str(source.adapter_dir) if (source.adapter_dir / "tokenizer_config.json").is_file() else path
    )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            tokenizer_from, trust_remote_code=source.model.trust_remote_code
        )
    except Exception as err:
        if not is_unreadable_model_error(err):
            raise  # a bug: reported as one (exit 1)
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise RecipeError(
            f"cannot load the base model {source.model.name!r} (named by {source.base_from}): {first_line}. "
            "Pass --base with the model the adapter was trained on"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _adapter_mismatch(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, (RuntimeError, ValueError, KeyError)) and any(
        fragment in text
        for fragment in (
            "size mismatch",
            "not found in the base model",
            "Target modules",
            "Target parameters",
        )
    )


def apply_adapter(base: Any, source: AdapterSource) -> Any:
    """The PeftModel of `base` with the adapter (PEFT's own path for the experts); exit 2 if it does not fit."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(source.adapter_dir))
    except Exception as err:
        if not _adapter_mismatch(err):
            raise
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise RecipeError(
            f"the adapter {source.adapter_dir} does not fit the base {source.model.name!r} (named by "
            f"{source.base_from}): {first_line}. Pass --base with the model it was trained on"
        ) from None
    model.eval()
    return model


def fold_expert_lora(model: Any) -> int:
    """Merge each expert LoRA into its fused stack in place, `W += s·lhs·rhs` with one `baddbmm_`; returns how
    many stacks were folded.

    PEFT's own `ParamWrapper.merge` builds the delta with an einsum and scales it out of place: two stacks'
    worth of memory (E x out x in) per parameter on top of the model. PEFT's `get_delta_factors` gives the
    factors in the parameter's own layout, and its forward folds them exactly this way (`_LoraFactorsProxy`),
    so the merged stack is what the adapted model computes with, at no extra memory. The wrapper then counts as
    merged, and `merge_and_unload` only unwraps it. Stacks PEFT's forward does not fold (several adapters, a
    single expert, 8-bit floats) are left to PEFT's merge.
    """
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    folded = 0
    for module in model.modules():
        if not isinstance(module, ParamWrapper) or module.merged or module.disable_adapters:
            continue
        adapters = [name for name in module.active_adapters if name in module.lora_A]
        param = module.get_param()
        if len(adapters) != 1 or module.num_experts == 1:
            continue
        if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            continue
        lhs, rhs, scaling = module.get_delta_factors(adapters[0])
        with torch.no_grad():
            param.data.baddbmm_(lhs, rhs, alpha=scaling)
        module.merged_adapters.append(adapters[0])
        folded += 1
    return folded


def merge_and_unload(model: Any) -> Any:
    """The plain transformers model with every adapter merged in (expert stacks folded in place first)."""
    import warnings

    fold_expert_lora(model)
    with warnings.catch_warnings():
        # PEFT says so for each wrapper folded above; it is what we want
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        return model.merge_and_unload()


# ------------------------------------------------------------------------------------------------
# The check: the merged model must reproduce the adapted one on a probe batch


def probe_batch(tokenizer: Any) -> dict[str, Any]:
    """A small padded batch of fixed texts (right padding: real tokens first; the tokenizer, which is saved
    with the merged model, keeps its own padding side)."""
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "right"
        return dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = side


@dataclass
class ProbeOutput:
    """What one model did on the probe batch: its logits and each MoE layer's router output, per position."""

    logits: Any  # (B, T, V) float32
    router_logits: list[Any]  # per MoE layer, (B, T, E) float32
    chosen: list[Any]  # per MoE layer, (B, T, k): the router's own top-k indices
    lengths: list[int]  # real tokens of each row (right padding)
    layer_names: list[str]


@contextmanager
def _recording_routers(model: Any, family: FamilySpec) -> Iterator[dict[int, tuple[Any, Any]]]:
    """Hooks on every router that keep its last (logits, chosen), read as the routing capture reads them."""
    _, modules = find_routers(model, family)
    seen: dict[int, tuple[Any, Any]] = {}
    handles = []

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            logits, chosen = read_router_output(output, family)
            seen[layer] = (logits.detach().float(), chosen)

        return hook

    for layer, layer_modules in enumerate(modules):
        for module in layer_modules:
            handles.append(module.register_forward_hook(hook_for(layer)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def run_probe(model: Any, batch: dict[str, Any]) -> ProbeOutput:
    """One forward of the probe batch, with every router's output kept."""
    import torch

    family = family_for_model(model)
    names, _ = find_routers(model, family)
    rows, length = batch["input_ids"].shape
    with torch.no_grad(), _recording_routers(model, family) as seen:
        logits = model(**batch).logits
    missing = [names[i] for i in range(len(names)) if i not in seen]
    if missing:
        raise MergeCheckError(
            f"the probe forward did not run the routers {missing}: routing cannot be compared"
        )
    return ProbeOutput(
        logits=logits.float(),
        router_logits=[seen[i][0].reshape(rows, length, -1) for i in range(len(names))],
        chosen=[seen[i][1].reshape(rows, length, -1) for i in range(len(names))],
        lengths=[int(n) for n in batch["attention_mask"].sum(dim=1)],
        layer_names=names,
    )


@dataclass
class MergeCheck:
    """How closely the merged model reproduces the adapted one on the probe."""

    dtype: str
    tokens: int  # real probe tokens
    compared: int  # tokens whose logits were compared (before any near-tie flip in their row)
    max_logit_diff: float
    logit_scale: float
    tolerance: float  # relative to max(logit_scale, 1)
    layers: int
    top_k: int
    near_ties: int  # rows whose routing flipped at a near-tie that rounding explains
    unexplained: list[str]  # routing changes rounding cannot explain, with their numbers
    adapter_effect: float | None = None  # max |adapted - base| logit: what the check has to tell apart

    @property
    def limit(self) -> float:
        return self.tolerance * max(self.logit_scale, 1.0)

    @property
    def logits_ok(self) -> bool:
        return self.compared > 0 and self.max_logit_diff <= self.limit

    @property
    def routing_ok(self) -> bool:
        return not self.unexplained

    @property
    def ok(self) -> bool:
        return self.logits_ok and self.routing_ok

    def line(self) -> str:
        left_out = (
            f"; {self.near_ties} row(s) compared only up to a near-tie routing flip ({self.tokens - self.compared} "
            "tokens after it left out)"
            if self.near_ties
            else ""
        )
        routing = (
            f"same top-{self.top_k} experts in all {self.layers} MoE layers"
            if not self.unexplained
            else f"{len(self.unexplained)} row(s) routed to other experts MISMATCH"
        )
        effect = (
            f"; the adapter itself moves them by up to {self.adapter_effect:.2e}"
            if self.adapter_effect
            else ""
        )
        return (
            f"merge check on {self.tokens} probe tokens ({self.dtype}): logits max |merged - adapted| "
            f"{self.max_logit_diff:.2e} (limit {self.limit:.2e}{effect}) {'ok' if self.logits_ok else 'MISMATCH'}; "
            f"routing: {routing}{left_out}"
        )


def _first_flip(adapted: ProbeOutput, merged: ProbeOutput, row: int) -> tuple[int, int] | None:
    """(position, layer) of the first routing change in a row, in execution order: an earlier position
    first (causal attention: later positions see it), then an earlier layer."""
    length = adapted.lengths[row]
    first: tuple[int, int] | None = None
    for layer in range(len(adapted.layer_names)):
        a_sets = adapted.chosen[layer][row, :length].sort(dim=-1).values
        m_sets = merged.chosen[layer][row, :length].sort(dim=-1).values
        changed = (a_sets != m_sets).any(dim=-1).nonzero().flatten()
        if changed.numel() and (first is None or int(changed[0]) < first[0]):
            first = (int(changed[0]), layer)
    return first


def compare_probes(
    adapted: ProbeOutput, merged: ProbeOutput, dtype: str, base: ProbeOutput | None = None
) -> MergeCheck:
    """Logits and routing of the merged model against the adapted one.

    The two compute the same function in a different rounding order, so a router whose top-k choice is nearly
    tied may pick differently, and that token then takes another expert, which changes it and (through
    attention) every later token of its row. So each row is compared up to its first routing change (in
    execution order), which must be one rounding explains: that token's router logits moved by no more than
    the dtype's tolerance and, where the router chose its top-k logits, its k-th and (k+1)-th logits were
    within twice that move. Any other change is a mismatch; logits must agree within the tolerance on the
    compared tokens. `base` (the adapter switched off) gives the adapter's own effect on the logits, to weigh
    the difference against.
    """
    tolerance = LOGIT_TOLERANCE.get(dtype, LOGIT_TOLERANCE["float32"])
    top_k = int(adapted.chosen[0].shape[-1]) if adapted.chosen else 0
    compared, near_ties, max_diff, scale = 0, 0, 0.0, 0.0
    unexplained: list[str] = []
    for row, length in enumerate(adapted.lengths):
        upto = length
        flip = _first_flip(adapted, merged, row)
        if flip is not None:
            position, layer = flip
            logits_a = adapted.router_logits[layer][row, position]
            noise = float((merged.router_logits[layer][row, position] - logits_a).abs().max())
            ordered, order = logits_a.sort(descending=True)
            gap = float(ordered[top_k - 1] - ordered[top_k]) if ordered.numel() > top_k else float("inf")
            # Where the router chose its top-k logits, two logits that each moved by `noise` can only trade
            # places if their gap is below 2 x noise. A router that chooses otherwise (DeepSeek-V3's bias and
            # expert groups) has no such gap to read: there the small change of its logits is the test.
            a_set = sorted(adapted.chosen[layer][row, position].tolist())
            by_logits = sorted(order[:top_k].tolist()) == a_set
            layer_scale = max(float(adapted.router_logits[layer][row, :length].abs().max()), 1.0)
            if (gap <= 2 * noise or not by_logits) and noise <= tolerance * layer_scale:
                near_ties += 1
                upto = position
            else:
                m_set = sorted(merged.chosen[layer][row, position].tolist())
                unexplained.append(
                    f"{adapted.layer_names[layer]}, probe row {row} token {position}: adapted experts {a_set}, "
                    f"merged {m_set}; the router's top-{top_k} gap {gap:.3g}, its logits moved by up to {noise:.3g}"
                )
                upto = position
        if upto:
            a = adapted.logits[row, :upto]
            max_diff = max(max_diff, float((merged.logits[row, :upto] - a).abs().max()))
            scale = max(scale, float(a.abs().max()))
        compared += upto
    return MergeCheck(
        dtype=dtype,
        tokens=sum(adapted.lengths),
        compared=compared,
        max_logit_diff=max_diff,
        logit_scale=scale,
        tolerance=tolerance,
        layers=len(adapted.layer_names),
        top_k=top_k,
        near_ties=near_ties,
        unexplained=unexplained,
        adapter_effect=None if base is None else _max_real_diff(adapted, base),
    )


def _max_real_diff(first: ProbeOutput, second: ProbeOutput) -> float:
    """Largest |logit| difference over the real (unpadded) tokens."""
    diffs = [
        float((first.logits[row, :n] - second.logits[row, :n]).abs().max())
        for row, n in enumerate(first.lengths)
        if n
    ]
    return max(diffs, default=0.0)


# ------------------------------------------------------------------------------------------------
# Writing


def default_output(adapter_dir: Path, run_dir: Path | None) -> Path:
    """RUN_DIR/merged for a run; a sibling `<adapter>-merged` for a bare adapter folder."""
    if run_dir is not None and adapter_dir == run_dir / ADAPTER_DIR:
        return run_dir / MERGED_DIR
    return adapter_dir.with_name(adapter_dir.name + "-merged")


def check_output(output: Path, overwrite: bool, protected: list[Path]) -> None:
    """The merge's --output rules (outputs.check_command_output)."""
    from moe_finetune.outputs import check_command_output

    check_command_output(output, overwrite, "merge", protected, "merge")


def _save_weights_shard_by_shard(model: Any, folder: Path, max_shard_size: str | int) -> None:
    """`save_pretrained`, with the checkpoint's original weight layout restored one shard at a time.

    A model loaded from a checkpoint in another layout (Mixtral's per-expert `w1/w2/w3`, fused on load by
    transformers 5) is written back in that layout, the one vLLM, TGI and older transformers read. transformers
    reverts the whole state dict at once, which copies every fused gate_up stack (+0.62x the model's bytes in
    benchmarks/merge_memory.py), except for a model it sees as offloaded to the CPU (`hf_device_map`), which it
    reverts shard by shard (modeling_utils.save_pretrained, `is_offloaded`). Every weight here is on the CPU, so
    the model is marked that way for the save. A conversion whose weights would straddle two shards fails there
    (transformers raises a RuntimeError saying so): then the folder is written the whole-state-dict way.
    """
    import warnings

    had_map = hasattr(model, "hf_device_map")
    previous = getattr(model, "hf_device_map", None)
    try:
        model.hf_device_map = {"": "cpu"}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            model.save_pretrained(folder, max_shard_size=max_shard_size)
    except RuntimeError as err:
        if "revert some weight conversions" not in str(err):
            raise
        for stale in folder.glob("model*.safetensors*"):
            stale.unlink()
        del model.hf_device_map
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        if had_map:
            model.hf_device_map = previous
        elif hasattr(model, "hf_device_map"):
            del model.hf_device_map


def save_merged(
    model: Any, tokenizer: Any, output: Path, max_shard_size: str | int, provenance: dict[str, Any]
) -> None:
    """save_pretrained into a temporary sibling, then renamed into place (removed if anything fails).
    `provenance` (what was merged onto what) goes into the folder's marker, which also tells a later
    `merge --overwrite` that the folder is one it may replace."""
    from moe_finetune.outputs import MERGE_MARKER, publish
    from moe_finetune.rundir import write_whole

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        # Training keeps the cache off (packed sequences stay separate only without it); a served model wants it.
        model.config.use_cache = True
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.use_cache = True
        _save_weights_shard_by_shard(model, staging, max_shard_size)
        tokenizer.save_pretrained(staging)
        write_whole(staging / MERGE_MARKER, json.dumps(provenance, indent=2) + "\n")
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# The command


@dataclass
class MergeResult:
    output: Path
    base: str
    dtype: str
    check: MergeCheck
    parameters: int
    files: list[str]


def dtype_name(model: Any) -> str:
    return str(model.dtype).removeprefix("torch.")


def shard_bytes(max_shard_size: str | int) -> int:
    """`--max-shard-size` as bytes (e.g. 2GB, 500MB, or a number of bytes), or exit 2 naming it."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = 0
    if not isinstance(size, int) or size <= 0:
        raise RecipeError(f"--max-shard-size: {max_shard_size!r} is not a size (e.g. 2GB, 500MB, or bytes)")
    return size


def merge_adapter(
    path: str | Path,
    output: str | Path | None = None,
    *,
    dtype: str = "auto",
    base: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    echo: Echo = print,
) -> MergeResult:
    """Merge the adapter of a run (or an adapter folder) into its base and write a plain transformers model.

    Fails fast (exit 2) on a missing adapter, an unreadable base, or a non-empty output without
    `overwrite`; raises MergeCheckError (exit 1) when the merged model does not reproduce the adapted one.
    """
    source = resolve_source(path, base, dtype)
    target = (
        Path(output).expanduser()
        if output is not None
        else default_output(source.adapter_dir, source.run_dir)
    )
    protected = [source.adapter_dir] + ([source.run_dir] if source.run_dir is not None else [])
    local_base = Path(source.model.name).expanduser()
    if local_base.exists():  # --overwrite must never replace the base it reads
        protected.append(local_base)
    check_output(target, overwrite, protected)
    shard_bytes(max_shard_size)  # a bad size is the user's to fix (exit 2), before anything loads

    base_model, tokenizer = load_base(source)
    merged_dtype = dtype_name(base_model)
    echo(
        f"merge: adapter {source.adapter_dir} onto {source.model.name} ({merged_dtype}; base named by {source.base_from})"
    )
    note = quantization_note(source, merged_dtype)
    if note:
        echo(note)
    model = apply_adapter(base_model, source)
    batch = probe_batch(tokenizer)
    adapted = run_probe(model, batch)
    with model.disable_adapter():
        without = run_probe(model, batch)
    merged = merge_and_unload(model)
    after = run_probe(merged, batch)
    check = compare_probes(adapted, after, merged_dtype, base=without)
    echo(check.line())
    if not check.ok:
        where = (
            f" Routing changes rounding cannot explain: {'; '.join(check.unexplained[:3])}."
            if check.unexplained
            else ""
        )
        raise MergeCheckError(
            f"the merged model does not reproduce the adapted one ({check.line()}).{where} Nothing was written. "
            "This is a bug in merging (please report it with the adapter's adapter_config.json)"
        )
    provenance = {
        "adapter": str(source.adapter_dir.resolve()),
        "base": source.model.name,
        "dtype": merged_dtype,
        "check": check.line(),
    }
    save_merged(merged, tokenizer, target, max_shard_size, provenance)
    files = sorted(p.name for p in target.iterdir())
    parameters = sum(p.numel() for p in merged.parameters())
    echo(f"merged model written to {target} ({parameters:,} parameters, {merged_dtype}, {len(files)} files)")
    return MergeResult(
        output=target,
        base=source.model.name,
        dtype=merged_dtype,
        check=check,
        parameters=parameters,
        files=files,
    )
