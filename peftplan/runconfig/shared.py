"""Tables and mappings every run-config format shares: optimizer names, attention implementations, load dtypes,
precision, and the reasons given for keys that do not change one step's memory."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .reader import _Reader

# transformers OptimizerNames (training_args.py) / axolotl `optimizer` -> (peftplan optimizer, implementation).
# adamw_torch builds torch.optim.AdamW with no foreach/fused argument: torch picks foreach for CUDA params;
# adamw_torch_fused passes fused=True (trainer.py get_optimizer_cls_and_kwargs). The bitsandbytes ones are
# bnb.optim.AdamW / Lion with optim_bits 8 or 32 and is_paged; their CUDA kernels allocate no per-step scratch.
OPTIMIZER_MAP: dict[str, tuple[str, str | None]] = {
    "adamw_torch_fused": ("adamw", "fused"),
    "adamw_torch": ("adamw", "foreach"),
    "adamw_hf": ("adamw", "for-loop"),  # transformers' own AdamW (removed in v5): a per-parameter Python loop
    "adamw_bnb_8bit": ("adamw-8bit", None),
    "adamw_8bit": ("adamw-8bit", None),  # transformers: "just an alias for adamw_bnb_8bit"
    "paged_adamw_8bit": ("paged-adamw-8bit", None),
    "paged_adamw_32bit": ("paged-adamw", None),
    "adafactor": ("adafactor", None),
    "sgd": ("sgd", None),  # torch.optim.SGD without momentum: the Trainer passes no optim_args to it
    "lion_32bit": ("lion", None),
}

MEMORY_NOT_MODELLED = "memory-relevant but not modelled by peftplan"

# (regex on the key, reason): keys that do not change one step's memory, or do in ways peftplan does not model.
_GENERIC_REASONS: tuple[tuple[str, str], ...] = (
    (r"^(datasets|test_datasets|pretraining_dataset|dataset_.*|val_set_size|train_on_inputs|chat_template.*|"
     r"default_system_message|shuffle_merged_datasets|skip_prepare_dataset|push_dataset_to_hub|"
     r"dataset_text_field|dataset_kwargs|dataset_num_proc|dataset_batch_size|num_of_sequences|chars_per_token|"
     r"completion_only_loss|assistant_only_loss|remove_unused_columns|label_names|length_column_name|"
     r"group_by_length|max_train_samples|preprocessing_num_workers|data_seed|eos_token|pad_token|"
     r"field_.*|roles_to_train|train_split|test_split|input_output|sequence_len_overflow_handling|"
     r"excess_length_strategy|min_sample_len|train_sampling_strategy)$", "data, not memory"),
    (r"^(tokenizer_.*|tokenizer|tokens|special_tokens|added_tokens_overrides|processor_type|"
     r"resize_token_embeddings_to_32x|shrink_embeddings|mean_resizing_embeddings)$",
     "tokenizer settings, not memory (vocabulary size comes from the model's config.json)"),
    (r"^(model_type|type_of_model|is_.*_derived_model|model_config_type|trust_remote_code|model_revision|"
     r"revision_of_model|revision|model_config|cls_model_config|num_labels|task_type|lora_task_type|"
     r"auto_mapping|base_model_ignore_patterns|random_init_weights)$",
     "the architecture comes from the model's config.json"),
    (r"^(peft_version)$", "the peft version that saved the adapter: no memory effect"),
    (r"^(learning_rate|lr|lr_.*|lr_scheduler.*|warmup_.*|weight_decay|num_epochs|num_train_epochs|max_steps|"
     r"adam_beta\d|adam_epsilon\d?|max_grad_norm|cosine_.*|loraplus_.*|embedding_lr.*|optim_args|"
     r"label_smoothing_factor|seed|full_determinism|neftune_noise_alpha|noisy_embedding_alpha|"
     r"loss_type|loss_watchdog_.*)$",
     "optimisation hyperparameter or schedule: no effect on one step's memory"),
    (r"^(output_dir|overwrite_output_dir|logging.*|log_.*|wandb_.*|mlflow_.*|comet_.*|use_wandb|use_mlflow|"
     r"use_comet|report_to|run_name|project|trackio_.*|save.*|saves_per_epoch|resume_from_checkpoint|"
     r"auto_resume_from_checkpoints|restore_callback_states_from_checkpoint|hub_.*|push_to_hub.*|"
     r"early_stopping_patience|load_best_model_at_end|metric_for_best_model|greater_is_better|"
     r"debug|strict|local_rank|disable_tqdm|skip_memory_metrics|include_.*|profiler_steps|"
     r"gradio_.*|do_train|do_predict|ignore_data_skip|past_index|jit_mode_eval|use_ipex|"
     r"ray_.*|torchdistx_path|axolotl_config_path|batch_eval_metrics|enable_jit_checkpoint)$",
     "logging, checkpointing or run control, not memory"),
    (r"^(eval.*|do_eval|per_device_eval_batch_size|per_gpu_eval_batch_size|prediction_loss_only|"
     r"bf16_full_eval|fp16_full_eval|do_bench_eval|bench_.*|do_causal_lm_eval|use_legacy_prediction_loop|"
     r"test_.*|evals_per_epoch|eval_table_size|eval_max_new_tokens)$",
     "evaluation, not the training step peftplan estimates"),
    (r"^(dataloader_.*|group_by_length|auto_find_batch_size)$", "data loading, not GPU memory"),
    (r"^(deepspeed|fsdp.*|ddp.*|world_size|sequence_parallel_degree|context_parallel_size|tensor_parallel_size|"
     r"parallelism_config|heads_k_stride|ring_attn_func|accelerator_config|tpu_.*|mp_parameters|"
     r"ddp_backend|xpu_backend|average_tokens_across_devices)$",
     "multi-GPU sharding is " + MEMORY_NOT_MODELLED + " (one GPU holds the whole model)"),
    (r"^(device|device_map|max_memory|gpu_memory_limit|low_cpu_mem_usage|no_cuda|use_cpu|use_mps_device|"
     r"lora_on_cpu)$", "device placement, not modelled"),
    (r"^(torch_compile.*|torchdynamo)$", "torch.compile: not modelled (it can lower the activation peak)"),
    (r"^(use_liger_kernel|liger_.*|plugins|cut_cross_entropy|flash_attn_cross_entropy|flash_attn_rms_norm|"
     r"flash_attn_fuse_qkv|flash_attn_fuse_mlp|unsloth_.*|lora_mlp_kernel|lora_qkv_kernel|lora_o_kernel|"
     r"use_liger)$",
     "fused kernels (cross-entropy / norm / LoRA) are " + MEMORY_NOT_MODELLED + ": the estimate is high"),
    (r"^(torch_empty_cache_steps)$",
     "empties the CUDA caching allocator every N steps: reserved memory, not the allocated peak"),
    (r"^(fp16_opt_level|half_precision_backend|fp16_backend|tf32)$",
     "numerics backend / TF32 matmuls: no effect on memory"),
)


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _generic_reason(key: str, value: Any) -> str:
    for pattern, reason in _GENERIC_REASONS:
        if re.match(pattern, key):
            return reason if not _is_empty(value) else f"not set ({reason})"
    if _is_empty(value):
        return "not set"
    return "not a setting peftplan reads"


def _optim_args(value: Any) -> dict[str, str]:
    """`optim_args` as transformers parses it ("k1=v1,k2=v2", trainer_optimizer._parse_optim_args), or a dict."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip():
        out = {}
        for item in value.replace(" ", "").split(","):
            if "=" in item:
                k, v = item.split("=", 1)
                out[k] = v
        return out
    return {}


def _map_optimizer(r: _Reader, key: str, name: Any) -> None:
    if name is None or name == "":
        return
    if not isinstance(name, str):
        raise r.error(key, f"must be an optimizer name, got {name!r}")
    opt = OPTIMIZER_MAP.get(name)
    if opt is None:
        known = ", ".join(sorted(OPTIMIZER_MAP))
        r.ignore(key, f"optimizer {name!r} is not modelled (peftplan reads: {known}); peftplan's default used")
        return
    optimizer, impl = opt
    if optimizer == "sgd":
        # transformers 5 passes optim_args momentum/dampening/weight_decay/nesterov to torch.optim.SGD
        args = _optim_args(r.peek("optim_args"))
        try:
            momentum = float(args.get("momentum", 0))
        except ValueError:
            raise r.error("optim_args", f"momentum must be a number, got {args.get('momentum')!r}") from None
        if momentum:
            optimizer = "sgd-momentum"
            r.mapped("optim_args", f"{r.peek('optim_args')} -> momentum {momentum}: optimizer=sgd-momentum")
    r.training["optimizer"] = optimizer
    if impl is not None:
        r.training["optimizer_impl"] = impl
    r.mapped(key, f"{name} -> optimizer={optimizer}" + (f", optimizer_impl={impl}" if impl else ""))


_ATTN_IMPL = {"flash_attention_2": "flash", "flash_attention_3": "flash", "kernels-community/flash-attn": "flash",
              "kernels-community/flash-attn3": "flash", "sdpa": "sdpa", "eager": "eager"}


def _map_attn_implementation(r: _Reader, key: str, value: Any) -> None:
    if _is_empty(value):
        r.ignore(key, "not set (transformers picks sdpa)")
        return
    att = _ATTN_IMPL.get(str(value))
    if att is None:
        r.ignore(key, f"attention {value!r} is not modelled (peftplan models eager, sdpa, flash)")
        return
    r.training["attention"] = att
    r.mapped(key, f"{value} -> attention={att}")


_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "float32": "fp32", "fp32": "fp32", "float": "fp32"}

TRAINS_BASE_WEIGHTS = ("full", "lisa", "bitfit")


def _precision(amp: str | None, load: str | None, method: str | None) -> str:
    """Peftplan precision from the autocast flag (bf16/fp16/None) and the dtype the model is loaded in.

    The Trainer's bf16/fp16 flags autocast the matmuls; what the trained weights are stored in is the load
    dtype. Methods that train base weights loaded in half precision therefore train in pure half precision
    (no fp32 master copy); adapter methods keep their adapters in fp32 (peft autocast_adapter_dtype).
    """
    if amp is None:
        if load in ("bf16", "fp16"):
            return load
        return "fp32"
    if method in TRAINS_BASE_WEIGHTS and load == amp:
        return amp
    return f"{amp}-mixed"

