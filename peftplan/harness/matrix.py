"""The CPU trace matrix: a representative set of configurations traced under FakeTensorMode.

Every registered method, on two model sizes (a tiny llama-family config, and a real ~1B config from
the catalog; BitFit needs biases, so it runs on a tiny GPT-2 and Qwen2.5-0.5B), with gradient
checkpointing on and off (prefix tuning refuses checkpointing) and eager / SDPA attention on the tiny
model; plus Llama-3-8B for LoRA, QLoRA and full fine-tuning; plus tiny Qwen3, Gemma 3, OLMo 2,
SmolLM3, Mixtral, Qwen3-MoE and gpt-oss configs (TINY_MODERN, TINY_MOE), full fine-tuning and LoRA.
`peftplan trace --matrix ci --out-dir DIR` writes one record per entry (records.write_record);
`peftplan check DIR` re-predicts each with the engine. A trace costs ~0.3 ms per aten op on this tracer
(fake tensors), so time grows with layers and steps, not with model size: the CI matrix runs in ~2-3
minutes on 2 cores with 2 worker processes.

Known engine deviations are marked `xfail` with the reason (written into the record as "xfail"):
`check` lists them as known deviations, never skips them silently, and reports a known deviation that
no longer deviates (so the mark can be removed).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..methods import method_names

TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 1000, "hidden_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 1000, "n_embd": 128, "n_head": 4, "n_layer": 2, "n_positions": 256}
# The 2025 dense families (arch_modern.py) at small width: q/k norms, gemma3's sliding/global layers with a
# sequence past the window (materialised sliding mask), olmo2's post-norms, smollm3's NoPE fourth layer
TINY_MODERN = {
    "tiny-qwen3": {"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 512, "num_hidden_layers": 2},
    "tiny-gemma3": {"model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                    "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]},
    "tiny-olmo2": {"model_type": "olmo2", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "intermediate_size": 512, "num_hidden_layers": 2, "pad_token_id": 0,
                   "eos_token_id": 1},
    "tiny-smollm3": {"model_type": "smollm3", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 512, "num_hidden_layers": 4, "pad_token_id": 0,
                     "bos_token_id": 1, "eos_token_id": 2},
}
# MoE (arch_moe.py): fused experts through grouped_mm; LoRA all-linear reaches them through peft's
# target_parameters (ParamWrapper). Full fine-tuning runs in bf16: fp32 experts do not trace (grouped_mm's meta
# kernel takes bf16 only).
TINY_MOE = {
    "tiny-mixtral": {"model_type": "mixtral", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_local_experts": 4, "num_experts_per_tok": 2},
    "tiny-qwen3moe": {"model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512,
                      "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_experts": 8,
                      "num_experts_per_tok": 2, "norm_topk_prob": True},
    "tiny-gptoss": {"model_type": "gpt_oss", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16},
}
TINY_MODELS = {"tiny-llama": TINY_LLAMA, "tiny-gpt2": TINY_GPT2, **TINY_MODERN, **TINY_MOE}
NO_CKPT = {"prefix"}  # peft refuses prefix tuning with gradient checkpointing
NEEDS_BIAS = {"bitfit"}  # llama-family linears have no biases


@dataclass(frozen=True)
class MatrixEntry:
    """One configuration to trace. `model` is a catalog name or a key of TINY_MODELS."""

    model: str
    method: str
    training: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    xfail: str | None = None  # a known engine deviation (reason), reported by `check`

    @property
    def id(self) -> str:
        t = self.training
        parts = [self.model, self.method, f"b{t.get('micro_batch')}s{t.get('seq_len')}",
                 t.get("attention", "sdpa"), "ckpt" if t.get("grad_ckpt") else "nockpt"]
        for k, v in sorted(self.options.items()):
            parts.append(f"{k}-{v}")
        for k in ("precision", "optimizer", "optimizer_impl"):
            if k in t:
                parts.append(str(t[k]))
        if t.get("trainer", "hf") != "hf":
            parts.append(str(t["trainer"]))
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts))

    def arch(self):  # type: ignore[no-untyped-def]
        from ..arch import from_hf_config
        from ..catalog import load_model

        if self.model in TINY_MODELS:
            return from_hf_config(TINY_MODELS[self.model], self.model)
        return load_model(self.model)


def _tiny_entries() -> list[MatrixEntry]:
    out = []
    for method in method_names():
        model = "tiny-gpt2" if method in NEEDS_BIAS else "tiny-llama"
        for ckpt in (False, True):
            if ckpt and method in NO_CKPT:
                continue
            for attn in ("sdpa", "eager"):
                out.append(MatrixEntry(model, method, {"micro_batch": 2, "seq_len": 64, "grad_ckpt": ckpt,
                                                       "attention": attn}))
    # other families and options on the tiny models
    for method in ("full", "lora", "ia3", "adapter"):
        out.append(MatrixEntry("tiny-gpt2", method, {"micro_batch": 2, "seq_len": 64}))
    out.append(MatrixEntry("tiny-llama", "qlora", {"micro_batch": 2, "seq_len": 64}, {"kbit_prep": False}))
    out.append(MatrixEntry("tiny-llama", "lora", {"micro_batch": 2, "seq_len": 64, "precision": "fp32"}))
    out.append(MatrixEntry("tiny-llama", "full", {"micro_batch": 2, "seq_len": 64, "optimizer_impl": "foreach"}))
    for model in TINY_MODERN:
        for method, ckpt in (("full", False), ("lora", False), ("lora", True)):
            out.append(MatrixEntry(model, method, {"micro_batch": 2, "seq_len": 64, "grad_ckpt": ckpt},
                                   {"targets": "all-linear"} if method == "lora" else {}))
    for model in TINY_MOE:
        for method, training, options in (
                ("lora", {"grad_ckpt": False}, {"targets": "all-linear"}),
                ("lora", {"grad_ckpt": True}, {"targets": "all-linear"}),
                ("lora", {"grad_ckpt": False}, {"targets": "q_proj,v_proj"}),
                ("qlora", {"grad_ckpt": False}, {"targets": "all-linear", "kbit_prep": False}),
                ("full", {"grad_ckpt": False, "precision": "bf16"}, {})):
            out.append(MatrixEntry(model, method, {"micro_batch": 2, "seq_len": 64, **training}, options))
    return out


def _sized_entries() -> list[MatrixEntry]:
    out = []
    for method in method_names():
        model = "qwen2.5-0.5b" if method in NEEDS_BIAS else "llama3.2-1b"
        for ckpt in (False, True):
            if ckpt and method in NO_CKPT:
                continue
            out.append(MatrixEntry(model, method, {"micro_batch": 1, "seq_len": 256, "grad_ckpt": ckpt}))
    for method, options in (("lora", {"rank": 16}), ("qlora", {"rank": 16}), ("full", {})):
        out.append(MatrixEntry("llama3-8b", method, {"micro_batch": 1, "seq_len": 512}, options))
    # llama3-8b at the size (batch 1 x 2048) for every method that applies (BitFit: llama has no
    # biases): fake tensors make it cost ~10-30 s each on 2 cores
    for method in method_names():
        if method not in NEEDS_BIAS:
            out.append(MatrixEntry("llama3-8b", method, {"micro_batch": 1, "seq_len": 2048}))
    return out


def _trl_entries() -> list[MatrixEntry]:
    """TRL's SFTTrainer step (trainer "trl": its fused LM head, its casts) for every method: the tiny models and the
    ~1B configs with checkpointing on (SFTConfig's default; prefix tuning refuses it), the issue's llama3.2-1b LoRA
    at batch 2 x 512, and llama3-8b LoRA / QLoRA at batch 1 x 2048."""
    out = []
    for method in method_names():
        ckpt = method not in NO_CKPT
        tiny = "tiny-gpt2" if method in NEEDS_BIAS else "tiny-llama"
        sized = "qwen2.5-0.5b" if method in NEEDS_BIAS else "llama3.2-1b"
        out.append(MatrixEntry(tiny, method, {"micro_batch": 2, "seq_len": 64, "grad_ckpt": ckpt, "trainer": "trl"}))
        out.append(MatrixEntry(sized, method, {"micro_batch": 1, "seq_len": 256, "grad_ckpt": ckpt, "trainer": "trl"}))
    out.append(MatrixEntry("tiny-llama", "lora", {"micro_batch": 2, "seq_len": 64, "trainer": "trl"}))
    out.append(MatrixEntry("llama3.2-1b", "lora", {"micro_batch": 2, "seq_len": 512, "grad_ckpt": True,
                                                   "trainer": "trl"}))
    for method in ("lora", "qlora"):
        out.append(MatrixEntry("llama3-8b", method, {"micro_batch": 1, "seq_len": 2048, "grad_ckpt": True,
                                                     "trainer": "trl"}))
    return out


# Known deviations of the engine from the real step, found by this matrix; re-measured 2026-12-02 03:25 UTC after
# the fuzzer's fixes (IA3, eager repeat_kv, DoRA, P-tuning, TRL accumulation: their marks are gone). Keyed by entry
# id; the reason names what differs. The GPT-2 ones are the fuzzer's class `gpt2-family-dropout` (harness/fuzz.py).
_GPT2 = ("tiny GPT-2 (hidden 128): saved_activations short of the trace around the embedding dropout, the eager "
         "causal mask (`where`, fp32) and the checkpointed layer's inputs; at real width (gpt2, 768) the same "
         "configurations are within 1%; undiagnosed")
XFAIL: dict[str, str] = {
    'tiny-gpt2_adapter_b2s64_sdpa_nockpt': "engine under-predicts -1.05%: " + _GPT2,
    'tiny-gpt2_bitfit_b2s64_eager_ckpt': "engine under-predicts -1.35% (eager, checkpointing): " + _GPT2,
    'tiny-gpt2_bitfit_b2s64_eager_nockpt': "engine under-predicts -1.70% (eager): " + _GPT2,
    'tiny-gpt2_ia3_b2s64_sdpa_nockpt': "engine under-predicts -1.13%: " + _GPT2,
    'tiny-gpt2_lora_b2s64_sdpa_nockpt': "engine under-predicts -1.25%: " + _GPT2,
}


def _mark(entries: Iterable[MatrixEntry]) -> list[MatrixEntry]:
    return [MatrixEntry(e.model, e.method, e.training, e.options, XFAIL.get(e.id)) for e in entries]


def matrix(name: str = "ci") -> list[MatrixEntry]:
    """The named matrix: "ci" (everything, ~2-3 min on 2 cores), "tiny" (tiny models only, ~40 s)."""
    if name == "tiny":
        return _mark(_tiny_entries())
    if name == "ci":
        return _mark(_tiny_entries() + _sized_entries() + _trl_entries())
    raise ValueError(f"unknown matrix {name!r} (choose from ci, tiny)")


def record_for(entry: MatrixEntry) -> dict[str, Any]:
    """Trace one entry and return its record (the trace's to_dict(), plus matrix id and xfail mark)."""
    import torch

    from ..training import Training
    from .trace import trace

    torch.set_num_threads(1)
    res = trace(entry.arch(), entry.method, dict(entry.options), Training(**entry.training), flops=False,
                model_name=entry.model)
    rec = res.to_dict()
    rec["matrix"] = {"id": entry.id}
    if entry.xfail:
        rec["xfail"] = entry.xfail
    return rec


def _worker(entry: MatrixEntry) -> tuple[str, dict[str, Any] | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        return entry.id, record_for(entry), None, time.perf_counter() - t0
    except Exception as exc:  # reported per entry by the caller
        return entry.id, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", \
            time.perf_counter() - t0


def run_matrix(entries: list[MatrixEntry], out_dir: str | os.PathLike[str], *, force: bool = False, jobs: int = 2,
               progress: Callable[[str, str | None, float], None] | None = None) -> list[tuple[str, str | None]]:
    """Trace every entry and write `out_dir/<id>.json`; returns (id, error or None) per entry.

    Refuses (before tracing anything) when a record exists and `force` is not given."""
    from ..records import RecordError, write_record

    out = Path(out_dir)
    if not force:
        taken = [e.id for e in entries if (out / f"{e.id}.json").exists()]
        if taken:
            raise RecordError(f"{out / (taken[0] + '.json')}: exists ({len(taken)} records in {out}); "
                              "use --force to overwrite")
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise ValueError("matrix has duplicate entry ids")
    results: list[tuple[str, str | None]] = []

    def done(item: tuple[str, dict[str, Any] | None, str | None, float]) -> None:
        eid, rec, err, seconds = item
        if rec is not None:
            write_record(out / f"{eid}.json", rec, overwrite=force)
        results.append((eid, err))
        if progress is not None:
            progress(eid, err, seconds)

    if jobs <= 1:
        for e in entries:
            done(_worker(e))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a clean interpreter per worker: no forked torch state
        # longest first (8B, then the ~1B configs) so the pool ends together
        order = sorted(entries, key=lambda e: 0 if e.model == "llama3-8b" else 1 if e.model not in TINY_MODELS else 2)
        with ctx.Pool(jobs) as pool:
            for item in pool.imap_unordered(_worker, order):
                done(item)
    return results
