"""4-bit fused experts: QLoRA for MoE models that really fits.

bitsandbytes' 4-bit (through transformers' `BitsAndBytesConfig`) replaces `nn.Linear` modules only, and
transformers 5 stores the experts as fused 3-D parameters (E x out x in), so 92-97% of an MoE model stays
bf16. Here the fused `gate_up_proj` / `down_proj` stacks are quantized too, with bitsandbytes' own
`quantize_4bit` / `dequantize_4bit` (NF4 or FP4, the recipe's blocksize and double quantization), one
expert at a time, so that each expert can be dequantized on its own:

- storage: the parameter keeps its name (PEFT finds it by name) but holds the packed bytes, (E, n/2) uint8
  for n = out x in values per expert, with the logical shape in `ds_shape` (the attribute PEFT's
  `ParamWrapper` reads the real shape from when a parameter does not carry it, as under ZeRO-3); the
  quantization constants are buffers beside it, persistent (`<name>_absmax`, and with double quant
  `<name>_offset`, `<name>_absmax2`, `<name>_code2`), so `.to(device)` moves them with the module;
- loading: `ExpertsBnb4bitQuantizer` is transformers' own bitsandbytes 4-bit quantizer plus the fused
  experts: transformers hands it each stack right after reading (and, for per-expert checkpoints, fusing)
  it, and it is packed at once, so peak host memory stays near the packed model plus one layer in bf16;
- compute: the experts forward (models/experts.py, `lora_grouped_mm`) loops over the experts that have
  routed rows; `PackedExperts.borrow(e)` dequantizes each into one reused buffer per shape and thread
  (`workspace`), which its matmul consumes before the next expert is dequantized, and backward dequantizes
  again into the same buffer instead of keeping anything: nothing full-size is saved for backward, and no
  expert-sized tensor is allocated per expert per pass (a new one each time fragmented glibc's heap: on
  CPU bitsandbytes has no `dequantize_4bit(out=)`, so its native CPU kernel is called into the buffer).

Routers are custom modules (not `nn.Linear`) in every family we support and stay as they are; the
Qwen2-MoE shared-expert gate (an `nn.Linear` with one output) is kept out of quantization with the
lm_head, as a router should be.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

QUANTIZED_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
QUANT_METHOD = "moe_finetune_bnb_4bit"
# nn.Linear gates that route (Qwen2-MoE's shared-expert gate): kept in full precision, as routers are.
GATE_MODULES = ("shared_expert_gate",)


@dataclass(frozen=True)
class PackedSpec:
    """How one expert stack is packed: per-expert stored shape (d1, d2), compute dtype, bnb settings."""

    num_experts: int
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested: bool


def packed_spec(experts: nn.Module, name: str) -> PackedSpec | None:
    """The packing of `experts.<name>`, or None when that stack is not 4-bit."""
    return getattr(experts, "_q4_specs", {}).get(name)


def is_packed(experts: nn.Module) -> bool:
    return bool(getattr(experts, "_q4_specs", None))


def pack_expert_stack(
    experts: nn.Module,
    name: str,
    weight: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> nn.Parameter:
    """Quantize `weight` (E, d1, d2) expert by expert and install it as `experts.<name>` (packed)."""
    import bitsandbytes.functional as bnbf

    num_experts, d1, d2 = weight.shape
    packed, absmax, offsets, absmax2, code2 = [], [], [], [], None
    for e in range(num_experts):
        data, state = bnbf.quantize_4bit(
            weight[e].contiguous(),
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        packed.append(data.reshape(-1))
        absmax.append(state.absmax)
        if double_quant:
            offsets.append(state.offset.reshape(()))
            absmax2.append(state.state2.absmax)
            code2 = state.state2.code
    parameter = nn.Parameter(torch.stack(packed), requires_grad=False)
    parameter.ds_shape = torch.Size((num_experts, d1, d2))  # PEFT's ParamWrapper reads the real shape here
    experts._parameters[name] = parameter
    experts.register_buffer(f"{name}_absmax", torch.stack(absmax))
    if double_quant:
        experts.register_buffer(f"{name}_offset", torch.stack(offsets).float())
        experts.register_buffer(f"{name}_absmax2", torch.stack(absmax2))
        experts.register_buffer(f"{name}_code2", code2)
    specs = dict(getattr(experts, "_q4_specs", {}))
    specs[name] = PackedSpec(num_experts, (d1, d2), compute_dtype, blocksize, quant_type, double_quant)
    experts._q4_specs = specs
    del weight, packed, absmax
    _return_freed_memory()
    return parameter


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc): the per-expert copies and bitsandbytes' scratch
    buffers of each stack are mid-size allocations that glibc keeps in the heap once freed, so without
    this a load would hold on to nearly every stack's full-precision bytes long after packing them
    (measured: +140 MiB of anonymous memory left over on a 201 MB-expert model). No-op elsewhere."""
    import contextlib
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl or another libc: nothing to trim with
            ctypes.CDLL("libc.so.6").malloc_trim(0)


_CODES: dict[tuple[str, str], torch.Tensor] = {}


def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    key = (quant_type, str(device))
    if key not in _CODES:
        _CODES[key] = bnbf.get_4bit_type(quant_type, device=device)
    return _CODES[key]


def _quant_state(experts: nn.Module, name: str, e: int) -> Any:
    """bitsandbytes' QuantState of expert `e` of the packed stack `name` (views of the module's buffers)."""
    import bitsandbytes.functional as bnbf

    spec = packed_spec(experts, name)
    assert spec is not None, f"{name} is not packed"
    state2 = offset = None
    if spec.nested:
        state2 = bnbf.QuantState(
            absmax=getattr(experts, f"{name}_absmax2")[e],
            code=getattr(experts, f"{name}_code2"),
            blocksize=256,
            dtype=torch.float32,
        )
        offset = getattr(experts, f"{name}_offset")[e]
    return bnbf.QuantState(
        absmax=getattr(experts, f"{name}_absmax")[e],
        shape=torch.Size(spec.shape),
        code=_code(spec.quant_type, experts._parameters[name].device),
        blocksize=spec.blocksize,
        quant_type=spec.quant_type,
        dtype=spec.dtype,
        offset=offset,
        state2=state2,
    )


def dequantize_expert(experts: nn.Module, name: str, e: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Expert `e` of the packed stack `name`, dequantized: (d1, d2) in the compute dtype, written into `out`
    when given (contiguous, that shape and dtype; returned), else a new tensor."""
    import bitsandbytes.functional as bnbf

    packed = experts._parameters[name][e]
    state = _quant_state(experts, name, e)
    if out is None:
        return bnbf.dequantize_4bit(packed.reshape(-1, 1), state)
    assert out.shape == state.shape and out.dtype == state.dtype and out.is_contiguous(), out.shape
    if out.device.type != "cpu":
        try:  # CUDA, XPU, MPS: bitsandbytes' own `out=` kernels
            return bnbf.dequantize_4bit(packed.reshape(-1, 1), state, out=out)
        except NotImplementedError:
            return out.copy_(bnbf.dequantize_4bit(packed.reshape(-1, 1), state))
    kernel = _cpu_dequantize_kernel(state.quant_type, state.dtype, state.blocksize, tuple(state.shape))
    absmax_kernel = _native_cpu_function("cdequantize_blockwise_cpu_fp32") if state.nested else None
    if kernel is None or (state.nested and absmax_kernel is None):
        return out.copy_(bnbf.dequantize_4bit(packed.reshape(-1, 1), state))
    absmax = state.absmax
    # With double quant, what bnbf.dequantize_4bit does first, here into a workspace too (fp32, 1/64 of the values)
    if state.nested:
        absmax = workspace(state.absmax.shape, torch.float32, out.device)
        absmax_kernel(
            _pointer(state.state2.code),
            _pointer(state.absmax),
            _pointer(state.state2.absmax),
            _pointer(absmax),
            ctypes.c_longlong(state.state2.blocksize),
            ctypes.c_longlong(state.absmax.numel()),
        )
        absmax += state.offset
    kernel(
        _pointer(packed),
        _pointer(absmax),
        _pointer(out),
        ctypes.c_longlong(state.blocksize),
        ctypes.c_longlong(math.prod(state.shape[:-1])),
        ctypes.c_longlong(state.shape[-1]),
    )
    return out


def _pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    return ctypes.c_void_p(tensor.data_ptr())


def _native_cpu_function(name: str) -> Any:
    """A function of bitsandbytes' native CPU library, or None where it has none (or no library loaded)."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    # the ctypes CDLL itself: bitsandbytes' wrapper would turn a missing symbol into a stub that raises when called
    native = getattr(lib, "_lib", None)
    return getattr(native, name, None)


def _cpu_dequantize_kernel(
    quant_type: str, dtype: torch.dtype, blocksize: int, shape: tuple[int, ...]
) -> Any:
    """bitsandbytes' CPU 4-bit kernel for these settings, to call into our buffer: bitsandbytes has no CPU
    `dequantize_4bit.out` and allocates a new output per call (backends/cpu/ops.py, which calls this same C
    function, so the values are bitwise equal). None where its CPU op would not call it (odd last dimension;
    blocksize >= 2048 on AVX512) or the native library lacks it: then the caller copies bitsandbytes' result."""
    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    if suffix is None or shape[-1] % 2 or (blocksize >= 2048 and avx512):
        return None
    return _native_cpu_function(f"cdequantize_blockwise_cpu_{quant_type}_{suffix}")


_WORKSPACES = threading.local()


def workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer of that shape, dtype and device (allocated on first use, kept).

    The experts forward dequantizes each expert into it instead of into a new tensor: a new (d1, d2)
    tensor per expert per pass is a mid-size block that glibc keeps in its heap once freed (on the
    1,152 MiB-expert benchmark model that left ~2 GiB more resident after 3 steps than the weights saved)
    and, on CUDA, a block the caching allocator must find each time. Per thread, so a forward on one thread
    never writes into a buffer another thread's forward or backward is reading.
    """
    buffers = _WORKSPACES.__dict__.setdefault("buffers", {})
    key = (tuple(shape), dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def dequantize_stack(experts: nn.Module, name: str) -> torch.Tensor:
    """The whole stack dequantized (E, d1, d2): for checks and the reference in tests, never in training."""
    spec = packed_spec(experts, name)
    assert spec is not None
    return torch.stack([dequantize_expert(experts, name, e) for e in range(spec.num_experts)])


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose packed stacks are plain parameters of their dequantized weights (and the
    transformers grouped_mm experts): the exact reference the 4-bit path must equal, for tests and benchmarks."""
    import copy

    reference = copy.deepcopy(model)
    for module in reference.modules():
        specs = getattr(module, "_q4_specs", None)
        if not specs:
            continue
        for name in specs:
            weight = dequantize_stack(module, name)
            module._parameters[name] = nn.Parameter(weight, requires_grad=False)
            for buffer in [b for b in module._buffers if b.startswith(f"{name}_")]:
                del module._buffers[buffer]
        del module._q4_specs
    reference.set_experts_implementation("grouped_mm")
    return reference


class PackedExperts:
    """A packed stack seen as the (E, in, out) "rows times weight" tensor the experts forward wants:
    `self[e]` dequantizes expert e (a transient (in, out) view); `.transpose(-2, -1)` flips the view."""

    def __init__(self, experts: nn.Module, name: str, transposed: bool) -> None:
        self.experts, self.name, self.transposed = experts, name, transposed
        spec = packed_spec(experts, name)
        assert spec is not None
        self.spec = spec
        d1, d2 = spec.shape
        self.shape = torch.Size((spec.num_experts, d2, d1) if transposed else (spec.num_experts, d1, d2))
        self.dtype = spec.dtype

    def __getitem__(self, e: int) -> torch.Tensor:
        """Expert e dequantized into a new tensor (in, out): safe to keep."""
        weight = dequantize_expert(self.experts, self.name, e)
        return weight.t() if self.transposed else weight

    def borrow(self, e: int) -> torch.Tensor:
        """Expert e dequantized into this thread's workspace of its shape (`workspace`), as an (in, out) view:
        valid until the next `borrow` of a stack of that shape on this thread, so use it at once and never
        keep it (nor let autograd save it)."""
        buffer = workspace(torch.Size(self.spec.shape), self.spec.dtype, self.device)
        weight = dequantize_expert(self.experts, self.name, e, out=buffer)
        return weight.t() if self.transposed else weight

    def transpose(self, dim0: int, dim1: int) -> PackedExperts:
        assert {dim0 % 3, dim1 % 3} == {1, 2}, "only the last two dimensions of an expert stack swap"
        return PackedExperts(self.experts, self.name, not self.transposed)

    @property
    def device(self) -> torch.device:
        return self.experts._parameters[self.name].device


def rows_times_weight(experts: nn.Module, name: str) -> torch.Tensor | PackedExperts:
    """`experts.<name>` in (E, in, out) order: transformers stores (E, out, in) unless `is_transposed`."""
    if packed_spec(experts, name) is not None:
        return PackedExperts(experts, name, transposed=not experts.is_transposed)
    weight = getattr(experts, name)
    return weight if experts.is_transposed else weight.transpose(-2, -1)


def logical_numel(param: torch.Tensor) -> int:
    """How many weights a parameter stands for: packed 4-bit storage holds two per byte."""
    shape = getattr(param, "ds_shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    quant_state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def compute_dtype(experts: nn.Module, name: str) -> torch.dtype:
    spec = packed_spec(experts, name)
    return spec.dtype if spec is not None else getattr(experts, name).dtype


def keep_linear4bit_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes repacking `Linear4bit` weights for CPU inference (AVX512-BF16 CPUs).

    bitsandbytes 0.50 repacks a Linear4bit's weight into a CPU-only layout on its first eval forward
    without grad (the Trainer's evaluation does exactly that); the repacked weight then gives no input
    gradient in training (or fails on an in-place bias add), so every LoRA layer below it stops learning.
    Measured on this machine's AVX512-BF16 CPU. Returns how many modules were switched off it.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


# ------------------------------------------------------------------------------------------------
# What is really quantized, counted on the loaded model


@dataclass
class KindFootprint:
    kind: str
    bits: str
    tensors: int
    parameters: int  # logical values
    bytes: int


def footprint(model: nn.Module) -> list[KindFootprint]:
    """Per module kind (experts, nn.Linear, other), the bits and bytes the loaded weights really take.

    Packed experts count their packed bytes and every quantization constant; bnb `Linear4bit` counts its
    packed weight and its quant state; everything else its own bytes.
    """
    kinds: dict[tuple[str, str], KindFootprint] = {}

    def add(kind: str, bits: str, parameters: int, nbytes: int) -> None:
        entry = kinds.setdefault((kind, bits), KindFootprint(kind, bits, 0, 0, 0))
        entry.tensors += 1
        entry.parameters += parameters
        entry.bytes += nbytes

    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if "lora_" in module_name:  # a PEFT model's adapters are not weights as loaded
            continue
        specs = getattr(module, "_q4_specs", {})
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            spec = specs.get(name)
            if spec is not None:
                constants = [b for n, b in module.named_buffers(recurse=False) if n.startswith(f"{name}_")]
                nbytes = param.numel() * param.element_size() + sum(
                    b.numel() * b.element_size() for b in constants
                )
                add(
                    "experts (fused)",
                    f"4-bit {spec.quant_type}",
                    spec.num_experts * spec.shape[0] * spec.shape[1],
                    nbytes,
                )
                continue
            quant_state = getattr(param, "quant_state", None)
            if quant_state is not None:  # bitsandbytes Params4bit
                nbytes = param.numel() * param.element_size() + _quant_state_bytes(quant_state)
                add(
                    "nn.Linear",
                    f"4-bit {quant_state.quant_type}",
                    int(torch.Size(quant_state.shape).numel()),
                    nbytes,
                )
                continue
            kind = (
                "experts (fused)"
                if param.dim() == 3
                else ("nn.Linear" if isinstance(module, nn.Linear) else "other")
            )
            bits = {torch.int8: "8-bit"}.get(param.dtype, str(param.dtype).removeprefix("torch."))
            add(kind, bits, param.numel(), param.numel() * param.element_size())
    return sorted(kinds.values(), key=lambda k: (k.kind, k.bits))


def _quant_state_bytes(state: Any) -> int:
    total = 0
    for value in (state.absmax, getattr(state, "offset", None), state.code):
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    if getattr(state, "state2", None) is not None:
        total += _quant_state_bytes(state.state2)
    return total


def format_footprint(rows: list[KindFootprint]) -> str:
    """One line per module kind: what the run really holds, for the banner."""
    total = sum(r.bytes for r in rows)
    parts = [
        f"{r.kind} {r.bits}: {r.parameters / 1e6:,.2f} M values in {r.bytes / 2**20:,.1f} MiB" for r in rows
    ]
    return "weights as loaded: " + "; ".join(parts) + f"; total {total / 2**30:,.3f} GiB"


def unpacked_expert_stacks(model: nn.Module) -> list[str]:
    """Fused expert stacks left in full precision: every 3-D floating-point parameter that is not packed
    (whatever class holds it: a family whose experts the 4-bit path does not know is found here too)."""
    missing = []
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if (
                param is not None
                and param.dim() == 3
                and param.is_floating_point()
                and packed_spec(module, name) is None
            ):
                missing.append(f"{module_name}.{name}")
    return missing


def _is_experts_module(module: nn.Module) -> bool:
    # transformers 5's fused experts (the `use_experts_implementation` classes): 3-D stacks and these flags.
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed")) and any(
        isinstance(module._parameters.get(n), torch.Tensor) for n in QUANTIZED_EXPERT_PARAMETERS
    )


# ------------------------------------------------------------------------------------------------
# Loading: transformers' bitsandbytes 4-bit quantizer, plus the fused experts


def experts_quantization_config(
    *, quant_type: str, compute_dtype: torch.dtype, double_quant: bool, blocksize: int
) -> Any:
    """A `BitsAndBytesConfig` for `from_pretrained` that quantizes the fused experts too."""
    _register()
    config = _ExpertsBitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )
    config.experts_blocksize = blocksize
    return config


_REGISTERED = False
_ExpertsBitsAndBytesConfig: Any = None


def _register() -> None:
    """Put our config and quantizer in transformers' quantization registry (once per process)."""
    global _REGISTERED, _ExpertsBitsAndBytesConfig
    if _REGISTERED:
        return
    import transformers
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizers_utils import get_module_from_name

    class ExpertsBitsAndBytesConfig(transformers.BitsAndBytesConfig):
        """bitsandbytes 4-bit with the fused experts quantized too (our quantizer, transformers' mechanism)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.experts_blocksize = kwargs.pop("experts_blocksize", 64)
            super().__init__(*args, **kwargs)
            self.quant_method = QUANT_METHOD

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out["experts_blocksize"] = self.experts_blocksize
            return out

    class PackExperts:
        """The quantize op: fused expert stacks are packed here; nn.Linear weights go to bitsandbytes' op."""

        def __init__(self, quantizer: Any) -> None:
            self.quantizer = quantizer
            self.linear = Bnb4bitQuantize(quantizer)

        def convert(
            self,
            input_dict: dict[str, Any],
            full_layer_name: str | None = None,
            model: Any = None,
            **kwargs: Any,
        ):
            config = self.quantizer.quantization_config
            result, linear = {}, {}
            for param_name, value in input_dict.items():
                if isinstance(value, list):
                    value = value[0]
                module, name = get_module_from_name(model, param_name)
                if _is_experts_module(module) and name in QUANTIZED_EXPERT_PARAMETERS:
                    result[param_name] = pack_expert_stack(
                        module,
                        name,
                        value,
                        blocksize=config.experts_blocksize,
                        quant_type=config.bnb_4bit_quant_type,
                        double_quant=config.bnb_4bit_use_double_quant,
                        compute_dtype=config.bnb_4bit_compute_dtype,
                    )
                    result[param_name]._is_hf_initialized = True
                    module._is_hf_initialized = True
                else:
                    linear[param_name] = value
            if linear:
                result.update(
                    self.linear.convert(linear, full_layer_name=full_layer_name, model=model, **kwargs)
                )
            return result

    class ExpertsBnb4bitHfQuantizer(Bnb4BitHfQuantizer):
        """transformers' bitsandbytes 4-bit quantizer, which also packs the fused expert stacks."""

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            module, name = get_module_from_name(model, param_name)
            if _is_experts_module(module) and name in QUANTIZED_EXPERT_PARAMETERS:
                return True
            return super().param_needs_quantization(model, param_name, **kwargs)

        def _process_model_before_weight_loading(self, model: Any, device_map: Any, **kwargs: Any) -> None:
            skip = list(self.quantization_config.llm_int8_skip_modules or [])
            self.quantization_config.llm_int8_skip_modules = sorted(
                set(skip) | set(GATE_MODULES) | set(_default_skips(model))
            )
            super()._process_model_before_weight_loading(model, device_map, **kwargs)

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            model = super()._process_model_after_weight_loading(model, **kwargs)
            from moe_finetune.models.experts import LORA_EXPERTS_IMPLEMENTATION, register_lora_experts

            # The packed stacks need the forward that dequantizes per expert, with or without LoRA.
            register_lora_experts()
            model.set_experts_implementation(LORA_EXPERTS_IMPLEMENTATION)
            return model

        def get_quantize_ops(self) -> Any:
            return PackExperts(self)

        def is_serializable(self) -> bool:
            # Packed expert stacks are not a format transformers reloads: save adapters, or merge into bf16.
            return False

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = ExpertsBitsAndBytesConfig
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = ExpertsBnb4bitHfQuantizer
    _ExpertsBitsAndBytesConfig = AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
    _REGISTERED = True


def _default_skips(model: Any) -> list[str]:
    """What transformers keeps unquantized by default (lm_head, tied weights): our skip list replaces its own."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return list(get_keys_to_not_convert(model))
