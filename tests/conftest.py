"""Shared fixtures: tiny random models are built once per session in a private cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# datasets.load_dataset keeps an Arrow copy of every file it reads, in a folder datasets reads from the
# environment when it is first imported (at collection): keep the tests' copies out of ~/.cache, here
# and in the subprocesses that inherit the environment.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="moe-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep test-built tiny models out of the user's cache (and make every session start clean)."""
    cache = tmp_path_factory.mktemp("moe-cache")
    previous = os.environ.get("MOE_FINETUNE_CACHE")
    os.environ["MOE_FINETUNE_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield cache
    if previous is None:
        os.environ.pop("MOE_FINETUNE_CACHE", None)
    else:
        os.environ["MOE_FINETUNE_CACHE"] = previous
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
    make every step several times slower and erratic. Subprocesses inherit it through the env."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    old_env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(previous)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="session")
def tiny_mixtral_dir(_private_model_cache: Path) -> Path:
    from moe_finetune.models.tiny import build_tiny

    return build_tiny("mixtral")


@pytest.fixture
def small_jsonl(tmp_path: Path) -> Path:
    """A 40-row prompt/completion dataset (too small for the default threshold, on purpose)."""
    path = tmp_path / "small.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?\n", "completion": f"{2 * i}"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _two_ranks(script: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def two_ranks():
    """`two_ranks(script, *args, timeout=...)`: the script on two CPU ranks over gloo (torchrun, one thread
    each), its output captured."""
    return _two_ranks


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def recipe_factory(tmp_path: Path, small_jsonl: Path):
    """Write a tiny-mixtral recipe into tmp_path; `extra` is YAML appended verbatim."""

    def make(extra: str = "", data_path: Path | None = None, name: str = "recipe.yaml") -> Path:
        text = (
            "model:\n  name: tiny-mixtral\n"
            f"data:\n  path: {data_path or small_jsonl}\n  min_examples: 10\n"
            f"output_dir: {tmp_path / 'run'}\n"
            "training:\n  max_steps: 4\n  per_device_train_batch_size: 4\n  logging_steps: 2\n"
            "  max_length: 64\n  save_steps: 2\n  learning_rate: 1.0e-4\n"
        ) + extra
        return write_recipe(tmp_path / name, text)

    return make


@pytest.fixture(scope="session")
def random_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_mixtral_dir: Path) -> Path:
    """An adapter folder on the tiny Mixtral with random (non-zero) B, made in a second, without training."""
    import torch
    import transformers

    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    folder = tmp_path_factory.mktemp("random-adapter") / "adapter"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    peft_model, _ = apply_lora(model, LoraSection(r=4), get_family("mixtral"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_mixtral_dir).save_pretrained(folder)
    return folder
