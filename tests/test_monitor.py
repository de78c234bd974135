"""RoutingMonitor on a real SFTTrainer: metrics in the Trainer's own log, routing.jsonl, clean-up, ranks."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from moe_finetune.callbacks import ROUTING_FILE, RoutingMonitor, attach
from moe_finetune.callbacks.monitor import MONITOR_ATTRIBUTE

ROUTING_KEYS = (
    "routing/entropy",
    "routing/entropy_min",
    "routing/load_max",
    "routing/load_cv",
    "routing/dead_experts",
    "routing/aux_loss",
    "routing/z_loss",
    "routing/drop_fraction",
)


def dataset(rows: int = 64, offset: int = 0):
    import datasets

    return datasets.Dataset.from_list(
        [
            {"prompt": f"What is {i} plus {i}?" + " Think." * (i % 4), "completion": f" {2 * i}"}
            for i in range(offset, offset + rows)
        ]
    )


def make_trainer(
    model_dir: Path,
    output_dir: Path,
    *,
    callbacks=None,
    eval_rows: int = 0,
    data_offset: int = 0,
    **overrides,
):
    """SFTTrainer + LoRA (attention and experts) on the tiny model, as train.py builds it."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    model, _ = apply_lora(model, LoraSection(), get_family("mixtral"))
    settings = {
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "max_length": 64,
        "report_to": "none",
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    args = SFTConfig(output_dir=str(output_dir), **settings)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset(offset=data_offset),
        eval_dataset=dataset(eval_rows, offset=500) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def capture_hooks(model) -> int:
    """Hooks installed by a RoutingCapture anywhere in the model (transformers and the Trainer add their own)."""
    hooks = [
        hook
        for module in model.modules()
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    ]
    return sum("RoutingCapture" in getattr(hook, "__qualname__", "") for hook in hooks)


def read_routing(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / ROUTING_FILE).read_text().splitlines()]


def train_entries(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: placed before user callbacks, it sees `logs` as passed."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_attached_monitor_logs_routing_metrics_in_the_same_entry_as_the_loss(tiny_mixtral_dir, tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, callbacks=[recorder])
    monitor = RoutingMonitor(drift_steps=2)
    hooks_during: list[int] = []
    monitor.add_listener(lambda *_: hooks_during.append(capture_hooks(trainer.model)))
    attach(trainer, monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not any("attach(" in str(w.message) for w in caught)  # attached: nothing to warn about

    entries = train_entries(trainer)
    assert [entry["step"] for entry in entries] == [1, 2, 3, 4]
    for entry in entries:
        assert set(ROUTING_KEYS) <= set(entry)
        assert 0.0 < entry["routing/entropy"] <= 1.0
        assert entry["routing/aux_loss"] == pytest.approx(entry["aux_loss"], rel=1e-4)  # TRL's own value
    # drift at the first logging step, then every drift_steps
    assert [("routing/drift" in entry) for entry in entries] == [True, False, True, False]
    # the logger placed before the monitor saw the routing metrics
    seen = [logs for logs in recorder.logs if "loss" in logs]
    assert len(seen) == 4 and all(set(ROUTING_KEYS) <= set(logs) for logs in seen)

    records = read_routing(tmp_path)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert [record["loss"] for record in records] == pytest.approx([entry["loss"] for entry in entries])
    for record in records:
        assert len(record["layers"]) == 2
        for layer in record["layers"]:
            assert len(layer["load"]) == 8 and sum(layer["load"]) == pytest.approx(1.0)
            assert len(layer["prob"]) == 8
    # every real token once: padding excluded and checkpoint recomputes skipped (SFTConfig turns
    # gradient checkpointing on) -- TRL counts the same tokens from the attention mask
    tokens_seen = [entry["num_tokens"] for entry in entries]
    per_step = [b - a for a, b in zip([0, *tokens_seen], tokens_seen, strict=False)]
    assert [record["tokens"] for record in records] == per_step

    assert hooks_during[0] > 0 and capture_hooks(trainer.model) == 0  # hooks released at train end
    assert monitor.capture is None and not hasattr(trainer.model, MONITOR_ATTRIBUTE)
    assert monitor.latest_step == 4 and len(monitor.history) == 4


def test_bare_monitor_still_fills_log_history_and_warns_once_that_loggers_miss_it(tiny_mixtral_dir, tmp_path):
    recorder = Recorder()
    monitor = RoutingMonitor()
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, callbacks=[recorder, monitor], logging_steps=2)
    with pytest.warns(UserWarning, match=r"attach\(trainer, monitor\)") as caught:
        trainer.train()
    assert sum("attach(trainer, monitor)" in str(w.message) for w in caught) == 1

    entries = train_entries(trainer)
    assert [entry["step"] for entry in entries] == [2, 4]
    assert all(set(ROUTING_KEYS) <= set(entry) for entry in entries)
    assert not any("routing/entropy" in logs for logs in recorder.logs)  # the limitation the warning names
    assert [record["step"] for record in read_routing(tmp_path)] == [2, 4]


def test_evaluation_forwards_do_not_enter_the_training_window(tiny_mixtral_dir, tmp_path):
    trainer = make_trainer(
        tiny_mixtral_dir, tmp_path, eval_rows=8, max_steps=2, eval_strategy="steps", eval_steps=1
    )
    attach(trainer, RoutingMonitor(probe_size=0))
    trainer.train()
    tokens_seen = [entry["num_tokens"] for entry in train_entries(trainer)]
    assert [record["tokens"] for record in read_routing(tmp_path)] == [
        tokens_seen[0],
        tokens_seen[1] - tokens_seen[0],
    ]


def test_listener_acts_in_the_logging_step_that_showed_the_metrics(tiny_mixtral_dir, tmp_path):
    monitor = RoutingMonitor(probe_size=0)
    calls = []

    def stop_at_four(step, metrics, state, control):
        calls.append((step, metrics.entropy, state.global_step))
        if step == 4:
            control.should_training_stop = True

    monitor.add_listener(stop_at_four)
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, max_steps=8, logging_steps=2)
    attach(trainer, monitor)
    trainer.train()
    assert [(step, global_step) for step, _, global_step in calls] == [(2, 2), (4, 4)]
    assert trainer.state.global_step == 4
    assert monitor.latest is not None and calls[-1][1] == monitor.latest.entropy


def test_non_finite_router_output_is_logged_without_crashing(tiny_mixtral_dir, tmp_path):
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, max_steps=2)
    with torch.no_grad():
        router = trainer.model.get_base_model().model.layers[0].mlp.gate
        router.weight[0, 0] = float("nan")
    monitor = RoutingMonitor()
    attach(trainer, monitor)
    trainer.train()
    assert monitor.latest is not None and monitor.latest.finite is False
    records = read_routing(tmp_path)
    assert len(records) == 2 and records[-1]["finite"] is False
    assert records[-1]["entropy"] is None  # nan is written as JSON null
    assert "NON-FINITE" in monitor.format_table()


def test_format_table_has_a_row_per_layer(tiny_mixtral_dir, tmp_path):
    lines: list[str] = []
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, max_steps=2)
    attach(trainer, RoutingMonitor(echo=lines.append, probe_size=0))
    trainer.train()
    assert len(lines) == 1
    table = lines[0].splitlines()
    assert table[0].startswith("routing at step 2:")
    assert [row.split()[0] for row in table[2:]] == ["layers.0.mlp.gate", "layers.1.mlp.gate"]


def test_the_final_table_says_when_drift_was_measured_when_that_was_not_its_step(tiny_mixtral_dir, tmp_path):
    lines: list[str] = []
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, max_steps=3, logging_steps=1)
    attach(trainer, RoutingMonitor(echo=lines.append, probe_size=4, drift_steps=50))
    trainer.train()
    title = lines[-1].splitlines()[0]
    assert title.startswith("routing at step 3:") and "(measured at step 1)" in title  # drift is every 50 steps


def test_a_second_run_in_the_same_directory_starts_routing_jsonl_over(tiny_mixtral_dir, tmp_path):
    trainer = make_trainer(tiny_mixtral_dir, tmp_path, max_steps=2)
    attach(trainer, RoutingMonitor(probe_size=0))
    trainer.train()
    trainer.train()
    assert [record["step"] for record in read_routing(tmp_path)] == [1, 2]


def test_a_resumed_run_drops_the_lines_written_after_its_checkpoint(tmp_path):
    from moe_finetune.rundir import keep_records_up_to

    path = tmp_path / ROUTING_FILE
    path.write_text("".join(json.dumps({"step": step}) + "\n" for step in (10, 20, 30)) + '{"step": 4')
    keep_records_up_to(path, 20)  # resuming from checkpoint-20; the last line was cut by the crash
    assert [record["step"] for record in read_routing(tmp_path)] == [10, 20]


def test_attach_wraps_trainer_log_once(tiny_mixtral_dir, tmp_path):
    trainer = make_trainer(tiny_mixtral_dir, tmp_path)
    attach(trainer, RoutingMonitor())
    wrapped = trainer.log
    attach(trainer)
    assert trainer.log is wrapped


_RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, sys.argv[3])
    import test_monitor as helpers
    from moe_finetune.callbacks import RoutingMonitor, attach

    model_dir, out_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])

    class Recording(RoutingMonitor):
        local = []

        def close_window(self, state, control, **kwargs):
            self.local.append(self.capture.sums.tokens.amax().item())  # before the all-reduce
            super().close_window(state, control, **kwargs)

    # different data on each rank, so the local sums really differ
    trainer = helpers.make_trainer(
        model_dir, os.path.join(out_dir, "run"), data_offset=1000 * rank, use_cpu=True, logging_steps=2
    )
    monitor = Recording(drift_steps=2)
    attach(trainer, monitor)
    trainer.train()
    result = {
        "world": trainer.args.world_size,
        "local_tokens": monitor.local,
        "history": monitor.history,
        "logged": [{k: v for k, v in e.items() if k.startswith("routing/")} for e in trainer.state.log_history if "loss" in e],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    """
)


@pytest.mark.slow
def test_two_ranks_log_identical_all_reduced_metrics(tiny_mixtral_dir, tmp_path, two_ranks):
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    done = two_ranks(script, str(tiny_mixtral_dir), str(tmp_path), str(Path(__file__).parent), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["local_tokens"] != ranks[1]["local_tokens"]  # each rank routed its own data
    assert ranks[0]["history"] == ranks[1]["history"]  # ...and both log the reduced numbers
    assert ranks[0]["logged"] == ranks[1]["logged"] and len(ranks[0]["logged"]) == 2
    reduced = [record["tokens"] for record in ranks[0]["history"]]
    assert reduced == [a + b for a, b in zip(ranks[0]["local_tokens"], ranks[1]["local_tokens"], strict=True)]
    # only rank 0 writes routing.jsonl: one line per logging step, not one per rank
    assert [r["step"] for r in read_routing(tmp_path / "run")] == [2, 4]
