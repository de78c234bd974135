"""From a validated Recipe to a finished run directory, in a straight line you can step through.

Order matters and is the contract: the recipe and its files are checked, the dataset is loaded and
counted (refused if too small) before any model is loaded, and the output directory is created
only once everything that can be checked has been. A failure before training leaves nothing
behind; a failure during training leaves the checkpoints already saved.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_finetune.data import LoadedData, load_data
from moe_finetune.errors import DatasetTooSmallError, OutputDirError, RecipeError
from moe_finetune.models.families import FamilySpec, family_for_config
from moe_finetune.models.lora import Coverage, apply_lora
from moe_finetune.models.tiny import build_tiny, family_of_tiny_name, is_tiny_name
from moe_finetune.recipe import Recipe, check_files, recipe_warnings

Echo = Callable[[str], None]


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path | None
    global_step: int
    train_loss: float | None
    seconds: float
    num_train_examples: int
    coverage: Coverage | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


def check_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Never silently overwrite a run: a non-empty directory needs --overwrite (or --resume)."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise OutputDirError(
            f"output_dir: {path} already exists and is not empty; pass --overwrite to replace it, "
            "--resume to continue its last checkpoint, or --output-dir to write elsewhere"
        )


def check_dataset_size(count: int, min_examples: int, source: str) -> None:
    """Refuse small datasets (exit 3): the count, the threshold and both ways to override."""
    if count < min_examples:
        raise DatasetTooSmallError(
            f"dataset refused: {source} has {count:,} training examples, fewer than the minimum of "
            f"{min_examples:,}. MoE routers tend to collapse when fine-tuned on small datasets. To train "
            "anyway, lower data.min_examples in the recipe (e.g. --set data.min_examples="
            f"{count}) or pass --allow-small-dataset."
        )


def resolve_model_path(recipe: Recipe) -> tuple[str, FamilySpec | None]:
    """A loadable path or hub id for the recipe's model (tiny models are built or reused here)."""
    name = recipe.model.name
    if is_tiny_name(name):
        spec = family_of_tiny_name(name)
        return str(build_tiny(spec)), spec
    local = recipe.resolve_path(name)
    if local.exists():
        return str(local), None
    return name, None


def load_model_and_tokenizer(recipe: Recipe) -> tuple[Any, Any, FamilySpec]:
    import torch
    import transformers

    path, spec = resolve_model_path(recipe)
    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    if recipe.model.dtype != "auto":
        kwargs["dtype"] = getattr(torch, recipe.model.dtype)
    if recipe.model.experts_implementation:
        kwargs["experts_implementation"] = recipe.model.experts_implementation
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.quantization is not None:
        q = recipe.model.quantization
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=q.bits == 4,
            load_in_8bit=q.bits == 8,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
            bnb_4bit_use_double_quant=q.double_quant,
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")}
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"model.name: cannot load {recipe.model.name!r} ({str(err).splitlines()[0]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = spec or family_for_config(model.config)
    model.config.use_cache = False  # packed sequences stay separate only without a cache
    return model, tokenizer, spec


def sft_config(recipe: Recipe, output_dir: Path, **extra: Any) -> Any:
    from trl import SFTConfig

    args = recipe.training_args()
    if recipe.model.router_aux_loss_coef is not None:
        args.setdefault("router_aux_loss_coef", recipe.model.router_aux_loss_coef)
    if not recipe.model.output_router_logits:
        args["router_aux_loss_coef"] = 0.0
    args.update(extra)
    if "bf16" not in recipe.training and "fp16" not in recipe.training:
        # TRL defaults to bf16, which a CPU-only machine cannot run: use it only where a GPU supports it.
        import torch

        args["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if "dataloader_pin_memory" not in recipe.training:
        import torch

        args["dataloader_pin_memory"] = torch.cuda.is_available()
    try:
        return SFTConfig(output_dir=str(output_dir), **args)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"training: SFTConfig rejected the section: {err}") from None


def make_callbacks(recipe: Recipe, output_dir: Path, echo: Echo) -> list[Any]:
    """The routing callbacks a recipe asks for (monitor, guard); filled in by the routing package."""
    return []


def banner(
    recipe: Recipe, spec: FamilySpec, model: Any, data: LoadedData, output_dir: Path, args: Any
) -> str:
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"moe-finetune: {recipe.name or recipe.model.name}",
        f"  model       {recipe.model.name} ({spec.name}, {spec.num_experts(model.config)} experts, top-"
        f"{spec.top_k(model.config)}, {total:,} parameters)",
        f"  data        {data.path} ({data.schema}): {data.num_train:,} training examples"
        + (f", {len(data.eval):,} eval" if data.eval is not None else ""),
        f"  training    lr {args.learning_rate:g} ({args.lr_scheduler_type}), batch "
        f"{args.per_device_train_batch_size}x{args.gradient_accumulation_steps}, "
        + (
            f"{args.max_steps} steps"
            if args.max_steps and args.max_steps > 0
            else f"{args.num_train_epochs:g} epochs"
        ),
        f"  output      {output_dir}",
    ]
    return "\n".join(lines)


def run(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    allow_small_dataset: bool = False,
    resume: str | bool | None = None,
    echo: Echo = print,
) -> RunResult:
    """Run a recipe end to end and return what happened."""
    from trl import SFTTrainer

    start = time.perf_counter()
    output_dir = Path(recipe.output_dir or "runs/run")
    check_files(recipe)
    check_output_dir(output_dir, overwrite=overwrite, resume=bool(resume))
    for warning in recipe_warnings(recipe):
        echo(f"warning: {warning}")

    data = load_data(recipe.data, recipe.resolve_path(recipe.data.path))
    if allow_small_dataset:
        if data.num_train < recipe.data.min_examples:
            echo(
                f"WARNING: --allow-small-dataset: training on {data.num_train:,} examples, below the minimum of "
                f"{recipe.data.min_examples:,}; watch routing entropy closely"
            )
    else:
        check_dataset_size(data.num_train, recipe.data.min_examples, str(data.path))

    model, tokenizer, spec = load_model_and_tokenizer(recipe)
    model, cov = apply_lora(model, recipe.lora, spec)
    args = sft_config(recipe, output_dir)

    if overwrite and output_dir.exists() and not resume:
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.resolved.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    echo(banner(recipe, spec, model, data, output_dir, args))
    echo(cov.line())

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=make_callbacks(recipe, output_dir, echo),
    )
    resume_from = resume if isinstance(resume, str) else (True if resume else None)
    result = trainer.train(resume_from_checkpoint=resume_from)

    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return RunResult(
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        global_step=trainer.state.global_step,
        train_loss=result.training_loss,
        seconds=time.perf_counter() - start,
        num_train_examples=data.num_train,
        coverage=cov,
        log_history=list(trainer.state.log_history),
    )


def train(recipe: Recipe | str | Path, overrides: list[str] | None = None, **kwargs: Any) -> RunResult:
    """Python entry point: `train("recipes/smoke.yaml", ["training.max_steps=5"])`."""
    from moe_finetune.recipe import load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run(recipe, **kwargs)
