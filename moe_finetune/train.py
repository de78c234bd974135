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

from moe_finetune.callbacks.dataset_size import DEFAULT_MIN_EXAMPLES, check_dataset_size
from moe_finetune.data import LoadedData, load_data
from moe_finetune.errors import OutputDirError, RecipeError, TrainingHalted, TrainingInterrupted
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
    if "use_cpu" not in recipe.training:
        import torch

        # Without it, a CPU-only run under accelerate/torchrun makes every process its own rank 0:
        # no DDP, each rank training on all the data and writing every file.
        args["use_cpu"] = not torch.cuda.is_available()
    if "dataloader_pin_memory" not in recipe.training:
        import torch

        args["dataloader_pin_memory"] = torch.cuda.is_available()
    try:
        return SFTConfig(output_dir=str(output_dir), **args)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"training: SFTConfig rejected the section: {err}") from None


def make_callbacks(recipe: Recipe, output_dir: Path, echo: Echo) -> list[Any]:
    """The routing callbacks the recipe's `guards:` section asks for, monitor first (the guard reads it)."""
    from moe_finetune.callbacks.guard import EntropyGuard
    from moe_finetune.callbacks.monitor import RoutingMonitor

    callbacks: list[Any] = []
    monitor = None
    if recipe.guards.monitor or recipe.guards.enabled:
        monitor = RoutingMonitor(
            output_dir,
            capacity_factor=recipe.guards.capacity_factor,
            dead_threshold=recipe.guards.dead_threshold,
        )
        callbacks.append(monitor)
    if recipe.guards.enabled:
        callbacks.append(EntropyGuard(recipe.guards, monitor=monitor, output_dir=output_dir, echo=echo))
    return callbacks


class InterruptCallback:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, stop; nothing trained is lost.

    The signal only sets a flag; the decision is taken at a step end, and under several processes
    the flag is all-reduced first, so every rank stops at the same step (no rank waits forever in
    a collective the others have left). A second signal interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(
            f"\n{name} received: saving a checkpoint at the end of this step (press Ctrl-C again to abort now)"
        )

    def _agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if self.requested else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)
        return self.requested

    def as_trainer_callback(self) -> Any:
        from transformers import TrainerCallback

        outer = self

        class _Interrupt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer._agreed():
                    outer.stopped_at = state.global_step
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return _Interrupt()


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


def save_adapter(trainer: Any, tokenizer: Any, adapter_dir: Path) -> None:
    """Save the final adapter from every kind of run: single process, DDP, FSDP2 or ZeRO-3.

    Under FSDP2 the adapter weights are sharded DTensors: every rank takes part in gathering them,
    then rank 0 writes. Under ZeRO-3 the Trainer's own `save_model` knows how to gather.
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        trainer.save_model(str(adapter_dir))
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # noqa: N806
    state = {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for key, value in trainer.model.state_dict().items()
        if "lora_" in key or "modules_to_save" in key
    }
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(adapter_dir, state_dict=state)
        tokenizer.save_pretrained(adapter_dir)


def _last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint (a save cut short by a crash has no trainer_state.json)."""
    if not output_dir.is_dir():
        return None
    steps = [
        int(path.name.removeprefix("checkpoint-"))
        for path in output_dir.glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file()
    ]
    return str(output_dir / f"checkpoint-{max(steps)}") if steps else None


@dataclass
class Prepared:
    """Everything a run needs before its Trainer exists (nothing written to the output directory yet)."""

    data: LoadedData
    args: Any
    model: Any
    tokenizer: Any
    spec: FamilySpec
    coverage: Coverage
    override: str | None


def prepare(recipe: Recipe, output_dir: Path, *, allow_small_dataset: bool = False) -> Prepared:
    """Data (counted and refused if too small, before any model loads), arguments, model with LoRA."""
    data = load_data(recipe.data, recipe.resolve_path(recipe.data.path))
    override = None
    if data.num_train < recipe.data.min_examples:
        if not allow_small_dataset:
            check_dataset_size(data.num_train, recipe.data.min_examples, str(data.path))
        override = "--allow-small-dataset"
    elif data.num_train < DEFAULT_MIN_EXAMPLES:
        override = f"data.min_examples={recipe.data.min_examples}"

    # The training arguments first: creating them sets up the process group, which FSDP's and
    # ZeRO-3's sharded loading need before the model is read. Then seed: LoRA's A matrices are
    # drawn in get_peft_model, before the Trainer would seed anything, and a run must be repeatable.
    evaluate: dict[str, Any] = {}
    if recipe.data.eval_fraction > 0 and "eval_strategy" not in recipe.training:
        # Held-out rows are evaluated at each checkpoint (not at every logging step: that is slow).
        evaluate = {"eval_strategy": "steps", "eval_steps": recipe.training_args().get("save_steps", 500)}
    args = sft_config(recipe, output_dir, **evaluate)
    from transformers import set_seed

    set_seed(args.seed)
    # Under several processes the main one builds (or downloads) the model first; the others then
    # read the finished copy instead of racing it.
    with args.main_process_first(desc="loading the model"):
        model, tokenizer, spec = load_model_and_tokenizer(recipe)
    model, cov = apply_lora(model, recipe.lora, spec)
    return Prepared(data, args, model, tokenizer, spec, cov, override)


def _sft_trainer(prepared: Prepared) -> Any:
    from trl import SFTTrainer

    return SFTTrainer(
        model=prepared.model,
        args=prepared.args,
        train_dataset=prepared.data.train,
        eval_dataset=prepared.data.eval,
        processing_class=prepared.tokenizer,
    )


def build_trainer(recipe: Recipe, *, allow_small_dataset: bool = False, echo: Echo = print) -> Any:
    """The SFTTrainer a recipe describes, routing callbacks attached, for users who drive `train()` themselves.

    Nothing is written until the Trainer itself saves; `run` adds the run directory, the interrupt
    handling, the exit conditions and the final adapter on top of the same pieces.
    """
    from moe_finetune.callbacks import attach

    output_dir = Path(recipe.output_dir or "runs/run")
    check_files(recipe)
    prepared = prepare(recipe, output_dir, allow_small_dataset=allow_small_dataset)
    trainer = _sft_trainer(prepared)
    attach(trainer, *make_callbacks(recipe, output_dir, echo))
    return trainer


def run(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    allow_small_dataset: bool = False,
    resume: str | bool | None = None,
    echo: Echo = print,
) -> RunResult:
    """Run a recipe end to end and return what happened (TrainingHalted / TrainingInterrupted otherwise)."""
    from moe_finetune.callbacks import attach
    from moe_finetune.callbacks.guard import EntropyGuard, append_event, checkpoint_before_trouble

    start = time.perf_counter()
    output_dir = Path(recipe.output_dir or "runs/run")
    check_files(recipe)
    check_output_dir(output_dir, overwrite=overwrite, resume=bool(resume))
    resume_from: str | None = None
    if resume:
        resume_from = resume if isinstance(resume, str) else _last_checkpoint(output_dir)
        if resume_from is None:
            raise OutputDirError(f"--resume: no complete checkpoint to resume from in {output_dir}")
        if not (Path(resume_from) / "trainer_state.json").is_file():
            raise OutputDirError(
                f"--resume: {resume_from} is not a complete Trainer checkpoint (no trainer_state.json); "
                f"checkpoints in {output_dir}: {', '.join(sorted(p.name for p in output_dir.glob('checkpoint-*'))) or 'none'}"
            )
    for warning in recipe_warnings(recipe):
        echo(f"warning: {warning}")

    existed = output_dir.exists()
    try:
        prepared = prepare(recipe, output_dir, allow_small_dataset=allow_small_dataset)
    except BaseException:
        # The training arguments may already have made an (empty) output directory: take it back.
        if not existed and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    data, args, model, tokenizer, spec, cov, override = (
        prepared.data,
        prepared.args,
        prepared.model,
        prepared.tokenizer,
        prepared.spec,
        prepared.coverage,
        prepared.override,
    )

    created = not existed or (overwrite and not resume)
    if overwrite and output_dir.exists() and not resume:
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        (output_dir / "recipe.resolved.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        echo(banner(recipe, spec, model, data, output_dir, args))
        echo(cov.line())
        if override is not None:
            message = (
                f"dataset size override ({override}): training on {data.num_train:,} examples, below the "
                f"recommended minimum of {max(recipe.data.min_examples, DEFAULT_MIN_EXAMPLES):,}; watch routing "
                "entropy closely"
            )
            echo(f"WARNING: {message}")
            append_event(
                output_dir,
                {
                    "step": 0,
                    "action": "allow_small_dataset",
                    "reason": message,
                    "count": data.num_train,
                    "min_examples": recipe.data.min_examples,
                    "override": override,
                },
            )
        callbacks = make_callbacks(recipe, output_dir, echo)
        trainer = _sft_trainer(prepared)
        from moe_finetune.aux_check import check_aux_loss

        aux = check_aux_loss(trainer.model, args)
        for line in aux.lines:
            echo(line)
        if aux.problems:
            raise RecipeError("aux loss set-up: " + " ".join(aux.problems))
    except BaseException:
        # Nothing was trained yet: leave no half-written run directory behind.
        if created and _last_checkpoint(output_dir) is None:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise

    attach(trainer, *callbacks)
    interrupt = InterruptCallback()
    trainer.add_callback(interrupt.as_trainer_callback())
    interrupt.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        interrupt.uninstall()

    monitor = next((c for c in callbacks if hasattr(c, "format_table")), None)
    if (
        monitor is not None
        and trainer.is_world_process_zero()
        and getattr(monitor, "latest", None) is not None
    ):
        echo(monitor.format_table())
    guard = next((c for c in callbacks if isinstance(c, EntropyGuard)), None)
    if guard is not None and guard.halted is not None:
        earlier = checkpoint_before_trouble(output_dir, guard.events)
        where = f"--resume {earlier}" if earlier is not None else "--resume"
        raise TrainingHalted(
            f"training halted by the routing guard at step {guard.halt_step}: {guard.halted.reason}. Checkpoint: "
            f"{output_dir / f'checkpoint-{guard.halt_step}'}; report: {output_dir / 'collapse_report.md'}; "
            f"events: {output_dir / 'guard_events.jsonl'}. To go on with a lower learning rate: moe-finetune "
            f"train {recipe.source or 'RECIPE'} --output-dir {output_dir} {where} --set training.learning_rate=LOWER"
        )
    if interrupt.stopped_at is not None:
        raise TrainingInterrupted(
            f"interrupted at step {interrupt.stopped_at}: checkpoint saved to "
            f"{output_dir / f'checkpoint-{interrupt.stopped_at}'}. To continue: moe-finetune train "
            f"{recipe.source or 'RECIPE'} --output-dir {output_dir} --resume"
        )

    adapter_dir = output_dir / "adapter"
    save_adapter(trainer, tokenizer, adapter_dir)
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
