"""Fast LoRA on fused experts: the adapter computed on the routed tokens, never a merged stack.

PEFT reaches transformers-5 fused experts only through `target_parameters`, and its `ParamWrapper`
parametrizes the whole stack as `W + s·B·A` (E x out x in) on every forward and every checkpoint
recompute. Here each expert computes, on the S = tokens x top_k rows routed to it (sorted by expert),

    y = x·Wᵀ + s·((x·Aᵀ)·Bᵀ)        x (S_e, in), A_e (r, in), B_e (out, r)

with grouped matmuls, so the extra work is two thin (rank-r) matmuls per projection and `B·A` is
never formed. The factors stay PEFT's own parameters (read from the wrapper), so the trainable
parameter names, the saved adapter and `merge_and_unload` are exactly PEFT's.

How it is switched on (`use_fast_expert_lora`), keeping PEFT's whole contract (issue 26; PEFT's own
tests/test_target_parameters.py runs with it in place in benchmarks/peft_suite.py):
- the forward is registered in transformers' `ExpertsInterface` as `lora_grouped_mm` and selected the
  transformers way, `model.set_experts_implementation("lora_grouped_mm")`;
- the wrappers stay PEFT's own `ParamWrapper`s (PEFT recognises an existing wrapper by that class name when
  a second adapter is added or loaded); three of their methods are replaced on each instance:
  `_activate_lora`, which PEFT's forward calls only when the adapters are on and not merged, publishes the
  wrapper and the adapters PEFT passes it to its experts for that one forward instead of parametrizing the
  weight as `W + s·B·A`; the kernel reads the factors of exactly those adapters (several active ones add,
  as PEFT sums their deltas). No wrapper around the experts (disabled, merged, unloaded): nothing is
  published and the experts run the implementation they had before the switch, bit for bit.
  `unload_and_optionally_merge_module` (`unload`, `merge_and_unload`) puts that implementation back in
  the configs, so the unloaded model is the base model. `merge` refuses 4-bit experts (models/quant4.py),
  whose packed bytes cannot take B·A;
- what PEFT itself refuses for target parameters (`add_weighted_adapter`, mixed adapter batches, dropout,
  DoRA, LoRA bias) it still refuses, in its own words, before the kernel is reached.
The one PEFT test whose outcome differs on purpose counts calls to PEFT's internal `_LoraFactorsProxy`,
the merged-stack parametrization that the kernel never builds.

PEFT's layout (peft 0.21-0.22 `ParamWrapper.update_layer` / `get_delta_weight`), for a projection with
`in_features` inputs and `out_features` outputs whatever the storage order of W:
`lora_A.weight` is (r·E, in), read expert-major: `.view(E, r, in)`; `lora_B.weight` is (out, r·E),
read expert-minor: `.view(out, r, E)`, column `j·E + e` is rank j of expert e.

LoRA dropout (PEFT refuses it on parameter wrappers): the fast path applies the wrapper's
`lora_dropout[adapter]` module to each routed row's input of the LoRA term only, `s·B·A·dropout(x)`,
independently per (token, expert) pair, the way `lora.Linear` applies it to a token's input.

On CPU each expert's routed rows are padded to one of a few counts per octave (`_row_layout`): oneDNN
keeps one primitive per matmul shape, and unpadded counts change every step (measured: ~1 GiB of cache
after two steps, and slower steps, on a 1,152 MiB-expert model). The padding rows are never read back.

Why one file of ~640 lines: the forward, its two memory-saving autograd functions and the switch that
keeps PEFT's wrapper from merging are one mechanism, and the equality with PEFT's path depends on all
three agreeing on PEFT's factor layout and on PEFT's choice of adapters.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from moe_finetune.models.quant4 import PackedExperts, compute_dtype, is_packed, packed_spec, rows_times_weight

LORA_EXPERTS_IMPLEMENTATION = "lora_grouped_mm"
FAST_PARAMETERS = ("gate_up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------
# Grouped matmuls over rows sorted by expert (offs[e] = end row of expert e)


def _aligned(*tensors: torch.Tensor) -> bool:
    # torch's CPU grouped_mm wants 16-byte strides and one contiguous dimension in the last two.
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16):
            return False
        if t.stride(-1) != 1 and t.stride(-2) != 1:
            return False
        if any((s * t.element_size()) % 16 for s in t.stride()[-2:] if s != 1):
            return False
    return True


def _grouped(a: torch.Tensor, b: torch.Tensor | PackedExperts, offs: torch.Tensor) -> torch.Tensor:
    """Rows of `a` (S, K) times their expert's `b[e]` (E, K, N) -> (S, N). Differentiable."""
    # Cast the rows, never the stack (autocast may hand fp32 rows to bf16 experts), as transformers does.
    a = a.to(b.dtype)
    if isinstance(b, PackedExperts):
        return _PackedMatmul.apply(a, offs, b)
    if a.device.type != "cpu" or _aligned(a, b):
        try:
            return torch.nn.functional.grouped_mm(a, b, offs=offs)
        except RuntimeError:
            pass  # an old GPU or an unaligned shape: the loop below is always right
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):  # one host sync for all experts
        out.append(a[start:end] @ b[e])
        start = end
    return torch.cat(out) if out else a.new_zeros(0, b.shape[-1])


def _packed_rows(a: torch.Tensor, b: PackedExperts, offs: torch.Tensor) -> torch.Tensor:
    """Rows of `a` times their expert's dequantized weight, one expert at a time, each dequantized into the
    one reused workspace of its shape (`PackedExperts.borrow`) and consumed by its matmul before the next."""
    out = a.new_empty(a.shape[0], b.shape[-1], dtype=b.dtype)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync for all experts
        if end > start:
            torch.mm(a[start:end], b.borrow(e), out=out[start:end])
        start = end
    return out


class _PackedMatmul(torch.autograd.Function):
    """`_grouped` over a 4-bit stack: the weight is dequantized again in backward, never saved for it."""

    @staticmethod
    def forward(ctx, a, offs, packed):
        ctx.packed = packed
        ctx.save_for_backward(offs)
        return _packed_rows(a, packed, offs)

    @staticmethod
    def backward(ctx, dy):
        (offs,) = ctx.saved_tensors
        return _packed_rows(dy.to(ctx.packed.dtype), ctx.packed.transpose(-2, -1), offs), None, None


def _grouped_outer(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per expert, `a_eᵀ · b_e` for rows a (S, K), b (S, N) -> (E, K, N) (a weight gradient)."""
    b = b.to(a.dtype)
    at = a.t()
    if a.device.type != "cpu" or _aligned(at, b):
        try:
            return torch.nn.functional.grouped_mm(at, b, offs=offs)
        except RuntimeError:
            pass
    out = a.new_zeros(num_experts, a.shape[1], b.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(at[:, start:end], b[start:end], out=out[e])
        start = end
    return out


# ------------------------------------------------------------------------------------------------
# The two autograd functions: they save the rank-r intermediates, not the routed copies


def _lora_linear_forward(x, weight, lora_a, lora_b, offs, s):
    """y = x·W + s·(x·A)·B over rows grouped by expert; returns y (S, out) and h = x·A (S, r).

    On CPU the rank-r products run per expert through BLAS and B's term is accumulated into the base
    output in place (`addmm_`): in a training step torch 2.13's CPU grouped_mm took 0.1-0.15 s per skinny
    (K or N = r) call at S = 4096, and `y + s·h·B` out of place costs two more passes over the (S, out)
    output; this cut the fast arm's CPU time per step from 13.0 s to 4.9 s (benchmarks/expert_lora.py,
    seq 512). Elsewhere (CUDA: not yet run on a GPU) grouped_mm.
    """
    y = _grouped(x, weight, offs)
    x = x.to(lora_a.dtype)
    if x.device.type != "cpu":
        h = _grouped(x, lora_a, offs)
        return y.add_(_grouped(h, lora_b, offs), alpha=s), h
    h = x.new_empty(x.shape[0], lora_a.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync for all experts
        if end > start:
            torch.mm(x[start:end], lora_a[e], out=h[start:end])
            y[start:end].addmm_(h[start:end], lora_b[e].to(y.dtype), alpha=s)
        start = end
    return y, h


def _lora_linear_backward(x, dy, weight, lora_a, lora_b, h, offs, s, need_weight_grad):
    """Gradients of `_lora_linear_forward` for dy (S, out): dx (S, in), dW or None, dA (E, in, r), dB (E, r, out)."""
    dx = _grouped(dy, weight.transpose(-2, -1), offs)  # (S, in)
    d_weight = _grouped_outer(x, dy.to(x.dtype), offs, weight.shape[0]) if need_weight_grad else None
    x, dy = x.to(lora_a.dtype), dy.to(lora_a.dtype)
    if x.device.type != "cpu":
        dh = s * _grouped(dy, lora_b.transpose(-2, -1), offs)  # (S, r)
        dx.add_(_grouped(dh, lora_a.transpose(-2, -1), offs))
        d_a = _grouped_outer(x, dh, offs, weight.shape[0])
        d_b = s * _grouped_outer(h, dy, offs, weight.shape[0])
        return dx, d_weight, d_a, d_b
    d_a, d_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            rows = slice(start, end)
            dh = torch.mm(
                dy[rows],
                lora_b[e].t(),
            ).mul_(s)  # (S_e, r)
            dx[rows].addmm_(dh.to(dx.dtype), lora_a[e].t().to(dx.dtype))
            torch.mm(x[rows].t(), dh, out=d_a[e])
            torch.mm(h[rows].t(), dy[rows], out=d_b[e])
        start = end
    return dx, d_weight, d_a, d_b.mul_(s)


def _saved(weight: torch.Tensor | PackedExperts) -> torch.Tensor | None:
    # A packed stack is kept on ctx (it holds the module, not a tensor of its own): nothing full-size is saved.
    return None if isinstance(weight, PackedExperts) else weight


class _GateUpLora(torch.autograd.Function):
    """`y = x·W + s·(x·A)·B` with x = hidden[token_index], saving `hidden` (N, H) instead of x (S, H).

    W (E, in, out), A (E, in, r), B (E, r, out) are views in "rows times weight" order.
    """

    @staticmethod
    def forward(ctx, hidden, token_index, weight, lora_a, lora_b, offs, scaling):
        y, h = _lora_linear_forward(hidden[token_index], weight, lora_a, lora_b, offs, scaling)
        ctx.packed = weight if isinstance(weight, PackedExperts) else None
        ctx.save_for_backward(hidden, token_index, _saved(weight), lora_a, lora_b, offs, h)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        hidden, token_index, weight, lora_a, lora_b, offs, h = ctx.saved_tensors
        weight = ctx.packed or weight
        x = hidden[token_index]  # re-gathered: (S, in) is k times the (N, in) we kept
        dx, d_weight, d_a, d_b = _lora_linear_backward(
            x, dy, weight, lora_a, lora_b, h, offs, ctx.scaling, ctx.needs_input_grad[2]
        )
        d_hidden = None
        if ctx.needs_input_grad[0]:
            d_hidden = torch.zeros_like(hidden).index_add_(0, token_index, dx.to(hidden.dtype))
        return d_hidden, None, d_weight, d_a, d_b, None, None


class _GateDownLora(torch.autograd.Function):
    """`y = a·W + s·(a·A)·B` with a = gate(gate_up), saving `gate_up` (S, 2I) and recomputing `a` in
    backward; the plain path keeps gate, act(gate) and up for the activation's own backward."""

    @staticmethod
    def forward(ctx, gate_up, gate, weight, lora_a, lora_b, offs, scaling):
        y, h = _lora_linear_forward(
            gate(gate_up), weight, lora_a, lora_b, offs, scaling
        )  # autograd is off here
        ctx.packed = weight if isinstance(weight, PackedExperts) else None
        ctx.save_for_backward(gate_up, _saved(weight), lora_a, lora_b, offs, h)
        ctx.gate, ctx.scaling = gate, scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_up, weight, lora_a, lora_b, offs, h = ctx.saved_tensors
        weight = ctx.packed or weight
        with torch.enable_grad():
            g = gate_up.detach().requires_grad_(True)
            a = ctx.gate(g)
        da, d_weight, d_a, d_b = _lora_linear_backward(
            a.detach(), dy, weight, lora_a, lora_b, h, offs, ctx.scaling, ctx.needs_input_grad[2]
        )
        (d_gate_up,) = torch.autograd.grad(a, g, da.to(a.dtype))
        return d_gate_up, None, d_weight, d_a, d_b, None, None


# ------------------------------------------------------------------------------------------------
# Reading the factors from PEFT's wrappers


@dataclass
class _LoraTerm:
    lora_a: torch.Tensor  # (E, in, r)
    lora_b: torch.Tensor  # (E, r, out)
    scaling: float
    dropout: nn.Module


def _lora_terms(experts: nn.Module, parameter_name: str) -> list[_LoraTerm]:
    """The LoRA terms of one expert parameter in this forward, in PEFT's layout (module docstring): those
    its ParamWrapper published, with the adapters PEFT passed it, while it runs around these experts
    (`_fast_activate_lora`). None published (adapters disabled or merged, the wrapper unloaded): none."""
    state = getattr(experts, "_lora_fast", None)
    published = state.published.get(parameter_name) if state is not None else None
    if published is None:
        return []
    wrapper, adapters = published
    dtype = compute_dtype(experts, parameter_name)
    terms = []
    for adapter in adapters:
        if adapter not in wrapper.lora_A:
            continue  # as PEFT: an active adapter that does not adapt this parameter adds nothing
        num_experts = wrapper.num_experts
        weight_a = wrapper.lora_A[adapter].weight  # (r·E, in), expert-major
        weight_b = wrapper.lora_B[adapter].weight  # (out, r·E), expert-minor
        lora_a = weight_a.view(num_experts, -1, weight_a.shape[-1]).transpose(-2, -1)  # (E, in, r)
        lora_b = (
            weight_b.view(weight_b.shape[0], -1, num_experts).permute(2, 1, 0).contiguous()
        )  # (E, r, out)
        terms.append(
            _LoraTerm(
                lora_a.to(dtype), lora_b.to(dtype), wrapper.scaling[adapter], wrapper.lora_dropout[adapter]
            )
        )
    return terms


def _projection(
    rows: torch.Tensor, weight: torch.Tensor, terms: list[_LoraTerm], offs: torch.Tensor
) -> torch.Tensor:
    """The plain (autograd) form: rows (S, in) -> (S, out); any number of adapters, dropout included."""
    out = _grouped(rows, weight, offs)
    for term in terms:
        out = out + term.scaling * _grouped(
            _grouped(term.dropout(rows), term.lora_a, offs), term.lora_b, offs
        )
    return out


def _memory_saving(terms: list[_LoraTerm]) -> bool:
    # One adapter and no live dropout: the autograd functions above apply (dropout would need its mask saved).
    if len(terms) != 1:
        return False
    dropout = terms[0].dropout
    return isinstance(dropout, nn.Identity) or not (dropout.training and getattr(dropout, "p", 0.0) > 0)


def _bucketed(counts: torch.Tensor) -> torch.Tensor:
    """Each count rounded up to one of 8 steps per octave (exact below 16): at most 12.5% more rows."""
    step = torch.exp2((torch.log2(counts.clamp(min=1).double()).floor() - 3).clamp(min=0)).long()
    return (counts + step - 1) // step * step


def _row_layout(
    counts: torch.Tensor, perm: torch.Tensor, expert_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows each expert computes and where each sorted row sits among them.

    Returns rows (E,), position (S,) (sorted row i -> its row), and perm and expert_ids over all rows.
    On CUDA that is the sorted layout itself. On CPU each expert's count is padded (`_bucketed`): oneDNN
    (bf16 matmuls) builds and caches one primitive per matmul shape, and the routed count per expert
    changes every step, so unpadded its cache filled to its 1,024 entries within two steps of the
    1,152 MiB-expert benchmark model and held ~1 GiB (`ONEDNN_PRIMITIVE_CACHE_CAPACITY=0` gave that
    back); with a handful of counts per matmul it stays a few dozen entries. Padding rows compute on slot
    0's token and nothing reads them back: their gradient is zero, so they add nothing to any other.
    """
    if perm.device.type != "cpu":
        return counts, torch.arange(perm.numel(), device=perm.device), perm, expert_ids
    rows = _bucketed(counts)
    starts = torch.cumsum(counts, 0) - counts
    padded_starts = torch.cumsum(rows, 0) - rows
    position = torch.arange(perm.numel()) - starts[expert_ids] + padded_starts[expert_ids]
    total = int(rows.sum())
    padded_perm = perm.new_zeros(total)
    padded_perm[position] = perm
    return rows, position, padded_perm, torch.repeat_interleave(torch.arange(counts.numel()), rows)


def lora_grouped_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' grouped_mm experts forward plus each active LoRA adapter, on the routed rows only.

    hidden_states (N, H), top_k_index / top_k_weights (N, k) -> (N, H). Biases (GPT-OSS) and the
    family's own gate (`_apply_gate`: SiLU·up, GPT-OSS's clamped interleaved SwiGLU) as transformers has them.
    """
    gate_up_terms = _lora_terms(self, "gate_up_proj")
    down_terms = _lora_terms(self, "down_proj")
    if not gate_up_terms and not down_terms and not is_packed(self):
        # No LoRA in this forward (adapters disabled or merged, wrappers unloaded): exactly what these experts
        # computed before the switch, so a disabled or unloaded adapter gives the base model's logits bit for bit.
        return _previous_forward(self)(self, hidden_states, top_k_index, top_k_weights)

    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.shape[-1]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))  # S = N·k rows, grouped by expert
    counts = torch.bincount(expert_ids, minlength=self.num_experts)
    # Where each sorted row sits: on CPU each expert's rows are padded to a bucketed count (`_bucketed`).
    sorted_slots = perm
    rows, position, perm, expert_ids = _row_layout(counts, perm, expert_ids)
    token_index = perm // num_top_k
    offs = torch.cumsum(rows, dim=0, dtype=torch.int32)

    # Weights in "rows times weight" order (E, in, out): transposed storage (GPT-OSS) already is. A 4-bit
    # stack (models/quant4.py) is dequantized one expert at a time, in forward and again in backward.
    w_gate_up = rows_times_weight(self, "gate_up_proj")
    w_down = rows_times_weight(self, "down_proj")

    if _memory_saving(gate_up_terms):
        t = gate_up_terms[0]
        gate_up = _GateUpLora.apply(
            hidden_states, token_index, w_gate_up, t.lora_a, t.lora_b, offs, t.scaling
        )
    else:
        gate_up = _projection(hidden_states[token_index], w_gate_up, gate_up_terms, offs)
    if self.has_bias:
        gate_up = gate_up + self.gate_up_proj_bias[expert_ids]

    if _memory_saving(down_terms):
        t = down_terms[0]
        out = _GateDownLora.apply(gate_up, self._apply_gate, w_down, t.lora_a, t.lora_b, offs, t.scaling)
    else:
        out = _projection(self._apply_gate(gate_up), w_down, down_terms, offs)
    if self.has_bias:
        out = out + self.down_proj_bias[expert_ids]

    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)  # (S, H); fp32 weights promote, as upstream
    # Back to (token, slot) order (padding rows are never read), then sum the k slots: deterministic, as
    # transformers does it.
    inverse = torch.empty_like(position)
    inverse[sorted_slots] = position
    return out[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


# ------------------------------------------------------------------------------------------------
# Switching a PEFT model onto the fast path and back


@dataclass
class _FastState:
    """What `use_fast_expert_lora` put on one experts module: how to put it back, and what its wrappers
    publish during a forward. A plain attribute (`_lora_fast`), not a submodule: nothing in state_dict."""

    previous: str | None  # these experts' implementation before the switch
    configs: list[tuple[Any, str | None]]  # every config the switch changed, with its value before
    published: dict[str, tuple[ParamWrapper, list[str]]] = field(default_factory=dict)


def _previous_forward(experts: nn.Module) -> Any:
    """The experts forward of the implementation from before the switch (transformers' grouped_mm when
    there is no record: 4-bit experts, whose loader selects `lora_grouped_mm` itself)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

    state = getattr(experts, "_lora_fast", None)
    previous = state.previous if state is not None else None
    original = getattr(type(experts).forward, "__wrapped__", None)  # the class's eager forward
    if previous in (None, LORA_EXPERTS_IMPLEMENTATION) or (previous == "eager" and original is None):
        return grouped_mm_experts_forward
    return ALL_EXPERTS_FUNCTIONS.get_interface(previous, original)


def fast_kernel_active(experts: nn.Module) -> bool:
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) == LORA_EXPERTS_IMPLEMENTATION and (
        getattr(experts, "_lora_fast", None) is not None
    )


# The ParamWrapper methods replaced on each wrapper instance (its class stays PEFT's own, which PEFT
# dispatches on by name when a second adapter reuses the wrapper). Bound with functools.partial, which
# deepcopy and pickle both follow.


def _fast_activate_lora(wrapper: ParamWrapper, active_adapters: list[str]) -> Any:
    """PEFT's `_activate_lora` parametrizes the weight as `W + s·B·A` around the base layer's forward; with
    the experts on `lora_grouped_mm` the wrapper instead publishes itself and the adapters PEFT chose to the
    experts for that forward, and the kernel reads their factors. PEFT's forward decides as ever whether to
    call this (not when disabled, merged or given `adapter_names`), so what runs is always PEFT's choice."""
    experts = wrapper.get_base_layer()
    if not fast_kernel_active(experts):
        if is_packed(experts):
            raise RuntimeError(
                f"forward: the 4-bit experts {type(experts).__name__} run only on the {LORA_EXPERTS_IMPLEMENTATION} "
                f"experts implementation (PEFT's ParamWrapper cannot add B·A to packed weights); the model is on "
                f"{experts.config._experts_implementation!r}: call "
                f"model.set_experts_implementation({LORA_EXPERTS_IMPLEMENTATION!r})"
            )
        return ParamWrapper._activate_lora(wrapper, active_adapters)
    return _published(experts._lora_fast, wrapper, active_adapters)


@contextmanager
def _published(state: _FastState, wrapper: ParamWrapper, adapters: list[str]):
    state.published[wrapper.parameter_name] = (wrapper, list(adapters))
    try:
        yield
    finally:
        state.published.pop(wrapper.parameter_name, None)


def _fast_unload(
    wrapper: ParamWrapper, merge: bool, safe_merge: bool, adapter_names: list[str] | None
) -> nn.Module:
    """PEFT's unload (`unload`, `merge_and_unload`), then the experts back on their implementation from
    before the switch: the unloaded model is the base model, config included."""
    experts = ParamWrapper.unload_and_optionally_merge_module(
        wrapper, merge=merge, safe_merge=safe_merge, adapter_names=adapter_names
    )
    _switch_back(experts, _wrapper_chain(wrapper))
    return experts


def _fast_merge(
    wrapper: ParamWrapper, safe_merge: bool = False, adapter_names: list[str] | None = None
) -> None:
    experts = wrapper.get_base_layer()
    if is_packed(experts):
        raise RuntimeError(
            f"merge: the experts {type(experts).__name__}.{wrapper.parameter_name} are 4-bit "
            "(model.quantization), and B·A cannot be added to packed weights (it would be rounded away). "
            "Merge the adapter into the full-precision base instead: `moe-finetune merge RUN_DIR` loads it "
            "unquantized"
        )
    ParamWrapper.merge(wrapper, safe_merge=safe_merge, adapter_names=adapter_names)


_FAST_METHODS = {
    "_activate_lora": _fast_activate_lora,
    "unload_and_optionally_merge_module": _fast_unload,
    "merge": _fast_merge,
}


def _wrapper_chain(outer: nn.Module) -> list[ParamWrapper]:
    """The (nested) wrappers from `outer` down to the experts: one per adapted parameter."""
    chain = []
    while isinstance(outer, ParamWrapper):
        chain.append(outer)
        outer = outer.base_layer
    return chain


def _switch_back(experts: nn.Module, wrappers: Iterable[ParamWrapper]) -> None:
    """Undo `use_fast_expert_lora` on one experts module and its wrappers (idempotent)."""
    state = experts.__dict__.pop("_lora_fast", None)
    for wrapper in wrappers:
        for name in _FAST_METHODS:
            wrapper.__dict__.pop(name, None)
    if state is not None:
        for config, previous in state.configs:
            config._experts_implementation_internal = previous  # as set_experts_implementation writes it


def register_lora_experts() -> None:
    """Put `lora_grouped_mm` in transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(LORA_EXPERTS_IMPLEMENTATION, lora_grouped_mm_experts_forward)


def _expert_wrappers(peft_model: nn.Module) -> dict[nn.Module, dict[str, ParamWrapper]]:
    """Each experts module that PEFT wrapped, with its wrappers by parameter name."""
    found: dict[nn.Module, dict[str, ParamWrapper]] = {}
    for module in peft_model.modules():
        if isinstance(module, ParamWrapper):
            found.setdefault(module.get_base_layer(), {})[module.parameter_name] = module
    return found


def unsupported_reason(experts: nn.Module, wrappers: dict[str, Any]) -> str | None:
    """Why the fast kernel cannot serve this experts module, or None when it can."""
    name = type(experts).__name__
    if not all(hasattr(experts, a) for a in ("has_gate", "has_bias", "is_transposed", "config")):
        return f"{name} does not use transformers' experts implementations"
    if not experts.has_gate or getattr(experts, "has_post_expert_norm", False):
        return f"{name} has no fused gate_up_proj or has a post-expert norm"
    if getattr(experts, "_is_expert_parallel", False):
        return f"{name} is expert-parallel"
    other = sorted(set(wrappers) - set(FAST_PARAMETERS))
    if other:
        return f"{name}: LoRA on {', '.join(other)} (the fast kernel adapts {', '.join(FAST_PARAMETERS)})"
    for parameter_name in wrappers:
        if packed_spec(experts, parameter_name) is not None:
            continue  # 4-bit: dequantized into its compute dtype
        dtype = getattr(experts, parameter_name).dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"{name}.{parameter_name} is {dtype}"
    return None


def use_fast_expert_lora(peft_model: nn.Module) -> str | None:
    """Run every expert LoRA of `peft_model` on the fast kernel. Returns None when it does, else the
    reason it cannot (then nothing changed and PEFT's path stays). All or nothing: the experts
    implementation is one per model config. Idempotent: call it again after adding adapters (they reuse
    the wrappers, so it has nothing to do) or after PEFT wrapped more parameters."""
    found = _expert_wrappers(peft_model)
    if not found:
        return "no expert parameter has LoRA"
    for experts, wrappers in found.items():
        reason = unsupported_reason(experts, wrappers)
        if reason:
            return reason
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if not callable(getattr(base, "set_experts_implementation", None)):
        return f"{type(base).__name__} cannot switch its experts implementation"
    register_lora_experts()
    # Every config the switch may change (the model's and its sub-models'), with the value it had, so that
    # unloading puts back exactly the base model; a second call keeps the record of the first.
    earlier = next((e._lora_fast for e in found if getattr(e, "_lora_fast", None) is not None), None)
    configs = earlier.configs if earlier is not None else _config_values(base)
    previous = {e: e._lora_fast.previous if getattr(e, "_lora_fast", None) else e.config._experts_implementation
                for e in found}  # fmt: skip
    before = base.get_experts_implementation()
    base.set_experts_implementation(LORA_EXPERTS_IMPLEMENTATION)
    missed = [e for e in found if e.config._experts_implementation != LORA_EXPERTS_IMPLEMENTATION]
    if missed:
        base.set_experts_implementation(before)
        return f"{type(missed[0]).__name__} did not take the {LORA_EXPERTS_IMPLEMENTATION} implementation"
    for experts, wrappers in found.items():
        if getattr(experts, "_lora_fast", None) is None:
            experts._lora_fast = _FastState(previous=previous[experts], configs=configs)
        for wrapper in wrappers.values():
            for name, method in _FAST_METHODS.items():
                wrapper.__dict__[name] = partial(
                    method, wrapper
                )  # an instance attribute: the class stays PEFT's
    return None


def _config_values(model: nn.Module) -> list[tuple[Any, str | None]]:
    from transformers import PreTrainedModel

    configs = {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}
    return [(config, config._experts_implementation) for config in configs.values()]


def use_peft_expert_lora(peft_model: nn.Module) -> None:
    """Back to PEFT's own path (the merged stack) and the experts implementation from before."""
    for experts, wrappers in _expert_wrappers(peft_model).items():
        _switch_back(experts, wrappers.values())


def set_expert_lora_dropout(peft_model: nn.Module, p: float) -> int:
    """Give every LoRA layer (attention and, on the fast path, experts) dropout `p` on its LoRA input.

    The adapter config keeps `lora_dropout: 0` so plain PEFT (which refuses dropout on parameter
    wrappers) still loads the saved adapter; dropout only acts in training. Returns how many layers got it.
    """
    from peft.tuners.lora.layer import LoraLayer

    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.lora_dropout.keys()):
                module.lora_dropout[adapter] = nn.Dropout(p) if p > 0 else nn.Identity()
                count += 1
    return count
