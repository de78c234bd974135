"""PEFT's own tests for `target_parameters`, run with the fast expert kernel in place and without it.

    python benchmarks/peft_suite.py                  # both runs and the comparison (~70 s on 2 cores)
    python benchmarks/peft_suite.py -k GptOss        # extra arguments go to pytest (both runs)
    python benchmarks/peft_suite.py --per-test       # also each test's kernel calls in the `on` run

The fast kernel (moe_finetune/models/experts.py) takes the place of PEFT's `ParamWrapper` forward, so
PEFT's own test file is its oracle (docs/design.md; STYLE 15). This script:

1. fetches the tests of the installed peft from its source distribution (`pip download --no-deps
   --no-binary :all: peft==X`; the sdist ships `tests/`), once, into ~/.cache/moe-finetune/peft-suite
   (or $MOE_FINETUNE_CACHE/peft-suite);
2. writes tiny random stand-ins for the hub models that `tests/test_target_parameters.py` loads
   (`STAND_INS`), each saved under its hub id as a relative directory: transformers loads a local
   directory of that name before it would ask the hub, and HF_HUB_OFFLINE=1 keeps the rest offline;
3. runs the file twice, each in a fresh pytest process: `off` (PEFT's own path) and `on` (this file
   loaded as a pytest plugin: `use_fast_expert_lora` applied after every adapter injection, which is
   what `apply_lora` does once; add_adapter, load_adapter and PeftModel.from_pretrained inject too);
4. prints pass/fail/skip for both, every test whose outcome differs (an `ARTEFACTS` entry says why
   when the difference is on purpose), and proves the kernel ran: per test, how many experts forwards
   the kernel computed with LoRA terms (one per projection). The exit status is 0 when the two runs agree but for artefacts,
   the kernel ran in the `on` run and never in the `off` run; 3 when the sdist could not be fetched.

The kernel serves the GPT-OSS configurations; Llama4's experts are not a transformers experts
implementation (`use_experts_implementation`), so there `use_fast_expert_lora` declines and PEFT's path
runs in both runs (the counts say so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FETCH_FAILED = 3  # exit status when the sdist cannot be fetched (offline): nothing was compared
TEST_FILE = "tests/test_target_parameters.py"

# Hub id -> (config class, its arguments, dtype as saved). Tiny, random, the architecture the id names;
# GPT-OSS is saved in bf16 as the hub model is (the tests cast it to fp32 where they need tight tolerances).
STAND_INS = {
    "peft-internal-testing/tiny-GptOssForCausalLM": (
        "GptOssConfig",
        dict(
            vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
        ),
        "bfloat16",
    ),
    "peft-internal-testing/tiny-Llama4ForCausalLM": (
        "Llama4TextConfig",
        dict(
            vocab_size=8192, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=1, max_position_embeddings=128,
        ),
        "float32",
    ),
    "hf-internal-testing/tiny-random-LlamaForCausalLM": (
        "LlamaConfig",
        dict(
            vocab_size=128, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128,
        ),
        "float32",
    ),
}  # fmt: skip

# Tests whose outcome differs with the kernel on, on purpose (test name, without parameters -> why).
ARTEFACTS = {
    "test_target_parameter_result_caching_works": (
        "counts calls to PEFT's internal `_LoraFactorsProxy.forward` (the merged-stack parametrization); "
        "the fast kernel never builds that stack, so there are no calls to count"
    ),
}

# PEFT's own pytest settings (its pyproject.toml), less coverage, which needs pytest-cov.
PYTEST_INI = """[pytest]
filterwarnings =
    error::DeprecationWarning:transformers
    ignore:.*BPE.__init__ will not create from files anymore.*:DeprecationWarning:transformers
    error::FutureWarning:transformers
"""


# ------------------------------------------------------------------------------------------------
# The runner


def cache_dir() -> Path:
    env = os.environ.get("MOE_FINETUNE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "moe-finetune") / "peft-suite"


def fetch_peft_tests(root: Path) -> Path:
    """The installed peft's source tree (with its tests/ as a package), fetched from its sdist once."""
    from importlib.metadata import version

    peft_version = version("peft")
    source = root / f"peft-{peft_version}"
    if (source / "pytest.ini").exists():  # written last
        return source
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"peft=={peft_version}", "-d", str(root)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"could not fetch peft {peft_version}'s source distribution ({' '.join(command[1:])}):\n"
              f"{done.stderr[-2000:]}", file=sys.stderr)  # fmt: skip
        raise SystemExit(FETCH_FAILED)
    with tarfile.open(root / f"peft-{peft_version}.tar.gz") as archive:
        archive.extractall(root, filter="data")
    if not (source / TEST_FILE).exists():
        raise SystemExit(
            f"the peft {peft_version} sdist has no {TEST_FILE}: take the tests from the GitHub tag"
        )
    (source / "tests" / "__init__.py").touch()  # the tests import each other relatively
    (source / "pytest.ini").write_text(PYTEST_INI)
    return source


def write_stand_ins(root: Path) -> Path:
    """The stand-ins under their hub ids in a folder keyed by what they are built from; returns the folder."""
    import hashlib

    import torch
    import transformers

    key = hashlib.sha256(repr((sorted(STAND_INS.items()), transformers.__version__)).encode()).hexdigest()[
        :10
    ]
    hub = root / f"hub-{key}"
    for model_id, (config_class, kwargs, dtype) in STAND_INS.items():
        target = hub / model_id
        if (target / "model.safetensors").exists():  # written after config.json
            continue
        config = getattr(transformers, config_class)(**kwargs, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
        model.save_pretrained(target)
    return hub


def run_pytest(mode: str, source: Path, hub: Path, report: Path, extra: list[str]) -> float:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
        "PEFT_SUITE_KERNEL": mode,
        "PEFT_SUITE_REPORT": str(report),
    }
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", str(source / TEST_FILE), "-c", str(source / "pytest.ini"),
               "--rootdir", str(source), "-p", "peft_suite", "-p", "no:cacheprovider", "-q", "--tb=line",
               "-rN", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=hub, env=env, capture_output=True, text=True)
    if not report.exists():
        raise SystemExit(f"pytest ({mode}) wrote no report:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def read_report(path: Path) -> dict[str, dict]:
    return {row["test"]: row for row in map(json.loads, path.read_text().splitlines())}


def base_name(nodeid: str) -> str:
    return nodeid.split("::")[-1].split("[")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-test", action="store_true", help="list every test's kernel calls (on run)")
    args, extra = parser.parse_known_args(argv)
    import peft
    import torch
    import transformers

    root = cache_dir()
    source = fetch_peft_tests(root)
    hub = write_stand_ins(root)
    print(f"peft {peft.__version__} tests from {source}; transformers {transformers.__version__}, "
          f"torch {torch.__version__}; {platform.machine()}, {os.cpu_count()} cores")  # fmt: skip
    results, seconds = {}, {}
    for mode in ("off", "on"):
        seconds[mode] = run_pytest(mode, source, hub, root / f"report-{mode}.jsonl", extra)
        results[mode] = read_report(root / f"report-{mode}.jsonl")

    print(f"\n{TEST_FILE}: {len(results['off'])} tests")
    for mode in ("off", "on"):
        counts = Counter(row["outcome"] for row in results[mode].values())
        summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped", "xfailed", "xpassed"))
        print(f"  kernel {mode:3}: {summary}  ({seconds[mode]:.0f} s)")

    on, off = results["on"], results["off"]
    served = [t for t, row in on.items() if row["kernel_calls"] > 0]
    declined = Counter(reason for row in on.values() for reason in row["declined"])
    print(f"\nkernel ran with LoRA terms in {len(served)} of {len(on)} tests "
          f"({sum(on[t]['kernel_calls'] for t in served)} projections computed with LoRA terms); "
          f"in the off run: {sum(row['kernel_calls'] for row in off.values())}")  # fmt: skip
    for reason, count in declined.most_common():
        print(f"  declined {count}x (PEFT's path ran): {reason}")
    families = Counter(
        next((m for m in STAND_INS if m in t), "tests without a model parameter") for t in served
    )
    if families:
        print("  tests the kernel served, by model: " + ", ".join(f"{k} {v}" for k, v in families.items()))
    if args.per_test:
        for test, row in sorted(on.items()):
            print(f"    {row['kernel_calls']:4d}  {row['outcome']:8}  {test}")
    served_models = {m for m in STAND_INS for t in served if m in t}
    idle = Counter(
        base_name(t)
        for t, row in on.items()
        if row["kernel_calls"] == 0 and any(m in t for m in served_models)
    )
    if idle:
        print(f"  tests on those models with no experts forward with LoRA ({sum(idle.values())}: they check names, "
              "configs, state dicts, a merge or a refusal, and run no adapted forward): " + ", ".join(sorted(idle)))  # fmt: skip

    differ = sorted(t for t in off if t in on and on[t]["outcome"] != off[t]["outcome"])
    missing = sorted(set(off) ^ set(on))
    unexplained = [t for t in differ if base_name(t) not in ARTEFACTS]
    print(f"\noutcomes that differ (on vs off): {len(differ)}")
    for test in differ:
        why = ARTEFACTS.get(base_name(test), "NOT EXPLAINED")
        print(f"  {test}: off {off[test]['outcome']}, on {on[test]['outcome']} "
              f"(kernel calls {on[test]['kernel_calls']})\n    {why}")  # fmt: skip
        if test in unexplained and on[test].get("message"):
            print(f"    on: {on[test]['message']}")
    for test in missing:
        print(f"  {test}: in one run only")
    ok = not unexplained and not missing and served and not any(row["kernel_calls"] for row in off.values())
    print("\nverdict: " + ("same results with the kernel on as off, but for the artefacts above" if ok else
                           "DIFFERENT (see above)"))  # fmt: skip
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# The pytest plugin (`-p peft_suite`, with PEFT_SUITE_KERNEL=on|off and PEFT_SUITE_REPORT=path)

_CALLS = {"kernel": 0}
_DECLINED: list[str] = []


def _stub_diffusers() -> None:
    # testing_common imports diffusers' StableDiffusionPipeline for tests of other files; none runs here.
    import importlib.util
    import types

    if importlib.util.find_spec("diffusers") is None:
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # isinstance checks see none
        sys.modules["diffusers"] = stub


def pytest_configure(config) -> None:
    if "PEFT_SUITE_KERNEL" not in os.environ:
        return
    _stub_diffusers()
    from moe_finetune.models import experts

    original_terms = experts._lora_terms

    def counted_terms(module, parameter_name):
        terms = original_terms(module, parameter_name)
        _CALLS["kernel"] += bool(terms)  # one per projection the kernel computed with LoRA terms
        return terms

    experts._lora_terms = counted_terms
    if os.environ["PEFT_SUITE_KERNEL"] != "on":
        return
    from peft.tuners.tuners_utils import BaseTuner

    original_inject = BaseTuner.inject_adapter

    def inject_then_fast_kernel(self, *args, **kwargs):
        result = original_inject(self, *args, **kwargs)
        reason = experts.use_fast_expert_lora(self.model)
        if reason is not None:
            _DECLINED.append(reason)
        return result

    BaseTuner.inject_adapter = inject_then_fast_kernel


def pytest_runtest_setup(item) -> None:
    _CALLS["kernel"] = 0
    _DECLINED.clear()


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("PEFT_SUITE_REPORT")
    if not path:
        return
    # One line per test: its first failing or skipping phase, else its call.
    outcome = None
    if report.when == "setup" and not report.passed:
        outcome = "skipped" if report.skipped else "failed"
    elif report.when == "call":
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
    if outcome is None:
        return
    row = {
        "test": report.nodeid.split("::", 1)[-1],
        "outcome": outcome,
        "kernel_calls": _CALLS["kernel"],
        "declined": sorted(set(_DECLINED)),
        "message": report.longreprtext.strip().splitlines()[-1][:300] if report.failed else "",
    }
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
