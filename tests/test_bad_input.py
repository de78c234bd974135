"""Bad input is the user's to fix (exit 2) and an unhealthy run is reported as one (exit 4), each saying
what was wrong; only a real bug is reported as "internal error" (exit 1)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import transformers

from moe_finetune.cli import build_parser, main
from moe_finetune.errors import RecipeError
from moe_finetune.models.families import get_family
from moe_finetune.models.loading import load_model_and_tokenizer
from moe_finetune.sections import GuardConfig, ModelSection

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- recipe numbers, through the CLI


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.learning_rate=0", "training.learning_rate: 0 is not a usable learning rate (must be > 0)"),
        ("training.learning_rate=-1e-5", "training.learning_rate: -1e-05 is not a usable learning rate"),
        ("training.max_steps=0", "training.max_steps: 0 is not a usable step count"),
        ("training.restore_callback_states_from_checkpoint=true", "remove it from the recipe"),
    ],
)
def test_validate_and_train_exit_2_naming_the_unusable_training_field(
    recipe_factory, tmp_path: Path, capsys, command: str, override: str, message: str
) -> None:
    code, _, err = _run(capsys, command, str(recipe_factory()), "--set", override)
    assert code == 2, err
    assert message in err
    assert "internal error" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- smoke: family names


def _readme_smoke_families() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if "moe-finetune smoke" in line and "(" in line)
    names = re.search(r"\(([a-z0-9_, -]+)\)", line).group(1)  # "(mixtral, qwen2-moe, ...)"
    return [name.strip() for name in names.split(",")]


def _help_smoke_families() -> list[str]:
    parser = build_parser()
    sub = next(action for action in parser._actions if action.dest == "command")
    family = next(action for action in sub.choices["smoke"]._actions if action.dest == "family")
    return re.findall(r"[a-z][a-z0-9-]*", family.help.split("(default")[0])


SHOWN_FAMILIES = sorted(set(_readme_smoke_families()) | set(_help_smoke_families()))


def test_the_readme_and_the_help_show_the_same_families() -> None:
    assert set(_readme_smoke_families()) == set(_help_smoke_families())
    assert {"mixtral", "qwen2-moe", "deepseek-v2", "deepseek-v3", "gpt-oss"} <= set(SHOWN_FAMILIES)


@pytest.mark.parametrize("name", SHOWN_FAMILIES)
def test_every_family_name_the_readme_and_help_show_is_accepted_with_dash_or_underscore(name: str) -> None:
    spec = get_family(name)
    for spelling in (
        name.replace("-", "_"),
        name.replace("_", "-"),
        name.upper(),
        name.replace("-", "_").title(),
    ):
        assert get_family(spelling) is spec, spelling


def test_an_unknown_family_lists_the_names_users_can_type() -> None:
    with pytest.raises(RecipeError) as info:
        get_family("mixtral-9000")
    assert "deepseek-v2" in str(info.value) and "qwen2-moe" in str(info.value)


@pytest.mark.slow
def test_smoke_runs_deepseek_v2_by_the_name_the_help_gives(capsys) -> None:
    code, out, err = _run(capsys, "smoke", "--family", "deepseek-v2", "--steps", "1")
    assert code == 0, err
    assert "smoke deepseek_v2: ok" in out


# --------------------------------------------------------------------------- smoke: exit codes


def test_smoke_with_no_steps_is_refused_as_bad_input(capsys) -> None:
    code, _, err = _run(capsys, "smoke", "--steps", "0")
    assert code == 2
    assert "--steps" in err and "internal error" not in err


def _guard_with(monkeypatch, **config) -> None:
    """Make `smoke` attach an EntropyGuard with this config instead of the default one."""
    import moe_finetune.callbacks as callbacks

    class ConfiguredGuard(callbacks.EntropyGuard):
        def __init__(self, **kwargs) -> None:
            super().__init__(config=GuardConfig(**config), **kwargs)

    monkeypatch.setattr(callbacks, "EntropyGuard", ConfiguredGuard)


def _nan_routers(monkeypatch) -> None:
    """Make every router of the smoke model output NaN (its weights), as a diverged router would."""
    import moe_finetune.models.lora as lora
    from moe_finetune.models.families import find_routers

    real = lora.apply_lora

    def apply_lora(model, section, spec):
        names, _ = find_routers(model, spec, canonical=False)
        with torch.no_grad():
            for name in names:
                for parameter in model.get_submodule(name).parameters():
                    parameter.fill_(float("nan"))
        return real(model, section, spec)

    monkeypatch.setattr(lora, "apply_lora", apply_lora)


@pytest.mark.slow
def test_smoke_guard_halt_exits_4_with_the_guards_reason(monkeypatch, capsys) -> None:
    # Normalised routing entropy is below 1 on any real router: this floor halts at the first check.
    _guard_with(monkeypatch, entropy_floor=0.9999999)
    code, out, err = _run(capsys, "smoke", "--steps", "3")
    assert code == 4, err
    reason = re.search(r"\[guard\] step 1: HALT: (.*)", out).group(1)
    assert f"training halted by the routing guard at step 1: {reason}" in err
    assert "FAILED" in out and "internal error" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({}, "training halted by the routing guard at step 1"),  # the guard's own non-finite halt
        ({"halt_on_nonfinite": False}, "router output was not finite (NaN or inf) at step"),  # smoke's check
    ],
)
def test_smoke_with_non_finite_router_output_exits_4_saying_so(
    monkeypatch, capsys, config: dict, fragment: str
) -> None:
    _guard_with(monkeypatch, **config)
    _nan_routers(monkeypatch)
    code, _, err = _run(capsys, "smoke", "--steps", "2")
    assert code == 4, err
    assert fragment in err
    assert "finite" in err and "internal error" not in err


@pytest.mark.parametrize(
    ("changes", "fragment", "exit_code"),
    [
        # no metrics at all: our family spec no longer finds the routers, a bug of ours (exit 1)
        ({"metrics": None}, "no routing metrics were logged in 2 steps", 1),
        ({"train_loss": float("nan")}, "the training loss was nan after 2 steps, with finite routing", 4),
        ({"steps": 1}, "training stopped after 1 of 2 steps", 4),
    ],
)
def test_smoke_that_logged_no_metrics_is_a_bug_and_a_non_finite_loss_a_failed_check(
    changes: dict, fragment: str, exit_code: int
) -> None:
    from moe_finetune.errors import MoeFinetuneError
    from moe_finetune.routing.metrics import RoutingSums, summarise
    from moe_finetune.smoke import SmokeResult

    sums = RoutingSums.zeros(1, 8, 2, ["model.layers.0.mlp.gate"])  # a uniform router: healthy
    sums.tokens += 16
    sums.assign_counts += 4
    sums.prob_sum += 2
    sums.entropy_sum += 16 * math.log(8)
    healthy = dict(
        family="mixtral",
        steps=2,
        seconds=0.1,
        train_loss=1.0,
        metrics=summarise(sums),
        table="",
        aux_lines=[],
        requested_steps=2,
        metrics_step=2,
    )
    assert SmokeResult(**healthy).ok and SmokeResult(**healthy).problem is None
    result = SmokeResult(**{**healthy, **changes})
    assert not result.ok and fragment in result.problem
    with pytest.raises(MoeFinetuneError) as info:
        result.raise_for_problem()
    assert info.value.exit_code == exit_code and fragment in str(info.value)


# --------------------------------------------------------------------------- model loading


def _failing_from_pretrained(monkeypatch, error: BaseException) -> None:
    def from_pretrained(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)


QUANTIZED = ModelSection(name="tiny-mixtral", quantization={"bits": 4})


@pytest.mark.parametrize(
    "error",
    [
        ImportError(
            "Using `bitsandbytes` 4-bit quantization requires bitsandbytes: `pip install -U bitsandbytes>=0.46.1`"
        ),
        RuntimeError(
            "None of the available devices `available_devices = {'cpu'}` are supported by the bitsandbytes "
            "version you have installed: `bnb_supported_devices = set()`."
        ),
        ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes"),
    ],
)
def test_bitsandbytes_that_cannot_quantize_here_names_model_quantization(
    monkeypatch, tiny_mixtral_dir: Path, error: BaseException
) -> None:
    _failing_from_pretrained(monkeypatch, error)
    with pytest.raises(RecipeError) as info:
        load_model_and_tokenizer(QUANTIZED)
    message = str(info.value)
    assert message.startswith("model.quantization:") and "4-bit" in message
    assert "pip install -U bitsandbytes" in message and "remove model.quantization" in message


def test_bitsandbytes_without_a_backend_for_this_device_names_model_quantization(
    monkeypatch, tiny_mixtral_dir: Path
) -> None:
    # The real path: transformers' own check of the installed bitsandbytes' devices raises RuntimeError.
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb, "supported_torch_devices", set(), raising=False)
    with pytest.raises(
        RecipeError, match="model.quantization: bitsandbytes cannot load 'tiny-mixtral' in 4-bit"
    ):
        load_model_and_tokenizer(QUANTIZED)


def test_bitsandbytes_not_installed_names_model_quantization(monkeypatch, tiny_mixtral_dir: Path) -> None:
    import transformers.quantizers.quantizer_bnb_4bit as quantizer

    monkeypatch.setattr(quantizer, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(RecipeError, match="model.quantization.*requires bitsandbytes"):
        load_model_and_tokenizer(QUANTIZED)


@pytest.mark.parametrize(
    "error",
    [
        OSError("Error no file named model.safetensors, or pytorch_model.bin, found in directory /m."),
        ValueError("Unrecognized model in /m. Should have a `model_type` key in its config.json."),
        ValueError(
            "The checkpoint you are trying to load has model type `zebra` but Transformers does not "
            "recognize this architecture."
        ),
    ],
)
def test_a_model_that_cannot_be_found_or_read_names_model_name(
    monkeypatch, tiny_mixtral_dir: Path, error: BaseException
) -> None:
    _failing_from_pretrained(monkeypatch, error)
    with pytest.raises(RecipeError, match="model.name: cannot load 'tiny-mixtral'"):
        load_model_and_tokenizer(ModelSection(name="tiny-mixtral"))


@pytest.mark.parametrize(
    "error",
    [
        ValueError("too many values to unpack (expected 2)"),
        TypeError("forward() got an unexpected keyword argument 'x'"),
        KeyError("model.layers.0.mlp.gate.weight"),
        AttributeError("'NoneType' object has no attribute 'shape'"),
    ],
)
@pytest.mark.parametrize("quantization", [None, {"bits": 4}])
def test_a_bug_during_model_loading_is_not_reported_as_cannot_load(
    monkeypatch, tiny_mixtral_dir: Path, error: BaseException, quantization
) -> None:
    _failing_from_pretrained(monkeypatch, error)
    with pytest.raises(type(error)):
        load_model_and_tokenizer(ModelSection(name="tiny-mixtral", quantization=quantization))


def _broken_copy(tiny: Path, where: Path, damage: str) -> Path:
    import json
    import shutil

    if damage == "empty":
        where.mkdir()
        return where
    shutil.copytree(tiny, where)
    if damage == "unknown model_type":
        config = json.loads((where / "config.json").read_text())
        (where / "config.json").write_text(json.dumps({**config, "model_type": "zebra_moe"}))
    elif damage == "no weights":
        (where / "model.safetensors").unlink()
    elif damage == "corrupt weights":
        (where / "model.safetensors").write_bytes(b"not a safetensors file")
    return where


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("empty", "tokenizer"),
        ("unknown model_type", "does not recognize this architecture"),
        ("no weights", "no file named model.safetensors"),
        ("corrupt weights", "deserializing header"),
    ],
)
def test_a_folder_without_a_readable_model_is_bad_input(
    tiny_mixtral_dir: Path, tmp_path: Path, damage: str, fragment: str
) -> None:
    folder = _broken_copy(tiny_mixtral_dir, tmp_path / "model", damage)
    with pytest.raises(RecipeError) as info:
        load_model_and_tokenizer(ModelSection(name=str(folder)), folder)
    assert str(info.value).startswith(f"model.name: cannot load {str(folder)!r}")
    assert fragment in str(info.value)


@pytest.mark.slow
def test_train_reports_a_loading_bug_as_internal_and_a_quantization_problem_as_bad_input(
    monkeypatch, recipe_factory, tiny_mixtral_dir: Path, capsys
) -> None:
    _failing_from_pretrained(monkeypatch, KeyError("model.layers.0.mlp.gate.weight"))
    code, _, err = _run(capsys, "train", str(recipe_factory()))
    assert code == 1
    assert "internal error" in err and "KeyError" in err and "cannot load" not in err

    _failing_from_pretrained(monkeypatch, RuntimeError("No supported devices found for bitsandbytes"))
    code, _, err = _run(
        capsys, "train", str(recipe_factory()), "--overwrite", "--set", "model.quantization.bits=4"
    )
    assert code == 2, err
    assert "model.quantization" in err and "internal error" not in err
