"""`moe-finetune merge`: a run's adapter becomes a plain transformers model that answers like the adapter."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

from moe_finetune import merge
from moe_finetune.cli import main
from moe_finetune.merge import (
    ProbeOutput,
    compare_probes,
    fold_expert_lora,
    merge_adapter,
    probe_batch,
    run_probe,
)
from moe_finetune.models.families import get_family
from moe_finetune.models.lora import apply_lora
from moe_finetune.sections import LoraSection

REPO = Path(__file__).resolve().parents[1]

# A short, fast run of the smoke recipe; a high rate so that 3 steps move the logits visibly.
QUICK_RUN = (
    "training.max_steps=3",
    "training.save_steps=100",
    "training.logging_steps=1",
    "training.per_device_train_batch_size=4",
    "training.max_length=64",
    "training.learning_rate=5e-3",
    "data.max_examples=48",
    "data.min_examples=10",
    "data.eval_fraction=0",
    "monitor.enabled=false",
    "guards.enabled=false",
)

# Run in a fresh interpreter where peft cannot be imported (as on a serving machine without it): every
# import finder is wrapped so that neither the package nor its metadata can be found.
WITHOUT_PEFT = """
import importlib.abc, sys
from importlib.metadata import DistributionFinder

class WithoutPeft(importlib.abc.MetaPathFinder):
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "peft" or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
    def find_distributions(self, context=None):
        found = getattr(self.finder, "find_distributions", None)
        dists = found(context or DistributionFinder.Context()) if found else ()
        return (d for d in dists if (d.metadata["Name"] or "").lower() != "peft")
    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [WithoutPeft(f) for f in sys.meta_path]
"""


def train_run(out: Path, *overrides: str) -> str:
    """Train the smoke recipe for 3 steps into `out` through the CLI; returns what it printed."""
    argv = ["train", str(REPO / "recipes" / "smoke.yaml"), "--output-dir", str(out)]
    for item in (*QUICK_RUN, *overrides):
        argv += ["--set", item]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    assert code == 0, printed.getvalue()[-2000:]
    return printed.getvalue()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def adapted_logits(run: Path, batch: dict) -> torch.Tensor:
    """The adapted model's logits, computed with PEFT directly (not through merge.py)."""
    from peft import PeftModel

    base_dir = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, _private_model_cache: Path) -> dict[str, Path]:
    """Three short runs, trained once: PEFT's expert kernel, the fast kernel, and trained routers."""
    root = tmp_path_factory.mktemp("merge-runs")
    printed = train_run(root / "peft", "lora.expert_kernel=peft")
    assert f"moe-finetune merge {root / 'peft'}" in printed  # train says how to serve what it made
    train_run(root / "fast", "lora.expert_kernel=fast")
    train_run(root / "router", "lora.router=true", "lora.expert_kernel=peft")
    return {"peft": root / "peft", "fast": root / "fast", "router": root / "router"}


@pytest.fixture(scope="session")
def merged_peft_run(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("merged") / "model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["merge", str(runs["peft"]), "--output", str(out)])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


# ------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_merged_run_loads_in_plain_transformers_without_peft_and_gives_the_adapted_logits(
    runs, merged_peft_run, tmp_path: Path
) -> None:
    out, printed = merged_peft_run
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(name.endswith(".safetensors") for name in names)
    assert "adapter_config.json" not in names
    assert "merge check on" in printed and "ok; routing: same top-2 experts in all 2 MoE layers" in printed

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = probe_batch(tokenizer)
    torch.save(dict(batch), tmp_path / "batch.pt")
    code = WITHOUT_PEFT + (
        "import torch, transformers\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**batch).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(name.split('.')[0] == 'peft' for name in sys.modules)\n"
        "assert not transformers.utils.is_peft_available()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = torch.load(tmp_path / "logits.pt")
    adapted = adapted_logits(runs["peft"], batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(merged[real], adapted[real], atol=1e-4, rtol=1e-4)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        json.loads((runs["peft"] / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    with torch.no_grad():
        untouched = base(**batch).logits
    assert (untouched[real] - adapted[real]).abs().max() > 100 * (merged[real] - adapted[real]).abs().max()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text())["use_cache"] is True


@pytest.mark.slow
def test_an_adapter_trained_on_the_fast_expert_kernel_merges_like_peft_s(runs, tmp_path: Path) -> None:
    assert json.loads((runs["fast"] / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0
    result = merge_adapter(runs["fast"], tmp_path / "merged", echo=lambda _line: None)
    assert result.check.ok and result.check.adapter_effect > 1e-3
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = probe_batch(tokenizer)
    with torch.no_grad():
        merged = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(merged[real], adapted_logits(runs["fast"], batch)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_trained_routers_are_merged_into_the_model(runs, tmp_path: Path) -> None:
    adapter = runs["router"] / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]
    merge_adapter(runs["router"], tmp_path / "merged", echo=lambda _line: None)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as saved:
        # PEFT saves a modules_to_save copy under the module's own name, beside the LoRA factors
        keys = saved.keys()  # a safe_open handle is not a mapping
        trained = {key: saved.get_tensor(key) for key in keys if "lora_" not in key}
    assert sorted(trained) == [f"base_model.model.model.layers.{i}.mlp.gate.weight" for i in (0, 1)]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    for key, weight in trained.items():
        name = key.removeprefix("base_model.model.")
        torch.testing.assert_close(merged[name], weight)
        assert not torch.allclose(base[name], weight)


@pytest.mark.slow
def test_a_base_in_the_original_per_expert_layout_is_written_back_in_it_shard_by_shard(
    tiny_mixtral_dir: Path, tmp_path: Path
) -> None:
    # save_pretrained writes Mixtral's hub layout (block_sparse_moe.experts.N.w1 ...), which transformers 5
    # fuses on load: the merged folder must come back in the layout vLLM and TGI read.
    # (a model built from its config, not loaded, is saved in the default original layout)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    base = transformers.MixtralForCausalLM(loaded.config)
    base.load_state_dict(loaded.state_dict())
    base.save_pretrained(tmp_path / "base")
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as saved:
        keys = saved.keys()
    assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in keys
    transformers.AutoTokenizer.from_pretrained(tiny_mixtral_dir).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model, _ = apply_lora(model, LoraSection(r=4), get_family("mixtral"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    result = merge_adapter(
        tmp_path / "adapter", tmp_path / "merged", max_shard_size="400KB", echo=lambda _l: None
    )
    assert result.check.ok
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in index["weight_map"]
    assert not any("gate_up_proj" in key for key in index["weight_map"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = probe_batch(transformers.AutoTokenizer.from_pretrained(tmp_path / "merged"))
    assert compare_probes(run_probe(peft_model.eval(), batch), run_probe(reloaded, batch), "float32").ok


@pytest.mark.slow
def test_merge_in_bfloat16_writes_bfloat16_weights(runs, tmp_path: Path) -> None:
    result = merge_adapter(runs["peft"], tmp_path / "merged", dtype="bfloat16", echo=lambda _line: None)
    assert result.dtype == "bfloat16" and result.check.ok
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
def test_an_adapter_trained_on_a_quantized_base_goes_into_the_unquantized_weights_and_says_so(
    runs, tmp_path: Path
) -> None:
    run = tmp_path / "qlora-run"
    shutil.copytree(runs["peft"], run)
    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    recipe["model"]["quantization"] = {"bits": 4, "quant_type": "nf4"}
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    lines: list[str] = []
    result = merge_adapter(run, echo=lines.append)
    assert result.output == run / "merged"
    assert any("4-bit base" in line and "unquantized float32 base weights" in line for line in lines)
    config = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.slow
def test_an_adapter_trained_on_4_bit_experts_merges_into_the_full_precision_base(tmp_path: Path) -> None:
    run = tmp_path / "qlora"
    train_run(run, "model.quantization.bits=4")
    lines: list[str] = []
    result = merge_adapter(run, echo=lines.append)
    assert result.check.ok and result.check.adapter_effect > 1e-3
    assert any("trained on a 4-bit base" in line for line in lines)
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged")
    assert merged.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # no packed 4-bit stack in the output


# ------------------------------------------------------------------------------------------------
# Refusals and failures


def test_merge_refuses_a_non_empty_output_without_overwrite(random_adapter, tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    code, _, err = cli(capsys, "merge", str(random_adapter), "--output", str(out))
    assert code == 2
    assert "--overwrite" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "earlier work"


def test_overwrite_replaces_an_earlier_merge_whole(random_adapter, tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    code, _, err = cli(capsys, "merge", str(random_adapter), "--output", str(out))
    assert code == 0, err
    marker = json.loads((out / "moe_finetune_merge.json").read_text())
    assert marker["adapter"] == str(random_adapter.resolve()) and marker["check"]
    (out / "config.json").write_text("{}")  # an earlier merge, changed since: replaced whole
    code, _, err = cli(capsys, "merge", str(random_adapter), "--output", str(out), "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging or set-aside folder left


@pytest.mark.slow
def test_merge_refuses_to_write_over_the_run_it_reads(runs, capsys) -> None:
    code, _, err = cli(
        capsys, "merge", str(runs["peft"]), "--output", str(runs["peft"] / "adapter"), "--overwrite"
    )
    assert code == 2 and "which this merge reads" in err
    assert (runs["peft"] / "adapter" / "adapter_config.json").is_file()


def test_merge_never_overwrites_the_local_base_it_reads(
    random_adapter, tiny_mixtral_dir, tmp_path, capsys
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_mixtral_dir, base)
    code, _, err = cli(
        capsys, "merge", str(random_adapter), "--base", str(base), "--output", str(base), "--overwrite"
    )
    assert code == 2 and "which this merge reads" in err
    assert (base / "config.json").is_file()


def test_a_bad_shard_size_exits_2_before_anything_loads(random_adapter, tmp_path: Path, capsys) -> None:
    code, _, err = cli(
        capsys, "merge", str(random_adapter), "--output", str(tmp_path / "m"), "--max-shard-size", "lots"
    )
    assert code == 2 and "--max-shard-size: 'lots' is not a size" in err
    assert not (tmp_path / "m").exists()


def test_bad_inputs_exit_2_with_a_message_naming_them(random_adapter, tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, "merge", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty-run").mkdir()
    code, _, err = cli(capsys, "merge", str(tmp_path / "empty-run"))
    assert code == 2 and "has no adapter" in err
    adapter = tmp_path / "no-weights"
    adapter.mkdir()
    shutil.copy(random_adapter / "adapter_config.json", adapter)
    code, _, err = cli(capsys, "merge", str(adapter))
    assert code == 2 and "no adapter weights" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(random_adapter), "--dtype", "int3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_a_base_that_cannot_be_loaded_exits_2_naming_where_its_name_came_from(
    random_adapter, tmp_path: Path, capsys
) -> None:
    code, _, err = cli(
        capsys,
        "merge",
        str(random_adapter),
        "--base",
        str(tmp_path / "no-model"),
        "--output",
        str(tmp_path / "m"),
    )
    assert code == 2 and "named by --base" in err
    assert not (tmp_path / "m").exists()


def test_a_merge_that_does_not_reproduce_the_adapter_exits_1_and_writes_nothing(
    random_adapter, tmp_path: Path, capsys, monkeypatch
) -> None:
    # A broken merge (here: the adapter dropped instead of merged) must be caught by the check, before writing.
    monkeypatch.setattr(merge, "merge_and_unload", lambda model: model.unload())
    code, _, err = cli(capsys, "merge", str(random_adapter), "--output", str(tmp_path / "merged"))
    assert code == 1
    assert "does not reproduce the adapted one" in err and "MISMATCH" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_save_that_fails_leaves_no_folder_behind(random_adapter, tmp_path: Path, monkeypatch) -> None:
    def half_written(model, folder: Path, max_shard_size) -> None:
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(merge, "_save_weights_shard_by_shard", half_written)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(random_adapter, tmp_path / "merged", echo=lambda _line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_layout_revert_that_cannot_go_shard_by_shard_is_saved_whole(
    tiny_mixtral_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    calls: list[bool] = []
    save = type(model).save_pretrained

    def save_pretrained(self, folder, **kwargs):
        calls.append(hasattr(self, "hf_device_map"))
        if len(calls) == 1:  # what transformers raises when a conversion straddles two shards
            (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
            raise RuntimeError("We could not revert some weight conversions because of offlading, and ...")
        return save(self, folder, **kwargs)

    monkeypatch.setattr(type(model), "save_pretrained", save_pretrained)
    merge._save_weights_shard_by_shard(model, tmp_path, "2GB")
    assert calls == [True, False]  # shard by shard first, then the whole state dict at once
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not hasattr(model, "hf_device_map")


# ------------------------------------------------------------------------------------------------
# The pieces


def test_folding_expert_lora_in_place_equals_peft_s_own_merge() -> None:
    from moe_finetune.models.tiny import build_tiny

    def adapted():
        model = transformers.AutoModelForCausalLM.from_pretrained(build_tiny("qwen2_moe"))
        torch.manual_seed(0)
        peft_model, _ = apply_lora(model, LoraSection(r=4), get_family("qwen2_moe"))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        return peft_model

    reference = adapted().merge_and_unload().state_dict()
    model = adapted()
    assert fold_expert_lora(model) == 4  # gate_up_proj and down_proj of 2 MoE layers
    folded = merge.merge_and_unload(model).state_dict()
    assert folded.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(folded[key], reference[key], atol=1e-6, rtol=1e-5)


def _probe(
    chosen: list[list[list[int]]], router_logits: list[list[list[float]]], logits: list[list[float]]
) -> ProbeOutput:
    """One row of `T` tokens: per layer (T, k) choices and (T, E) router logits; (T, V) logits."""
    return ProbeOutput(
        logits=torch.tensor([logits]),
        router_logits=[torch.tensor([layer]) for layer in router_logits],
        chosen=[torch.tensor([layer]) for layer in chosen],
        lengths=[len(logits)],
        layer_names=[f"model.layers.{i}.mlp.gate" for i in range(len(chosen))],
    )


def test_a_routing_flip_at_a_near_tie_is_excused_and_the_row_compared_up_to_it() -> None:
    # token 1: experts 1 and 2 nearly tied (gap 1e-3); rounding moved them by 1e-3 and the choice flipped
    adapted = _probe([[[0, 1], [0, 1], [0, 1]]], [[[3.0, 2.0, 0.0], [3.0, 2.0, 1.999], [3.0, 2.0, 0.0]]],
                     [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # fmt: skip
    merged = _probe([[[0, 1], [0, 2], [0, 1]]], [[[3.0, 2.0, 0.0], [3.0, 1.999, 2.0], [3.0, 2.0, 0.0]]],
                    [[1.0, 0.0], [0.0, 9.0], [5.0, 5.0]])  # fmt: skip
    check = compare_probes(adapted, merged, "bfloat16")
    assert check.ok and check.near_ties == 1 and check.compared == 1
    assert check.max_logit_diff == 0.0  # the tokens from the flip on are not compared


def test_a_routing_change_rounding_cannot_explain_is_a_mismatch_with_the_numbers() -> None:
    adapted = _probe([[[0, 1]]], [[[3.0, 2.0, 0.0]]], [[1.0, 0.0]])
    merged = _probe([[[0, 2]]], [[[3.0, 0.0, 2.5]]], [[1.0, 0.0]])  # the router's logits moved by 2.5
    check = compare_probes(adapted, merged, "bfloat16")
    assert not check.ok and not check.routing_ok
    assert "adapted experts [0, 1], merged [0, 2]" in check.unexplained[0]
    assert "MISMATCH" in check.line()


def test_logits_beyond_the_dtype_s_tolerance_are_a_mismatch() -> None:
    adapted = _probe([[[0, 1], [0, 1]]], [[[3.0, 2.0, 0.0]] * 2], [[4.0, 0.0], [0.0, 4.0]])
    close = _probe([[[0, 1], [0, 1]]], [[[3.0, 2.0, 0.0]] * 2], [[4.0 + 1e-5, 0.0], [0.0, 4.0]])
    far = _probe([[[0, 1], [0, 1]]], [[[3.0, 2.0, 0.0]] * 2], [[4.0, 0.0], [0.0, 4.1]])
    assert compare_probes(adapted, close, "float32").ok
    check = compare_probes(adapted, far, "float32")
    assert not check.logits_ok and check.limit == pytest.approx(4e-4)
    assert compare_probes(adapted, far, "bfloat16").ok  # 0.1 is within bfloat16's rounding at this scale
