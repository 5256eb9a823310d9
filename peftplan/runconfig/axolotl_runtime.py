"""The axolotl keys about how the step runs rather than what is trained: the trainer (axolotl's AxolotlTrainer is a
transformers Trainer: `hf`), the LigerPlugin's kernels (src/axolotl/integrations/liger/), and multi-GPU sharding
(`deepspeed`: a ZeRO JSON, `fsdp` / `fsdp_config`) mapped to peftplan's shard and offload."""

from __future__ import annotations

import json

from .reader import _Reader
from .shared import _is_empty

# axolotl src/axolotl/integrations/liger/args.py LigerArgs: the kernels its LigerPlugin applies
# (`apply_liger_kernel_to_<model>(rope=, swiglu=, rms_norm=, layer_norm=, cross_entropy=,
# fused_linear_cross_entropy=)`, integrations/liger/plugin.py)
LIGER_LAYER_KEYS = {  # key -> (trainer option, what it is); option None: not modelled
    "liger_rope": ("liger_rope", "RoPE kernel (in place on q/k)"),
    "liger_rms_norm": ("liger_rms_norm", "RMSNorm kernel (saves input + rstd)"),
    "liger_glu_activation": ("liger_glu", "SwiGLU/GeGLU kernel (saves gate and up, gradients written into them)"),
    "liger_swiglu": ("liger_glu", "SwiGLU kernel (saves gate and up, gradients written into them)"),
    "liger_layer_norm": (None, "LayerNorm kernel"),
}


def _axolotl_sharding(r: _Reader) -> None:
    """`deepspeed` (a ZeRO JSON) and `fsdp` / `fsdp_config` -> shard and offload (engine/sharding.py). The number
    of GPUs comes from the launcher, not the file: pass --gpus N (with one GPU the sharding is dropped)."""
    ds = r.take("deepspeed")
    if not _is_empty(ds) and not _is_empty(r.peek("fsdp")):
        raise r.error("deepspeed", "and fsdp are both set: axolotl runs one of them")
    if not _is_empty(ds):
        stage, offload, how = _deepspeed_stage(r, ds)
        if stage is None:
            r.ignore("deepspeed", f"{ds!r}: no ZeRO stage found in the file or its name: pass --shard")
        else:
            r.training["shard"] = f"zero{stage}"
            if offload != "none":
                r.training["offload"] = offload
            r.mapped("deepspeed", f"{ds} -> shard=zero{stage}, offload={offload} ({how}); pass --gpus N")
    elif r.has("deepspeed"):
        r.mapped("deepspeed", "not set")
    fsdp = r.take("fsdp")
    cfg = r.take("fsdp_config") or {}
    if not isinstance(cfg, dict):
        raise r.error("fsdp_config", f"must be a mapping, got {cfg!r}")
    if isinstance(fsdp, str):
        fsdp = fsdp.split()
    if not _is_empty(fsdp) or cfg:
        words = [str(w) for w in (fsdp or [])]
        strategy = str(cfg.get("fsdp_sharding_strategy") or cfg.get("sharding_strategy") or "").upper()
        rshard = cfg.get("reshard_after_forward", cfg.get("fsdp_reshard_after_forward"))
        if "hybrid_shard" in words or "HYBRID" in strategy:
            shard = "fsdp-hybrid"
        elif "shard_grad_op" in words or "SHARD_GRAD_OP" in strategy or rshard is False:
            shard = "fsdp-grad-op"
        else:
            shard = "fsdp-full"
        off = any(w == "offload" for w in words) or bool(cfg.get("fsdp_offload_params") or cfg.get("offload_params"))
        r.training["shard"] = shard
        if off:
            r.training["offload"] = "optimizer+params"  # FSDP CPUOffload(offload_params=True) offloads both
        if r.has("fsdp"):
            r.mapped("fsdp", f"{json.dumps(fsdp)} -> shard={shard}" + (", offload=optimizer+params" if off else ""))
        if cfg:
            r.mapped("fsdp_config", json.dumps(cfg, default=str) + f" -> shard={shard}"
                     + (", offload=optimizer+params" if off else "") + "; per decoder layer wrapping, as modelled")
    else:
        for key in ("fsdp", "fsdp_config"):
            if r.has(key):
                r.mapped(key, "not set")
    if "shard" in r.training:
        r.note(f"the file shards over several GPUs ({r.training['shard']}): the number comes from the launcher; "
               "pass --gpus N for the per-GPU estimate (with one GPU the sharding is dropped)")


def _deepspeed_stage(r: _Reader, ds: object) -> tuple[int | None, str, str]:
    """(ZeRO stage, offload, how it was found) from a DeepSpeed JSON path (read when it exists) or a mapping."""
    import re
    from pathlib import Path

    data = ds if isinstance(ds, dict) else None
    if data is None and isinstance(ds, str):
        for base in (Path(r.path).parent, Path.cwd()):
            p = base / ds
            if p.is_file():
                try:
                    data = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    data = None
                break
    if isinstance(data, dict):
        zero = data.get("zero_optimization") or {}
        stage = zero.get("stage")
        dev = lambda k: str((zero.get(k) or {}).get("device", "none")).lower()  # noqa: E731
        offload = "optimizer+params" if dev("offload_param") in ("cpu", "nvme") else \
            "optimizer" if dev("offload_optimizer") in ("cpu", "nvme") else "none"
        return (int(stage) if isinstance(stage, int) and stage in (1, 2, 3) else None), offload, "read from the file"
    m = re.search(r"zero[_-]?([123])", str(ds).lower())
    if m is None:
        return None, "none", ""
    offload = "optimizer" if "offload" in str(ds).lower() else "none"
    return int(m.group(1)), offload, "inferred from the file name (file not found)"


def _add_option(r: _Reader, name: str) -> None:
    r.training["trainer_options"] = tuple(dict.fromkeys((*r.training.get("trainer_options", ()), name)))


def _axolotl_kernels(r: _Reader) -> None:
    """axolotl runs transformers' Trainer (AxolotlTrainer subclasses it): trainer hf; the Liger plugin's fused
    linear cross-entropy is its `liger` option (engine/liger.py, modelled from source)."""
    r.training["trainer"] = "hf"
    r.read.append("trainer: axolotl's AxolotlTrainer is a transformers Trainer -> trainer=hf")
    plugins = r.peek("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise r.error("plugins", f"must be a list of plugin class paths, got {plugins!r}")
    liger = any(p.endswith("LigerPlugin") for p in plugins)
    if r.has("plugins"):
        r.mapped("plugins", ", ".join(plugins) + (" (Liger kernels)" if liger else "")
                 if plugins else "none")
    flce_key = "liger_fused_linear_cross_entropy"
    if r.has(flce_key):
        on = r.flag(flce_key, r.take(flce_key))
        if on and not liger:
            r.ignore(flce_key, "true, but plugins has no LigerPlugin: axolotl does not apply it")
        elif on:
            _add_option(r, "liger_flce")
            r.mapped(flce_key, "true -> trainer option liger_flce: Liger fused linear cross-entropy, modelled from "
                               "source (engine/liger.py); no full logits")
        else:
            r.mapped(flce_key, "false")
    for key, (option, what) in LIGER_LAYER_KEYS.items():
        if r.has(key):
            on = r.flag(key, r.take(key))
            if not on:
                r.mapped(key, "false")
            elif not liger:
                r.ignore(key, "true, but plugins has no LigerPlugin: axolotl does not apply it")
            elif option is None:
                r.mapped(key, f"true: Liger {what}; no model in peftplan's catalog has a LayerNorm that Liger "
                              "patches, the HF op is modelled")
            else:
                _add_option(r, option)
                r.mapped(key, f"true -> trainer option {option}: Liger {what}, modelled from source "
                              "(engine/liger.py)")
    if r.has("chunked_cross_entropy"):
        on = r.flag("chunked_cross_entropy", r.take("chunked_cross_entropy"))
        if on:
            _add_option(r, "chunked_ce")
            r.mapped("chunked_cross_entropy", "true -> trainer option chunked_ce: axolotl's chunked cross-entropy "
                     "(monkeypatch/loss/chunked.py), modelled from source (engine/chunked_ce.py)")
        else:
            r.mapped("chunked_cross_entropy", "false")
    if r.has("chunked_cross_entropy_num_chunks"):
        n = r.take("chunked_cross_entropy_num_chunks")
        r.mapped("chunked_cross_entropy_num_chunks", f"{n}: the number of chunks changes only the per-chunk fp32 "
                 "logsumexp rows (a few KiB); modelled with axolotl's default 8")
    if r.has("liger_cross_entropy"):
        on = r.flag("liger_cross_entropy", r.take("liger_cross_entropy"))
        r.mapped("liger_cross_entropy", "true: Liger cross-entropy on materialised logits; the full-logits loss is "
                 "modelled (its in-place gradient saves one logits copy: estimate high)" if on else "false")
