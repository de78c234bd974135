"""Ctrl-C / SIGTERM during training: finish the current step, save a checkpoint, stop; nothing trained is lost.

The signal handler only sets a flag; the decision is taken at a step end. A second signal interrupts at once.

One process: it stops at the end of the step the signal arrived in.

Several processes: every rank must stop at the same step, or the ones that go on wait forever in a
collective the others have left, so the flag is agreed on first (a MAX all-reduce). A blocking
all-reduce at every step end would be a host sync per step (on GPUs it also drains the queue of
launched kernels), so the vote is overlapped with the step instead: each step end launches an
asynchronous all-reduce of the local flag and reads the one launched at the previous step end, which
has had a whole step to finish. The decision for step s is therefore taken at the end of step s + 1,
identically on every rank: a signal stops training one step later than it would in one process. When
a step ends training anyway (max_steps, a guard halting), the vote is taken at once, so a signal in the
last step still saves and reports an interrupt.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from transformers import TrainerCallback


def several_ranks() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FlagVote:
    """A MAX all-reduce of one boolean over all ranks, started now and read later (at most one in flight).

    gloo: a CPU tensor; its collective runs on gloo's worker thread while the next step computes.
    nccl: a tensor on this rank's GPU, reduced and copied to pinned host memory on a side stream, so
    the compute stream never waits for it and reading it waits only for that copy.
    """

    def __init__(self) -> None:
        self._work: Any = None  # the collective in flight (gloo), or the event after its copy (nccl)
        self._flag: Any = None  # the tensor being reduced, kept alive until it is read
        self._stream: Any = None
        self._host: Any = None

    @property
    def pending(self) -> bool:
        return self._work is not None

    def start(self, flag: bool) -> None:
        import torch
        import torch.distributed as dist

        if self._work is not None:
            raise RuntimeError("FlagVote.start: the vote in flight was not read (every rank reads it first)")
        value = 1.0 if flag else 0.0
        if dist.get_backend() == "nccl":
            if self._stream is None:
                self._stream = torch.cuda.Stream()
                self._host = torch.zeros(1, pin_memory=True)
            copied = torch.cuda.Event()
            with torch.cuda.stream(self._stream):
                self._flag = torch.full((1,), value, device="cuda")
                work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
                work.wait()  # nccl: makes the side stream wait for the collective, not the host
                self._host.copy_(self._flag, non_blocking=True)
                copied.record()
            self._work = copied
        else:
            self._flag = torch.tensor([value])
            self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)

    def result(self) -> bool:
        """The agreed flag of the vote in flight (waiting for it if need be); False when there is none."""
        work, flag = self._work, self._flag
        self._work = self._flag = None
        if work is None:
            return False
        if self._stream is not None:  # nccl: the event recorded after the copy to pinned memory
            work.synchronize()
            return bool(self._host.item() > 0)
        work.wait()
        return bool(flag.item() > 0)


class InterruptCallback(TrainerCallback):
    """Turns SIGINT/SIGTERM into a checkpoint and a clean stop; `stopped_at` is the step it stopped at."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}
        self._vote = FlagVote()

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

    def _should_stop(self, ending_anyway: bool) -> bool:
        """The stop decision at this step end, the same on every rank (see the module docstring)."""
        if not several_ranks():
            return self.requested
        # Every rank reads the vote of the previous step end and starts one now unless it stops, so
        # all ranks run the same collectives in the same order.
        if self._vote.result():
            return True
        self._vote.start(self.requested)
        return self._vote.result() if ending_anyway else False

    def on_train_begin(self, args, state, control, **kwargs):
        self._vote = FlagVote()

    def on_step_end(self, args, state, control, **kwargs):
        if self._should_stop(ending_anyway=control.should_training_stop):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # Training ended without a step end that read it (the data ran out): finish the collective so no
        # rank leaves one in flight. Its flag no longer matters: every step has been trained.
        if self._vote.pending:
            self._vote.result()
