"""The recipe's sections, one pydantic model each: the schema every layer reads, below all of them.

`recipe.py` composes them into a `Recipe` (with loading, `--set` overrides and `training:`
validation); the layers that act on a section (`models/` on `model:` and `lora:`, `data.py` on
`data:`, the RoutingMonitor on `monitor:`, the guard policy on `guards:`) import it from here, so no
layer reaches up into the recipe to learn its own settings. Only pydantic is imported: no torch, no
transformers, so a recipe validates in milliseconds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The field's advice for MoE fine-tuning (DESIGN.md section 4): at least ~10,000 examples.
DEFAULT_MIN_EXAMPLES = 10_000
# The field's learning rate for MoE fine-tuning, and the rate above which `validate` warns (routers collapse).
DEFAULT_LEARNING_RATE = 1e-5
MAX_MOE_LEARNING_RATE = 1e-4
# `model.name: tiny-<family>`: a tiny model built locally (models/tiny.py), named so by the report too.
TINY_PREFIX = "tiny-"

# Keys that moved out of `guards:` into `monitor:` (they configure what is measured, not the guard).
MOVED_TO_MONITOR = {"monitor": "enabled", "capacity_factor": "capacity_factor", "dead_threshold": "dead_threshold"}


class Section(BaseModel):
    # inf passes `gt=0` (an infinite LoRA alpha or aux coefficient makes no run): refused everywhere
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class QuantizationSection(Section):
    """bitsandbytes quantization through `quantization_config` (the `load_in_4bit` kwarg is gone in
    transformers 5). bitsandbytes alone quantizes nn.Linear only; in 4-bit the fused experts (most of an
    MoE model) are quantized too unless `experts: false` (models/quant4.py)."""

    bits: Literal[4, 8] = Field(4, description="4 (QLoRA, NF4/FP4) or 8 (LLM.int8)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="matmul dtype")
    double_quant: bool = Field(True, description="quantize the quantization constants too")
    experts: bool | None = Field(
        None,
        description="quantize the fused experts too (4-bit only; default true in 4-bit); false = nn.Linear only, "
        "as transformers + bitsandbytes do it",
    )
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="values per quantization block of the fused experts (bitsandbytes' own default: 64)"
    )

    @model_validator(mode="after")
    def _experts_need_4bit(self) -> QuantizationSection:
        if self.bits == 8 and self.experts:
            raise ValueError(
                "experts: true needs bits: 4 (the fused experts are quantized in 4-bit only; 8-bit quantizes "
                "nn.Linear modules only)"
            )
        return self

    @property
    def quantize_experts(self) -> bool:
        return self.bits == 4 and self.experts is not False


class ModelSection(Section):
    name: str = Field(
        ...,
        description="tiny-<family> for a tiny random model built locally (tiny-mixtral, tiny-qwen3-moe, ...), "
        "a hub id, or a local save_pretrained directory",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    config: str | None = Field(
        None,
        description="a config.json (file or directory) describing the architecture, for offline `validate` and "
        "`inspect` when the hub is out of reach; relative to the recipe file",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = the checkpoint's own (float32 for tiny models)"
    )
    quantization: QuantizationSection | None = Field(
        None, description="load the base model quantized (QLoRA)"
    )
    experts_implementation: Literal["eager", "grouped_mm"] | None = Field(
        None, description="how fused experts run; None = the transformers default (grouped_mm)"
    )
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2, ...")
    trust_remote_code: bool = Field(False, description="allow custom modeling code from the hub")
    output_router_logits: bool = Field(
        True, description="ask the model for router logits so that the load-balancing aux loss is computed"
    )
    router_aux_loss_coef: float | None = Field(
        None, ge=0.0, description="aux-loss coefficient; None = the model config's own (0.0 turns it off)"
    )
    aux_loss: Literal["per_layer", "transformers", "off"] = Field(
        "per_layer",
        description="which load-balancing loss is added (once) with router_aux_loss_coef: per_layer = the Switch "
        "loss of each MoE layer on its own, averaged over layers (same strength per router as transformers' at the "
        "same coefficient); transformers = load_balancing_loss_func, which pools all layers' counts and can read "
        "balanced while single layers collapse; off = none (as output_router_logits: false)",
    )

    @field_validator("aux_loss", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false
        return "off" if value is False else value


def _whole(value: Any) -> int:
    """A layer or expert number: an int, or its digits as a string (YAML keys that went through JSON)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"{value!r} is not a whole number")


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout on attention modules")
    attention: bool = Field(True, description="adapt the attention projections (q/k/v/o or the family's own)")
    experts: bool | Literal["auto"] | dict[int, list[int]] = Field(
        True,
        description="which experts to adapt through PEFT target_parameters: true / all = every expert, false = "
        "none (attention only), auto = per layer the experts the data uses most (ESFT: a routing profile of the "
        "training data before training, lora.experts_top_p and lora.experts_score), or {layer: [experts]}; a "
        "layer left out of the mapping keeps its experts frozen",
    )
    experts_top_p: float = Field(
        0.2,
        gt=0,
        le=1,
        description="experts: auto adapts, per layer, the fewest experts whose share of the score reaches this",
    )
    experts_score: Literal["gate", "token"] = Field(
        "gate",
        description="experts: auto ranks experts by ESFT's average gate score (gate) or token-selection ratio (token)",
    )
    router: bool = Field(
        False,
        description="train the router weights fully (modules_to_save); off by default: routers are fragile",
    )
    target_modules: list[str] | None = Field(
        None, description="attention module names to adapt; None = the family's attention projections"
    )
    target_parameters: list[str] | None = Field(
        None, description="expert parameter names to adapt; None = the family's fused expert parameters"
    )
    expert_kernel: Literal["fast", "peft"] = Field(
        "fast",
        description="how expert LoRA runs: fast = on the routed tokens (grouped matmuls, no merged W + s*B*A "
        "stack; families it cannot serve fall back to peft and the coverage line says so); peft = PEFT's "
        "ParamWrapper (merges the whole stack every forward)",
    )

    @field_validator("experts", mode="before")
    @classmethod
    def _experts_form(cls, value: Any) -> Any:
        # `all` is today's behaviour, kept as the plain true every other layer reads; anything else gets one
        # message naming the four forms, not one per member of the union
        if value == "all":
            return True
        if isinstance(value, bool) or value == "auto":
            return value
        if isinstance(value, dict):
            try:
                return {_whole(layer): [_whole(e) for e in experts] for layer, experts in value.items()}
            except (TypeError, ValueError):
                pass
        raise ValueError(f"expected true, false, all, auto or {{layer: [experts]}} with whole numbers, got {value!r}")

    @field_validator("experts")
    @classmethod
    def _experts_mapping(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if not value:
            raise ValueError("an empty {layer: [experts]} mapping adapts no expert: use experts: false for that")
        for layer, experts in value.items():
            if layer < 0 or any(expert < 0 for expert in experts):
                raise ValueError(f"layer {layer}: layer and expert numbers must be >= 0, got {experts}")
            if len(set(experts)) != len(experts):
                raise ValueError(f"layer {layer}: expert list {experts} repeats an expert")
        return {layer: sorted(experts) for layer, experts in sorted(value.items())}


class DataSection(Section):
    path: str = Field(
        ...,
        description="a .jsonl/.jsonl.gz/.json/.csv/.parquet file or a datasets.save_to_disk directory; relative "
        "to the recipe file",
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "disk"] = Field(
        "auto", description="file format; auto = from the extension"
    )
    split: str = Field("train", description="split to use when `path` is a saved DatasetDict")
    text_field: str = Field("text", description="column with plain text")
    prompt_field: str = Field("prompt", description="column with the prompt (prompt/completion datasets)")
    completion_field: str = Field("completion", description="column with the completion")
    messages_field: str = Field("messages", description="column with chat messages [{role, content}, ...]")
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="share of rows held out for evaluation")
    max_examples: int | None = Field(None, ge=1, description="use only the first N rows (after shuffling)")
    shuffle: bool = Field(True, description="shuffle rows (seeded) before splitting")
    seed: int = Field(0, ge=0, lt=2**32, description="seed for shuffling and the eval split")
    min_examples: int = Field(
        DEFAULT_MIN_EXAMPLES,
        ge=0,
        description="refuse to train on fewer training examples than this (MoE routers collapse on small data)",
    )


class MonitorSection(Section):
    """The recipe's `monitor:` section: what the RoutingMonitor measures at every logging step.

    `dead_threshold` lives here alone: it defines `routing/dead_experts` and is the line the guard's
    dead-expert halt judges against, so the metric a user reads and the guard's decision cannot disagree.
    """

    enabled: bool = Field(
        True,
        description="Run the RoutingMonitor: log routing metrics at each logging step and write routing.jsonl "
        "(the guard needs it and runs one even when this is false).",
    )
    capacity_factor: float = Field(
        1.25,
        gt=0,
        description="Expert capacity as a multiple of the uniform load, used to report routing/drop_fraction "
        "(tokens over capacity); the guard logs it but does not act on it.",
    )
    dead_threshold: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="An expert counts as dead when its load share is below this multiple of uniform (1/E): "
        "routing/dead_experts and the guard's dead-expert halt both use it.",
    )
    probe_size: int = Field(
        8,
        ge=0,
        description="Training rows routed at the start and again for routing/drift; their routing at the start, "
        "before the first update, is also the guard's baseline (0 = no drift, and the guard falls back to "
        "guards.baseline_steps).",
    )
    drift_steps: int = Field(
        50, ge=1, description="Re-route the probe at the first logging step this many steps after the last."
    )


class RetentionConfig(Section):
    """The recipe's `guards.retention:` section: watch forgetting itself, on rows unlike the fine-tune's.

    Measured on a pretrained MoE (README, "Does the guard protect a trained model from forgetting?"):
    what a too-aggressive fine-tune destroys is what the model knew, and its routing can stay flat while
    that happens (router frozen), so no routing threshold sees it. The loss on a small set of rows the
    model should keep knowing does.
    """

    data: str | None = Field(
        None,
        description="Rows the model should keep knowing (general text, the pretraining mix, earlier tasks), "
        "in any format data.path takes, with the data section's field names; relative to the recipe file. "
        "null (default) = no retention check.",
    )
    rows: int = Field(96, ge=1, description="How many rows of that file are evaluated at each check (the first N).")
    every: int = Field(
        1, ge=1, description="Logging steps between checks; the first check is before the first update."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Rows per forward pass; default: training.per_device_train_batch_size."
    )
    max_length: int | None = Field(
        None, ge=2, description="Tokens per row at most; default: training.max_length (else 1024)."
    )
    cut_rise: float = Field(
        0.0075,
        gt=0,
        lt=1,
        description="Cut the learning rate (by guards.cut_factor) when the retention loss has risen this "
        "fraction above its reference (0.0075 = 0.75%): where it stood before the first update, or at the last "
        "cut that answered a rise (a retention cut, or a routing cut made at the check that saw the rise).",
    )
    max_cuts: int = Field(
        4, ge=0, description="Most learning-rate cuts the retention check makes (its own budget)."
    )
    halt_rise: float | None = Field(
        0.10,
        gt=0,
        description="Halt when the retention loss stands this fraction above the base model's (0.10 = 10%): "
        "forgetting no cut has held back; null = never halt on it.",
    )

    @model_validator(mode="after")
    def _halt_above_cut(self) -> RetentionConfig:
        if self.halt_rise is not None and self.halt_rise <= self.cut_rise:
            raise ValueError(
                f"halt_rise ({self.halt_rise}) must be greater than cut_rise ({self.cut_rise}): a halt is the "
                "deeper rise, so a cut gets the chance to act first"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.data is not None


class GuardConfig(Section):
    """The recipe's `guards:` section: when the routing guards cut the learning rate or halt training.

    Also the argument of `EntropyGuard(config=...)` and `GuardPolicy(config)`, so a user of an existing
    Trainer tunes the same fields a recipe does.
    """

    enabled: bool = Field(
        True,
        description="Run the EntropyGuard: cut the learning rate or halt training when routing collapses.",
    )
    baseline_steps: int = Field(
        3,
        ge=1,
        description="Fallback only: the guard's baseline is the routing of the model before its first update "
        "(the monitor's probe batch at train begin, or the routing profile of lora.experts: auto); only when "
        "neither exists (monitor.probe_size 0) are this many first logging steps averaged into it instead "
        "(routing entropy and balance, pooled and per layer, and expert load), judging nothing before them.",
    )
    cut_drop: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="Cut the learning rate when pooled routing entropy falls this fraction below its baseline "
        "(0.10 = 10%).",
    )
    cut_layer_drop: float = Field(
        0.20,
        gt=0,
        lt=1,
        description="Cut the learning rate when any layer's routing entropy falls this fraction below that "
        "layer's own baseline.",
    )
    cut_factor: float = Field(
        0.5, gt=0, lt=1, description="Multiply the learning rate by this factor at each cut."
    )
    cut_window: int = Field(
        10,
        ge=1,
        description="A cut needs routing entropy to have fallen cut_drop (cut_layer_drop for a layer) within "
        "this many logging steps (and since the last cut): a sharp drop, not a level reached long ago or "
        "before a resume.",
    )
    cut_balance_drop: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="Cut the learning rate when any layer's balance (normalised entropy of its load share) falls "
        "this fraction within cut_window logging steps and sits that far below its baseline: the first sign "
        "of load concentrating.",
    )
    continue_drop: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="After the last allowed cut, halt only when routing entropy falls this fraction further below "
        "where it stood at that cut; a run that holds steady below its baseline has settled and runs on.",
    )
    halt_balance_drop: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Halt when any layer's balance (normalised entropy of its load share, routing/balance) falls "
        "this fraction below that layer's baseline: the load concentrating on few experts is collapse.",
    )
    cooldown: int = Field(
        2,
        ge=0,
        description="Logging windows after any cut of the guard (a routing cut or a retention cut) in which "
        "neither check cuts again and the halt for a drop that continues after the last cut waits; the other "
        "halts (levels, load, dead experts, balance, retention.halt_rise, non-finite output) still apply.",
    )
    max_cuts: int = Field(
        3,
        ge=0,
        description="Most learning-rate cuts in a run; a collapse that continues after the last one halts "
        "training.",
    )
    min_lr: float = Field(
        1e-7,
        ge=0,
        description="The learning rate is never cut below this; a cut that would go lower lands on it, and a "
        "collapse that continues at this learning rate halts training.",
    )
    halt_drop: float = Field(
        0.40,
        gt=0,
        lt=1,
        description="Halt when pooled routing entropy falls this fraction below its baseline.",
    )
    halt_layer_drop: float = Field(
        0.50,
        gt=0,
        lt=1,
        description="Halt when any layer's routing entropy falls this fraction below that layer's own baseline.",
    )
    min_baseline_entropy: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Relative falls of routing entropy (cut_drop, cut_layer_drop, halt_drop, halt_layer_drop, "
        "continue_drop) are judged only where the baseline, pooled or the layer's own, is at least this "
        "normalised entropy (0..1): a router near-deterministic at the start (entropy ~0.02) moves by half of "
        "it on a wobble. Balance, expert load, dead experts and entropy_floor still judge such a layer.",
    )
    entropy_floor: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Halt when pooled normalised routing entropy (0..1) falls below this absolute value; "
        "null turns the floor off.",
    )
    max_load_ratio: float = Field(
        3.0,
        gt=1,
        description="Halt when any expert's load share (fraction of top-k assignments) exceeds this multiple "
        "of uniform (1/E).",
    )
    load_baseline_factor: float = Field(
        1.5,
        ge=1,
        description="The load limit of a layer is the larger of max_load_ratio x uniform and this factor x the "
        "layer's largest expert share at the baseline: routing that was already concentrated at the start "
        "(narrow-domain data) is specialisation, not collapse.",
    )
    dead_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Halt when at least this fraction of one layer's experts are dead for dead_patience "
        "consecutive checks.",
    )
    dead_patience: int = Field(
        3,
        ge=1,
        description="Consecutive logging steps a layer's experts must stay dead before training halts.",
    )
    halt_on_nonfinite: bool = Field(
        True,
        description="Halt on any NaN or infinite router output; when false such a logging step is skipped.",
    )
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig,
        description="The retention check: the loss on rows the model should keep knowing, cut and halt on its rise.",
    )

    @model_validator(mode="before")
    @classmethod
    def _monitor_keys_moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [key for key in MOVED_TO_MONITOR if key in data]
            if moved:
                raise ValueError(
                    "; ".join(f"guards.{key} has moved to monitor.{MOVED_TO_MONITOR[key]}" for key in moved)
                    + " (the monitor measures, the guard acts on what it measured)"
                )
        return data

    @model_validator(mode="after")
    def _halts_are_deeper_than_cuts(self) -> GuardConfig:
        problems = []
        if self.halt_drop <= self.cut_drop:
            problems.append(f"halt_drop ({self.halt_drop}) must be greater than cut_drop ({self.cut_drop})")
        if self.halt_layer_drop <= self.cut_layer_drop:
            problems.append(
                f"halt_layer_drop ({self.halt_layer_drop}) must be greater than "
                f"cut_layer_drop ({self.cut_layer_drop})"
            )
        if self.halt_balance_drop <= self.cut_balance_drop:
            problems.append(
                f"halt_balance_drop ({self.halt_balance_drop}) must be greater than "
                f"cut_balance_drop ({self.cut_balance_drop})"
            )
        if problems:
            raise ValueError(
                "; ".join(problems) + ": a halt is the deeper drop, so a cut gets the chance to act first"
            )
        return self
