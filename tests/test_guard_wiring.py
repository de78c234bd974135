"""Guard wiring that must never silently do nothing: logging strategies, callback order, schedulers,
load limits that cannot fire, drift across a resume, bounded history, and the commands we print."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_monitor import capture_hooks, make_trainer
from transformers import TrainerControl, TrainerState

from moe_finetune.callbacks import EntropyGuard, RoutingMonitor, attach
from moe_finetune.callbacks.lr import check_scheduler_can_be_cut, scale_learning_rate
from moe_finetune.errors import RecipeError
from moe_finetune.routing.policy import GuardAction, load_limit_problem
from moe_finetune.rundir import ROUTING_FILE, ROUTING_PROBE_FILE
from moe_finetune.sections import GuardConfig


def test_epoch_logging_strategy_still_feeds_the_guard_at_every_logging_event(tiny_mixtral_dir, tmp_path):
    monitor, guard = RoutingMonitor(), EntropyGuard(echo=None)
    # a rate at which the tiny model's routing stays put: judged from the first epoch on, it runs all three
    trainer = make_trainer(
        tiny_mixtral_dir, tmp_path, max_steps=-1, num_train_epochs=3, logging_strategy="epoch", learning_rate=1e-5
    )
    attach(trainer, monitor, guard)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / ROUTING_FILE).read_text().splitlines()]
    assert len(records) == 3  # one per epoch: 64 rows / batch 4 = 16 steps each
    assert [r["step"] for r in records] == [16, 32, 48]
    assert guard.policy.last_step == 48 and guard.policy.baseline is not None  # it judged every one
    assert all("routing/entropy" in e for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("order", ["guard_first", "monitor_first"])
def test_bare_callbacks_in_either_order_hook_the_routers_once(tiny_mixtral_dir, tmp_path, order):
    monitor, guard = RoutingMonitor(), EntropyGuard(echo=None)
    callbacks = [guard, monitor] if order == "guard_first" else [monitor, guard]
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, callbacks=callbacks)
    hooks: list[int] = []
    monitor.add_listener(lambda *_: hooks.append(capture_hooks(trainer.model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    one_set = 2 + 2  # the backbone's pre/post hooks + one hook per router of the 2-layer model
    assert hooks and set(hooks) == {one_set}
    assert guard.monitor is monitor and not guard._owns_monitor
    lines = (tmp_path / ROUTING_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # routing.jsonl written once


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-3, step_size_up=10),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 100),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    ],
    ids=["one_cycle", "cyclic", "lambda", "step"],
)
def test_a_cut_lasts_through_schedulers_that_recompute_from_their_own_maxima(make):
    reference_opt, cut_opt = _optimizer(), _optimizer()
    reference, cut = make(reference_opt), make(cut_opt)
    check_scheduler_can_be_cut(cut)
    for _ in range(5):
        for opt, sched in ((reference_opt, reference), (cut_opt, cut)):
            opt.step()
            sched.step()
    scale_learning_rate(cut_opt, cut, 0.5)
    for _ in range(30):  # through warm-up peaks, cycles and step boundaries
        for opt, sched in ((reference_opt, reference), (cut_opt, cut)):
            opt.step()
            sched.step()
        assert cut_opt.param_groups[0]["lr"] == pytest.approx(0.5 * reference_opt.param_groups[0]["lr"])


def test_a_scheduler_the_guard_cannot_cut_is_refused_at_train_begin():
    class OwnSchedule:
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.param_groups[0]["lr"] = 1e-3

    with pytest.raises(RecipeError, match="cannot cut the learning rate of the scheduler OwnSchedule"):
        check_scheduler_can_be_cut(OwnSchedule(_optimizer()))


def test_a_load_limit_at_or_above_e_over_k_is_named_with_the_largest_useful_value():
    problem = load_limit_problem(GuardConfig(max_load_ratio=4.5), num_experts=8, top_k=2)
    assert problem is not None and "guards.max_load_ratio 4.5 can never be reached" in problem
    assert "use a value below 4" in problem
    assert load_limit_problem(GuardConfig(max_load_ratio=3.9), num_experts=8, top_k=2) is None


def test_validate_and_train_refuse_a_load_limit_that_can_never_fire(recipe_factory, capsys):
    from moe_finetune.cli import main

    recipe = recipe_factory("guards:\n  max_load_ratio: 4.5\n")
    for command in (["validate", str(recipe)], ["train", str(recipe)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "guards.max_load_ratio 4.5 can never be reached" in err and "Traceback" not in err


def test_a_baseline_so_concentrated_that_its_load_limit_cannot_fire_is_said_at_the_baseline():
    from moe_finetune.routing.policy import GuardPolicy, RoutingSnapshot

    narrow = [0.4, 0.3] + [0.05] * 6  # the top expert at 40%: 1.5x that is 60% > 1/k = 50%
    policy = GuardPolicy(GuardConfig())
    for step in (1, 2, 3):
        action = policy.update(RoutingSnapshot(step, 0.8, [0.8], [narrow], top_k=2), 1e-5)
    assert action.details["unreachable_load_layers"][0]["layer"] == 0
    assert "the expert-load halt cannot fire in 1 layer(s)" in action.reason


def test_drift_after_a_resume_is_measured_from_the_start_of_the_run(tiny_mixtral_dir, tmp_path):
    first = RoutingMonitor(drift_steps=1)
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, callbacks=[first])
    trainer.train()
    assert (tmp_path / ROUTING_PROBE_FILE).is_file()
    start = first._probe_start
    resumed = RoutingMonitor(drift_steps=1)
    again = make_trainer(tiny_mixtral_dir, tmp_path, callbacks=[resumed])
    again.state.global_step = 4  # what the Trainer restores from checkpoint-4 before on_train_begin

    class Control:
        should_log = False

    resumed.on_train_begin(
        again.args, again.state, Control(), model=again.model, train_dataloader=again.get_train_dataloader()
    )
    try:
        assert torch.equal(resumed._probe_start.topk.cpu(), start.topk.cpu())  # not re-measured at step 4
    finally:
        resumed._release()


def test_monitor_history_is_bounded_while_routing_jsonl_keeps_every_step(tiny_mixtral_dir, tmp_path):
    monitor = RoutingMonitor(history_size=2)
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, callbacks=[monitor], max_steps=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert len(monitor.history) <= 4 and monitor.history[-1]["step"] == 12
    assert len((tmp_path / ROUTING_FILE).read_text().splitlines()) == 12


def test_the_printed_continue_command_repeats_the_users_overrides(recipe_factory, tmp_path: Path):
    from moe_finetune.recipe import load_recipe
    from moe_finetune.train import continue_command

    recipe = load_recipe(
        recipe_factory(), ["training.max_steps=400", "output_dir=/somewhere", "lora.r=8", "name=a b"]
    )
    command = continue_command(recipe, tmp_path / "run")
    assert "--set training.max_steps=400 --set lora.r=8 --set 'name=a b'" in command
    assert "output_dir=" not in command and command.endswith(f"--output-dir {tmp_path / 'run'}")
    lower = continue_command(recipe, tmp_path / "run", drop=("training.max_steps",))
    assert "training.max_steps" not in lower


def test_a_dataset_of_9999_rows_is_refused_naming_the_rows_and_the_training_count(tmp_path: Path, capsys):
    from moe_finetune.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(9_999)),
        encoding="utf-8",
    )
    recipe = tmp_path / "smoke.yaml"
    smoke = (Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml").read_text()
    recipe.write_text(smoke.replace("../data/instructions.jsonl.gz", str(data)), encoding="utf-8")
    assert main(["validate", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert "9,999 rows" in err and "9,799 training examples" in err and "10,000" in err


def test_a_trainer_with_a_scheduler_the_guard_cannot_cut_stops_at_train_begin_with_exit_2(
    tiny_mixtral_dir, tmp_path
):
    trainer = make_trainer(tiny_mixtral_dir, tmp_path)
    attach(trainer, RoutingMonitor(), EntropyGuard(echo=None))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.AdamW(params, lr=1e-3)

    class OwnSchedule:  # recomputes the rate from its own maximum at every step
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.param_groups[0]["lr"] = 1e-3

        def get_last_lr(self):
            return [1e-3]

    trainer.lr_scheduler = OwnSchedule(trainer.optimizer)
    with pytest.raises(RecipeError) as caught:
        trainer.train()
    assert caught.value.exit_code == 2 and "OwnSchedule" in str(caught.value)
    assert trainer.state.global_step == 0


def test_guard_events_past_the_resumed_step_are_dropped_like_routing_jsonl(tmp_path):
    from types import SimpleNamespace

    events = tmp_path / "guard_events.jsonl"
    events.write_text("".join(json.dumps({"step": s, "action": "cut_lr"}) + "\n" for s in (5, 10, 15)))
    guard = EntropyGuard(echo=None)
    state = TrainerState(global_step=10, is_world_process_zero=True)
    args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=1e-5)
    guard.on_train_begin(args, state, TrainerControl(), model=None, optimizer=None, lr_scheduler=None)
    assert [json.loads(line)["step"] for line in events.read_text().splitlines()] == [5, 10]


def test_attaching_a_guard_alone_registers_a_monitor_whose_metrics_reach_the_loggers(tiny_mixtral_dir, tmp_path):
    from test_monitor import Recorder

    recorder = Recorder()
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, callbacks=[recorder])
    guard = EntropyGuard(echo=None)
    attach(trainer, guard)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not any("passed to the Trainer directly" in str(w.message) for w in caught)
    assert isinstance(guard.monitor, RoutingMonitor) and guard.monitor in trainer.callback_handler.callbacks
    seen = [logs for logs in recorder.logs if "loss" in logs]
    assert seen and all("routing/entropy" in logs for logs in seen)


def test_a_guard_reused_for_a_second_train_hooks_the_routers_again_and_judges_from_step_one(
    tiny_mixtral_dir, tmp_path
):
    guard = EntropyGuard(echo=None)
    for attempt in ("first", "second"):
        trainer = make_trainer(tiny_mixtral_dir, tmp_path / attempt, callbacks=[guard])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        assert guard.policy.last_step == 4 and guard.policy.baseline is not None
        assert len((tmp_path / attempt / ROUTING_FILE).read_text().splitlines()) == 4


def _guard_at(tmp_path, healthy_save):
    guard = EntropyGuard(echo=None, output_dir=tmp_path)
    if healthy_save is not None:
        guard.checkpoints.judged(healthy_save, healthy=True)
        guard.checkpoints.saved(healthy_save)
    return guard


def test_a_first_action_with_no_healthy_checkpoint_keeps_nothing_and_saves_nothing(tmp_path):
    for kind in ("halt", "cut_lr"):
        guard = _guard_at(tmp_path, healthy_save=None)
        guard.checkpoints.saved(30)  # the weights at the trouble itself
        guard.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        control = TrainerControl()
        guard._act(GuardAction(kind, "test", factor=0.5, step=30), 30, TrainerState(global_step=30), control, None)
        assert guard.kept_checkpoint is None  # never the troubled weights
        assert control.should_save == (kind == "halt")  # a halt saves its own checkpoint, a cut nothing


def test_the_kept_checkpoint_is_decided_from_the_saves_every_rank_saw_not_one_ranks_disk(tmp_path):
    guard = _guard_at(tmp_path, healthy_save=20)
    guard.is_main = False  # another rank: no checkpoint folder on its disk, yet the same decision
    guard._keep_healthy_checkpoint(30)
    assert guard.kept_checkpoint == tmp_path / "last-healthy" / "checkpoint-20"


class _StubMonitor:
    """What the guard reads of a RoutingMonitor: its listeners and the probe routed at train begin."""

    def __init__(self, begin_metrics, begin_step):
        self._listeners, self.capture = [], None
        self.begin_metrics, self.begin_step = begin_metrics, begin_step

    def add_listener(self, listener):
        self._listeners.append(listener)


def _probe_metrics(entropy):
    from types import SimpleNamespace

    return SimpleNamespace(
        entropy=entropy, layer_entropy=[entropy, entropy], load_share=[[1 / 8] * 8] * 2, dead_threshold=0.1, tokens=99
    )


def _begin(guard, step, begin_metrics, saved=None):
    from types import SimpleNamespace

    guard.monitor = _StubMonitor(begin_metrics, step)
    args = SimpleNamespace(output_dir=str(guard.output_dir), learning_rate=1e-3)
    callbacks = {"EntropyGuard": saved} if saved is not None else None
    state = TrainerState(global_step=step, is_world_process_zero=True, stateful_callbacks=callbacks)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    guard.on_train_begin(args, state, TrainerControl(), optimizer=optimizer)
    guard.on_step_begin(args, state, TrainerControl())  # the monitor began after the guard: taken here
    return guard


def test_the_baseline_is_the_probe_routed_before_the_first_update_and_a_resume_keeps_it(tmp_path):
    first = _begin(EntropyGuard(echo=None, output_dir=tmp_path), 0, _probe_metrics(0.8))
    assert first.policy.baseline == pytest.approx(0.8) and first.policy.layer_baseline == pytest.approx([0.8, 0.8])
    event = first.events[0]
    assert event["action"] == "baseline" and event["step"] == 0 and event["details"]["source"] == "probe"
    assert event["details"]["layer_balance"] == pytest.approx([1.0, 1.0])
    # resumed at step 10: the routing there (already moved) is not the start; the saved baseline is
    resumed = _begin(EntropyGuard(echo=None, output_dir=tmp_path), 10, _probe_metrics(0.5), saved=first.state())
    assert resumed.policy.baseline == pytest.approx(0.8)
    assert [e["action"] for e in resumed.events] == []


def test_a_run_resumed_from_its_halt_keeps_the_baseline_of_its_start_and_starts_its_cuts_over(tmp_path):
    first = _begin(EntropyGuard(echo=None, output_dir=tmp_path), 0, _probe_metrics(0.8))
    first.policy.state.cuts_made, first.policy.state.cooldown_left = 2, 1
    first.halt_step = 15
    # the probe at the resume routes the collapsed model (0.5): it is not the start
    resumed = _begin(EntropyGuard(echo=None, output_dir=tmp_path), 15, _probe_metrics(0.5), saved=first.state())
    state = resumed.policy.state
    assert state.baseline == pytest.approx(0.8) and state.layer_balance_baseline == pytest.approx([1.0, 1.0])
    assert state.baseline_top_share == pytest.approx([1 / 8, 1 / 8]) and state.alive_at_baseline == [[True] * 8] * 2
    assert state.cuts_made == 0 and state.cooldown_left == 0
    assert [e["action"] for e in resumed.events] == ["resume_after_halt"]  # no new baseline
    assert "judged against the baseline of the run's start (routing entropy 0.800" in resumed.events[0]["reason"]
    assert resumed.checkpoints.before(100) is None  # the halted weights are never kept as healthy


def test_without_a_probe_the_baseline_is_the_first_logging_windows_and_the_events_say_so(tmp_path):
    guard = _begin(EntropyGuard(echo=None, output_dir=tmp_path), 0, None)
    assert guard.policy.baseline is None
    assert guard.events[0]["action"] == "baseline" and "no probe batch" in guard.events[0]["reason"]
    assert "mean of the first 3 logging windows" in guard.events[0]["reason"]


def test_a_resumed_trainer_with_its_own_optimizer_keeps_its_rate_unless_the_user_changes_it(tmp_path):
    from types import SimpleNamespace

    def resume(requested: float) -> float:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)  # not args.learning_rate
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        first = EntropyGuard(echo=None, output_dir=tmp_path)
        args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=1e-3)
        begin = TrainerState(global_step=0, is_world_process_zero=True)
        first.on_train_begin(args, begin, TrainerControl(), optimizer=optimizer, lr_scheduler=scheduler)
        saved = first.state()
        resumed = EntropyGuard(echo=None, output_dir=tmp_path)
        state = TrainerState(global_step=10, is_world_process_zero=True, stateful_callbacks={"EntropyGuard": saved})
        args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=requested)
        resumed.on_train_begin(args, state, TrainerControl(), optimizer=optimizer, lr_scheduler=scheduler)
        return optimizer.param_groups[0]["lr"]

    assert resume(1e-3) == pytest.approx(1e-4)  # same request: the optimizer's own 1e-4 stays
    assert resume(5e-4) == pytest.approx(5e-5)  # half the request: half the rate


def _checkpoint(folder: Path) -> Path:
    """A checkpoint folder of the files a Trainer writes, each whole by `rundir.checkpoint_problem`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(4, 4)}, str(folder / "adapter_model.safetensors"))
    torch.save({"step": 1}, folder / "optimizer.pt")
    torch.save({"lr": 1e-3}, folder / "scheduler.pt")
    (folder / "adapter_config.json").write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    return folder


def test_a_copy_of_the_healthy_checkpoint_cut_short_is_never_trusted_as_last_healthy(tmp_path, monkeypatch):
    import shutil

    from moe_finetune.callbacks import guard as guard_module
    from moe_finetune.rundir import checkpoint_problem

    source = _checkpoint(tmp_path / "checkpoint-10")
    kept = tmp_path / "last-healthy" / "checkpoint-10"
    copied, real_copy = [], shutil.copy2

    def copy_then_fail(src, dst, **kwargs):
        if copied:  # the second file: the disk fills up, or the process dies, half way through
            raise OSError(28, "No space left on device")
        copied.append(src)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(guard_module.shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        guard_module.keep_out_of_rotation(source, tmp_path)
    assert copied and not kept.exists()  # nothing at the kept name: no half copy to trust later
    assert list((tmp_path / "last-healthy").iterdir()) == []  # and the staged half copy is gone
    monkeypatch.setattr(guard_module.shutil, "copy2", real_copy)
    # a folder already there that is not whole (a copy cut short by a crash) is replaced, not trusted
    kept.mkdir()
    (kept / "trainer_state.json").write_text('{"global_step": 1')  # cut short
    assert checkpoint_problem(kept) is not None
    assert guard_module.keep_out_of_rotation(source, tmp_path) == kept
    assert checkpoint_problem(kept) is None
    assert sorted(p.name for p in kept.iterdir()) == sorted(p.name for p in source.iterdir())
    assert [p.name for p in (tmp_path / "last-healthy").iterdir()] == ["checkpoint-10"]  # no hidden leftovers


def test_a_fresh_runs_guard_keeps_the_dataset_size_override_recorded_by_a_callback_before_it(tmp_path):
    from types import SimpleNamespace

    from moe_finetune.callbacks import DatasetSizeGuard

    events = tmp_path / "guard_events.jsonl"
    events.write_text(json.dumps({"step": 40, "action": "halt", "reason": "an earlier run's"}) + "\n")
    size = DatasetSizeGuard(min_examples=10_000, allow_small=True, dataset=[{"text": "x"}] * 40, echo=None)
    guard = EntropyGuard(echo=None, output_dir=tmp_path)
    args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=1e-3)
    state = TrainerState(global_step=0, is_world_process_zero=True)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    guard.monitor = _StubMonitor(_probe_metrics(0.8), 0)
    for callback in (size, guard):  # the override's callback first: its train begin runs before the trim
        callback.on_train_begin(args, state, TrainerControl(), optimizer=optimizer)
    for callback in (size, guard):
        callback.on_step_begin(args, state, TrainerControl())
    written = [json.loads(line) for line in events.read_text().splitlines()]
    assert sorted(e["action"] for e in written) == ["allow_small_dataset", "baseline"]  # the old run's halt is gone
    assert next(e for e in written if e["action"] == "allow_small_dataset")["count"] == 40
