"""From a validated Recipe to a finished run directory, in a straight line you can step through.

Order matters and is the contract: the recipe and its files are checked, the dataset is loaded and
counted (refused if too small) and the output directory checked before any model is loaded, and the
output directory is written only once everything that can be checked has been. --overwrite replaces only
a run directory of ours (moe_finetune/outputs.py), moved aside whole once the trainer is built and deleted
when the new run has ended; a failure before the first training step takes back only what it made and
puts the old run back; a failure during training leaves the checkpoints already saved and says in
run_summary.json what ended it.

`build_trainer(recipe)` is the guarded SFTTrainer a recipe describes, for users who drive it
themselves; `run(recipe)` is `build_trainer` plus the run directory, the interrupt handling, the exit
conditions and the final adapter.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_finetune.callbacks.dataset_size import DatasetSizeGuard, check_dataset_size, count_examples
from moe_finetune.data import LoadedData, load_data
from moe_finetune.errors import (
    OutputDirError,
    OutputWriteError,
    RecipeError,
    TrainingHalted,
    TrainingInterrupted,
)
from moe_finetune.models.families import FamilySpec, family_for_model
from moe_finetune.models.loading import load_model_and_tokenizer
from moe_finetune.models.lora import Coverage, apply_lora, coverage
from moe_finetune.recipe import Recipe, check_files, recipe_warnings
from moe_finetune.routing.policy import load_limit_problem
from moe_finetune.rundir import (
    ADAPTER_DIR,
    EVENTS_FILE,
    REPORT_FILE,
    RESOLVED_RECIPE_FILE,
    checkpoint_problem,
    checkpoint_problems,
    checkpoint_steps,
    read_jsonl,
    write_whole,
)
from moe_finetune.sections import DEFAULT_MIN_EXAMPLES

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
    resumed_from_step: int = 0  # the checkpoint's step a --resume started from (0: a fresh run)
    already_finished: bool = False  # --resume on a run that had reached its last step: nothing was done

    @property
    def trained_steps(self) -> int:
        return self.global_step - self.resumed_from_step


# ------------------------------------------------------------------------------------------------
# The pieces of a trainer


def recipe_reads(recipe: Recipe) -> list[Path]:
    """The files and folders a run reads (recipe, data, retention rows, a local model or config): no output
    directory may hold them, or replacing it would delete the run's own input."""
    reads = [recipe.resolve_path(recipe.data.path)]
    if recipe.source:
        reads.append(Path(recipe.source))
    if recipe.guards.retention.data is not None:
        reads.append(recipe.resolve_path(recipe.guards.retention.data))
    if recipe.model.config:
        reads.append(recipe.resolve_path(recipe.model.config))
    local_model = recipe.resolve_path(recipe.model.name)
    if local_model.exists():
        reads.append(local_model)
    return reads


def check_output_dir(path: Path, overwrite: bool, resume: bool = False, reads: list[Path] | None = None) -> None:
    """Never silently overwrite a run: a non-empty directory needs --overwrite (or --resume), and
    --overwrite replaces only a run directory of ours (moe_finetune/outputs.py says which). Checked before
    any model loads."""
    from moe_finetune.outputs import check_output_path, check_replaceable

    check_output_path(path, "output_dir")
    if not (path.is_dir() and any(path.iterdir())) or resume:
        return
    if not overwrite:
        raise OutputDirError(
            f"output_dir: {path} already exists and is not empty; pass --overwrite to replace it, "
            "--resume to continue its last checkpoint, or --output-dir to write elsewhere"
        )
    check_replaceable(path, "output_dir", "run", reads=reads or [])


def load_training_data(recipe: Recipe, allow_small_dataset: bool = False) -> tuple[LoadedData, str | None]:
    """The recipe's dataset, counted and refused if too small (exit 3), and how a small one got past.

    The second value names the override that let a dataset below the field's 10,000 through
    (`--allow-small-dataset`, or a lowered `data.min_examples`), None when none was needed.
    """
    data = load_data(recipe.data, recipe.resolve_path(recipe.data.path))
    if data.num_train < recipe.data.min_examples:
        if not allow_small_dataset:
            check_dataset_size(
                data.num_train,
                recipe.data.min_examples,
                str(data.path),
                rows_in_file=data.total_rows,
                eval_rows=len(data.eval) if data.eval is not None else 0,
            )
        return data, "--allow-small-dataset"
    if data.num_train < DEFAULT_MIN_EXAMPLES:
        return data, f"data.min_examples={recipe.data.min_examples}"
    return data, None


def sft_config(recipe: Recipe, output_dir: Path, **extra: Any) -> Any:
    from trl import SFTConfig

    args = recipe.training_args()
    if recipe.model.router_aux_loss_coef is not None:
        args.setdefault("router_aux_loss_coef", recipe.model.router_aux_loss_coef)
    if not recipe.model.output_router_logits or recipe.model.aux_loss == "off":
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


def read_retention_rows(recipe: Recipe) -> Any | None:
    """The rows `guards.retention.data` names, read and checked before any model loads (a bad file: exit 2);
    None when there is no retention check."""
    settings = recipe.guards.retention
    if not recipe.guards.enabled or settings.data is None:
        return None
    from moe_finetune.callbacks.retention import retention_rows

    return retention_rows(recipe.resolve_path(settings.data), rows=settings.rows, fields=recipe.data)


def retention_set(recipe: Recipe, tokenizer: Any, loaded: Any | None) -> Any | None:
    """Those rows tokenised as training reads them (callbacks/retention.py, the guard's one factory)."""
    if loaded is None:
        return None
    from moe_finetune.callbacks.retention import RetentionSet

    training = recipe.training_args()
    return RetentionSet.from_settings(
        recipe.guards.retention,
        tokenizer,
        path=recipe.resolve_path(recipe.guards.retention.data),
        training_max_length=training.get("max_length"),
        training_batch_size=int(training.get("per_device_train_batch_size", 8)),
        fields=recipe.data,
        loaded=loaded,
    )


def make_callbacks(recipe: Recipe, output_dir: Path, echo: Echo, retention: Any | None = None) -> list[Any]:
    """The routing callbacks the recipe's `monitor:` and `guards:` sections ask for, monitor first."""
    from moe_finetune.callbacks.guard import EntropyGuard
    from moe_finetune.callbacks.monitor import RoutingMonitor

    callbacks: list[Any] = []
    monitor = None
    if recipe.monitor.enabled or recipe.guards.enabled:
        settings = recipe.monitor
        monitor = RoutingMonitor(
            output_dir,
            capacity_factor=settings.capacity_factor,
            dead_threshold=settings.dead_threshold,
            probe_size=settings.probe_size,
            drift_steps=settings.drift_steps,
        )
        callbacks.append(monitor)
    if recipe.guards.enabled:
        callbacks.append(
            EntropyGuard(recipe.guards, monitor=monitor, output_dir=output_dir, echo=echo, retention=retention)
        )
    return callbacks


def use_profile_as_baseline(trainer: Any, profile: Any, recipe: Recipe, say: Echo) -> None:
    """The routing profile is the base model's routing before any update: the guard's best baseline."""
    from moe_finetune.callbacks.guard import EntropyGuard

    guard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EntropyGuard)), None)
    if guard is None or not profile.layers:
        return
    layer_entropy = [layer.entropy for layer in profile.layers]
    entropy = sum(layer_entropy) / len(layer_entropy)  # routing/entropy: the mean over MoE layers
    load_share = [layer.load_share for layer in profile.layers]
    guard.use_baseline(entropy, layer_entropy, load_share, recipe.monitor.dead_threshold)
    say(
        f"guard baseline: the routing profile of {profile.tokens:,} tokens before any update (routing entropy "
        f"{entropy:.3f}, lowest layer {min(layer_entropy):.3f}), not the monitor's probe batch"
    )


def banner(recipe: Recipe, family: FamilySpec, model: Any, data: LoadedData, args: Any) -> str:
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"moe-finetune: {recipe.name or recipe.model.name}",
        f"  model       {recipe.model.name} ({family.name}, {family.num_experts(model.config)} experts, top-"
        f"{family.top_k(model.config)}, {total:,} parameters)",
        f"  data        {data.path} ({data.schema}): {data.num_train:,} training examples"
        + (f", {len(data.eval):,} eval" if data.eval is not None else ""),
        f"  training    lr {args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}), batch "
        f"{args.per_device_train_batch_size}x{args.gradient_accumulation_steps}, "
        + (
            f"{args.max_steps} steps"
            if args.max_steps and args.max_steps > 0
            else f"{args.num_train_epochs:g} epochs"
        ),
        f"  output      {args.output_dir}",
    ]
    return "\n".join(lines)


def build_trainer(recipe: Recipe, *, allow_small_dataset: bool = False, echo: Echo = print) -> Any:
    """The SFTTrainer a recipe describes, routing callbacks attached; nothing is written until it saves.

    Prints what it built (model, data, LoRA coverage, the aux-loss set-up) through `echo`. Refuses a
    small dataset (exit 3) before any model loads, and an aux-loss set-up that cannot work (exit 2).
    """
    from transformers import set_seed
    from trl import SFTTrainer

    from moe_finetune.aux_check import check_aux_loss
    from moe_finetune.callbacks import PerLayerAuxLoss, attach

    output_dir = Path(recipe.output_dir or "runs/run")
    check_files(recipe)
    data, size_override = load_training_data(recipe, allow_small_dataset)
    retention_rows = read_retention_rows(recipe)
    # The training arguments first: creating them sets up the process group, which FSDP's and
    # ZeRO-3's sharded loading need before the model is read.
    evaluate: dict[str, Any] = {}
    if recipe.data.eval_fraction > 0 and "eval_strategy" not in recipe.training:
        # Held-out rows are evaluated at each checkpoint (not at every logging step: that is slow).
        evaluate = {"eval_strategy": "steps", "eval_steps": recipe.training_args().get("save_steps", 500)}
    args = sft_config(recipe, output_dir, **evaluate)
    # Under several processes the main one builds (or downloads) the model first; the others then
    # read the finished copy instead of racing it.
    with args.main_process_first(desc="loading the model"):
        model, tokenizer, family = load_model_and_tokenizer(recipe.model, recipe.resolve_path(recipe.model.name))
    # Seed only now: LoRA's A matrices are drawn in get_peft_model, before the Trainer would seed
    # anything, and a run must be repeatable. Seeded before the load, a tiny model built on a cold
    # cache (random init) would draw from the same stream and change the adapter run by run.
    set_seed(args.seed)
    if recipe.guards.enabled:
        problem = load_limit_problem(recipe.guards, family.num_experts(model.config), family.top_k(model.config))
        if problem is not None:
            raise RecipeError(problem)
    profile = None
    if recipe.lora.experts == "auto":
        from moe_finetune.profile import DEFAULT_SAMPLES, experts_from_profile, profile_loaded

        # ESFT: the experts this data uses, from the base model, made explicit for recipe.resolved.yaml
        quiet = echo if args.process_index == 0 else (lambda _line: None)
        profile = profile_loaded(recipe, model, tokenizer, family, data, samples=DEFAULT_SAMPLES, echo=quiet)
        profile = as_rank_zero_measured(profile)
        recipe.lora.experts = experts_from_profile(profile, recipe, echo=quiet)
    model, adapted = apply_lora(model, recipe.lora, family)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer
    )
    is_main = trainer.is_world_process_zero()
    say: Echo = echo if is_main else (lambda _line: None)
    say(banner(recipe, family, model, data, args))
    if recipe.model.quantization is not None:
        from moe_finetune.models.quant4 import footprint, format_footprint

        say(format_footprint(footprint(trainer.model)))  # what is really quantized, counted after the load
    say(adapted.line())
    if recipe.model.aux_loss == "per_layer":
        # takes TRL's resolved coefficient over and switches TRL's pooled term off (counted once)
        PerLayerAuxLoss().attach(trainer)
    aux = check_aux_loss(trainer.model, args)
    for line in aux.lines:
        say(line)
    if aux.problems:
        raise RecipeError("aux loss set-up: " + " ".join(aux.problems))
    callbacks = make_callbacks(recipe, output_dir, say, retention_set(recipe, tokenizer, retention_rows))
    if size_override is not None:
        # Training goes ahead below the field's minimum: said loudly at train begin and recorded in
        # guard_events.jsonl, so the run directory tells the truth about it later.
        recommended = max(recipe.data.min_examples, DEFAULT_MIN_EXAMPLES)
        callbacks.append(DatasetSizeGuard(min_examples=recommended, allow_small=True, echo=say))
    attach(trainer, *callbacks)
    if profile is not None:
        use_profile_as_baseline(trainer, profile, recipe, say)
    return trainer


def as_rank_zero_measured(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself in a single process). Each rank profiles the same rows,
    but devices may differ in a last bit, and an expert at the top_p boundary would then be adapted on
    one rank and not another (adapters of different shapes) or the guard judge from other baselines:
    the choice and the baseline must be one decision, taken once."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------
# A run: the trainer, its directory, and how it ends


def save_adapter(trainer: Any, adapter_dir: Path) -> None:
    """Save the final adapter (+ tokenizer) from every kind of run: single process, DDP, FSDP2 or ZeRO-3.

    PEFT's `get_peft_model_state_dict` picks the adapter's tensors. Under FSDP2 they are sharded
    DTensors: every rank takes part in gathering them (in the same order), then rank 0 writes. Under
    ZeRO-3 the Trainer's own `save_model` knows how to gather. Written into a hidden sibling and renamed
    into place, so `adapter/` is whole or absent: a full disk never leaves one that `merge` would trust.
    """
    from moe_finetune.outputs import publish

    staging = adapter_dir.with_name(f".{adapter_dir.name}.tmp")  # one name on every rank; rank 0 writes it
    is_main = trainer.is_world_process_zero()
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a process killed while saving
        staging.mkdir(parents=True)
    try:
        write_adapter(trainer, staging)
        if is_main:
            publish(staging, adapter_dir)
    finally:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)


def write_adapter(trainer: Any, adapter_dir: Path) -> None:
    if getattr(trainer, "is_deepspeed_enabled", False):
        trainer.save_model(str(adapter_dir))
        return
    from peft import get_peft_model_state_dict

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # noqa: N806
    raw = trainer.model.state_dict()
    chosen = {id(tensor) for tensor in get_peft_model_state_dict(trainer.model, state_dict=raw).values()}
    state = {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for key, value in raw.items()
        if id(value) in chosen
    }
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(adapter_dir, state_dict=state)
        trainer.processing_class.save_pretrained(adapter_dir)


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest whole checkpoint: one a crash or a full disk cut short is never chosen (rundir.py)."""
    steps = checkpoint_steps(output_dir)
    return str(output_dir / f"checkpoint-{steps[-1]}") if steps else None


def resume_point(output_dir: Path, resume: str | bool | None, echo: Echo = print) -> str | None:
    """The checkpoint `--resume [CKPT]` means, checked to be whole; newer damaged ones are named and skipped."""
    if not resume:
        return None
    problems = checkpoint_problems(output_dir)
    whole = [step for step, problem in problems.items() if problem is None]
    newest = str(output_dir / f"checkpoint-{whole[-1]}") if whole else None
    if isinstance(resume, str):
        problem = checkpoint_problem(Path(resume)) if Path(resume).is_dir() else "it does not exist"
        if problem is not None:
            instead = f"; the newest whole checkpoint is {newest}" if newest else ""
            raise OutputDirError(f"--resume: {resume} cannot be resumed: {problem}{instead}")
        return resume
    if newest is None:
        raise OutputDirError(f"--resume: no complete checkpoint to resume from in {output_dir}")
    for step, problem in problems.items():
        if problem is not None and step > whole[-1]:
            echo(f"warning: skipping {output_dir / f'checkpoint-{step}'}: {problem}; resuming {newest} instead")
    return newest


def checkpoint_progress(checkpoint: Path, recipe: Recipe) -> tuple[int, int | None]:
    """(the step a checkpoint was saved at, the run's last step): the recipe's `training.max_steps` when set,
    else what the Trainer had planned (epochs); None when neither is known."""
    import json

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    step = int(state.get("global_step") or 0)
    max_steps = int(recipe.training_args().get("max_steps", -1) or -1)
    planned = max_steps if max_steps > 0 else int(state.get("max_steps") or 0) or None
    return step, planned


def continue_command(recipe: Recipe, output_dir: Path, drop: tuple[str, ...] = ()) -> str:
    """The `moe-finetune train` command line that continues this run: same recipe, same `--set` overrides
    (bar the keys in `drop`, which the caller sets anew), same output directory."""
    words = ["moe-finetune", "train", recipe.source or "RECIPE"]
    for override in recipe.overrides:
        key = override.partition("=")[0].strip()
        if key != "output_dir" and key not in drop:
            words += ["--set", override]
    words += ["--output-dir", str(output_dir)]
    return " ".join(shlex.quote(word) for word in words)


def start_run_directory(trainer: Any, recipe: Recipe, output_dir: Path, *, clear: bool) -> Path | None:
    """Write the run directory (the main process; the others wait for it). On --overwrite the old run is
    moved aside whole, not deleted: returned, to be deleted once the new run has ended or put back if it
    fails before its first step."""
    from moe_finetune.outputs import move_aside

    aside = None
    if trainer.is_world_process_zero():
        if clear and output_dir.is_dir() and any(output_dir.iterdir()):
            aside = move_aside(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_whole(output_dir / RESOLVED_RECIPE_FILE, recipe.to_yaml())
    trainer.accelerator.wait_for_everyone()
    return aside


def write_failure_message(err: BaseException, output_dir: Path) -> str | None:
    """For a write the system refused (full disk, permissions): the one paragraph saying which file, how
    much is free, and the checkpoint to go on from; None for any other error."""
    from moe_finetune.errors import write_failure

    failure = write_failure(err)
    if failure is None:
        return None
    what, filename = failure
    where = filename or newest_file(output_dir) or str(output_dir)
    free = ""
    for folder in (Path(where).parent, output_dir, output_dir.parent):
        if folder.is_dir():
            free = f" ({shutil.disk_usage(folder).free:,} bytes free there)"
            break
    checkpoint = last_checkpoint(output_dir)
    go_on = (
        f"the last complete checkpoint is {checkpoint}: free some space, then continue it with --resume"
        if checkpoint
        else "no complete checkpoint was saved: free some space and start again"
    )
    return f"{what} while writing {where}{free}; {go_on}"


def newest_file(folder: Path) -> str | None:
    """The file most recently written under `folder`: where a write that named no file was going."""
    try:
        files = [p for p in folder.rglob("*") if p.is_file()]
    except OSError:
        return None
    return str(max(files, key=lambda p: p.stat().st_mtime_ns)) if files else None


def run_summary(trainer: Any, recipe: Recipe, output_dir: Path) -> dict[str, Any]:
    """What this run is, for run_summary.json and the report: written before the first step, so a run killed
    later (SIGKILL, a lost node) still says which recipe and how much data it had."""
    max_steps = int(trainer.args.max_steps)
    return {
        "status": "running",
        "recipe": recipe.source,
        "name": recipe.name,
        "model": recipe.model.name,
        "dataset": str(recipe.resolve_path(recipe.data.path)),
        "train_examples": count_examples(trainer.train_dataset),
        "eval_examples": count_examples(trainer.eval_dataset),
        "max_steps": max_steps if max_steps > 0 else None,
        # pasted as is, it continues the newest checkpoint; the report appends a checkpoint and a rate to it
        "resume_command": continue_command(recipe, output_dir, drop=("training.learning_rate",)) + " --resume",
    }


def write_run_report(trainer: Any, output_dir: Path, summary: dict[str, Any], echo: Echo, **end: Any) -> None:
    """At every end of a run that trained (finished, halted, interrupted): run_summary.json with how it
    ended, then report.md and its plots; main process only. A report that cannot be drawn is said loudly
    and never hides how the run ended (the exit code and message stay the run's)."""
    if not trainer.is_world_process_zero():
        return
    from moe_finetune.report import write_report, write_run_summary

    summary.update(end, step=int(trainer.state.global_step), max_steps=int(trainer.state.max_steps) or None)
    try:
        write_run_summary(output_dir, summary)
        report = write_report(output_dir)
    except Exception as err:  # noqa: BLE001 - the run's outcome matters more than its plots
        problem = f"{type(err).__name__}: {err}"
        echo(f"warning: the run report was not written ({problem}); retry: moe-finetune report {output_dir}")
        return
    echo(f"report: {report.path} ({len(report.figures)} plots)")


def run(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    allow_small_dataset: bool = False,
    resume: str | bool | None = None,
    echo: Echo = print,
) -> RunResult:
    """Run a recipe end to end and return what happened (TrainingHalted / TrainingInterrupted otherwise)."""
    from moe_finetune.callbacks.console import use_routing_console
    from moe_finetune.callbacks.guard import EntropyGuard
    from moe_finetune.callbacks.interrupt import InterruptCallback
    from moe_finetune.outputs import discard, left_aside, put_back

    start = time.perf_counter()
    output_dir = Path(recipe.output_dir or "runs/run")
    check_files(recipe)
    check_output_dir(output_dir, overwrite=overwrite, resume=bool(resume), reads=recipe_reads(recipe))
    resume_from = resume_point(output_dir, resume, echo)
    resumed_from_step = 0
    if resume_from is not None:
        resumed_from_step, planned = checkpoint_progress(Path(resume_from), recipe)
        if planned and resumed_from_step >= planned:
            echo(
                f"{output_dir} already finished at step {resumed_from_step} of {planned}: nothing to resume, and "
                "nothing was written (raise training.max_steps to train on)"
            )
            adapter = output_dir / ADAPTER_DIR
            return RunResult(
                output_dir=output_dir,
                adapter_dir=adapter if adapter.is_dir() else None,
                global_step=resumed_from_step,
                train_loss=None,
                seconds=0.0,
                num_train_examples=0,
                resumed_from_step=resumed_from_step,
                already_finished=True,
            )
        echo(f"resuming from {resume_from} (step {resumed_from_step}{f' of {planned}' if planned else ''})")
    for warning in recipe_warnings(recipe):
        echo(f"warning: {warning}")
    for kept in left_aside(output_dir):
        echo(
            f"warning: {kept} is the run an earlier --overwrite of {output_dir} moved aside and was stopped "
            "before it could delete; it is whole: rename it back or delete it yourself"
        )

    existed = output_dir.exists()
    trainer, aside, summary = None, None, None
    try:
        trainer = build_trainer(recipe, allow_small_dataset=allow_small_dataset, echo=echo)
        console = use_routing_console(trainer, echo)  # one routing line per logging step, not HF's raw dict
        for guard in (c for c in trainer.callback_handler.callbacks if isinstance(c, EntropyGuard)):
            guard.report_on_halt = False  # the report is written below, at every end of the run
            if guard.echo is not None and trainer.is_world_process_zero():
                guard.echo = console.write  # its lines above the progress bar, not through it
        aside = start_run_directory(trainer, recipe, output_dir, clear=overwrite and not resume)
        summary = run_summary(trainer, recipe, output_dir)
        if trainer.is_world_process_zero():
            from moe_finetune.report import write_run_summary

            write_run_summary(output_dir, summary)
        interrupt = InterruptCallback()
        trainer.add_callback(interrupt)
        interrupt.install()
        try:
            result = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            interrupt.uninstall()
        outcome = end_of_run(trainer, recipe, output_dir, summary, interrupt, result, start, echo)
        outcome.resumed_from_step = resumed_from_step
    except (TrainingHalted, TrainingInterrupted) as ended:
        if aside is not None and isinstance(ended, TrainingHalted):
            discard(aside)  # the halted run stands in its place, checkpoint and report written
        elif aside is not None:
            echo(f"the run this one replaces is kept, whole, at {aside} until you delete it")
        raise
    except BaseException as err:
        started = trainer is not None and trainer.state.global_step > 0
        is_main = trainer is None or trainer.is_world_process_zero()
        message = write_failure_message(err, output_dir)
        if is_main and not started and last_checkpoint(output_dir) is None:
            # Failed before the first step (a model that does not load, a scheduler the guard refuses at train
            # begin, a full disk): take back only what this attempt made. The run it was replacing returns
            # whole; a folder that was there before (empty, or being resumed) stays.
            if aside is not None:
                put_back(aside, output_dir)
            elif not existed:
                shutil.rmtree(output_dir, ignore_errors=True)
        elif trainer is not None and summary is not None:
            # It trained: run_summary.json and the report say what ended it, not "running" or "healthy".
            ended = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            reason = message or f"{type(err).__name__}: {str(err)[:300]}"
            seconds = round(time.perf_counter() - start, 1)
            write_run_report(trainer, output_dir, summary, echo, status=ended, error=reason, seconds=seconds)
        if message is not None:
            raise OutputWriteError(message) from err
        if isinstance(err, KeyboardInterrupt) and started:
            # a second Ctrl-C / SIGTERM stops at once, maybe in the middle of a save
            checkpoint = last_checkpoint(output_dir)
            go_on = (
                f"the last complete checkpoint is {checkpoint}: continue with "
                f"{continue_command(recipe, output_dir)} --resume"
                if checkpoint
                else "no complete checkpoint was saved: start again"
            )
            raise TrainingInterrupted(
                f"interrupted at once (a second signal) at step {trainer.state.global_step}; a checkpoint being "
                f"written then is incomplete and is skipped; {go_on}"
            ) from err
        raise
    discard(aside)
    return outcome


def end_of_run(
    trainer: Any,
    recipe: Recipe,
    output_dir: Path,
    summary: dict[str, Any],
    interrupt: Any,
    result: Any,
    start: float,
    echo: Echo,
) -> RunResult:
    """After `trainer.train` returned: a halt or an interrupt raised (exit 4 / 130), or the final adapter
    saved; the report written at each."""
    from moe_finetune.callbacks.guard import EntropyGuard
    from moe_finetune.callbacks.monitor import RoutingMonitor
    from moe_finetune.report import lower_rate, trouble_checkpoint

    callbacks = trainer.callback_handler.callbacks
    monitor = next((c for c in callbacks if isinstance(c, RoutingMonitor)), None)
    if monitor is not None and trainer.is_world_process_zero() and monitor.latest is not None:
        echo(monitor.format_table())
    rerun = continue_command(recipe, output_dir)
    guard = next((c for c in callbacks if isinstance(c, EntropyGuard)), None)
    seconds = round(time.perf_counter() - start, 1)
    if guard is not None and guard.halted is not None:
        write_run_report(trainer, output_dir, summary, echo, status="halted", seconds=seconds)
        # the whole run's events (a resumed run's guard saw only its own attempt's), or this attempt's
        events = list(read_jsonl(output_dir / EVENTS_FILE)) or list(guard.events)
        earlier = trouble_checkpoint(output_dir, events)
        check = str(guard.halted.details.get("check", ""))
        forgot = check.startswith("retention")
        who = "the guard's retention check" if forgot else "the routing guard"
        lower = f"{continue_command(recipe, output_dir, drop=('training.learning_rate',))}"
        rate = f"training.learning_rate={lower_rate(events, float(trainer.args.learning_rate))}"
        if earlier is not None:
            go_on = f"To go on at a tenth of the rate it halted at (at most 1e-5): {lower} --resume {earlier} --set {rate}"
        elif forgot:
            # the halt checkpoint has forgotten already: resumed, it is judged against the same base and halts again
            go_on = (
                "No checkpoint was saved before the forgetting began: start again at a tenth of the rate (at most 1e-5) "
                f"({lower} --overwrite --set {rate}), or raise guards.retention.halt_rise"
            )
        else:
            # the halt checkpoint is judged against the same start when resumed: still collapsed, it halts again
            go_on = (
                "No healthy checkpoint was saved before the guard first acted (its first action came before a save "
                f"it could keep): start again at a tenth of the rate (at most 1e-5) ({lower} --overwrite --set "
                f"{rate}), saving at least as often as it logs (training.save_steps); resumed with --resume, the "
                "halt checkpoint is judged against the same start and halts again unless its routing has recovered"
            )
        raise TrainingHalted(
            f"training halted by {who} at step {guard.halt_step}: {guard.halted.reason}. Checkpoint: "
            f"{output_dir / f'checkpoint-{guard.halt_step}'}; report: {output_dir / REPORT_FILE}; "
            f"events: {output_dir / EVENTS_FILE}. {go_on}"
        )
    if interrupt.stopped_at is not None:
        write_run_report(trainer, output_dir, summary, echo, status="interrupted", seconds=seconds)
        raise TrainingInterrupted(
            f"interrupted at step {interrupt.stopped_at}: checkpoint saved to "
            f"{output_dir / f'checkpoint-{interrupt.stopped_at}'}. To continue: {rerun} --resume"
        )

    adapter_dir = output_dir / ADAPTER_DIR
    save_adapter(trainer, adapter_dir)
    end = {"status": "finished", "seconds": seconds, "train_loss": result.training_loss}
    write_run_report(trainer, output_dir, summary, echo, **end)
    return RunResult(
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        global_step=trainer.state.global_step,
        train_loss=result.training_loss,
        seconds=time.perf_counter() - start,
        num_train_examples=count_examples(trainer.train_dataset),
        coverage=coverage(trainer.model, family_for_model(trainer.model)),
        log_history=list(trainer.state.log_history),
    )


def train(recipe: Recipe | str | Path, overrides: list[str] | None = None, **kwargs: Any) -> RunResult:
    """Python entry point: `train("recipes/smoke.yaml", ["training.max_steps=5"])`."""
    from moe_finetune.recipe import load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run(recipe, **kwargs)
