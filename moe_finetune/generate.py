"""`moe-finetune generate`: a trained adapter (or a merged model) answers a prompt, and which experts it used.

The prompt goes through the tokenizer the run saved with its adapter (the recipe's model's tokenizer, with its
chat template), as one user turn with the generation prompt appended, which is how TRL formats a chat
(`messages`) dataset; `plain=True` sends the text as it is, which is how TRL formats `prompt`/`completion`
and `text` datasets (prompt + completion, no template). Decoding is greedy, so the same prompt gives the same
answer, and stops at the end-of-text token or at the token the template closes a turn with.

With routing on, the answer is run once more, teacher-forced (prompt + answer in one forward), under the
routing capture's hooks (routing/capture.py), and each MoE layer's top-k choices for the answer's tokens are
counted: the same choices the routers made while decoding (same tokens at the same positions), without
hooking the decoding loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_finetune.errors import RecipeError
from moe_finetune.merge import ADAPTER_CONFIG, apply_adapter, dtype_name, load_base, resolve_source
from moe_finetune.models.loading import is_unreadable_model_error

Echo = Callable[[str], None]

# Above this many experts the table lists each layer's busiest experts instead of one column per expert.
MAX_EXPERT_COLUMNS = 16
TOP_EXPERTS_LISTED = 8


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    description: str  # what answers: the adapter on its base, or a model folder
    notes: list[str]


def load_for_generation(path: str | Path, base: str | None = None) -> LoadedModel:
    """The model that answers: a run directory's or an adapter folder's adapter on its base, or a model folder
    (a merged model, or any causal LM). Exit 2 for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RecipeError(f"{path} does not exist: give a run directory, an adapter folder or a model folder")
    is_model_folder = (
        path.is_dir() and (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file()
    )
    if is_model_folder:
        if base is not None:
            raise RecipeError(f"--base goes with an adapter; {path} is a model folder (it is its own base)")
        return _load_model_folder(path)
    source = resolve_source(path, base)  # exit 2 for a folder that holds no adapter
    model, tokenizer = load_base(source)
    notes = []
    if source.trained_quantized is not None:
        bits = source.trained_quantized.get("bits", 4)
        notes.append(
            f"note: the run trained on a {bits}-bit base (model.quantization); here its adapter runs on the "
            "unquantized base, as `merge` writes it"
        )
    model = apply_adapter(model, source)
    kernel = "PEFT's expert LoRA"
    if source.lora is not None and source.lora.expert_kernel == "fast":
        from moe_finetune.models.experts import use_fast_expert_lora

        reason = use_fast_expert_lora(model)
        kernel = "the fast expert LoRA kernel" if reason is None else f"PEFT's expert LoRA ({reason})"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        description=f"adapter {source.adapter_dir} on {source.model.name} ({dtype_name(model)}, {kernel})",
        notes=notes,
    )


def _load_model_folder(path: Path) -> LoadedModel:
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as err:
        if not is_unreadable_model_error(err):
            raise
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise RecipeError(f"cannot load the model folder {path}: {first_line}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, description=f"model {path} ({dtype_name(model)})", notes=[]
    )


def read_prompt(prompt: str | None, prompt_file: str | Path | None) -> str:
    """The prompt from --prompt or from a file (its whole text); exactly one of them, not empty."""
    if (prompt is None) == (prompt_file is None):
        raise RecipeError("generate: give the prompt with --prompt TEXT or --prompt-file FILE (one of them)")
    if prompt_file is not None:
        file = Path(prompt_file).expanduser()
        try:
            prompt = file.read_text(encoding="utf-8").strip("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise RecipeError(f"--prompt-file: cannot read {file} ({err})") from None
    assert prompt is not None
    if not prompt.strip():
        raise RecipeError("generate: the prompt is empty")
    return prompt


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: str, plain: bool) -> list[int]:
    """Token ids of the prompt: one user turn in the chat template (the generation prompt appended), or the
    plain text when `plain` or when the tokenizer has no template."""
    if plain or not has_chat_template(tokenizer):
        return list(tokenizer(prompt).input_ids)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    # the template writes any BOS itself
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def turn_end_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (`<|end|>`, `<|im_end|>`, ...), read
    off the template itself; None when it closes turns with ordinary text or has no template."""
    if not has_chat_template(tokenizer):
        return None
    marker = "MOEFINETUNEMARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that refuses this chat has no turn end to read
        return None
    tail = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return int(ids[0]) if ids and ids[0] in special else None


def stop_token_ids(tokenizer: Any, model: Any, plain: bool) -> list[int]:
    """End-of-text ids (tokenizer and generation config) and, for a chat prompt, the template's turn end."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    turn_end = None if plain else turn_end_token_id(tokenizer)
    if turn_end is not None and turn_end not in ids:
        ids.append(turn_end)
    return ids


@dataclass
class AnswerRouting:
    """Each MoE layer's top-k assignments of the answer's tokens, counted per expert."""

    layer_names: list[str]
    counts: list[list[int]]  # (L, E)
    tokens: int
    top_k: int


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    answer_ids: list[int]
    stopped_by: str | None  # the stop token that ended it, None when max_new_tokens did
    routing: AnswerRouting | None


def answer_routing(model: Any, ids: list[int], prompt_length: int) -> AnswerRouting:
    """Which experts the answer's tokens went to: one teacher-forced forward of prompt + answer under the
    routing capture, counting each layer's choices at the answer's positions."""
    import torch

    from moe_finetune.routing.capture import RoutingCapture

    batch = torch.tensor([ids], dtype=torch.long, device=_device(model))
    with RoutingCapture(model) as capture, capture.recording_choices() as chosen, torch.no_grad():
        model(input_ids=batch, attention_mask=torch.ones_like(batch))
    counts = []
    for layer in range(capture.num_layers):
        experts, _ = chosen[layer]  # (T, k)
        answer = experts[prompt_length:].reshape(-1).cpu()
        counts.append(torch.bincount(answer, minlength=capture.num_experts).tolist())
    return AnswerRouting(
        layer_names=list(capture.layer_names),
        counts=counts,
        tokens=len(ids) - prompt_length,
        top_k=capture.top_k,
    )


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def generate_answer(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    plain: bool = False,
    routing: bool = False,
) -> Answer:
    """Greedy decoding of the answer to `prompt`, and (with `routing`) which experts its tokens went to."""
    import torch
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise RecipeError(f"--max-new-tokens: {max_new_tokens} is not a usable length (must be >= 1)")
    ids = prompt_ids(tokenizer, prompt, plain)
    stops = stop_token_ids(tokenizer, model, plain)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops or None,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    batch = torch.tensor([ids], dtype=torch.long, device=_device(model))
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=config)
    new = out[0, len(ids) :].tolist()
    stopped_by = None
    if new and new[-1] in stops:
        stopped_by = tokenizer.convert_ids_to_tokens(new[-1])
        new = new[:-1]  # the stop token is not part of the answer
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Answer(
        text=text,
        prompt_tokens=len(ids),
        answer_ids=new,
        stopped_by=stopped_by,
        routing=answer_routing(model, ids + new, len(ids)) if routing and new else None,
    )


def _layer_label(name: str) -> str:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return f"layer {match.group(1)}" if match else name


def format_routing_table(routing: AnswerRouting) -> str:
    """A per-layer table of the answer's expert assignments: the share of the layer's tokens x top-k
    assignments each expert took (one column per expert up to MAX_EXPERT_COLUMNS, else the busiest ones)."""
    num_experts = len(routing.counts[0]) if routing.counts else 0
    assignments = routing.tokens * routing.top_k
    lines = [
        f"routing of the answer's {routing.tokens} tokens: share of each layer's {assignments} top-{routing.top_k} "
        f"assignments per expert (of {num_experts}; uniform = {100 / max(num_experts, 1):.0f}%)"
    ]
    labels = [_layer_label(name) for name in routing.layer_names]
    width = max([len(label) for label in labels] + [5])

    def share(count: int) -> str:
        return f"{100 * count / assignments:.0f}%" if count else "."

    if num_experts <= MAX_EXPERT_COLUMNS:
        header = " ".join(f"{f'e{e}':>4}" for e in range(num_experts))
        lines.append(f"{'layer':<{width}}  {header}  used")
        for label, counts in zip(labels, routing.counts, strict=True):
            cells = " ".join(f"{share(c):>4}" for c in counts)
            used = sum(1 for c in counts if c)
            lines.append(f"{label:<{width}}  {cells}  {used}/{num_experts}")
    else:
        lines.append(f"{'layer':<{width}}  used    busiest experts")
        for label, counts in zip(labels, routing.counts, strict=True):
            ranked = sorted(range(num_experts), key=lambda e: (-counts[e], e))[:TOP_EXPERTS_LISTED]
            busiest = ", ".join(f"e{e} {share(counts[e])}" for e in ranked if counts[e])
            used = sum(1 for c in counts if c)
            lines.append(f"{label:<{width}}  {f'{used}/{num_experts}':<6}  {busiest}")
    return "\n".join(lines)


def run_generate(
    path: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    routing: bool = False,
    plain: bool = False,
    base: str | None = None,
    echo: Echo = print,
) -> Answer:
    """Load what answers, say what it is and how the prompt is formatted, print the answer (and its routing)."""
    if max_new_tokens < 1:
        raise RecipeError(f"--max-new-tokens: {max_new_tokens} is not a usable length (must be >= 1)")
    loaded = load_for_generation(path, base)
    for note in loaded.notes:
        echo(note)
    if plain or not has_chat_template(loaded.tokenizer):
        why = "--plain" if plain else "the tokenizer has no chat template"
        format_line = f"prompt as plain text ({why})"
    else:
        format_line = "prompt in the tokenizer's chat template (--plain sends it as is, as prompt/completion recipes train)"
    echo(f"generate: {loaded.description}; {format_line}; greedy, at most {max_new_tokens} new tokens")
    answer = generate_answer(
        loaded.model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens, plain=plain, routing=routing
    )
    echo(answer.text)
    ended = (
        f"stopped at {answer.stopped_by}"
        if answer.stopped_by
        else f"reached --max-new-tokens {max_new_tokens}"
    )
    echo(f"({len(answer.answer_ids)} new tokens after a {answer.prompt_tokens}-token prompt, {ended})")
    if routing:
        echo(
            format_routing_table(answer.routing)
            if answer.routing
            else "routing: the answer has no tokens to route"
        )
    return answer
