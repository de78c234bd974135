"""Tiny random MoE models and a local tokenizer, so every path of the toolkit runs on a laptop CPU.

Nothing can be downloaded here, so the tokenizer is a byte-level BPE trained with `tokenizers` on
the bundled instruction data, and the model is a randomly initialised member of a real
`transformers` MoE family (fused experts, the transformers 5 layout). Both are saved as ordinary
`save_pretrained` directories under a cache folder and reused: a recipe names them as
`model: {name: tiny-mixtral}` and they then load exactly like a hub checkpoint would.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moe_finetune.models.families import FamilySpec, get_family, tiny_config_kwargs
from moe_finetune.sections import TINY_PREFIX

# `tiny-<family>-trained`: the family pretrained on the Python stdlib (models/trained.py), not random.
TRAINED_SUFFIX = "-trained"
TOKENIZER_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# A chat template so that `messages` datasets work with the tiny tokenizer just as with a real one.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Bumped whenever what `build_tiny` writes changes, so stale caches are not reused.
_CACHE_VERSION = "3"

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA = REPO_ROOT / "data" / "instructions.jsonl.gz"

# Used when the package is installed without the repository's data/ folder.
_FALLBACK_CORPUS = [
    "What is 12 plus 30? 42",
    "Convert 3 km to metres. 3000 m",
    "Reverse the word 'router'. retuor",
    "Sort the numbers 5, 2, 9 in ascending order. 2, 5, 9",
    "Translate 'water' into French. eau",
    "What is the capital of Japan? Tokyo",
    "Write a Python function that returns the square of x. def square(x):\n    return x * x",
    "What is the plural of 'mouse'? mice",
]


def is_tiny_name(name: str) -> bool:
    return name.startswith(TINY_PREFIX)


def family_of_tiny_name(name: str) -> FamilySpec:
    """`tiny-mixtral` -> the mixtral spec (and `tiny-deepseek-v3` -> deepseek_v3, `tiny-olmoe-trained` -> olmoe)."""
    return get_family(name[len(TINY_PREFIX) :].removesuffix(TRAINED_SUFFIX))


def tiny_model_dir(name: str) -> Path:
    """Build (or reuse) the tiny model a recipe names: `tiny-<family>` random, `tiny-<family>-trained`
    pretrained on the Python stdlib (models/trained.py); its `save_pretrained` directory."""
    family = family_of_tiny_name(name)
    if name.endswith(TRAINED_SUFFIX):
        from moe_finetune.models.trained import build_trained  # it builds on this module

        return build_trained(family)
    return build_tiny(family)


def cache_root() -> Path:
    """Where tiny models are kept: $MOE_FINETUNE_CACHE, else ~/.cache/moe-finetune."""
    env = os.environ.get("MOE_FINETUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moe-finetune"


def _corpus_texts(data_path: Path | None) -> Iterator[str]:
    path = data_path if data_path is not None else BUNDLED_DATA
    if not path.exists():
        yield from _FALLBACK_CORPUS
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            yield " ".join(str(row.get(key, "")) for key in ("prompt", "completion", "text"))


def train_tokenizer(texts: Iterable[str], vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """A byte-level BPE tokenizer (every string encodes, no unknown token) as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _cache_key(spec: FamilySpec, data_path: Path | None) -> str:
    import transformers

    source = data_path if data_path is not None else BUNDLED_DATA
    data_id = f"{source.stat().st_size}-{int(source.stat().st_mtime)}" if source.exists() else "fallback"
    blob = json.dumps(
        [_CACHE_VERSION, spec.name, dict(spec.tiny_config), transformers.__version__, data_id], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny(
    family: str | FamilySpec = "mixtral",
    *,
    cache_dir: Path | None = None,
    data_path: Path | None = None,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a tiny random model of `family` with its tokenizer; return its directory.

    The directory is written under a temporary name and renamed into place, so a crash or a
    concurrent builder never leaves a half-written model that a later run would load.
    """
    import torch
    import transformers

    spec = family if isinstance(family, FamilySpec) else get_family(family)
    root = cache_dir if cache_dir is not None else cache_root()
    target = root / f"tiny-{spec.name}-{_cache_key(spec, data_path)}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_corpus_texts(data_path))
    config_cls = getattr(transformers, spec.config_class)
    config = config_cls(
        **tiny_config_kwargs(spec, vocab_size=len(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    # Random init leaves routers near-uniform and nearly identical across tokens; a wider router
    # init gives the tiny model distinct, input-dependent routing to watch, as a trained one has.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
                param.normal_(0.0, 0.15)

    return write_model_dir(target, model, tokenizer)


def write_model_dir(target: Path, model: Any, tokenizer: Any, extra_files: dict[str, str] | None = None) -> Path:
    """Save model + tokenizer (+ `extra_files`, name -> text) as `target`, whole or not at all.

    The directory is written under a temporary name and renamed into place, so a crash or a
    concurrent builder never leaves a half-written model that a later run would load.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # Not model.save_pretrained: under torch.distributed it writes only on global rank 0, and the
        # process building this private copy may be any rank. The result is the same directory.
        from safetensors.torch import save_file

        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first: its copy is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
