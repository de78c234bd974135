"""`moe-finetune profile`: how the recipe's data is routed by the base model, before any training.

The base model (no adapter, eval mode, no gradients) reads a sample of the recipe's training data
(`--samples` real tokens, default 8,192, in batches of the recipe's batch size) with the capture hooks on
(routing/capture.py), and per MoE layer reports both entropies the guard watches (per-token routing entropy
and the balance of the load), the load share, and each expert's affinity to this data in ESFT's two scores
(routing/affinity.py): the average gate score and the token-selection ratio, which is the load share.
Written as a table on the terminal, `profile.json` and `profile.png` (a layer x expert heatmap per score,
the experts `lora.experts: auto` would adapt outlined).

`lora.experts: auto` runs the same measurement inside `train` (`choose_experts`), on the model it is about
to adapt, and replaces `auto` by the explicit {layer: [experts]} it chose, which `recipe.resolved.yaml`
then records: the run can be repeated without profiling again.

Only the backbone runs (the decoder stack that holds the routers): the LM head's B x T x vocab logits are
never computed, and the routers see exactly what they see in training. The rows of each batch are the
recipe's examples as the trainer would read them (text; prompt + completion; a chat through the tokenizer's
template), cut at `training.max_length`, the last one cut so the sample is exactly `--samples` tokens.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_finetune.data import LoadedData, load_data, row_token_ids
from moe_finetune.errors import DataError, OutputDirError, RecipeError
from moe_finetune.models.families import FamilySpec, find_routers, unwrap_model
from moe_finetune.models.lora import layer_number
from moe_finetune.models.tokens import pad_batch, padding_id
from moe_finetune.recipe import Recipe
from moe_finetune.routing.affinity import gate_score, select_experts, token_ratio
from moe_finetune.routing.capture import RoutingCapture, find_backbone, read_router_output, routing_scores
from moe_finetune.rundir import write_whole

DEFAULT_SAMPLES = 8192
PROFILE_FILE = "profile.json"
HEATMAP_FILE = "profile.png"

Echo = Callable[[str], None]


@dataclass
class LayerProfile:
    """One MoE layer's routing of the sample. `load_share` is ESFT's token-selection ratio."""

    name: str
    layer: int  # decoder-layer number: the key of lora.experts {layer: [experts]}
    tokens: int
    entropy: float  # mean per-token routing entropy / ln E (routing/entropy)
    balance: float  # entropy of the load share / ln E (routing/balance)
    load_share: list[float]  # (E,) share of the top-k assignments, sums to 1
    gate_score: list[float]  # (E,) ESFT average gate score: mean over tokens of the chosen experts' scores


@dataclass
class RoutingProfile:
    """The routing of a data sample on a base model, per MoE layer."""

    model: str
    family: str
    num_experts: int
    top_k: int
    tokens: int
    examples: int
    layers: list[LayerProfile] = field(default_factory=list)

    def scores(self, score: str) -> list[list[float]]:
        """(L, E) the affinity `lora.experts_score` ranks by: "gate" or "token"."""
        if score == "gate":
            return [layer.gate_score for layer in self.layers]
        if score == "token":
            return [layer.load_share for layer in self.layers]
        raise ValueError(f"score must be 'gate' or 'token', got {score!r}")

    def selection(self, score: str, top_p: float) -> dict[int, list[int]]:
        """Per decoder layer, the fewest experts whose share of `score` reaches `top_p` (ESFT)."""
        chosen = select_experts(self.scores(score), top_p)
        return {layer.layer: experts for layer, experts in zip(self.layers, chosen, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# The sample: the recipe's rows as text, tokenized, batched


def sample_token_ids(data: LoadedData, tokenizer: Any, samples: int, max_length: int | None) -> list[list[int]]:
    """Token ids of the first training rows, each cut at `max_length`, until `samples` tokens in all
    (the last row cut to fit). Fewer when the data runs out."""
    rows: list[list[int]] = []
    total = 0
    for row in data.train:
        ids = row_token_ids(row, data.schema, tokenizer)
        if max_length:
            ids = ids[:max_length]
        ids = ids[: samples - total]
        if ids:
            rows.append(ids)
            total += len(ids)
        if total >= samples:
            break
    return rows


def batches(rows: list[list[int]], batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Right-padded (input_ids, attention_mask) batches; the capture counts only the mask's real rows."""
    for start in range(0, len(rows), batch_size):
        input_ids, mask = pad_batch(rows[start : start + batch_size], pad_id)
        yield {"input_ids": input_ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------
# The measurement


class _GateSums:
    """Forward hooks adding, per layer, the sum over real tokens of the routing score of each CHOSEN expert
    (ESFT's gate score needs the scores at the router's own top-k, which the capture's sums do not keep).
    Each layer's sum stays on its router's device, so the hooks never wait for the host (as the capture's)."""

    def __init__(self, model: Any, family: FamilySpec) -> None:
        self.family = family
        self.names, modules = find_routers(model, family)
        self._sums: list[torch.Tensor | None] = [None] * len(self.names)
        self.keep: torch.Tensor | None = None  # (B*T,) bool of the batch in flight, set by the caller
        self._handles = [
            module.register_forward_hook(self._hook(layer)) for layer, group in enumerate(modules) for module in group
        ]

    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            logits, chosen = read_router_output(output, self.family)
            scores = routing_scores(logits.detach().float(), self.family.scores)  # (N, E)
            chosen = chosen.long()
            mass = torch.zeros_like(scores).scatter_(1, chosen, scores.gather(1, chosen))  # (N, E)
            keep = self.keep
            if keep is not None and keep.numel() == mass.shape[0]:
                mass = torch.where(keep.to(mass.device).unsqueeze(-1), mass, 0.0)
            total = mass.sum(0).to(torch.float32 if mass.device.type == "mps" else torch.float64)
            previous = self._sums[layer]
            self._sums[layer] = total if previous is None else previous + total

        return hook

    def totals(self, num_experts: int) -> list[list[float]]:
        """(L, E) the sums as Python numbers (one transfer per layer, at the end)."""
        return [[0.0] * num_experts if part is None else part.cpu().tolist() for part in self._sums]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _device_of(model: Any) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def measure_profile(
    model: Any,
    family: FamilySpec,
    rows: list[list[int]],
    *,
    batch_size: int,
    pad_id: int,
    model_name: str = "",
    echo: Echo | None = None,
) -> RoutingProfile:
    """Route `rows` (token ids) through `model`'s backbone without gradients and profile every MoE layer.

    The model is put in eval mode for the measurement and given back in the mode it came in.
    """
    if not rows:
        raise DataError("profile: the training data gave no tokens to route")
    capture = RoutingCapture(model)
    gates = _GateSums(model, family)
    backbone = find_backbone(model)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total, done = sum(len(ids) for ids in rows), 0
    count = math.ceil(len(rows) / batch_size)
    every = 1 if echo is not None and getattr(echo, "in_place", False) else max(1, count // 10)
    try:
        with torch.no_grad():
            for number, batch in enumerate(batches(rows, batch_size, pad_id), start=1):
                gates.keep = batch["attention_mask"].reshape(-1).bool()
                backbone(**{key: value.to(device) for key, value in batch.items()})
                done += int(batch["attention_mask"].sum())
                if echo is not None and (number % every == 0 or number == count):
                    echo(f"profile: {done:,}/{total:,} tokens routed (batch {number}/{count})")
    finally:
        capture.remove()
        gates.remove()
        model.train(was_training)
    metrics = capture.stats()
    sums = capture.sums
    counts = sums.assign_counts.double().cpu().tolist()
    tokens = sums.tokens.double().cpu().tolist()
    gate_sums = gates.totals(capture.num_experts)
    layers = []
    for index, name in enumerate(capture.layer_names):
        layers.append(
            LayerProfile(
                name=name,
                layer=layer_number(name) if layer_number(name) is not None else index,
                tokens=int(tokens[index]),
                entropy=metrics.layer_entropy[index],
                balance=metrics.layer_balance[index],
                load_share=token_ratio(counts[index], tokens[index], capture.top_k),
                gate_score=gate_score(gate_sums[index], tokens[index]),
            )
        )
    return RoutingProfile(
        model=model_name,
        family=family.name,
        num_experts=capture.num_experts,
        top_k=capture.top_k,
        tokens=total,
        examples=len(rows),
        layers=layers,
    )


def place_like_trainer(model: Any, recipe: Recipe) -> None:
    """On the GPU when there is one, as the Trainer places a single-device model (on the process's current
    device, which accelerate sets per rank); a model spread by device_map, or quantized (bitsandbytes
    placed it while loading), stays where it is."""
    spread = getattr(unwrap_model(model), "hf_device_map", None) is not None
    if torch.cuda.is_available() and not spread and recipe.model.quantization is None:
        model.to(torch.device("cuda", torch.cuda.current_device()))


def profile_loaded(
    recipe: Recipe, model: Any, tokenizer: Any, family: FamilySpec, data: LoadedData, *, samples: int, echo: Echo
) -> RoutingProfile:
    """The profile of the recipe's data on a model already loaded (what `train` has before apply_lora)."""
    place_like_trainer(model, recipe)
    args = recipe.training_args()
    rows = sample_token_ids(data, tokenizer, samples, args.get("max_length"))
    return measure_profile(
        model,
        family,
        rows,
        batch_size=int(args.get("per_device_train_batch_size", 8)),
        pad_id=padding_id(tokenizer),
        model_name=recipe.model.name,
        echo=_progress(echo),
    )


def choose_experts(
    recipe: Recipe, model: Any, tokenizer: Any, family: FamilySpec, data: LoadedData, *, echo: Echo = print
) -> dict[int, list[int]]:
    """`lora.experts: auto` made explicit: per MoE layer, the experts ESFT would adapt for this data."""
    profile = profile_loaded(recipe, model, tokenizer, family, data, samples=DEFAULT_SAMPLES, echo=echo)
    return experts_from_profile(profile, recipe, echo=echo)


def experts_from_profile(profile: RoutingProfile, recipe: Recipe, *, echo: Echo = print) -> dict[int, list[int]]:
    """The selection `lora.experts: auto` makes from a measured profile (said in one line)."""
    lora = recipe.lora
    chosen = profile.selection(lora.experts_score, lora.experts_top_p)
    if not any(chosen.values()):
        raise DataError("lora.experts: auto: the routing profile of the training data chose no expert in any layer")
    echo(
        f"lora.experts: auto ({lora.experts_score} score, top_p {lora.experts_top_p:g}) over "
        f"{profile.tokens:,} tokens: " + "; ".join(f"layer {k}: {v}" for k, v in chosen.items())
    )
    return chosen


def _progress(echo: Echo) -> Echo:
    """Progress on one terminal line, rewritten at every batch, when stdout is a terminal; else about ten
    lines in all (a log file)."""
    if echo is print and sys.stdout.isatty():

        def in_place(line: str) -> None:
            print(f"\r{line}", end="", flush=True)

        in_place.in_place = True  # type: ignore[attr-defined]
        return in_place
    return echo


# ------------------------------------------------------------------------------------------------
# What it writes


def format_table(profile: RoutingProfile, score: str = "gate", top_p: float = 0.2) -> str:
    """One row per MoE layer: both entropies, the largest load share, and the top experts by `score`."""
    chosen = profile.selection(score, top_p)
    uniform = 1.0 / profile.num_experts
    lines = [
        f"routing profile: {profile.model} ({profile.family}, {profile.num_experts} experts, top-{profile.top_k}), "
        f"{profile.tokens:,} tokens from {profile.examples:,} examples",
        f"{'layer':>5}  {'entropy':>7}  {'balance':>7}  {'load max':>8}  "
        f"{'experts by ' + score + ' score (share)':<44}  top_p {top_p:g}",
    ]
    for layer, scores in zip(profile.layers, profile.scores(score), strict=True):
        total = math.fsum(value for value in scores if math.isfinite(value)) or 1.0
        order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))[:4]
        top = ", ".join(f"{e} ({scores[e] / total:.2f})" for e in order)
        peak = max(layer.load_share) / uniform if layer.load_share else math.nan
        lines.append(
            f"{layer.layer:>5}  {layer.entropy:>7.3f}  {layer.balance:>7.3f}  {peak:>7.2f}x  {top:<44}  "
            f"{chosen[layer.layer]}"
        )
    return "\n".join(lines)


def heatmap_figure(profile: RoutingProfile, top_p: float = 0.2) -> Any:
    """Layers x experts, one panel per ESFT score (as shares of the layer's total); the experts top_p picks
    by that score are outlined."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = len(profile.layers)
    height = 1.5 + 0.3 * max(rows, 2)  # inches: margins fixed in inches below, so 2 or 48 layers both read
    fig = Figure(figsize=(11.0, height))
    axes = fig.subplots(1, 2)
    for ax, (score, title) in zip(axes, (("gate", "average gate score"), ("token", "token-selection ratio")), strict=True):
        values = np.array(profile.scores(score), dtype=float)
        values = values / np.nansum(values, axis=1, keepdims=True)
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        for row, experts in enumerate(profile.selection(score, top_p).values()):
            for expert in experts:
                ax.add_patch(Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_title(f"{title} (outlined: top_p {top_p:g})", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(rows), [str(layer.layer) for layer in profile.layers])
        fig.colorbar(image, ax=ax, label="share of the layer")
    fig.suptitle(f"routing profile: {profile.model}, {profile.tokens:,} tokens", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.97, bottom=0.5 / height, top=1 - 0.75 / height, wspace=0.25)
    return fig


def write_profile(profile: RoutingProfile, output_dir: Path, top_p: float = 0.2) -> tuple[Path, Path]:
    """profile.json and profile.png in `output_dir` (each written beside itself, then renamed)."""
    from moe_finetune.report_plots import save_figure

    output_dir.mkdir(parents=True, exist_ok=True)
    data = profile.to_dict()
    data["selection"] = {score: profile.selection(score, top_p) for score in ("gate", "token")}
    data["top_p"] = top_p
    path = write_whole(output_dir / PROFILE_FILE, json.dumps(data, indent=1) + "\n")
    return path, save_figure(heatmap_figure(profile, top_p), output_dir / HEATMAP_FILE)


def measure_recipe(recipe: Recipe, *, samples: int = DEFAULT_SAMPLES, echo: Echo = print) -> RoutingProfile:
    """Load the recipe's data and base model (as `train` loads them) and profile `samples` tokens."""
    from moe_finetune.models.loading import load_model_and_tokenizer

    if samples < 1:
        raise RecipeError(f"--samples: must be at least 1 token, got {samples}")
    data = load_data(recipe.data, recipe.resolve_path(recipe.data.path))
    model, tokenizer, family = load_model_and_tokenizer(recipe.model, recipe.resolve_path(recipe.model.name))
    profile = profile_loaded(recipe, model, tokenizer, family, data, samples=samples, echo=echo)
    if echo is print and sys.stdout.isatty():
        print()  # end the progress line
    if profile.tokens < samples:
        echo(f"note: the training data holds only {profile.tokens:,} tokens, fewer than the {samples:,} asked for")
    return profile


def profile_recipe(
    recipe: Recipe, *, samples: int = DEFAULT_SAMPLES, output_dir: Path | None = None, echo: Echo = print
) -> tuple[RoutingProfile, Path, Path]:
    """`moe-finetune profile`: measure, print the table, write profile.json and profile.png (default folder:
    OUTPUT_DIR/profile, beside the run the recipe would make)."""
    target = output_dir or Path(recipe.output_dir or "runs/run") / "profile"
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"--output-dir: {target} exists and is not a directory")
    profile = measure_recipe(recipe, samples=samples, echo=echo)
    lora = recipe.lora
    echo(format_table(profile, lora.experts_score, lora.experts_top_p))
    json_path, png_path = write_profile(profile, target, lora.experts_top_p)
    return profile, json_path, png_path
