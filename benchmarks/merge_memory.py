"""Peak host memory of `moe-finetune merge`, as a multiple of the model's own bytes.

    python benchmarks/merge_memory.py                  # ~1.5 minutes on a 2-core CPU
    python benchmarks/merge_memory.py --dtype bfloat16 # the float32 checkpoint loaded (and merged) in bf16

The model is a random Mixtral (tiny-mixtral's layout scaled up): hidden 768, intermediate 1536, 8 experts
top-2, 4 layers, the tiny models' 1024-token vocabulary, 121 M parameters (462 MiB in float32), saved with
`save_pretrained` in Mixtral's original per-expert layout (as hub checkpoints are: transformers 5 fuses the
experts on load, and the merge writes that layout back); the adapter is LoRA r 16 on q/k/v/o and on both fused
expert stacks, with random B (a trained adapter's size, not zeros), plus the tokenizer, as a run saves it.

Each arm runs in a fresh process, in ABBA order (load, peft, merge, merge, peft, load). The process imports torch,
transformers, peft and moe_finetune.merge first and then resets its peak RSS (Linux `/proc/self/clear_refs`),
so the figures are the memory the arm itself added. `load` is `from_pretrained` of the base alone (what one
copy of the model costs to load here); `peft` is the merge written by hand (from_pretrained, PeftModel,
PEFT's merge_and_unload, save_pretrained with the same shard size; no check), the baseline; `merge` is the whole command (load, adapter, the probe with the adapter
on and off, the fold and merge_and_unload, the merged probe, the sharded save into a temporary folder, rename).
Two figures: peak RSS (VmHWM), which also counts the checkpoint's file pages that transformers maps while
loading (clean: the kernel drops them under memory pressure), and peak anonymous RSS (RssAnon sampled every
millisecond on a thread), the memory that must fit. Ratios are against the model's own bytes (parameters x
element size) and against the `load` and `peft` arms, measured in the same run. Target (issue 20): an anonymous
peak of one copy of the model plus one decoder layer, one copy being the larger of the model's bytes and what
from_pretrained alone costs (more than the model when a float32 checkpoint is loaded as bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from procstatus import status_kb  # noqa: E402  (benchmarks/, beside this script)

SIZES = {
    "hidden_size": 768,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
RANK = 16
# Shards of 0.7 decoder layer, as the default 2GB is 0.7 of a Mixtral 8x7B layer in bf16 (the save holds one).
SHARD_OF_LAYER = 0.7
ARMS = ("load", "peft", "merge")


class AnonymousPeak:
    """Samples the process's anonymous RSS (RssAnon) every millisecond on a thread, keeping the largest.

    VmHWM counts the checkpoint's pages that transformers maps while loading (clean, file-backed: the kernel
    drops them under memory pressure, they stay resident otherwise); RssAnon is the memory that must fit.
    """

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kb("RssAnon") * 1024)
            self._stop.wait(0.001)

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kb("RssAnon") * 1024)


def build(workdir: Path) -> dict:
    """A base model folder and a run-style adapter folder under `workdir`; returns their sizes."""
    import shutil

    import torch
    import transformers

    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.models.tiny import build_tiny
    from moe_finetune.sections import LoraSection

    tiny = build_tiny("mixtral", cache_dir=workdir / "cache")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        **SIZES,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.MixtralForCausalLM(config)
    base_dir = workdir / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    shutil.rmtree(workdir / "cache")
    peft_model, _ = apply_lora(model, LoraSection(r=RANK, alpha=2 * RANK), get_family("mixtral"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    adapter_dir = workdir / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    base = peft_model.get_base_model()
    params = [p for n, p in base.named_parameters() if "lora_" not in n]
    experts = [
        p
        for n, p in base.named_parameters()
        if n.endswith(("gate_up_proj", "down_proj")) and "lora_" not in n
    ]
    return {
        "parameters": sum(p.numel() for p in params),
        "fp32_bytes": sum(p.numel() * 4 for p in params),
        "largest_stack_fp32_bytes": max(p.numel() * 4 for p in experts),
        "layer_fp32_bytes": sum(p.numel() * 4 for n, p in base.named_parameters() if ".layers.0." in n),
    }


def run_arm(arm: str, workdir: Path, dtype: str, shard_bytes: int) -> dict:
    """One arm in this process: imports first, then peak RSS reset, then the arm."""
    import warnings

    warnings.filterwarnings("ignore")
    import peft  # noqa: F401 - imported before the reset, as the merge command imports it
    import torch
    import transformers
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

    import moe_finetune.merge as merge

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    start_rss = status_kb("VmRSS") * 1024
    start_anon = status_kb("RssAnon") * 1024
    sampler = AnonymousPeak().__enter__()
    if arm == "load":
        kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "base", **kwargs)
        element = model.dtype.itemsize
        del model
    elif arm == "peft":
        # what one writes by hand: PEFT's merge_and_unload, then save_pretrained (no check)
        from peft import PeftModel

        kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "base", **kwargs)
        merged = PeftModel.from_pretrained(model, str(workdir / "adapter")).merge_and_unload()
        merged.save_pretrained(workdir / "merged-by-hand", max_shard_size=shard_bytes)
        element = merged.dtype.itemsize
        del model, merged
    else:
        output = workdir / "merged"
        result = merge.merge_adapter(
            workdir / "adapter",
            output,
            base=str(workdir / "base"),
            dtype=dtype,
            overwrite=True,
            max_shard_size=shard_bytes,
            echo=lambda _line: None,
        )
        element = torch.empty(0, dtype=getattr(torch, result.dtype)).element_size()
        files = sorted(p.name for p in output.glob("*.safetensors"))
        assert result.check.ok, result.check.line()
    sampler.__exit__()
    peak = status_kb("VmHWM") * 1024
    out = {
        "arm": arm,
        "peak_added_bytes": peak - start_rss,
        "anon_peak_added_bytes": sampler.peak - start_anon,
        "element_bytes": element,
    }
    if arm == "merge":
        out["shards"] = len(files)
        out["check"] = result.check.line()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--child", nargs=3, metavar=("ARM", "WORKDIR", "SHARD_BYTES"), help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child[0], Path(args.child[1]), args.dtype, int(args.child[2]))))
        return
    if args.build:
        print(json.dumps(build(args.build)))
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="merge-memory-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_FINETUNE_CACHE": str(workdir / "cache")}
        sizes = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--build", str(workdir)],
                check=True, capture_output=True, text=True, cwd=REPO, env=env,
            ).stdout.strip().splitlines()[-1]
        )  # fmt: skip
        print(
            f"merge memory benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}; Mixtral hidden {SIZES['hidden_size']}, intermediate "
            f"{SIZES['intermediate_size']}, {SIZES['num_local_experts']} experts, {SIZES['num_hidden_layers']} "
            f"layers, {sizes['parameters']:,} parameters; LoRA r {RANK} on attention and experts; dtype "
            f"{args.dtype}; fresh process per arm, ABBA"
        )
        element_bytes = 2 if args.dtype == "bfloat16" else 4  # the checkpoint is float32
        shard_bytes = int(SHARD_OF_LAYER * sizes["layer_fp32_bytes"] * element_bytes / 4)
        results = []
        for arm in (*ARMS, *reversed(ARMS)):
            out = subprocess.run(
                [sys.executable, __file__, "--child", arm, str(workdir), str(shard_bytes), "--dtype", args.dtype],
                check=True, capture_output=True, text=True, cwd=REPO, env=env,
            )  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            print(
                f"  {arm:5s}: peak RSS +{result['peak_added_bytes'] / 2**20:,.0f} MiB, anonymous "
                f"+{result['anon_peak_added_bytes'] / 2**20:,.0f} MiB",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "results": results}, indent=1))

    element = results[0]["element_bytes"]
    model_bytes = sizes["fp32_bytes"] * element / 4
    stack_bytes = sizes["largest_stack_fp32_bytes"] * element / 4
    layer_bytes = sizes["layer_fp32_bytes"] * element / 4
    rss = {arm: statistics.median(r["peak_added_bytes"] for r in results if r["arm"] == arm) for arm in ARMS}
    anon = {
        arm: statistics.median(r["anon_peak_added_bytes"] for r in results if r["arm"] == arm) for arm in ARMS
    }
    merge_run = next(r for r in results if r["arm"] == "merge")
    print(f"\n{merge_run['check']}")
    print(
        f"merged folder: {merge_run['shards']} safetensors shards (max_shard_size {shard_bytes / 2**20:.0f} MiB)"
    )
    print(
        "\n| arm | peak RSS added | x model | x load | x peft | peak anonymous RSS added | x model | x load | x peft |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        print(
            f"| {arm} | {rss[arm] / 2**20:,.0f} MiB | {rss[arm] / model_bytes:.2f}x | {rss[arm] / rss['load']:.2f}x "
            f"| {rss[arm] / rss['peft']:.2f}x | {anon[arm] / 2**20:,.0f} MiB | {anon[arm] / model_bytes:.2f}x "
            f"| {anon[arm] / anon['load']:.2f}x | {anon[arm] / anon['peft']:.2f}x |"
        )
    # One copy plus one layer, where "one copy" is what from_pretrained alone costs when that is more than the
    # model's bytes (loading a float32 checkpoint as bf16 converts through float32 copies).
    copy = max(model_bytes, anon["load"])
    print(
        f"\nmodel {model_bytes / 2**20:,.0f} MiB, one decoder layer {layer_bytes / 2**20:,.0f} MiB (largest expert "
        f"stack {stack_bytes / 2**20:,.0f} MiB). Merge: anonymous peak {anon['merge'] / model_bytes:.2f}x the "
        f"model's bytes, {anon['merge'] / anon['load']:.2f}x what from_pretrained alone costs, "
        f"{anon['merge'] / anon['peft']:.2f}x the merge by hand's; one copy plus one layer is "
        f"{(copy + layer_bytes) / model_bytes:.2f}x the model: {'met' if anon['merge'] <= copy + layer_bytes else 'MISSED'}. "
        f"Peak RSS {rss['merge'] / model_bytes:.2f}x the model, {rss['merge'] / rss['load']:.2f}x what from_pretrained "
        "alone costs (RSS also counts the checkpoint's pages that transformers maps to load it: clean file pages "
        "the kernel drops under memory pressure)"
    )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
