"""Two processes: every rank takes the same guard decision at the same step, and both stop.

Launched with `accelerate launch --multi_gpu --num_processes 2`, which on a CPU-only machine
starts two gloo ranks running DDP (`--cpu` would start only one process; DESIGN.md section 3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import moe_finetune.train as train
    from moe_finetune.errors import TrainingHalted
    from moe_finetune.recipe import load_recipe

    recipe_path, out_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    made = []
    original = train.make_callbacks

    def recording(*args, **kwargs):
        made.extend(original(*args, **kwargs))
        return made

    train.make_callbacks = recording
    if os.environ.get("RETENTION_DRIFT"):
        # forgetting made to order: each check's loss a little higher than the last, and each rank's a little
        # different from the other's, so only the mean over ranks can keep their decisions the same
        import moe_finetune.callbacks.retention as retention

        measured, calls = retention.summed_token_loss, [0]

        def drifting(model, input_ids, attention_mask):
            summed, count = measured(model, input_ids, attention_mask)
            calls[0] += 1
            return summed * (1 + 0.002 * calls[0] + 1e-6 * int(os.environ["RANK"])), count

        retention.summed_token_loss = drifting
    recipe = load_recipe(recipe_path, [f"output_dir={out_dir}/run", *overrides])
    halted = None
    try:
        train.run(recipe, echo=lambda line: None)
    except TrainingHalted as err:
        halted = str(err)
    guard = next(c for c in made if type(c).__name__ == "EntropyGuard")
    rank = int(os.environ["RANK"])
    events = [{k: e[k] for k in ("step", "action", "lr_before", "lr_after")} for e in guard.events]
    state = guard.policy.state_dict()
    retention = {k: v for k, v in state.items() if k.startswith("retention_")}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(
            {"events": events, "halted": halted, "world": int(os.environ["WORLD_SIZE"]), "retention": retention},
            handle,
        )
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None) -> list[dict]:
    """demo-sharpening for 200 steps on two DDP ranks; what each rank's guard saw and did."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert launcher, "accelerate's launcher is part of the install"
    script = tmp_path / "ranks.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(script),
        str(REPO / "recipes" / "demo-sharpening.yaml"),
        str(tmp_path),
        "training.max_steps=200",
        *overrides,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    return ranks


def test_both_ranks_cut_and_settle_at_the_same_steps(tmp_path: Path) -> None:
    ranks = _launch(tmp_path)
    assert ranks[0]["events"] == ranks[1]["events"]
    actions = [e["action"] for e in ranks[0]["events"]]
    assert "cut_lr" in actions
    assert ranks[0]["halted"] == ranks[1]["halted"]
    # Only rank 0 writes the run's files: one line per action, not one per rank.
    written = (tmp_path / "run" / "guard_events.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in written] == [e["step"] for e in ranks[0]["events"]]


def test_both_ranks_take_the_same_retention_decisions(tmp_path: Path) -> None:
    """The retention check on two ranks: each evaluates every row and the mean over ranks decides, so with
    losses that differ between the ranks (RETENTION_DRIFT in the script) the base, the reference, the cuts
    and every event still agree; rank 0 alone writes retention.jsonl."""
    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(16)))
    ranks = _launch(
        tmp_path,
        f"guards.retention.data={keep}",
        "guards.retention.every=2",
        env={"RETENTION_DRIFT": "1"},
    )
    assert ranks[0]["events"] == ranks[1]["events"]
    assert ranks[0]["retention"] == ranks[1]["retention"]
    assert ranks[0]["retention"]["retention_base"] > 0
    assert ranks[0]["retention"]["retention_cuts"] >= 1  # the check acted, on both ranks alike
    checks = [json.loads(line) for line in (tmp_path / "run" / "retention.jsonl").read_text().splitlines()]
    assert checks[0]["step"] == 0 and len({c["step"] for c in checks}) == len(checks)  # one line per check
    assert checks[-1]["step"] == ranks[0]["retention"]["retention_last_step"]


_PROBE_FAILS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, sys.argv[3])
    import test_monitor as helpers
    import moe_finetune.callbacks.monitor as monitor_module
    from moe_finetune.callbacks import EntropyGuard, RoutingMonitor, attach

    model_dir, out_dir, fail_at = sys.argv[1], sys.argv[2], int(sys.argv[4])
    rank = int(os.environ["RANK"])
    routed, calls = monitor_module.probe_routing, [0]

    def probe_routing(*args, **kwargs):
        # the drift probe's forward fails on rank 1 only, at its `fail_at`-th call (1: at train begin)
        calls[0] += 1
        if rank == 1 and calls[0] == fail_at:
            raise RuntimeError("probe forward failed on this rank only")
        return routed(*args, **kwargs)

    monitor_module.probe_routing = probe_routing
    trainer = helpers.make_trainer(model_dir, os.path.join(out_dir, "run"), use_cpu=True, logging_steps=2, max_steps=6)
    monitor, guard = RoutingMonitor(drift_steps=2), EntropyGuard(echo=None)
    attach(trainer, monitor, guard)
    trainer.train()
    result = {
        "world": trainer.args.world_size,
        "probe_calls": calls[0],
        "baseline_from_probe": monitor.begin_metrics is not None,
        "drift": [record["drift"] for record in monitor.history],
        "events": [{k: e[k] for k in ("step", "action", "reason")} for e in guard.events],
        "baseline": guard.policy.state.baseline,
        "steps": trainer.state.global_step,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    """
)


@pytest.mark.parametrize("fail_at", [1, 2], ids=["at_train_begin", "at_a_drift_check"])
def test_a_drift_probe_failing_on_one_rank_only_is_the_same_decision_on_every_rank(
    tmp_path: Path, tiny_mixtral_dir: Path, fail_at: int, two_ranks
) -> None:
    """The probe's forward raises on rank 1 alone: every rank still joins every collective (the failure is
    counted in the one that reduces the probe), turns drift off together and judges from the same baseline."""
    script = tmp_path / "ranks.py"
    script.write_text(_PROBE_FAILS_SCRIPT)
    done = two_ranks(script, str(tiny_mixtral_dir), str(tmp_path), str(Path(__file__).parent), str(fail_at), timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2 and ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert ranks[0]["events"] == ranks[1]["events"] and ranks[0]["baseline"] == ranks[1]["baseline"]
    assert ranks[0]["drift"] == ranks[1]["drift"] and ranks[0]["probe_calls"] == ranks[1]["probe_calls"]
    if fail_at == 1:  # no probe anywhere: the baseline is the first windows' mean on both ranks
        assert not ranks[0]["baseline_from_probe"] and not ranks[1]["baseline_from_probe"]
        assert ranks[0]["drift"] == [None, None, None]
        assert "no probe batch" in ranks[0]["events"][0]["reason"]
    else:  # measured at train begin on both, then off on both from the first drift check
        assert ranks[0]["baseline_from_probe"] and ranks[1]["baseline_from_probe"]
        assert ranks[0]["drift"] == [None, None, None] and ranks[0]["probe_calls"] == 2
