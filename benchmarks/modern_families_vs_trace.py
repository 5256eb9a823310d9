"""Engine vs trace for the cases of tests/test_modern_families.py and tests/test_moe.py (real width, reduced depth).

Run from the repository root: `python benchmarks/modern_families_vs_trace.py > benchmarks/modern_families_vs_trace.md`
(the table is printed as markdown; about 3 minutes on 2 CPU cores)."""
import warnings, sys
warnings.simplefilter("ignore")
import torch; torch.set_num_threads(1)
from peftplan.arch import from_hf_config
from peftplan.catalog import load_gpu, load_model
from peftplan.estimate import estimate
from peftplan.training import Training
from peftplan.harness.trace import trace
sys.path.insert(0, "tests")
import test_modern_families as tm, test_moe as tmoe
rows = []
for fam, m, ck in tm.CASES:
    arch, seq = tm.reduced_arch(fam)
    opts = {"rank": 16, "targets": "all-linear"} if m in ("lora", "qlora") else {}
    t = Training(micro_batch=1, seq_len=seq, grad_ckpt=ck)
    rows.append((arch.name, m, f"b1 s{seq}" + (" ckpt" if ck else ""), opts, t))
for fam, (name, layers) in tmoe.REDUCED.items():
    for m, opts, extra in tmoe.CASES:
        cfg = {**load_model(name).config, "num_hidden_layers": layers}
        if "layer_types" in cfg: cfg["layer_types"] = cfg["layer_types"][:layers]
        arch = from_hf_config(cfg, f"{name}-L{layers}")
        seq = 256 if fam == "gpt_oss" else 128
        rows.append((arch.name, m, f"b1 s{seq} {extra}" if extra else f"b1 s{seq}", opts, (arch, Training(micro_batch=1, seq_len=seq, **extra))))
print("| model | method | options | step | engine bytes | trace bytes | error |")
print("|---|---|---|---|---:|---:|---:|")
for name, m, step, opts, t in rows:
    if isinstance(t, tuple): arch, t = t
    else: arch = [a for a in [tm.reduced_arch(f)[0] for f in tm.REDUCED] if a.name == name][0]
    e = estimate(arch, m, t, load_gpu("h200"), opts)
    r = trace(arch, m, opts, t, flops=False)
    err = (e.memory.peak_allocated_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes
    print(f"| {name} | {m} | {opts} | {step} | {e.memory.peak_allocated_bytes:,} | {r.peak_allocated_bytes:,} | {err:+.3%} |", flush=True)
