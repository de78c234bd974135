"""`moe-finetune`: parse, call, map errors to exit codes. Nothing here decides anything.

Exit codes (DESIGN.md section 2): 0 success, 1 internal error (a bug), 2 invalid recipe/arguments/
input, 3 dataset refused as too small, 4 training halted by a guard, 5 a file could not be written (no
space left on the device, no permission), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_finetune.errors import MoeFinetuneError, OutputWriteError, RecipeError, write_failure


def _quiet_libraries() -> None:
    """Keep the terminal for our own messages: no TF/bitsandbytes chatter, no hub telemetry."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import logging
    import warnings

    # transformers 5 deprecation notices about its own internals are not actionable for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)

    for name in ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_train(args: argparse.Namespace) -> int:
    from moe_finetune.recipe import load_recipe

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides)
    from moe_finetune.train import run

    result = run(
        recipe,
        overwrite=args.overwrite,
        allow_small_dataset=args.allow_small_dataset,
        resume=args.resume,
    )
    if result.already_finished:
        return 0
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    steps = f"{result.global_step} steps"
    if result.resumed_from_step:
        steps += f" ({result.trained_steps} trained now, resumed at step {result.resumed_from_step})"
    print(f"done: {steps} in {result.seconds:.1f} s, train loss {loss}; adapter saved to {result.adapter_dir}")
    print(f"to serve it as a plain transformers model: moe-finetune merge {shlex.quote(str(result.output_dir))}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from moe_finetune.validate import validate_recipe

    report = validate_recipe(
        args.recipe, list(args.set or []), check_data=not args.skip_data, profile_samples=args.profile
    )
    for warning in report.warnings:
        print(f"warning: {warning}")
    for line in report.lines:
        print(line)
    print(f"ok: {args.recipe} is valid")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from moe_finetune.inspect import inspect_model
    from moe_finetune.models.configs import load_config, meta_model

    if args.model is None and not args.recipe:
        raise RecipeError("inspect: give a MODEL_OR_CONFIG, or --recipe to inspect the recipe's model")
    lora_config = None
    if args.recipe:
        from moe_finetune.models.families import family_for_config
        from moe_finetune.models.lora import build_lora_config
        from moe_finetune.recipe import load_recipe

        recipe = load_recipe(args.recipe, list(args.set or []))
        if args.model is None:
            args.model = (
                str(recipe.resolve_path(recipe.model.config)) if recipe.model.config else recipe.model.name
            )
        config = load_config(args.model)
        lora_config = build_lora_config(meta_model(config), recipe.lora, family_for_config(config))
    report = inspect_model(args.model, lora_config=lora_config)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from moe_finetune.callbacks import EntropyGuard
    from moe_finetune.smoke import run_smoke

    result = run_smoke(args.family, steps=args.steps, echo=print, extra_callbacks=[EntropyGuard(echo=print)])
    print(f"smoke {result.family}: {'ok' if result.ok else 'FAILED'}")
    result.raise_for_problem()  # a guard halt or an unhealthy run: exit 4, saying what was wrong
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from moe_finetune.report import write_report

    report = write_report(args.run_dir, compare=args.compare)
    print(report.verdict.line.replace("**", ""))
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {report.path} ({len(report.figures)} plots beside it)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from moe_finetune.profile import profile_recipe
    from moe_finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, list(args.set or []))
    _, json_path, png_path = profile_recipe(
        recipe, samples=args.samples, output_dir=Path(args.output_dir) if args.output_dir else None, echo=print
    )
    print(f"profile: {json_path}, heatmap {png_path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from moe_finetune.merge import DEFAULT_SHARD_SIZE, merge_adapter

    merge_adapter(
        args.source,
        args.output,
        dtype=args.dtype,
        base=args.base,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size or DEFAULT_SHARD_SIZE,
        echo=print,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moe_finetune.export import export_adapter

    export_adapter(
        args.source, args.output, format=args.format, base=args.base, overwrite=args.overwrite, echo=print
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moe_finetune.generate import read_prompt, run_generate

    prompt = read_prompt(args.prompt, args.prompt_file)
    run_generate(
        args.source,
        prompt,
        max_new_tokens=args.max_new_tokens,
        routing=args.routing,
        plain=args.plain,
        base=args.base,
        echo=print,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-finetune",
        description="LoRA fine-tuning for Mixture-of-Experts models that watches the routers.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="run a recipe")
    train.add_argument("recipe", help="path to a recipe YAML")
    train.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe field")
    train.add_argument("--output-dir", help="run directory (overrides output_dir)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty output directory"
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the last checkpoint in the output directory (or from CHECKPOINT)",
    )
    train.add_argument(
        "--allow-small-dataset",
        action="store_true",
        help="train even below data.min_examples (recorded loudly)",
    )
    train.set_defaults(func=cmd_train)

    validate = sub.add_parser("validate", help="check a recipe without training")
    validate.add_argument("recipe", help="path to a recipe YAML")
    validate.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe field")
    validate.add_argument("--skip-data", action="store_true", help="do not read and count the dataset")
    validate.add_argument(
        "--profile",
        nargs="?",
        type=int,
        const=8192,
        default=None,
        metavar="N",
        help="also route N tokens of the data through the base model (default 8192; loads its weights) and print "
        "the routing profile, with the experts lora.experts: auto would adapt",
    )
    validate.set_defaults(func=cmd_validate)

    smoke = sub.add_parser(
        "smoke",
        help="build a tiny random model of a family, run a few guarded steps, print its routing "
        "(exit 4 when the guard halts or routing is not healthy)",
    )
    smoke.add_argument(
        "--family",
        default="mixtral",
        help="mixtral, qwen2-moe, qwen3-moe, olmoe, deepseek-v2, deepseek-v3, gpt-oss (default: mixtral)",
    )
    smoke.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    smoke.set_defaults(func=cmd_smoke)

    report = sub.add_parser(
        "report", help="write RUN_DIR/report.md and PNG plots of a run's routing (train writes it too)"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the output directory of a run")
    report.add_argument(
        "--compare",
        metavar="OTHER_RUN",
        help="put another run beside it (e.g. the same recipe with the guard off)",
    )
    report.set_defaults(func=cmd_report)

    profile = sub.add_parser(
        "profile",
        help="route a sample of the recipe's data through the base model: per-layer entropy, load and each "
        "expert's affinity (table, profile.json, profile.png)",
    )
    profile.add_argument("recipe", help="path to a recipe YAML")
    profile.add_argument(
        "--samples", type=int, default=8192, metavar="N", help="tokens of training data to route (default 8192)"
    )
    profile.add_argument("--output-dir", help="where to write profile.json and profile.png (default OUTPUT_DIR/profile)")
    profile.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe field")
    profile.set_defaults(func=cmd_profile)

    merge = sub.add_parser(
        "merge",
        help="merge a run's adapter into its base and write a plain transformers model (checked against the "
        "adapter first)",
    )
    merge.add_argument("source", metavar="RUN_DIR_OR_ADAPTER", help="a run directory or an adapter folder")
    merge.add_argument("--output", help="where to write the model (default: RUN_DIR/merged)")
    merge.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="dtype of the merged weights (default: the base checkpoint's own)",
    )
    merge.add_argument("--base", metavar="MODEL", help="the base model, if not the one the adapter names")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    merge.add_argument(
        "--max-shard-size", help="largest safetensors shard, e.g. 5GB (default 2GB; the save holds one at a time)"
    )
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser(
        "export",
        help="write a run's adapter for serving unmerged in vLLM or SGLang, per expert or fused (checked against "
        "PEFT's own deltas first)",
    )
    export.add_argument("source", metavar="RUN_DIR_OR_ADAPTER", help="a run directory or an adapter folder")
    export.add_argument(
        "--format",
        required=True,
        choices=("per-expert", "fused"),
        help="per-expert: one LoRA per expert projection (vLLM and SGLang, per-expert models); fused: PEFT's "
        "layout for target parameters (vLLM: natively for GPT-OSS, else with --enable-mixed-moe-lora-format)",
    )
    export.add_argument("--output", help="where to write the adapter (default: RUN_DIR/export-FORMAT)")
    export.add_argument("--base", metavar="MODEL", help="the base model, if not the one the adapter names")
    export.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    export.set_defaults(func=cmd_export)

    generate = sub.add_parser(
        "generate", help="answer a prompt with a run's adapter or a merged model (and show the experts it used)"
    )
    generate.add_argument(
        "source", metavar="RUN_DIR_OR_MODEL", help="a run directory, an adapter folder or a model folder"
    )
    generate.add_argument("--prompt", help="the prompt text")
    generate.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file (its whole text)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    generate.add_argument(
        "--routing", action="store_true", help="print which experts the answer's tokens went to, per layer"
    )
    generate.add_argument(
        "--plain", action="store_true", help="send the prompt as is, without the chat template"
    )
    generate.add_argument("--base", metavar="MODEL", help="the base model, if not the one the adapter names")
    generate.set_defaults(func=cmd_generate)

    inspect = sub.add_parser(
        "inspect", help="parameters (total, experts, active per token), memory estimates, LoRA size"
    )
    inspect.add_argument(
        "model",
        nargs="?",
        metavar="MODEL_OR_CONFIG",
        help="a config.json, a model folder, a shipped config name (mixtral-8x7b, ...) or a hub id "
        "(default with --recipe: the recipe's model)",
    )
    inspect.add_argument("--recipe", help="also count the LoRA parameters and optimizer state of this recipe")
    inspect.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe field")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def _internal_error(err: BaseException) -> int:
    log = Path(tempfile.gettempdir()) / f"moe-finetune-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        log.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
        where = f"the traceback is in {log}"
    except OSError:
        where = "rerun with --debug to see the traceback"
    print(
        f"moe-finetune: internal error (this is a bug in moe-finetune, please report it): "
        f"{type(err).__name__}: {err}. {where}",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MoeFinetuneError as err:
        if args.debug:
            traceback.print_exc()
        print(f"moe-finetune: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("moe-finetune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: a bug, reported as one
        if args.debug:
            traceback.print_exc()
        failure = write_failure(err)
        if failure is not None:  # a full disk or a folder we may not write: the user's to fix, not a bug
            what, filename = failure
            where = f" while writing {filename}" if filename else ""
            print(f"moe-finetune: {what}{where} ({type(err).__name__}: {str(err)[:300]})", file=sys.stderr)
            return OutputWriteError.exit_code
        return _internal_error(err)


def _entry() -> Any:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
