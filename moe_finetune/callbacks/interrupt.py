"""Ctrl-C / SIGTERM during training: finish the current step, save a checkpoint, stop; nothing trained is lost.

The signal handler only sets a flag; the decision is taken at a step end, and under several processes
the flag is agreed on first (all-reduced), so every rank stops at the same step and no rank waits
forever in a collective the others have left. A second signal interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from transformers import TrainerCallback


class InterruptCallback(TrainerCallback):
    """Turns SIGINT/SIGTERM into a checkpoint and a clean stop; `stopped_at` is the step it stopped at."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
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

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
