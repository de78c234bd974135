"""`moe-finetune export`: a run's adapter re-emitted for serving unmerged, per expert or fused, checked first.

No engine runs here (no GPU, no vLLM or SGLang install). What stands in for one: PEFT itself loads every export
back, into transformers' fused model (the fused format) or into a per-expert model built from the hub-layout
checkpoint, with modules named as that checkpoint names them (the per-expert format), and must give the adapted
model's logits and routing; every expert's delta must equal PEFT's own `get_delta_weight` exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_finetune import export, merge
from moe_finetune.cli import main
from moe_finetune.export import PER_EXPERT_NAMES, PerExpertNames, export_adapter
from moe_finetune.merge import compare_probes, probe_batch, run_probe
from moe_finetune.models.families import FAMILIES, get_family
from moe_finetune.models.lora import apply_lora
from moe_finetune.models.tiny import build_tiny
from moe_finetune.outputs import EXPORT_MARKER, foreign_entries
from moe_finetune.sections import LoraSection

PER_EXPERT_FAMILIES = sorted(PER_EXPERT_NAMES)  # all seven but gpt_oss
ALL_FAMILIES = sorted(FAMILIES)


def quiet(_line: str) -> None:
    pass


@pytest.fixture(autouse=True)
def _quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def randomize(peft_model, seed: int = 0) -> None:
    """Random B (PEFT starts it at zero), so that every expert's delta differs from every other's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="session")
def family_adapter(tmp_path_factory: pytest.TempPathFactory, _private_model_cache: Path):
    """family -> an adapter folder (attention + every expert stack, r 4, random B, with the tokenizer), made once."""
    made: dict[str, Path] = {}

    def make(family: str, **lora) -> Path:
        key = f"{family}{sorted(lora.items())}"
        if key not in made:
            folder = tmp_path_factory.mktemp(f"adapter-{family}") / "adapter"
            model = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(family))
            peft_model, _ = apply_lora(model, LoraSection(r=4, **lora), get_family(family))
            randomize(peft_model)
            peft_model.save_pretrained(folder)
            transformers.AutoTokenizer.from_pretrained(build_tiny(family)).save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make


def adapted_model(family: str, adapter: Path):
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(family))
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def batch_for(family: str) -> dict:
    return probe_batch(transformers.AutoTokenizer.from_pretrained(build_tiny(family)))


def copy_of(folder: Path, where: Path) -> Path:
    shutil.copytree(folder, where)
    return where


# ------------------------------------------------------------------------------------------------
# A per-expert model: transformers' eager expert loop over per-expert nn.Linear modules, built from the
# hub-layout checkpoint (the layout `merge` writes back for a per-expert base)


class PerExpertExperts(torch.nn.Module):
    """`experts.{e}.{gate|up|down}` Linears computing what transformers' fused experts compute (gate and up,
    act(gate) * up, down, times the routing weight), as vLLM and SGLang hold per-expert models."""

    def __init__(self, fused: torch.nn.Module, names: PerExpertNames) -> None:
        super().__init__()
        experts, two_intermediate, hidden = fused.gate_up_proj.shape
        self.names, self.count, self.act = names, experts, fused.act_fn
        for index in range(experts):
            expert = torch.nn.Module()
            setattr(expert, names.gate, torch.nn.Linear(hidden, two_intermediate // 2, bias=False))
            setattr(expert, names.up, torch.nn.Linear(hidden, two_intermediate // 2, bias=False))
            setattr(expert, names.down, torch.nn.Linear(two_intermediate // 2, hidden, bias=False))
            self.add_module(str(index), expert)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for index in range(self.count):
            token, slot = torch.where(top_k_index == index)
            if token.numel() == 0:
                continue
            expert, x = getattr(self, str(index)), hidden_states[token]
            hidden = self.act(getattr(expert, self.names.gate)(x)) * getattr(expert, self.names.up)(x)
            out.index_add_(0, token, getattr(expert, self.names.down)(hidden) * top_k_weights[token, slot, None])
        return out


# transformers' own renaming of Mixtral's hub names (conversion_mapping.py: WeightRenaming(".block_sparse_moe.",
# ".mlp.")): the one name a hub checkpoint and the transformers module tree do not share.
def to_transformers_names(key: str) -> str:
    return key.replace(".block_sparse_moe.", ".mlp.")


@pytest.fixture(scope="session")
def hub_base(tmp_path_factory: pytest.TempPathFactory, _private_model_cache: Path):
    """family -> the tiny base saved in its hub (per-expert) layout, as test_merge builds one."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            folder = tmp_path_factory.mktemp(f"hub-{family}") / "base"
            loaded = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(family))
            base = type(loaded)(loaded.config)  # built, not loaded: saved in the original per-expert layout
            base.load_state_dict(loaded.state_dict())
            merge._save_weights_shard_by_shard(base, folder, "2GB")
            transformers.AutoTokenizer.from_pretrained(build_tiny(family)).save_pretrained(folder)
            made[family] = folder
        return made[family]

    return make


def hub_keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        return set(saved.keys())


def per_expert_model(family: str, hub_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(family))
    for name, module in list(model.named_modules()):
        if name.endswith("mlp.experts"):
            model.get_submodule(name.rsplit(".", 1)[0]).experts = PerExpertExperts(module, PER_EXPERT_NAMES[family])
    state = {to_transformers_names(k): v for k, v in load_file(str(hub_dir / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)  # every weight of the hub checkpoint has its module, and back
    return model.eval()


@contextlib.contextmanager
def without_v5_conversion(model):
    """PEFT 0.22 turns a per-expert adapter into its own fused layout when the model is a transformers-5 MoE it
    knows (peft/utils/transformers_weight_conversion.py, keyed on `config.model_type`); the reference keeps
    per-expert modules, as an engine does, so PEFT is shown a model type it has no conversion for while it loads."""
    model_type = model.config.model_type
    model.config.model_type = "per_expert_reference"
    try:
        yield
    finally:
        model.config.model_type = model_type


def in_transformers_names(exported: Path, where: Path) -> Path:
    """The exported adapter with the hub's MoE block name turned into transformers' (only Mixtral differs)."""
    where.mkdir()
    tensors = load_file(str(exported / "adapter_model.safetensors"))
    save_file({to_transformers_names(k): v for k, v in tensors.items()}, str(where / "adapter_model.safetensors"))
    shutil.copy2(exported / "adapter_config.json", where / "adapter_config.json")
    return where


# ------------------------------------------------------------------------------------------------
# Per expert


@pytest.mark.parametrize("family", PER_EXPERT_FAMILIES)
def test_per_expert_export_reproduces_every_expert_delta_of_peft_exactly(family_adapter, family, tmp_path) -> None:
    from peft.tuners.lora.layer import ParamWrapper

    adapter = family_adapter(family)
    printed: list[str] = []
    result = export_adapter(adapter, tmp_path / "out", format="per-expert", echo=printed.append)
    assert result.check.ok and result.check.max_diff == 0.0
    assert any(line.startswith("export check (per-expert, float32): 32 expert deltas") for line in printed)
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    names = PER_EXPERT_NAMES[family]
    assert "target_parameters" not in config
    assert {names.gate, names.up, names.down} <= set(config["target_modules"])
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) <= set(
        config["target_modules"]
    )
    # the reference: PEFT's own model of the source adapter on the real weights, not export's meta-device view
    compared = 0
    for name, wrapper in adapted_model(family, adapter).named_modules():
        if not isinstance(wrapper, ParamWrapper):
            continue
        delta = wrapper.get_delta_weight("default")  # (E, out, in)
        module = name.removeprefix("base_model.model.").removesuffix(".base_layer").replace(
            ".mlp.experts", f".{names.moe_module}.experts"
        )
        projections = [names.gate, names.up] if wrapper.parameter_name == "gate_up_proj" else [names.down]
        for expert in range(delta.shape[0]):
            keys = [f"base_model.model.{module}.{expert}.{p}" for p in projections]
            a = tensors[keys[0] + ".lora_A.weight"]
            assert all(torch.equal(tensors[k + ".lora_A.weight"], a) for k in keys)  # gate and up share A_e
            b = torch.cat([tensors[k + ".lora_B.weight"] for k in keys])  # gate rows above up rows
            assert torch.equal((b @ a) * wrapper.scaling["default"], delta[expert])
            compared += 1
    assert compared == 32


@pytest.mark.parametrize("family", PER_EXPERT_FAMILIES)
def test_an_adapter_exported_per_expert_gives_the_adapted_logits_in_a_per_expert_model(
    family_adapter, hub_base, family, tmp_path
) -> None:
    from peft import PeftModel

    adapter, hub = family_adapter(family), hub_base(family)
    export_adapter(adapter, tmp_path / "out", format="per-expert", echo=quiet)
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    # every per-expert module the export names is a Linear of the hub checkpoint, under that checkpoint's name
    expert_modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors if ".experts." in k}
    assert expert_modules and {m + ".weight" for m in expert_modules} <= hub_keys(hub)

    loaded_into = per_expert_model(family, hub)
    with without_v5_conversion(loaded_into), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found missing adapter keys")  # shared experts: see above
        served = PeftModel.from_pretrained(loaded_into, str(in_transformers_names(tmp_path / "out", tmp_path / "tf")))
    served.eval()
    state = served.state_dict()
    for key, value in tensors.items():  # every exported factor reached its module (none left at PEFT's init)
        loaded = to_transformers_names(key).replace(".lora_A.weight", ".lora_A.default.weight")
        loaded = loaded.replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(state[loaded], value), key

    adapted = adapted_model(family, adapter)
    batch = batch_for(family)
    reference = run_probe(adapted, batch)
    with adapted.disable_adapter():
        without = run_probe(adapted, batch)
    check = compare_probes(reference, run_probe(served, batch), "float32", base=without)
    assert check.ok, check.line()
    assert check.adapter_effect > 100 * max(check.max_logit_diff, 1e-7)

    # and the merged hub-layout checkpoint `merge` writes holds W_e + (alpha/r)·B_e·A_e of the exported factors
    merge.merge_adapter(adapter, tmp_path / "merged", base=str(hub), echo=quiet)
    merged, base = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(hub / "model.safetensors"))
    scaling = adapted.peft_config["default"].lora_alpha / adapted.peft_config["default"].r
    for module in sorted(expert_modules):
        a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
        torch.testing.assert_close(merged[module + ".weight"], base[module + ".weight"] + scaling * b @ a)


@pytest.mark.parametrize("family", PER_EXPERT_FAMILIES)
def test_peft_itself_reads_the_per_expert_export_back_onto_the_fused_model(family_adapter, family, tmp_path) -> None:
    # PEFT 0.22 converts adapters saved for transformers 4's per-expert modules into its fused layout on load
    # (gate and up stacked: rank 2r, block-diagonal B): the exported names are the per-expert names it knows.
    adapter = family_adapter(family)
    export_adapter(adapter, tmp_path / "out", format="per-expert", echo=quiet)
    with warnings.catch_warnings():
        # target_modules names the projections by their leaf names, which shared experts and dense MLP layers
        # share: PEFT gives those a LoRA of its own (B = 0) and says their keys are missing; they change nothing
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        back = adapted_model(family, tmp_path / "out")
    batch = batch_for(family)
    adapted = adapted_model(family, adapter)
    with adapted.disable_adapter():
        without = run_probe(adapted, batch)
    check = compare_probes(run_probe(adapted, batch), run_probe(back, batch), "float32", base=without)
    assert check.ok and check.adapter_effect > 100 * max(check.max_logit_diff, 1e-7), check.line()


def test_gpt_oss_ships_fused_only(family_adapter, tmp_path, capsys) -> None:
    code = main(["export", str(family_adapter("gpt_oss")), "--format", "per-expert", "--output", str(tmp_path / "o")])
    assert code == 2
    error = capsys.readouterr().err
    assert "interleaves gate and up" in error and "--format fused" in error
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Fused


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_fused_export_loads_back_in_peft_and_gives_the_same_logits(family_adapter, family, tmp_path) -> None:
    adapter = family_adapter(family)
    printed: list[str] = []
    result = export_adapter(adapter, tmp_path / "out", format="fused", echo=printed.append)
    assert result.check.ok
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    source = load_file(str(adapter / "adapter_model.safetensors"))
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
    # vLLM reads `experts.base_layer` as gate_up_proj and `experts` as down_proj
    assert any(k.endswith("mlp.experts.base_layer.lora_B.weight") for k in written)
    gate_up = next(v for k, v in written.items() if k.endswith("experts.base_layer.lora_B.weight"))
    experts = next(m for n, m in adapted_model(family, adapter).named_modules() if n.endswith("mlp.experts.base_layer"))
    assert gate_up.shape[0] == experts.out_features  # 2I rows: the gate_up stack's out features
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], list) and config["target_parameters"]
    flags = " ".join(result.serving)
    if family == "gpt_oss":
        assert "--enable-mixed-moe-lora-format" not in flags
    else:
        assert "--enable-mixed-moe-lora-format" in flags and '"is_3d_lora_weight": true' in flags
    batch = batch_for(family)
    with torch.no_grad():
        again = adapted_model(family, tmp_path / "out")(**batch).logits
        before = adapted_model(family, adapter)(**batch).logits
    assert torch.equal(again, before)


# ------------------------------------------------------------------------------------------------
# PEFT 0.17 - 0.19.0 files: the transposed layout


def transposed_copy(adapter: Path, where: Path, family: str, version: str | None = "0.18.1") -> Path:
    """The adapter as PEFT before 0.19.1 saved it: a stack (E, dim1, dim2) read as (E, in, out), so A is
    (E·r, dim1) and B (dim2, r·E) with delta[e] = s·(B_e·A_e)ᵀ. Written from the current file by moving values:
    old A_e = current B_eᵀ, old B_e = current A_eᵀ."""
    copy_of(adapter, where)
    tensors = load_file(str(where / "adapter_model.safetensors"))
    config = json.loads((where / "adapter_config.json").read_text())
    experts, rank = 8, config["r"]
    for key in [k for k in tensors if ".experts" in k and k.endswith("lora_A.weight")]:
        a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        old_a = torch.empty(experts * rank, b.shape[0])
        old_b = torch.empty(a.shape[1], rank * experts)
        for e in range(experts):
            old_a[e * rank : (e + 1) * rank] = b[:, e::experts].t()
            old_b[:, e::experts] = a[e * rank : (e + 1) * rank].t()
        tensors[key], tensors[key.replace("lora_A", "lora_B")] = old_a, old_b
    save_file(tensors, str(where / "adapter_model.safetensors"))
    if version is None:
        config.pop("peft_version", None)
    else:
        config["peft_version"] = version
    (where / "adapter_config.json").write_text(json.dumps(config))
    return where


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])  # olmoe: gate_up square, told by down_proj
def test_a_transposed_file_of_peft_0_18_exports_to_the_same_adapter_as_the_current_one(
    family_adapter, family, tmp_path
) -> None:
    adapter = family_adapter(family)
    old = transposed_copy(adapter, tmp_path / "old", family)
    assert load_file(str(old / "adapter_model.safetensors")).keys() == load_file(
        str(adapter / "adapter_model.safetensors")
    ).keys()
    for fmt in ("per-expert", "fused"):
        printed: list[str] = []
        export_adapter(old, tmp_path / f"old-{fmt}", format=fmt, echo=printed.append)
        export_adapter(adapter, tmp_path / f"new-{fmt}", format=fmt, echo=quiet)
        assert "read from PEFT 0.17-0.19.0's transposed layout" in printed[0] and printed[0].endswith(": ok")
        from_old = load_file(str(tmp_path / f"old-{fmt}" / "adapter_model.safetensors"))
        from_new = load_file(str(tmp_path / f"new-{fmt}" / "adapter_model.safetensors"))
        assert from_old.keys() == from_new.keys()
        assert all(torch.equal(from_old[k], from_new[k]) for k in from_new)
    peft_version = json.loads((tmp_path / "old-fused" / "adapter_config.json").read_text())["peft_version"]
    assert peft_version != "0.18.1"  # a converted file must not pass for the old layout


def test_a_file_whose_stacks_are_all_square_is_read_only_when_its_writer_says_which_layout(
    family_adapter, tmp_path, capsys
) -> None:
    # qwen3-moe's tiny gate_up_proj is (8, 64, 64): both layouts fit it
    adapter = family_adapter("qwen3_moe", target_parameters=["mlp.experts.gate_up_proj"])
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_version"] == "0.22.0"
    export_adapter(adapter, tmp_path / "ok", format="per-expert", echo=quiet)  # written by 0.22: current layout
    for version in ("0.18.1", None):
        unknown = transposed_copy(adapter, tmp_path / f"old-{version}", "qwen3_moe", version=version)
        code = main(["export", str(unknown), "--format", "per-expert", "--output", str(tmp_path / f"o-{version}")])
        assert code == 2
        error = capsys.readouterr().err
        assert "cannot be told" in error and "square" in error
        assert not (tmp_path / f"o-{version}").exists()
    # and gate_up_proj alone has no fused form vLLM reads (it takes `experts` for down_proj)
    code = main(["export", str(adapter), "--format", "fused", "--output", str(tmp_path / "fused")])
    assert code == 2 and "gate_up_proj alone cannot be served fused" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Rank and alpha patterns, rsLoRA


def test_rank_and_alpha_patterns_and_rslora_keep_every_module_s_scaling_per_expert(hub_base, tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    family = "olmoe"
    model = transformers.AutoModelForCausalLM.from_pretrained(build_tiny(family))
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"layers.1.mlp.experts.down_proj": 8, "layers.0.self_attn.q_proj": 2},
        alpha_pattern={"layers.0.mlp.experts.gate_up_proj": 64},
    )
    source = get_peft_model(model, config)
    randomize(source)
    source.save_pretrained(tmp_path / "adapter")
    result = export_adapter(tmp_path / "adapter", tmp_path / "out", format="per-expert", echo=quiet)
    assert result.check.ok
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["use_rslora"] is True
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.mlp.experts.5.down_proj.lora_A.weight"].shape[0] == 8
    assert export.resolve_rank_scaling(written, "model.layers.1.mlp.experts.5.down_proj") == (8, 16 / math.sqrt(8))
    assert export.resolve_rank_scaling(written, "model.layers.0.mlp.experts.2.up_proj") == (4, 64 / 2.0)
    assert export.resolve_rank_scaling(written, "model.layers.0.self_attn.q_proj") == (2, 16 / math.sqrt(2))

    loaded_into = per_expert_model(family, hub_base(family))
    with without_v5_conversion(loaded_into):
        served = PeftModel.from_pretrained(loaded_into, str(tmp_path / "out")).eval()
    batch = batch_for(family)
    check = compare_probes(run_probe(source.eval(), batch), run_probe(served, batch), "float32")
    assert check.ok, check.line()


# ------------------------------------------------------------------------------------------------
# What cannot be served, and the output folder


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("use_dora", True, "DoRA"),
        ("modules_to_save", ["model.layers.0.mlp.gate"], "moe-finetune merge"),
        ("init_lora_weights", "pissa", "changes the base weights"),
        ("lora_bias", True, "lora_bias"),
    ],
)
def test_what_an_engine_cannot_serve_is_refused_with_exit_2_naming_why(
    random_adapter, tmp_path, capsys, setting, value, named
) -> None:
    adapter = copy_of(random_adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[setting] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code = main(["export", str(adapter), "--format", "per-expert"])
    assert code == 2
    error = capsys.readouterr().err
    assert setting in error and named in error
    assert not (tmp_path / "adapter-per-expert").exists()


def test_a_mismatch_exits_1_and_writes_nothing(random_adapter, tmp_path, monkeypatch, capsys) -> None:
    def expert_major_columns(lora_a, lora_b, experts, rank, expert):  # the convention PEFT does not use
        return lora_a[expert * rank : (expert + 1) * rank], lora_b[:, expert * rank : (expert + 1) * rank]

    monkeypatch.setattr(export, "expert_factors", expert_major_columns)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", str(random_adapter), "--format", "per-expert", "--output", str(tmp_path / "out")])
    assert code == 1
    assert "MISMATCH" in printed.getvalue() and "Nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


def test_a_run_exports_into_itself_and_overwrite_replaces_only_an_export(random_adapter, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    copy_of(random_adapter, run / "adapter")
    (run / "recipe.resolved.yaml").write_text("model:\n  name: tiny-mixtral\nlora:\n  r: 4\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(run), "--format", "per-expert"]) == 0
    out = run / "export-per-expert"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", EXPORT_MARKER, "tokenizer.json"} <= names
    assert foreign_entries(out, "export") == [] and foreign_entries(run, "run") == []
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["format"] == "per-expert" and marker["check"].endswith(": ok") and marker["serve"]

    assert main(["export", str(run), "--format", "per-expert"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(run), "--format", "per-expert", "--overwrite"]) == 0
    assert json.loads((out / EXPORT_MARKER).read_text())["check"] == marker["check"]

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--format", "fused", "--output", str(foreign), "--overwrite"]) == 2
    assert "is not a serving adapter written by moe-finetune" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert main(["export", str(run), "--format", "fused", "--output", str(run / "adapter"), "--overwrite"]) == 2
    assert "which this export reads" in capsys.readouterr().err


def test_an_export_is_not_exported_again(random_adapter, tmp_path, capsys) -> None:
    export_adapter(random_adapter, tmp_path / "once", format="per-expert", echo=quiet)
    assert main(["export", str(tmp_path / "once"), "--format", "per-expert", "--output", str(tmp_path / "twice")]) == 2
    assert "already in the per-expert layout" in capsys.readouterr().err


def test_an_attention_only_adapter_passes_through_unchanged(family_adapter, tmp_path) -> None:
    adapter = family_adapter("mixtral", experts=False)
    printed: list[str] = []
    export_adapter(adapter, tmp_path / "out", format="per-expert", echo=printed.append)
    assert "no expert LoRA (attention only)" in printed[0] and printed[0].endswith(": ok")
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    source = load_file(str(adapter / "adapter_model.safetensors"))
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    )
