"""Properties of the analytical engine that must hold for any correct accounting."""

import subprocess
import sys

import pytest

from peftplan.arch import from_hf_config
from peftplan.catalog import load_gpu, load_model
from peftplan.estimate import estimate
from peftplan.methods import method_names
from peftplan.training import Training

GPU = load_gpu("h200")
B1 = Training(micro_batch=1, seq_len=2048)


def peak(model, method, training=B1, **opts):
    return estimate(load_model(model), method, training, GPU, opts).memory.peak_allocated_bytes


def test_method_ordering_llama3_8b():
    full = peak("llama3-8b", "full")
    lora = peak("llama3-8b", "lora")
    qlora = peak("llama3-8b", "qlora")
    assert qlora < lora < full


def test_checkpointing_and_attention():
    base = peak("llama3-8b", "lora", B1)
    assert peak("llama3-8b", "lora", B1.with_(grad_ckpt=True)) < base
    assert peak("llama3-8b", "lora", B1.with_(attention="eager")) > base


def test_foreach_costs_one_state_sized_list():
    """Full FT in pure bf16: foreach - fused = one bf16 copy of every parameter (torch _multi_tensor_adamw)."""
    t = Training(micro_batch=1, seq_len=2048, precision="bf16")
    arch = load_model("llama3-8b")
    fused = estimate(arch, "full", t.with_(optimizer_impl="fused"), GPU).memory.phase_peaks["optimizer"]
    foreach = estimate(arch, "full", t.with_(optimizer_impl="foreach"), GPU).memory.phase_peaks["optimizer"]
    assert foreach - fused == pytest.approx(2 * arch.total_params, rel=0.01)


def test_paged_states_leave_allocated():
    a = estimate(load_model("llama3.2-1b"), "full", B1.with_(optimizer="paged-adamw"), GPU)
    b = estimate(load_model("llama3.2-1b"), "full", B1.with_(optimizer="adamw"), GPU)
    assert a.memory.paged_optimizer_bytes > 0
    assert a.memory.peak_allocated_bytes < b.memory.peak_allocated_bytes


def test_mixed_precision_is_about_16_bytes_per_param_plus_copies():
    n = load_model("llama3-8b").total_params
    e = estimate(load_model("llama3-8b"), "full", B1.with_(precision="bf16-mixed"), GPU)
    assert e.memory.weights_bytes == pytest.approx(4 * n, rel=1e-3)
    assert e.memory.optimizer_state_bytes == pytest.approx(8 * n, rel=1e-3)


@pytest.mark.parametrize("method", method_names())
def test_every_method_estimates_on_three_families(method):
    for model in ("llama3.2-1b", "gpt2", "mt0-large"):
        arch = load_model(model)
        opts = {"targets": "all-linear"} if method in ("lora", "dora", "qlora") else {}
        try:
            e = estimate(arch, method, Training(micro_batch=2, seq_len=256), GPU, opts)
        except ValueError as exc:
            assert "no bias" in str(exc)  # BitFit on bias-free models is refused, not estimated
            continue
        assert e.memory.peak_allocated_bytes > e.memory.weights_bytes
        assert e.compute.flops_per_step > 0


def test_absurd_sizes_do_not_overflow():
    cfg = {"model_type": "llama", "vocab_size": 256000, "hidden_size": 65536, "intermediate_size": 262144,
           "num_hidden_layers": 192, "num_attention_heads": 512, "num_key_value_heads": 64}
    arch = from_hf_config(cfg, "huge")
    assert arch.total_params > 10**13
    e = estimate(arch, "qlora", Training(micro_batch=1, seq_len=1_000_000), GPU, {"rank": 64})
    assert e.memory.peak_allocated_bytes > 10**13 // 2 and not e.fits


def test_estimate_path_imports_neither_torch_nor_pandas():
    code = ("import sys, peftplan.cli, peftplan.estimate, peftplan.display, peftplan.explain; "
            "from peftplan.catalog import load_model, load_gpu; from peftplan.training import Training; "
            "peftplan.estimate.estimate(load_model('llama3-8b'), 'qlora', Training(), load_gpu('t4')); "
            "print('torch' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
