"""Read a peft `adapter_config.json` (`peft_type`, `r`, `lora_alpha`, `target_modules`, `num_virtual_tokens`, ...)
into a peftplan method and its options."""

from __future__ import annotations

import json
from typing import Any

from .reader import _Reader
from .shared import MEMORY_NOT_MODELLED, _is_empty

_PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix",
                 "P_TUNING": "ptuning"}

_PEFT_INIT = "initialisation only, no effect on memory"


def _map_peft(r: _Reader) -> None:
    peft_type = r.take("peft_type")
    r.set_model("base_model_name_or_path", r.take("base_model_name_or_path"))
    if not isinstance(peft_type, str):
        raise r.error("peft_type", f"must be a string, got {peft_type!r}")
    method = _PEFT_METHODS.get(peft_type.upper())
    if method is None:
        r.ignore("peft_type", f"{peft_type} has no peftplan method (peftplan models LORA, IA3, PROMPT_TUNING, "
                              "PREFIX_TUNING, P_TUNING); pass --method")
        return
    if method == "lora" and r.flag("use_dora", r.take("use_dora")):
        method = "dora"
        r.mapped("use_dora", "true -> method dora")
    elif r.has("use_dora"):
        r.mapped("use_dora", "false")
    r.method = method
    r.mapped("peft_type", f"{peft_type} -> method {method}")
    r.note("adapter_config.json does not record whether the base model was quantized: "
           "for a QLoRA adapter use method qlora")
    if r.has("inference_mode"):
        r.ignore("inference_mode", "saved adapters set it true; peftplan estimates the training step")
    if r.has("task_type"):
        r.ignore("task_type", "the model head comes from the model's config.json")

    if method in ("lora", "dora"):
        _map_peft_lora(r)
    elif method == "ia3":
        _map_peft_ia3(r)
    else:
        _map_peft_prompting(r, method)


def _default_or_ignore(r: _Reader, key: str, expected: tuple[Any, ...], modelled: str, reason: str) -> None:
    """A key whose only modelled value(s) are `expected`: read when it matches, ignored with `reason` if not."""
    if not r.has(key):
        return
    value = r.take(key)
    if value in expected or _is_empty(value) and any(_is_empty(e) for e in expected):
        r.mapped(key, f"{json.dumps(value)} ({modelled})")
    else:
        r.ignore(key, f"{json.dumps(value)}: {reason}")


def _map_peft_lora(r: _Reader) -> None:
    if r.has("r"):
        r.options["rank"] = r.positive_int("r", r.take("r"))
        r.mapped("r", f"{r.options['rank']} -> rank")
    if r.has("lora_alpha"):
        r.options["alpha"] = r.number("lora_alpha", r.take("lora_alpha"))
        r.mapped("lora_alpha", f"{r.options['alpha']} -> alpha")
    if r.has("lora_dropout"):
        r.options["dropout"] = r.dropout("lora_dropout", r.take("lora_dropout"))
        r.mapped("lora_dropout", f"{r.options['dropout']} -> dropout")
    if r.has("target_modules"):
        raw = r.take("target_modules")
        targets = r.set_targets("target_modules", raw)
        if targets is not None:
            r.options["targets"] = targets
            r.mapped("target_modules", f"{json.dumps(raw)} -> targets={targets}")
        elif _is_empty(raw):
            r.mapped("target_modules", "null -> peft's per-model default targets")
    _default_or_ignore(r, "bias", ("none",), "no trainable bias, as modelled",
                       "trainable biases are " + MEMORY_NOT_MODELLED + " (estimate low)")
    _default_or_ignore(r, "modules_to_save", (None,), "no extra trained modules",
                       "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)")
    _default_or_ignore(r, "layers_to_transform", (None,), "every layer, as modelled",
                       "LoRA on a subset of layers is " + MEMORY_NOT_MODELLED + " (estimate high)")
    _default_or_ignore(r, "layers_pattern", (None,), "unused", "only used with layers_to_transform")
    _default_or_ignore(r, "rank_pattern", ({}, None), "one rank everywhere, as modelled",
                       "per-module ranks are " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "alpha_pattern", ({}, None), "no per-module alpha", "scaling only, no memory effect")
    _default_or_ignore(r, "exclude_modules", (None,), "nothing excluded",
                       "excluded modules are " + MEMORY_NOT_MODELLED + " (estimate high)")
    _default_or_ignore(r, "layer_replication", (None,), "no replication",
                       "replicated layers are " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "trainable_token_indices", (None,), "none",
                       "trainable token rows are " + MEMORY_NOT_MODELLED + " (small)")
    _default_or_ignore(r, "target_parameters", (None, []), "none",
                       "LoRA on raw parameters (MoE experts) is " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "lora_bias", (False,), "no bias on lora_B",
                       "a bias on lora_B is " + MEMORY_NOT_MODELLED + " (negligible)")
    _default_or_ignore(r, "use_qalora", (False,), "plain LoRA", "QA-LoRA is " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "megatron_config", (None,), "no Megatron layers", "Megatron tensor parallelism: not modelled")
    for key, reason in (
        ("fan_in_fan_out", "weight layout of Conv1D models (GPT-2): no memory effect"),
        ("enable_lora", "old peft MergedLinear option: no memory effect"),
        ("use_rslora", "rank-stabilised scaling alpha/sqrt(r): no memory effect"),
        ("init_lora_weights", _PEFT_INIT), ("loftq_config", _PEFT_INIT), ("eva_config", _PEFT_INIT),
        ("corda_config", _PEFT_INIT), ("megatron_core", "Megatron module name: not used"),
        ("runtime_config", "runtime options (ephemeral offload for DoRA init): not modelled"),
        ("qalora_group_size", "only used with use_qalora"),
        ("ensure_weight_tying", "ties adapters of tied embeddings: not modelled"),
    ):
        if r.has(key):
            r.ignore(key, reason)


def _map_peft_ia3(r: _Reader) -> None:
    if r.has("target_modules"):
        raw = r.take("target_modules")
        targets = r.set_targets("target_modules", raw)
        if targets is not None:
            r.options["targets"] = targets
            r.mapped("target_modules", f"{json.dumps(raw)} -> targets={targets}")
        elif _is_empty(raw):
            r.mapped("target_modules", "null -> peft's per-model default targets")
    if r.has("feedforward_modules"):
        r.ignore("feedforward_modules", "peftplan takes the feed-forward (input-scaled) modules from peft's "
                                        "per-model list; a custom list is not modelled (a vector of in_ vs "
                                        "out_features per module)")
    _default_or_ignore(r, "modules_to_save", (None,), "no extra trained modules",
                       "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)")
    _default_or_ignore(r, "exclude_modules", (None,), "nothing excluded", MEMORY_NOT_MODELLED)
    for key, reason in (("fan_in_fan_out", "weight layout of Conv1D models: no memory effect"),
                        ("init_ia3_weights", _PEFT_INIT)):
        if r.has(key):
            r.ignore(key, reason)


def _map_peft_prompting(r: _Reader, method: str) -> None:
    if r.has("num_virtual_tokens"):
        r.options["virtual_tokens"] = r.positive_int("num_virtual_tokens", r.take("num_virtual_tokens"))
        r.mapped("num_virtual_tokens", f"{r.options['virtual_tokens']} -> virtual_tokens")
    for key in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
        if r.has(key):
            r.ignore(key, "peft fills it from the model's config.json; peftplan derives it the same way")
    for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
        if r.has(key):
            r.ignore(key, _PEFT_INIT)
    if method == "prefix":
        _default_or_ignore(r, "prefix_projection", (False, None), "no projection MLP, as modelled",
                           "the prefix projection MLP is " + MEMORY_NOT_MODELLED + " (estimate low)")
        if r.has("encoder_hidden_size"):
            r.ignore("encoder_hidden_size", "only used with prefix_projection")
    if method == "ptuning":
        _default_or_ignore(r, "encoder_reparameterization_type", ("MLP", None), "MLP prompt encoder, as modelled",
                           "an LSTM prompt encoder is " + MEMORY_NOT_MODELLED)
        _default_or_ignore(r, "encoder_hidden_size", (None,), "token_dim, as modelled",
                           "peftplan sizes the prompt-encoder MLP at token_dim (peft's default when unset); "
                           "another width is " + MEMORY_NOT_MODELLED)
        for key in ("encoder_num_layers", "encoder_dropout"):
            if r.has(key):
                r.ignore(key, "used by the LSTM encoder only")
    _default_or_ignore(r, "modules_to_save", (None,), "no extra trained modules",
                       "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)")

