"""LoRA on MoE models as peft 0.21 applies it under transformers 5.x.

transformers 5 fused the experts into 3-D parameters and made the router a custom module, so the
v4 module names users target (`w1`/`w3`/`w2`/`gate` for Mixtral, `gate_proj`/`up_proj`/`down_proj`/
`gate` for the qwen2_moe conversion pattern, which Qwen3-MoE uses) no longer name nn.Linear modules.
peft utils/transformers_weight_conversion.py `_convert_peft_config_moe` (called from
tuners_utils.py `inject_adapter` for every model type with a checkpoint conversion mapping)
rewrites the config:

- `target_modules="all-linear"` becomes the leaf names of the real nn.Linear modules plus every v4
  name of the mapping (`_resolve_string_target_modules`): attention projections, and the router and
  experts by their old names;
- every target that ends with a mapped v4 name moves to `target_parameters`: `gate` -> `gate.weight`,
  the two gate/up halves -> `gate_up_proj` (both halves must be targeted, else ValueError; its rank and
  alpha are doubled via rank_pattern / alpha_pattern, keeping alpha/r), the down projection ->
  `down_proj`. The name moves for every layer: on Qwen3-MoE `gate_proj`/`up_proj`/`down_proj` also
  stop targeting the nn.Linear MLPs of dense (`mlp_only_layers`) layers.

Each targeted parameter gets a `ParamWrapper` (tuners/lora/layer.py): lora_A (r*E x in), lora_B
(out x r*E), no dropout (ValueError otherwise), no DoRA. Its forward registers a parametrization that
builds the full adapted weight W + s*B@A (experts: `torch.baddbmm` of the factors, the
`_LoraFactorsProxy`; the 2-D router: `Linear.get_delta_weight` then W + delta), E x out x in in the
parameter's dtype, every forward.
"""

from __future__ import annotations

from ..arch import ModelArch
from ..tuned import wrapped_shape  # noqa: F401  (re-exported)
from .base import MethodError

# peft utils/transformers_weight_conversion.py _MOE_TARGET_MODULE_MAPPING (v4 name -> v5 parameter) and
# _MODEL_TO_CONVERSION_PATTERN (peft's copy adds "mixtral"; transformers conversion_mapping.py maps qwen3_moe
# to "qwen2_moe")
CONVERSION_PATTERN = {"mixtral": "mixtral", "qwen3_moe": "qwen2_moe"}
TARGET_MAPPING = {
    "mixtral": {"gate": "gate.weight", "w1": "experts.gate_up_proj", "w3": "experts.gate_up_proj",
                "w2": "experts.down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "experts.gate_up_proj", "up_proj": "experts.gate_up_proj",
                  "down_proj": "experts.down_proj"},
}
FUSED = {"mixtral": ("w1", "w3"), "qwen2_moe": ("gate_proj", "up_proj")}  # _MOE_FUSED_TARGETS


def moe_v4_names(arch: ModelArch, raw_targets: str | None) -> tuple[tuple[str, ...], str | None]:
    """(the --targets names peft's MoE conversion maps to parameters, the other names or None): the mapped
    v4 names (e.g. Mixtral's `w1`) name no nn.Linear, so they bypass the linear-name check."""
    pattern = CONVERSION_PATTERN.get(arch.model_type)
    if pattern is None or raw_targets is None:
        return (), raw_targets
    names = [t.strip() for t in raw_targets.split(",") if t.strip()]
    mapping = TARGET_MAPPING[pattern]
    linear_names = set(arch.all_linear_names())
    mapped = tuple(t for t in names if t.rsplit(".", 1)[-1] in mapping and t.rsplit(".", 1)[-1] not in linear_names)
    rest = [t for t in names if t not in mapped]
    return mapped, ",".join(rest) if rest else None


def peft_drops_default_targets(arch: ModelArch) -> bool:
    """True when peft 0.21's v4 -> v5 MoE config conversion turns "no target_modules" into none (see
    split_targets): get_peft_model raises although utils/constants.py lists a default."""
    return CONVERSION_PATTERN.get(arch.model_type) is not None and any(b.moe is not None for b in arch.blocks)


def split_targets(arch: ModelArch, raw_targets: str | None, targets: tuple[str, ...], rank: int,
                  dropout: float, dora: bool) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """(module targets, ((MoE parameter, rank), ...)) after peft's v4 -> v5 MoE config conversion."""
    pattern = CONVERSION_PATTERN.get(arch.model_type)
    if pattern is None or not any(b.moe is not None for b in arch.blocks):
        return targets, ()
    if raw_targets is None:
        # tuners_utils.py inject_adapter converts first: `set(target_modules or [])` turns peft's "use the
        # model_type default" (None) into an empty set, and get_peft_model raises NoMatchingPeftModuleError
        # (reproduced with peft 0.21.2 on mixtral and qwen3_moe)
        raise MethodError(f"peft 0.21 finds no target modules on {arch.model_type} without --targets (its MoE "
                          "config conversion drops the default list): pass --targets, e.g. all-linear or q_proj,v_proj")
    mapping = TARGET_MAPPING[pattern]
    names = set(targets)
    if raw_targets is not None and raw_targets.strip().lower() == "all-linear":
        names |= set(mapping)  # _resolve_string_target_modules: the v4 names join the nn.Linear leaf names
    modules: list[str] = []
    hit: dict[str, set[str]] = {}
    for t in names:
        old = next((o for o in mapping if t == o or t.endswith("." + o)), None)
        if old is None:
            modules.append(t)
        else:
            hit.setdefault(mapping[old], set()).add(old)
    fused = set(FUSED[pattern])
    got = hit.get("experts.gate_up_proj", set())
    if got and got != fused:
        raise MethodError(f"peft cannot convert target(s) {', '.join(sorted(got))} without also targeting "
                          f"{', '.join(sorted(fused - got))}: they are fused into gate_up_proj")
    if hit and dropout > 0:
        raise MethodError("peft's ParamWrapper (LoRA on MoE router/expert parameters) refuses lora_dropout != 0")
    if hit and dora:
        raise MethodError("peft's ParamWrapper (LoRA on MoE router/expert parameters) does not support DoRA")
    order = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")
    params = tuple((n, 2 * rank if n == "experts.gate_up_proj" else rank) for n in order if n in hit)
    keep = tuple(t for t in targets if t in modules)
    return keep, params


def moe_notes(model) -> list[str]:  # type: ignore[no-untyped-def]
    """What an estimate of a MoE model assumes, for the user (estimate.py assumptions)."""
    from ..dtypes import FP32

    arch = model.arch
    moe_blocks = [tb for tb in model.blocks if tb.block.moe is not None]
    if not moe_blocks:
        return []
    moe = moe_blocks[0].block.moe
    notes = [f"MoE: {moe.num_experts} experts, top-{moe.top_k} per token; FLOPs and step time count the "
             f"active parameters ({arch.active_params / 1e9:.2f}B of {arch.total_params / 1e9:.2f}B)",
             "experts run as transformers 5.23 runs them by default: grouped_mm over the fused 3-D expert "
             "weights (integrations/moe.py grouped_mm_experts_forward)"]
    quant = arch.config.get("quantization_config") or {}
    if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4":
        notes.append("the checkpoint's MXFP4 experts are dequantized to bf16 for training (transformers "
                     "Mxfp4Config(dequantize=True); MXFP4 weights get no gradients): modelled as bf16")
    if arch.config.get("output_router_logits"):
        notes.append("output_router_logits is set: the load-balancing loss's tensors are NOT modelled")
    else:
        notes.append("router auxiliary loss off (output_router_logits false, the config default): "
                     "the router trains through the LM loss only")
    if model.method in ("lora", "qlora", "dora"):
        if moe_blocks[0].expert_lora:
            names = ", ".join(n for n, _ in moe_blocks[0].expert_lora)
            notes.append(f"peft target_parameters ({names}): each forward builds the adapted weight W + s*BA of "
                         "every wrapped tensor (E x out x in) and keeps it for backward")
        else:
            notes.append("LoRA reaches only nn.Linear modules here: the fused experts and the router are frozen")
    if model.method == "qlora":
        notes.append("bitsandbytes quantizes nn.Linear only: the fused experts stay unquantized"
                     + (" (fp32 after prepare_model_for_kbit_training)" if moe_blocks[0].norm_dtype == FP32 else ""))
    if moe_blocks[0].norm_dtype == FP32:
        notes.append("fp32 experts: grouped_mm runs in fp32; torch 2.13's aten._grouped_mm meta kernel (mirroring "
                     "the CUDA checks) accepts bf16 only, so this case is modelled, not traced, and may fail on CUDA")
    return notes
