"""The terminal of a `moe-finetune train` run: one compact line per logging step instead of HF's raw dict.

transformers prints every log entry as a Python dict: `ProgressCallback` (under its tqdm bar) or
`PrinterCallback` (with `disable_tqdm`). With routing metrics that is twenty keys a line, the numbers a
person watches for (both entropies, the busiest expert, the guard's action) lost among them. `train`
swaps either one for `RoutingConsole`, which keeps the progress bar and prints, at each logging step,

    step   35/400  loss 6.716  lr 4.00e-03  entropy 0.797 (min 0.770)  balance 0.623 (min 0.514)  load max 3.62x  drop 50.9%  guard HALT

and one short line for an evaluation and for the end of training. Only `train` runs do: a Trainer a user
builds (`build_trainer`, `attach`) keeps transformers' own printing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from transformers import PrinterCallback, ProgressCallback

from moe_finetune.callbacks.guard import ACTION_CODES

Echo = Callable[[str], None]
ACTION_LABELS = {code: name for name, code in ACTION_CODES.items()}
_SHOWN = {"cut_lr": "CUT LR", "halt": "HALT", "settled": "SETTLED"}


def _number(logs: dict[str, Any], key: str) -> float | None:
    value = logs.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def format_log_line(step: int, logs: dict[str, Any], max_steps: int | None = None) -> str:
    """One log entry of the Trainer as one line: training steps, evaluations and the end of training."""
    width = len(str(max_steps)) if max_steps else 1
    where = f"step {step:>{width}}" + (f"/{max_steps}" if max_steps else "")
    if "train_runtime" in logs:
        runtime, rate, loss = (
            _number(logs, k) for k in ("train_runtime", "train_steps_per_second", "train_loss")
        )
        parts = [f"trained {step} steps"]
        if runtime is not None:
            parts.append(f"in {runtime:.1f} s" + (f" ({rate:.2f} steps/s)" if rate is not None else ""))
        if loss is not None:
            parts.append(f"mean loss {loss:.4f}")
        return " ".join(parts)
    if any(key.startswith("eval_") for key in logs):
        shown = []
        for key, label, spec in (
            ("eval_loss", "loss", ".4f"),
            ("eval_mean_token_accuracy", "token accuracy", ".1%"),
            ("eval_runtime", "took", ".1f"),
        ):
            value = _number(logs, key)
            if value is not None:
                shown.append(f"{label} {value:{spec}}" + (" s" if key == "eval_runtime" else ""))
        return f"{where}  eval  " + ("  ".join(shown) if shown else "(no eval loss)")
    parts = [where]
    for key, label, spec in (("loss", "loss", ".4g"), ("learning_rate", "lr", ".2e")):
        value = _number(logs, key)
        if value is not None:
            parts.append(f"{label} {value:{spec}}")
    for name, key in (("entropy", "routing/entropy"), ("balance", "routing/balance")):
        value, lowest = _number(logs, key), _number(logs, f"{key}_min")
        if value is not None:
            parts.append(f"{name} {value:.3f}" + (f" (min {lowest:.3f})" if lowest is not None else ""))
    load_max, drop, dead = (
        _number(logs, f"routing/{k}") for k in ("load_max", "drop_fraction", "dead_experts")
    )
    if load_max is not None:
        parts.append(f"load max {load_max:.2f}x")
    if dead:
        parts.append(f"dead {dead:.0f}")
    if drop is not None:
        parts.append(f"drop {drop:.1%}")
    action = _number(logs, "routing/guard_action")
    if action:
        name = ACTION_LABELS.get(int(action), str(int(action)))
        parts.append(f"guard {_SHOWN.get(name, name)}")
    return "  ".join(parts)


class RoutingConsole(ProgressCallback):
    """transformers' progress bar (or none, with `disable_tqdm`), with `format_log_line` for each log."""

    def __init__(self, echo: Echo = print, bar: bool = True) -> None:
        super().__init__()
        self.echo = echo
        self.bar = bar

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bar:
            return super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar and self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)
        return control

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        return control

    def write(self, line: str) -> None:
        """Print a line above the progress bar (which stays in place), or plainly when there is none."""
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            self.echo(line)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.write(
                format_log_line(
                    int(state.global_step), logs, int(state.max_steps) if state.max_steps else None
                )
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)
        return control


def use_routing_console(trainer: Any, echo: Echo = print) -> RoutingConsole:
    """Replace the Trainer's printing of raw log dicts (ProgressCallback / PrinterCallback) with ours."""
    for printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(printer)
    console = RoutingConsole(echo=echo, bar=not trainer.args.disable_tqdm)
    trainer.add_callback(console)
    return console
