"""Patches that make the fake CPU step equal the real one, and stand for the CUDA step: CUDA autocast's fp32
policies under CPU autocast, CUDA's SDPA and fused-dropout memory, transformers' packed-sequence check without
its data-dependent exit (`_patched`), and the module hooks that tell the tracker which module runs
(`_module_hooks`). Used by the CPU, FSDP2 and DeepSpeed tracers and the GPU profiler.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from .tracker import MemoryTracker


# ---- patches that make the fake step equal the real one (and the CPU step stand for a GPU one) -------


def _find_packed_sequence_indices(position_ids: torch.Tensor):
    """transformers.masking_utils.find_packed_sequence_indices without its data-dependent early exit.

    The same ops run (so the same temporaries exist); it returns None, the answer for the unpacked
    sequences the tracer feeds. transformers treats FakeTensors as tracing and would otherwise return
    the mask and build a (b, 1, s, s) attention mask a real run never builds."""
    first_dummy_value = position_ids[:, :1] - 1
    position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
    packed_sequence_mask = (position_diff != 1).cumsum(-1)
    (packed_sequence_mask[:, -1] == 0).all()
    return None


# CUDA autocast policy (aten/src/ATen/autocast_mode.cpp, torch 2.13) for ops CPU autocast leaves alone:
# "fp32" casts half-precision floating inputs to fp32; "fp32_set_opt_dtype" runs the op with dtype=fp32
# when its first input is half precision and no dtype was given. CPU autocast has none of these (it
# runs layer_norm, softmax, pow, sum ... in bf16), so an LN model's activations would differ.
_CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "frobenius_norm.dim", "cosine_similarity", "dist", "renorm", "logsumexp",
)
_CUDA_FP32_SET_DTYPE_OPS = ("softmax.int", "log_softmax.int", "cumsum", "cumprod", "sum", "sum.dim_IntList",
                            "linalg_vector_norm")
_HALF = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def cuda_autocast_policy():
    """While active, CPU autocast follows CUDA autocast's fp32 policies (registered as AutocastCPU kernels)."""
    from torch._C import DispatchKey, DispatchKeySet

    lib = torch.library.Library("aten", "IMPL")
    exclude = DispatchKeySet(DispatchKey.AutocastCPU)

    def f32(x):
        if isinstance(x, torch.Tensor) and x.dtype in _HALF:
            return x.to(torch.float32)
        return x

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            args = tuple(f32(a) if not isinstance(a, (list, tuple)) else type(a)(f32(x) for x in a) for a in args)
            kwargs = {k: f32(v) for k, v in kwargs.items()}
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*args, **kwargs)
        return kernel

    def set_dtype_kernel(op):
        names = [a.name for a in op._schema.arguments]
        pos = names.index("dtype")

        def kernel(*args, **kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            given = args[pos] if len(args) > pos else kwargs.get("dtype")
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                if first is not None and first.dtype in _HALF and given is None:
                    if len(args) > pos:
                        args = args[:pos] + (torch.float32,) + args[pos + 1:]
                    else:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
        return kernel

    registered = []
    try:
        for name in _CUDA_FP32_OPS + _CUDA_FP32_SET_DTYPE_OPS:
            base, _, overload = name.partition(".")
            packet = getattr(torch.ops.aten, base, None)
            if packet is None:
                continue
            op = getattr(packet, overload or "default", None)
            if op is None:
                continue
            qual = f"aten::{base}" + (f".{overload}" if overload else "")
            if torch._C._dispatch_has_kernel_for_dispatch_key(qual, "AutocastCPU"):
                continue
            kernel = set_dtype_kernel(op) if name in _CUDA_FP32_SET_DTYPE_OPS else fp32_kernel(op)
            lib.impl(base + (f".{overload}" if overload else ""), kernel, "AutocastCPU")
            registered.append(name)
        yield registered
    finally:
        lib._destroy()


@contextlib.contextmanager
def _patched(tracker: MemoryTracker | None, emulate_cuda: bool):
    import torch.utils.checkpoint as ckpt
    import transformers.masking_utils as mu

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch(mu, "find_packed_sequence_indices", _find_packed_sequence_indices)
    if emulate_cuda:
        orig_is_autocast = torch.is_autocast_enabled

        def is_autocast_enabled(device_type=None):
            if device_type is None:
                return orig_is_autocast("cpu") or orig_is_autocast("cuda")
            return orig_is_autocast(device_type)

        patch(torch, "is_autocast_enabled", is_autocast_enabled)
        orig_sdpa = torch.nn.functional.scaled_dot_product_attention

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
            # CUDA's flash / memory-efficient kernels apply dropout inside the kernel (Philox RNG), saving
            # no mask; CPU SDPA has no dropout kernel and falls back to the math path (S x S saved).
            return orig_sdpa(query, key, value, attn_mask, 0.0, *args, **kwargs)

        patch(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        orig_dropout = torch.nn.functional.dropout

        def dropout(input, p=0.5, training=True, inplace=False):
            # CUDA's at::dropout takes the fused native_dropout kernel when training with 0 < p < 1 (not
            # in-place): an output and a bool mask (1 B/element), the mask saved for backward. CPU's
            # at::dropout takes _dropout_impl (mask in the input's dtype, multiplied and saved).
            # torch.native_dropout on CPU returns the same bool mask, so call it as CUDA does.
            if (training and not inplace and isinstance(p, (int, float)) and 0.0 < p < 1.0
                    and isinstance(input, torch.Tensor) and input.numel() > 0):
                return torch.native_dropout(input, float(p), True)[0]
            return orig_dropout(input, p, training, inplace)

        patch(torch.nn.functional, "dropout", dropout)
    stack = contextlib.ExitStack()
    if emulate_cuda and tracker is not None:
        stack.enter_context(cuda_autocast_policy())
    if tracker is not None:
        orig_hook = ckpt._recomputation_hook

        class _RecomputationHook(orig_hook):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                inner = self.pack_hook

                def pack_hook(x):
                    tracker.note_saved(x)
                    return inner(x)

                self.pack_hook = pack_hook

            def __enter__(self):
                tracker.in_recompute += 1
                return super().__enter__()

            def __exit__(self, *exc):
                tracker.in_recompute -= 1
                tracker.module_stack.clear()
                return super().__exit__(*exc)

        patch(ckpt, "_recomputation_hook", _RecomputationHook)
    try:
        with stack:
            yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def _module_hooks(tracker: MemoryTracker, model: torch.nn.Module):
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): n for n, m in model.named_modules()}
    stack = tracker.module_stack

    def pre(mod, args):
        name = names.get(id(mod))
        if name is None:
            return
        while stack and not (name.startswith(stack[-1] + ".") or stack[-1] == ""):
            stack.pop()
        stack.append(name)

    def post(mod, args, out):
        name = names.get(id(mod))
        if name is None:
            return
        while stack:
            if stack.pop() == name:
                break

    h1 = register_module_forward_pre_hook(pre)
    h2 = register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()
