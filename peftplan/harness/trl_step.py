"""TRL 1.16's SFT step inside the tracer: `SFTTrainer`'s model preparation and its real `compute_loss`.

What `trl.SFTTrainer.__init__` does to a model that matters for memory (trl/trainer/sft_trainer.py, 1.16.0):
- peft + gradient checkpointing: `model.enable_input_require_grads()` (lines 899-900);
- a quantized base: every trainable parameter but DoRA's magnitude cast to bf16 (`param.data.to(torch.bfloat16)`,
  lines 908-911);
- `add_fused_lm_head(base_model, outputs=("log_probs", "entropy", "is_top1"))` (line 1144): the model's forward
  then takes `fused_lm_head=True` and computes per-token log-probabilities with
  `trl.kernels.chunked_logprob.ChunkedLogProbFunction`, never building the (tokens x vocab) logits.

`compute_loss` below calls the unbound `SFTTrainer.compute_loss` itself (sft_trainer.py 1560-1650) with a stand-in
for the trainer object that carries only the attributes it reads; its metrics (`gather_for_metrics`, `.item()`)
read zeros, since a fake tensor has no value to compare with 0.

On a GPU the fused head runs its Triton kernels (`_use_triton(device)`: Triton available and a CUDA device). The
tracer's device is a fake CPU, where TRL would take its torch fallback (whole-tile fp32 temporaries a GPU never
allocates). `cuda_triton_path()` makes the traced step take the GPU path: `_use_triton` answers True, the two Triton
kernel launches become no-ops (each kernel reads and writes in place into buffers the Python code allocated, so it
allocates nothing; only values are lost, which fake tensors do not have), and `_addmm_fp32` takes its CUDA branch
(`torch.addmm(..., out_dtype=torch.float32, out=acc)`, no fp32 copies of the tile). The compact path indexes the
hidden states with the label mask (`hidden_states[mask]`), a data-dependent shape; the tracer's labels are the
input ids (no -100 outside peft's virtual-token prefix), so `bool_index_rewrite` replaces a boolean index by the
positions it selects (all of them, or all after the prefix), computed below autograd: autograd still saves the
boolean mask, as it does on the GPU.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict
from typing import Any

import torch

TRL_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # sft_trainer.py:1144-1147


def prepare(model: torch.nn.Module, base: torch.nn.Module, quantized: bool, grad_ckpt: bool) -> None:
    """Apply SFTTrainer.__init__'s model changes (module docstring) to the built model, on the meta device."""
    from peft import PeftModel
    from trl.trainer.utils import add_fused_lm_head

    is_peft = isinstance(model, PeftModel)
    if is_peft and grad_ckpt:
        model.enable_input_require_grads()
    if quantized:
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    add_fused_lm_head(base, outputs=TRL_FUSED_OUTPUTS)


class _NoLaunch:
    """A Triton kernel's launcher (`kernel[grid](...)`) that does nothing: the kernel only writes in place."""

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: None


def _addmm_fp32_cuda(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    # trl/kernels/chunked_logprob.py `_addmm_fp32`, CUDA branch (torch >= 2.8, half inputs)
    if a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


@contextlib.contextmanager
def cuda_triton_path():
    """The fused LM head's GPU (Triton) path on the tracer's fake CPU device (module docstring)."""
    import trl.kernels.chunked_logprob as ck
    import trl.trainer.utils as tu

    saved: list[tuple[Any, str, Any, bool]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name, None), hasattr(obj, name)))
        setattr(obj, name, value)

    patch(ck, "_use_triton", lambda device: True)
    patch(tu, "_use_triton", lambda device: True)
    patch(ck, "_forward_kernel", _NoLaunch())
    patch(ck, "_backward_kernel", _NoLaunch())
    patch(ck, "_addmm_fp32", _addmm_fp32_cuda)
    if not hasattr(ck, "triton"):
        patch(ck, "triton", types.SimpleNamespace(cdiv=lambda a, b: -(-a // b)))
    try:
        yield
    finally:
        for obj, name, value, existed in reversed(saved):
            if existed:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


class BoolIndexRewrite:
    """Boolean-mask indexing with a known count of True values, below autograd.

    `skip`: leading positions per row that are False (peft's virtual-token label prefix after the shift), the rest
    True. aten.index / index_put with a boolean (B, S) mask become the same ops on flat positions."""

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        rows, cols = mask.shape[0], mask.shape[1]
        col = torch.arange(self.skip, cols)
        return (torch.arange(rows).unsqueeze(1) * cols + col.unsqueeze(0)).reshape(-1)

    def __call__(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        aten = torch.ops.aten
        if func in (aten.index.Tensor,):
            x, indices = args[0], args[1]
            if len(indices) == 1 and indices[0] is not None and indices[0].dtype == torch.bool \
                    and indices[0].dim() == 2:
                mask = indices[0]
                flat = x.reshape(mask.numel(), *x.shape[2:])
                return aten.index.Tensor(flat, [self._positions(mask)])
        if func in (aten._index_put_impl_.default, aten.index_put_.default, aten.index_put.default):
            x, indices, values = args[0], args[1], args[2]
            if len(indices) == 1 and indices[0] is not None and indices[0].dtype == torch.bool \
                    and indices[0].dim() == 2:
                mask = indices[0]
                flat = x.view(mask.numel(), *x.shape[2:])
                rest = list(args[3:])
                out = func(flat, [self._positions(mask)], values, *rest, **kwargs)
                return x if out is flat else out.view(x.shape)
        return NotImplemented


class _Gathered:
    """What the stand-in's `gather_for_metrics` returns: `.sum()` is 0, so the metrics' `if num_valid > 0` is false
    and no `.item()` is asked of a fake tensor. On one GPU the gathered scalars are the metric sums themselves,
    each a 0-d tensor freed within the statement (the engine does not count them)."""

    @staticmethod
    def sum() -> int:
        return 0


class _Accelerator:
    parallelism_config = None
    num_processes = 1

    @staticmethod
    def gather_for_metrics(x: Any) -> _Gathered:
        return _Gathered()


class _TrainerStandIn:
    """The attributes `SFTTrainer.compute_loss` reads (sft_trainer.py 1560-1650), at SFTConfig's defaults."""

    def __init__(self) -> None:
        self.model = types.SimpleNamespace(training=False)  # metrics bucket only: see compute_loss
        self.aux_loss_enabled = False
        self.accelerator = _Accelerator()
        self.compute_loss_func = None
        self.label_smoother = None
        self.args = types.SimpleNamespace(loss_type="nll", average_tokens_across_devices=False, max_length=None)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss exactly as `SFTTrainer.compute_loss` computes it: `model(**inputs, fused_lm_head=True)`, then
    `-log_probs` summed over the label tokens. The stand-in's mode is "eval" so that the train-mode token count
    (`inputs["attention_mask"].sum().item()`, metrics only, a scalar) is skipped: the tracer's batch has no
    attention mask, as in the bare-step trace."""
    from trl import SFTTrainer

    return SFTTrainer.compute_loss(_TrainerStandIn(), model, dict(batch))
