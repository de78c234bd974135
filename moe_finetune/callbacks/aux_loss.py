"""`PerLayerAuxLoss`: the per-layer load-balancing loss (routing/load_balancing.py) on any Trainer.

    from moe_finetune.callbacks import PerLayerAuxLoss
    trainer = SFTTrainer(...)                 # or a plain transformers.Trainer
    PerLayerAuxLoss().attach(trainer)         # coef: the trainer's router_aux_loss_coef, else the config's

What `attach` does, and why each step:

1. switches transformers' pooled term off, so nothing is counted twice: TRL's SFTTrainer adds
   `router_aux_loss_coef x aux` itself when `trainer.aux_loss_enabled` (it then also passes
   `output_router_logits=True`); a plain Trainer gets it from the model's forward when
   `config.output_router_logits`. Both are turned off.
2. hooks the routers (RouterLogitsTap) and wraps `trainer.compute_loss`, the one method every
   Trainer's training step and evaluation go through: `loss += coef x per-layer aux`, once per call.
   A loss term cannot come from a callback: callbacks run after the backward.
3. gradient accumulation: the aux term is a per-micro-batch mean, averaged over the accumulation
   steps like TRL averages its own: divided by the steps when the Trainer leaves the scaling to the
   loss (`num_items_in_batch` given to a model that takes it, Trainer's own rule), else left to the
   Trainer's division of the whole loss.
4. several ranks: each rank balances its own micro-batch, and DDP averages the gradients, exactly
   as transformers' and TRL's loss do (counts are not all-reduced: no collective inside the step).
5. registers itself (through `attach` of callbacks/attach.py) so `routing/aux_loss_per_layer`, the mean
   of the term over the logging window, lands in the Trainer's own log entry.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import TrainerCallback

from moe_finetune.models.families import unwrap_model
from moe_finetune.routing.load_balancing import RouterLogitsTap

LOG_KEY = "routing/aux_loss_per_layer"
_WRAPPED_MARK = "_moe_finetune_per_layer_aux"


def _text_config(model: Any) -> Any:
    config = unwrap_model(model).config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


class PerLayerAuxLoss(TrainerCallback):
    """Adds `coef x` the mean over MoE layers of each layer's own load-balancing loss to a Trainer's loss.

    `coef=None` takes the trainer's `router_aux_loss_coef` (TRL's SFTTrainer: its resolved value) or
    else the model config's. A coefficient of 0 installs nothing.
    """

    def __init__(self, coef: float | None = None) -> None:
        if coef is not None and not coef >= 0.0:
            raise ValueError(f"PerLayerAuxLoss: coef must be >= 0, got {coef}")
        self.coef = coef
        self.coefficient: float | None = None  # resolved at attach
        self.tap: RouterLogitsTap | None = None
        self._window: list[torch.Tensor] = []
        self._attached = False

    # ------------------------------------------------------------------ installing

    def attach(self, trainer: Any) -> Any:
        """Install on `trainer` (see the module docstring); returns the trainer."""
        from moe_finetune.callbacks.attach import attach as attach_callbacks

        if getattr(trainer.compute_loss, _WRAPPED_MARK, False):
            raise RuntimeError("PerLayerAuxLoss: this trainer already has a per-layer aux loss attached")
        config = _text_config(trainer.model)
        coef = self.coef
        if coef is None:
            coef = getattr(trainer, "router_aux_loss_coef", None)
        if coef is None:
            coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
        self.coefficient = float(coef)
        self._attached = True
        if self.coefficient == 0.0:
            return trainer
        # 1. transformers' pooled term off: TRL's flag, and the config flag the model's forward reads
        if getattr(trainer, "aux_loss_enabled", False):
            trainer.aux_loss_enabled = False
        if getattr(config, "output_router_logits", False):
            config.output_router_logits = False
        # 2. the tap and the wrapped compute_loss
        self.tap = RouterLogitsTap(trainer.model, coefficient=self.coefficient)
        original = trainer.compute_loss

        @functools.wraps(original)
        def compute_loss(
            model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None, **kw
        ):
            tap = self.tap
            if tap is None or not tap.active:
                return original(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw
                )
            tap.begin()
            try:
                result = original(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw
                )
            finally:
                aux = tap.take()
            if aux is None:
                return result
            loss = result[0] if return_outputs else result
            loss = loss + (
                self.coefficient * aux / self._accumulation_divisor(trainer, model, num_items_in_batch)
            ).to(loss.device)
            if model.training:
                self._window.append(aux.detach())
            return (loss, *result[1:]) if return_outputs else loss

        setattr(compute_loss, _WRAPPED_MARK, True)
        trainer.compute_loss = compute_loss
        attach_callbacks(trainer, self)
        return trainer

    def remove(self, trainer: Any | None = None) -> None:
        """Take the hooks off (the trainer's compute_loss then passes straight through)."""
        if self.tap is not None:
            self.tap.remove()

    @staticmethod
    def _accumulation_divisor(trainer: Any, model: Any, num_items_in_batch: Any) -> int:
        """What the aux term is divided by so that it is averaged over the accumulation steps."""
        if not getattr(model, "training", False):
            return 1
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:  # transformers' Trainer.training_step rule
            scaled = (
                bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
            ) or getattr(trainer, "compute_loss_func", None) is not None
        return int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1) if scaled else 1

    # ------------------------------------------------------------------ callback events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._attached:
            raise RuntimeError(
                "PerLayerAuxLoss adds a term to the loss, which a callback alone cannot do: install it with "
                "PerLayerAuxLoss(...).attach(trainer) instead of callbacks=[...] or attach(trainer, ...)"
            )

    def pop_log(self) -> dict[str, float]:
        """The mean per-layer aux loss (before the coefficient) over the micro-batches since the last log."""
        if not self._window:
            return {}
        value = torch.stack([v.to(self._window[0].device) for v in self._window]).mean().item()
        self._window = []
        return {LOG_KEY: value}
