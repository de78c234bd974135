"""Does Mixtral 8x7B fit in ~26 GB with 4-bit experts? Two decoder layers at the true shapes, measured.

    python benchmarks/expert_4bit_real_dims.py --layers 2            # ~6 GB bf16 checkpoint written in a temp dir

A Mixtral with the published 8x7B config (hidden 4096, 8 experts of 14336, 32 heads / 8 KV heads, vocab 32000)
but `--layers` decoder layers is written as a bf16 safetensors checkpoint (random weights, initialised one
tensor at a time so building it never holds two copies), then loaded through the recipe path
(`model.quantization: {bits: 4}`, experts packed while loading, double quant). Reported:
- bytes held per decoder layer, by kind (packed experts with their constants, Linear4bit attention, the rest),
  from `quant4.footprint` on the loaded model;
- the peak anonymous RSS during the load (sampled every 5 ms, the default environment, a fresh process),
  beside the bf16 layer's own bytes (what a load that materialised a whole bf16 layer would need);
- the 32-layer extrapolation (embeddings and head counted once) beside `inspect mixtral-8x7b`'s
  "experts quantized" nf4-double-quant figure.
The claim it stands behind: README, "4-bit experts" ("Mixtral 8x7B ... fits ~26 GB").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
CONFIG = REPO / "recipes" / "configs" / "mixtral-8x7b-instruct-v0.1.json"
GIB = 2**30


def write_checkpoint(folder: Path, layers: int) -> int:
    """A bf16 Mixtral 8x7B with `layers` decoder layers and a tokenizer; returns the checkpoint's bytes."""
    import torch
    import transformers

    from moe_finetune.models.tiny import build_tiny

    config = transformers.MixtralConfig.from_pretrained(CONFIG)
    config.num_hidden_layers = layers
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)  # the constructor builds fp32
    model.to_empty(device="cpu")  # buffers (rotary frequencies) are not saved: the load recomputes them
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, tensor in model.named_parameters():
            for part in tensor if tensor.dim() == 3 else [tensor]:  # an expert at a time: 0.5 GB of fp32, not 3.7
                part.copy_((torch.randn(part.shape, generator=generator) * 0.02).to(part.dtype))
    model.save_pretrained(folder, max_shard_size="2GB")
    transformers.AutoTokenizer.from_pretrained(build_tiny("mixtral")).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def load_child(folder: str) -> None:
    """In a fresh process: load in 4-bit through the recipe path, sample the peak, print one JSON line."""
    from procstatus import PeakSampler

    sampler = PeakSampler()
    start = time.perf_counter()
    from moe_finetune.models.loading import load_model_and_tokenizer
    from moe_finetune.models.quant4 import footprint
    from moe_finetune.sections import ModelSection

    section = ModelSection(name=folder, quantization={"bits": 4, "compute_dtype": "bfloat16"})
    model, _, _ = load_model_and_tokenizer(section)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    rows = [{"kind": r.kind, "bits": r.bits, "parameters": r.parameters, "bytes": r.bytes} for r in footprint(model)]
    print(json.dumps({"peak_rss_anon": peak, "seconds": seconds, "footprint": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    args = parser.parse_args()
    if args.child:
        load_child(args.child)
        return

    import transformers

    config = transformers.MixtralConfig.from_pretrained(CONFIG)
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    with tempfile.TemporaryDirectory(prefix="mixtral-real-dims-") as tmp:
        folder = args.keep or Path(tmp) / "mixtral-8x7b-2l"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        written = write_checkpoint(folder, args.layers)
        print(f"checkpoint: {args.layers} decoder layers at Mixtral 8x7B shapes, {written / GIB:.2f} GiB bf16 "
              f"({time.perf_counter() - start:.0f} s to write)")  # fmt: skip
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True, env=dict(os.environ)
        )
        if child.returncode != 0:
            sys.exit(f"the 4-bit load failed:\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])

    per_kind = {f"{r['kind']} {r['bits']}": r["bytes"] for r in result["footprint"]}
    vocab_bytes = 2 * config.vocab_size * hidden * 2  # embeddings + head, bf16, held once whatever the depth
    total = sum(per_kind.values())
    layer_bytes = (total - vocab_bytes) / args.layers
    expert_bf16 = experts * 3 * hidden * inter * 2
    print(f"loaded in 4-bit in {result['seconds']:.0f} s; held by kind:")
    for name, nbytes in per_kind.items():
        print(f"  {name:<28} {nbytes / GIB:8.3f} GiB")
    print(f"per decoder layer: {layer_bytes / GIB:.3f} GiB held (its experts in bf16 alone: {expert_bf16 / GIB:.3f} GiB)")
    print(f"peak RssAnon during the load: {result['peak_rss_anon'] / GIB:.2f} GiB "
          f"(one bf16 layer's experts: {expert_bf16 / GIB:.2f} GiB; the whole bf16 checkpoint: {written / GIB:.2f} GiB)")  # fmt: skip
    extrapolated = vocab_bytes + 32 * layer_bytes
    from moe_finetune.inspect import inspect_model

    report = inspect_model("mixtral-8x7b").to_dict()
    inspected = next(m for m in report["memory"] if m["precision"] == "nf4_double_quant")["experts_quantized_bytes"]
    print(f"32 layers, extrapolated: {extrapolated / GIB:.2f} GiB = {extrapolated / 1e9:.2f} GB; "
          f"inspect's nf4 double-quant 'experts quantized': {inspected / GIB:.2f} GiB "
          f"(ratio {extrapolated / inspected:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
