"""`peftplan profile`, the GPU profiler, tested end to end on the CPU with the same code path.

The CPU meter counts real tensors with the tracer's MemoryTracker (so a CPU profile equals
`trace(real=True)`), and an emulated capacity raises `torch.OutOfMemoryError` like CUDA's allocator.
The end-to-end test runs the real CLI: one process per configuration, the progress bar, atomic
record writes, an OOM outcome, an engine refusal, a crashing child, and `--resume`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftplan.harness.sweep import SweepError, gpu_slug, load_sweep, run_sweep
from peftplan.records import RecordError, load_record, parse_record

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_type="llama", vocab_size=1000, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False)
# run the app itself, as the console script does
CLI = "import sys; from peftplan.cli import app; sys.argv[0] = 'peftplan'; app()"
CAPACITY = 5 * 2**20  # between the s32 peak (3.7 MiB) and the s128 peak (7.2 MiB) of full fine-tuning


def write_sweep(tmp_path: Path, entries: str, name: str = "sweep.yaml", extra: str = "") -> Path:
    text = textwrap.dedent(f"""\
        name: test
        warmup: 1
        steps: 2
        defaults: {{micro_batch: 2, seq_len: 32}}
        configs:
          tiny-llama: {json.dumps(TINY)}
        {extra}
        entries:
        """) + textwrap.indent(textwrap.dedent(entries), "  ")
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def env_with_root(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


# ---- sweep files: validation, expansion, bundled sweeps (no torch) ------------------------------------


@pytest.mark.parametrize("entries,extra,match", [
    ("- {models: [tiny-llama], methods: [full], batchsize: [1]}\n", "", r"entries\[0\].*unknown key 'batchsize'"),
    ("- {models: [no-such-model], methods: [full]}\n", "", r"no-such-model"),
    ("- {models: [tiny-llama], methods: [fulll]}\n", "", r"unknown method 'fulll'"),
    ("- {models: [tiny-llama], methods: [{method: lora, options: {rnk: 4}}]}\n", "", r"--rnk does not apply"),
    ("- {models: [tiny-llama], methods: [full], precision: [fp8]}\n", "", r"unknown precision 'fp8'"),
    ("- {models: [tiny-llama], methods: [full], batch: [0]}\n", "", r"micro-batch must be a positive integer"),
    ("- {models: [tiny-llama], methods: [full], training: {warmup: 3}}\n", "", r"unknown training field 'warmup'"),
    ("- {models: [remote], methods: [full]}\n",
     "  remote: {model_type: llama, auto_map: {AutoModelForCausalLM: modeling_x.X}}", r"auto_map.*never runs remote code"),
    ("- {models: [tiny-llama]}\n", "", r"needs 'methods'"),
])
def test_sweep_file_errors_are_one_line(tmp_path, entries, extra, match):
    p = write_sweep(tmp_path, entries)
    if extra:  # an extra inline config
        text = p.read_text().replace("configs:\n", "configs:\n" + extra + "\n", 1)
        p.write_text(text)
    with pytest.raises(SweepError, match=match) as info:
        load_sweep(str(p), device="cpu")
    assert "\n" not in str(info.value) and str(p) in str(info.value)


def test_sweep_file_syntax_and_shape_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(str(bad))
    (tmp_path / "s.json").write_text(json.dumps({"entries": [], "name": "x"}))
    with pytest.raises(SweepError, match="non-empty list"):
        load_sweep(str(tmp_path / "s.json"))
    (tmp_path / "t.json").write_text(json.dumps({"entries": [{"models": ["llama3.2-1b"], "methods": ["lora"]}],
                                                 "trust_remote_code": True}))
    with pytest.raises(SweepError, match="unknown top-level key 'trust_remote_code'"):
        load_sweep(str(tmp_path / "t.json"))
    with pytest.raises(SweepError, match="no sweep file"):
        load_sweep("no-such-sweep")


def test_expansion_order_labels_and_engine_refusals(tmp_path):
    p = write_sweep(tmp_path, """\
        - name: first
          models: [tiny-llama]
          methods: [full, bitfit, {method: qlora, options: {double_quant: false}, label: qlora-nodq}]
          seq: [32, 64]
        - name: second
          models: [tiny-llama]
          methods: [prefix, lora]
          grad_ckpt: true
          optimizer: [adamw, paged-adamw-8bit]
        """)
    sw = load_sweep(str(p), device="cpu")
    labels = [c.label for c in sw.configs]
    assert labels[:2] == ["tiny-llama full b2 s32 bf16-mixed", "tiny-llama full b2 s64 bf16-mixed"]
    assert [c.index for c in sw.configs] == list(range(len(sw.configs)))
    skipped = {c.label: c.skip_reason for c in sw.configs if c.skip_reason}
    assert "BitFit" in skipped["tiny-llama bitfit b2 s32 bf16-mixed"]
    assert "gradient checkpointing" in skipped["tiny-llama prefix b2 s32 bf16-mixed ckpt"]
    assert "CUDA" in skipped["tiny-llama lora b2 s32 bf16-mixed ckpt paged-adamw-8bit/fused"]
    qlora = next(c for c in sw.configs if c.method_label == "qlora-nodq")
    assert qlora.options["double_quant"] is False and qlora.options["quant"] == "nf4"  # full options recorded
    ok = sw.runnable[0]
    assert ok.prediction["peak_allocated_bytes"] > 0 and ok.estimated_s > 0
    assert ok.key("cpu") != ok.key("cuda") and ok.key("cpu") == ok.key("cpu")
    # on a GPU the CUDA-only optimizer is planned, not skipped
    gpu = load_sweep(str(p), device="cuda")
    assert not any("CUDA" in (c.skip_reason or "") for c in gpu.configs)


def test_bundled_sweeps_cover_every_method_and_fit_the_budget():
    from peftplan.arch import from_hf_config
    from peftplan.methods import method_names
    from peftplan.training import PRECISIONS

    sw = load_sweep("default", gpu="h100", device="cuda")
    run = sw.runnable
    assert set(method_names()) <= {c.method for c in run}
    families = {from_hf_config(c.config, c.model_name).model_type for c in run}
    assert len(families) >= 3 and {"llama", "qwen2"} <= families
    assert {"llama3.2-1b", "qwen2.5-0.5b", "llama3-8b"} <= {c.model_name for c in run}
    assert {c.method for c in run if c.model_name == "llama3-8b"} >= {"lora", "qlora"}
    seqs = {c.training["seq_len"] for c in run}
    assert min(seqs) == 512 and max(seqs) == 8192
    assert {c.training["precision"] for c in run if c.method == "full"} == set(PRECISIONS)
    q = {(c.options["quant"], c.options["double_quant"], c.options["kbit_prep"]) for c in run if c.method == "qlora"}
    assert {("nf4", True, True), ("nf4", False, True), ("nf4", True, False), ("nf4", False, False)} <= q
    assert {c.options["adapter_kind"] for c in run if c.method == "adapter"} == {"houlsby", "pfeiffer", "parallel"}
    assert any(c.training["grad_ckpt"] for c in run) and any(c.training["attention"] == "eager" for c in run)
    # most informative first: every method appears within the first entries
    assert {c.method for c in run[:25]} == set(method_names())
    minutes = sum(c.estimated_s for c in run) / 60
    assert 5 < minutes <= 25, minutes
    assert len({c.stem for c in run}) == len(run)  # file names do not collide within a sweep
    smoke = load_sweep("smoke", gpu="h100")
    assert smoke.runnable and sum(c.estimated_s for c in smoke.runnable) < 120


def test_gpu_slug_and_catalog_name():
    from peftplan.harness.profile import catalog_gpu_name

    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert catalog_gpu_name("NVIDIA H100 80GB HBM3") == "h100"
    assert catalog_gpu_name("Some Future GPU") is None


def test_dry_run_imports_no_torch_and_writes_nothing(tmp_path):
    code = ("import sys; from typer.testing import CliRunner; from peftplan.cli import app; "
            f"r = CliRunner().invoke(app, ['profile', 'smoke', '--dry-run', '--out', {str(tmp_path / 'p')!r}]); "
            "print(r.output); assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_with_root(COLUMNS="200"),
                         timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "qwen2.5-0.5b qlora b1 s512 bf16-mixed" in out.stdout
    assert "estimated time on h100" in out.stdout
    assert not (tmp_path / "p").exists()


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from peftplan.cli import app

    p = write_sweep(tmp_path, "- {models: [tiny-llama], methods: [fulll]}\n")
    r = CliRunner().invoke(app, ["profile", str(p), "--dry-run"])
    assert r.exit_code == 2 and "unknown method 'fulll'" in r.output
    r = CliRunner().invoke(app, ["profile", "smoke", "--device", "tpu"])
    assert r.exit_code == 2 and "--device must be cuda or cpu" in r.output
    r = CliRunner().invoke(app, ["profile", "smoke", "--torchrun", "1", "--dry-run"])
    assert r.exit_code == 2 and "N >= 2" in r.output
    r = CliRunner().invoke(app, ["profile", "smoke", "--torchrun", "2", "--shard", "zero3", "--dry-run"])
    assert r.exit_code == 2 and "--shard must be one of" in r.output


# ---- the child's measurement, in process (needs torch) -------------------------------------------------


def _spec(method="full", seq=32, **kw):
    spec = {"model_name": "tiny-llama", "config": dict(TINY), "method": method, "options": {},
            "training": {"micro_batch": 2, "seq_len": seq}, "device": "cpu", "warmup": 1, "steps": 2, "threads": 1,
            "label": f"tiny-llama {method} s{seq}", "config_key": "k"}
    spec.update(kw)
    return spec


@pytest.fixture(scope="module")
def torch_mod():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(n)


def test_cpu_profile_equals_the_real_tensor_trace(torch_mod):
    from peftplan.arch import from_hf_config
    from peftplan.harness.profile import measure
    from peftplan.harness.trace import trace
    from peftplan.training import Training

    for method in ("full", "lora"):
        rec = measure(_spec(method))
        parsed = parse_record(rec)
        assert parsed.kind == "cpu-trace" and rec["trace"]["device"] == "cpu" and rec["trace"]["fake_tensors"] is False
        real = trace(from_hf_config(TINY, "tiny-llama"), method, {}, Training(micro_batch=2, seq_len=32), real=True,
                     flops=False)
        m = rec["memory"]
        assert m["peak_allocated_bytes"] == real.peak_allocated_bytes
        for phase in ("forward", "backward"):
            assert m["phase_peaks"][phase] == real.phase_peaks[phase]
        assert m["components"] == real.components
        assert (parsed.params_total, parsed.params_trainable) == (real.params_total, real.params_trainable)
        assert 0 < m["after_load_allocated_bytes"] < m["peak_allocated_bytes"]
        assert rec["trace"]["step_time_s_median"] > 0
        assert rec["env"]["torch"] == torch_mod.__version__ and "transformers" in rec["env"]


def test_capacity_raises_out_of_memory_and_records_it(torch_mod):
    from peftplan.harness.profile import measure

    rec = measure(_spec("full", capacity_bytes=CAPACITY, seq=128))
    parsed = parse_record(rec)
    assert parsed.outcome == "oom" and parsed.capacity_bytes == CAPACITY
    assert rec["oom"]["phase"].startswith("step1.") and "out of memory" in rec["oom"]["message"]
    assert 0 < rec["memory"]["peak_before_oom_bytes"] <= CAPACITY
    assert parsed.params_total == 202048  # built before it ran out
    ok = measure(_spec("full", capacity_bytes=CAPACITY, seq=32))
    assert ok["outcome"] == "ok" and ok["memory"]["peak_allocated_bytes"] <= CAPACITY


def test_refusals_and_never_overwriting(torch_mod, tmp_path):
    from peftplan.harness.profile import Refused, measure, run_one

    with pytest.raises(Refused, match="BitFit"):
        measure(_spec("bitfit"))
    with pytest.raises(Refused, match="remote code"):
        measure(_spec(config={**TINY, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    target = tmp_path / "taken.json"
    target.write_text("{}")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec(out_path=str(target))))
    with pytest.raises(RecordError, match="refusing to overwrite"):
        run_one(str(spec_path))
    assert target.read_text() == "{}"


# ---- the real thing: the CLI, one process per configuration ----------------------------------------------


def test_cpu_sweep_end_to_end(torch_mod, tmp_path):
    sweep = write_sweep(tmp_path, """\
        - name: fits
          models: [tiny-llama]
          methods: [full, bitfit]
        - name: does not fit
          models: [tiny-llama]
          methods: [full]
          seq: [128]
        - name: crashes
          models: [tiny-llama]
          methods: [{method: full, label: full-crash}]
          seq: 48
        """)
    out = tmp_path / "profiles"
    cmd = [sys.executable, "-c", CLI, "profile", str(sweep), "--device", "cpu", "--out", str(out),
           "--capacity", f"{CAPACITY}", "--threads", "1", "--timeout", "300"]
    env = env_with_root(PEFTPLAN_PROFILE_FAULT="full-crash=abort", COLUMNS="200")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    log = first.stderr
    assert first.returncode == 1, log  # a crashed configuration makes the exit code non-zero ...
    assert "crashed" in log and "signal" in log  # ... and is reported,
    assert "oom" in log and "BitFit" in log
    assert "4/4" in log  # ... and the sweep went on to the end (the progress bar's count)
    d = out / "cpu"
    files = sorted(p.name for p in d.glob("*.json"))
    assert files == ["tiny-llama-full-b2-s128-bf16-mixed-sdpa.json", "tiny-llama-full-b2-s32-bf16-mixed-sdpa.json"]
    assert list((d / "logs").glob("tiny-llama-full-crash-*.log"))
    assert not list(d.glob(".*"))  # no temporary files left behind
    ok = load_record(d / files[1])
    oom = load_record(d / files[0])
    assert ok.outcome == "ok" and oom.outcome == "oom" and oom.capacity_bytes == CAPACITY
    assert ok.kind == oom.kind == "cpu-trace"
    raw = ok.raw
    assert raw["model"]["config"] == TINY and raw["training"]["seq_len"] == 32 and raw["options"] == {}
    assert raw["trace"]["device"] == "cpu" and raw["trace"]["fake_tensors"] is False
    assert raw["profile"]["sweep"]["entry"] == "fits" and raw["profile"]["config_key"]
    # the engine's prediction travels with the record: the tiny model's CPU peak is within 1% of it
    pred = raw["prediction"]["peak_allocated_bytes"]
    assert abs(pred - ok.peak_allocated_bytes) / ok.peak_allocated_bytes < 0.01
    assert oom.raw["prediction"]["peak_allocated_bytes"] > CAPACITY
    try:
        from peftplan.check import check_paths
    except ImportError:  # pragma: no cover - the check gate lives in another module
        check_paths = None
    if check_paths is not None:
        result = check_paths([d])
        assert all(not f.violations for f in result.findings), [f.violations for f in result.findings]

    before = {p.name: p.read_bytes() for p in d.glob("*.json")}
    second = subprocess.run(cmd + ["--resume", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert "already measured" in second.stderr, second.stderr
    assert {p.name: p.read_bytes() for p in d.glob("*.json")} == before  # nothing rewritten, nothing added
    assert second.returncode == 1 and "crashed" in second.stderr  # the crashed one is retried


def test_hanging_child_is_killed_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from rich.console import Console

    sweep = write_sweep(tmp_path, """\
        - models: [tiny-llama]
          methods: [{method: full, label: full-hang}, bitfit]
        """)
    monkeypatch.setenv("PEFTPLAN_PROFILE_FAULT", "full-hang=hang")
    console = Console(file=open(os.devnull, "w"), width=200)
    outcomes = run_sweep(load_sweep(str(sweep), device="cpu"), tmp_path / "out", device="cpu", timeout_s=3,
                         console=console)
    assert [o.status for o in outcomes] == ["timeout", "skipped"]
    assert "killed after 3 s" in outcomes[0].reason
    assert not list((tmp_path / "out").glob("*.json"))


# ---- several ranks: FSDP2 under torchrun ------------------------------------------------------------------


def test_multi_gpu_entries_are_planned_and_skipped_without_gpus(tmp_path):
    from rich.console import Console

    p = write_sweep(tmp_path, """\
        - name: fsdp
          models: [tiny-llama]
          methods: [lora, qlora]
          gpus: 2
          shard: [fsdp-full, fsdp-grad-op, ddp]
        """)
    sw = load_sweep(str(p), device="cuda")
    labels = {c.label: c for c in sw.configs}
    ok = labels["tiny-llama lora b2 s32 bf16-mixed fsdp-full x2"]
    assert ok.skip_reason is None and ok.training["n_gpus"] == 2 and ok.stem.endswith("fsdp-full-x2")
    assert ok.prediction["peak_allocated_bytes"] > 0  # the engine's rank-0 prediction
    assert "not DDP" in labels["tiny-llama lora b2 s32 bf16-mixed ddp x2"].skip_reason
    assert "QLoRA under FSDP2" in labels["tiny-llama qlora b2 s32 bf16-mixed fsdp-full x2"].skip_reason
    # one GPU present: skipped with the reason, nothing launched, no crash
    console = Console(file=open(os.devnull, "w"), width=200)
    outcomes = run_sweep(sw, tmp_path / "out", device="cuda", n_devices=1, console=console)
    assert {o.status for o in outcomes} == {"skipped"}
    assert "needs 2 GPUs (torchrun, fsdp-full); 1 present" in outcomes[0].reason
    # --torchrun N: every configuration on N ranks
    over = load_sweep(str(write_sweep(tmp_path, "- {models: [tiny-llama], methods: [full]}\n", name="o.yaml")),
                      device="cpu", training_overrides={"n_gpus": 4, "shard": "fsdp-grad-op"})
    assert over.configs[0].label.endswith("fsdp-grad-op x4") and over.configs[0].skip_reason is None
    # the bundled sweep's FSDP2 entries come last and need 2 GPUs
    default = load_sweep("default", gpu="h100", device="cuda")
    multi = [c for c in default.configs if c.training["n_gpus"] > 1]
    assert multi and default.configs[-len(multi):] == multi
    assert {c.training["shard"] for c in multi} == {"fsdp-full", "fsdp-grad-op"}


def _only(sw, needle: str):
    import dataclasses

    return dataclasses.replace(sw, configs=[c for c in sw.configs if needle in c.label])


def _live_processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_cpu_fsdp2_under_torchrun_end_to_end(torch_mod, tmp_path, monkeypatch):
    """Two real FSDP2 ranks on the CPU (gloo), launched by `peftplan profile` through torchrun.

    Rank 0's measured peak equals `trace_fsdp` (the fake-process-group trace of the same wrapping)
    byte for byte: same model build, same `fsdp_wrap.wrap_fsdp`, same tracker; the only difference,
    real vs fake tensors, does not change any allocation size. The engine is held to the FSDP2 trace
    tolerances of tests/test_sharding.py (full 1%, LoRA 4%: the adapter-input cast the engine keeps
    under the mixed-precision policy), and to the cpu-trace gate of `peftplan check`."""
    import tempfile

    from peftplan.arch import from_hf_config
    from peftplan.catalog import load_gpu
    from peftplan.estimate import estimate
    from peftplan.harness.fsdp_trace import trace_fsdp
    from peftplan.training import Training

    sweep = write_sweep(tmp_path, """\
        - name: fsdp2
          models: [tiny-llama]
          methods: [lora, full]
          gpus: 2
          shard: fsdp-full
        """)
    out = tmp_path / "profiles"
    cmd = [sys.executable, "-c", CLI, "profile", str(sweep), "--device", "cpu", "--out", str(out), "--threads", "1",
           "--timeout", "300", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env_with_root(COLUMNS="200"), timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    d = out / "cpu"
    tol = {"lora": 0.04, "full": 0.01}
    for method in ("lora", "full"):
        rec = load_record(d / f"tiny-llama-{method}-b2-s32-bf16-mixed-sdpa-fsdp-full-x2.json")
        assert parse_record(dict(rec.raw)).outcome == "ok" and rec.kind == "cpu-trace"
        raw = rec.raw
        assert raw["training"]["n_gpus"] == 2 and raw["training"]["shard"] == "fsdp-full"
        dist = raw["distributed"]
        assert dist["rank"] == 0 and dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["gathered"]
        assert dist["mesh_shape"] == [2] and dist["reshard_after_forward"] is True and dist["mixed_precision"] == "bf16"
        per_rank = raw["memory"]["per_rank_peak_allocated_bytes"]
        assert len(per_rank) == 2 and per_rank[0] == rec.peak_allocated_bytes and all(p > 0 for p in per_rank)
        arch = from_hf_config(TINY, "tiny-llama")
        training = Training(micro_batch=2, seq_len=32, n_gpus=2, shard="fsdp-full")
        traced = trace_fsdp(arch, method, {}, training)
        assert rec.peak_allocated_bytes == traced.peak_allocated_bytes, (method, rec.peak_allocated_bytes, traced)
        assert dict(rec.components) == traced.components
        engine = estimate(arch, method, training, load_gpu("h100")).memory.peak_allocated_bytes
        assert abs(engine - rec.peak_allocated_bytes) / rec.peak_allocated_bytes < tol[method], (method, engine)
        assert raw["prediction"]["peak_allocated_bytes"] == engine
    try:
        from peftplan.check import check_paths
    except ImportError:  # pragma: no cover
        check_paths = None
    if check_paths is not None:
        result = check_paths([d])
        assert all(not f.violations for f in result.findings), [f.violations for f in result.findings]

    # an out-of-memory on the ranks is a recorded outcome; a hung torchrun is killed with its ranks
    from rich.console import Console

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # spec + rank files here: find leftover ranks
    monkeypatch.setenv("PEFTPLAN_PROFILE_FAULT", "full-hang=hang")
    sw = load_sweep(str(write_sweep(tmp_path, """\
        - models: [tiny-llama]
          methods: [full, {method: full, label: full-hang}]
          gpus: 2
          shard: fsdp-full
        """, name="oom.yaml")), device="cpu")
    console = Console(file=open(os.devnull, "w"), width=200)
    oom_cap = 2 * 2**20  # between the LoRA (1.50 MiB) and the full (2.56 MiB) rank-0 peaks
    oom, = run_sweep(_only(sw, "full b2"), tmp_path / "o", device="cpu", capacity_bytes=oom_cap, threads=1,
                     timeout_s=300, console=console)
    assert oom.status == "oom", oom
    rec = load_record(oom.path)
    assert rec.outcome == "oom" and rec.capacity_bytes == oom_cap and 0 in rec.raw["oom"]["ranks"]
    assert rec.raw["oom"]["phase"].startswith("step") and rec.raw["training"]["n_gpus"] == 2
    assert 0 < rec.raw["memory"]["peak_before_oom_bytes"] <= oom_cap
    hang, = run_sweep(_only(sw, "full-hang"), tmp_path / "h", device="cpu", threads=1, timeout_s=6, console=console)
    assert hang.status == "timeout" and "killed after 6 s" in hang.reason
    import time

    deadline = time.monotonic() + 10
    while _live_processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _live_processes_mentioning(str(tmp_path))  # no rank outlived its torchrun


def test_a_configurations_alloc_conf_reaches_its_child_process(tmp_path, monkeypatch):
    """`training: {alloc_conf: ...}` runs that configuration under PYTORCH_CUDA_ALLOC_CONF (check.py replays the
    allocator with the conf the record holds), with its own file name; the others run under the sweep's env."""
    import peftplan.harness.sweep as sweep_mod
    from rich.console import Console

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    seen = []

    def fake_child(spec, timeout_s, env=None, nproc=1):  # type: ignore[no-untyped-def]
        seen.append((spec["label"], (env or {}).get("PYTORCH_CUDA_ALLOC_CONF")))
        return 1, "", "not run", False

    monkeypatch.setattr(sweep_mod, "run_child", fake_child)
    path = write_sweep(tmp_path, """\
        - models: [tiny-llama]
          methods: [lora]
        - models: [tiny-llama]
          methods: [lora]
          training: {alloc_conf: "expandable_segments:True"}
        """)
    sw = load_sweep(str(path), device="cpu")
    assert len({c.stem for c in sw.runnable}) == 2
    run_sweep(sw, tmp_path / "out", device="cpu", timeout_s=5, console=Console(file=open(os.devnull, "w")))
    assert [conf for _, conf in seen] == [None, "expandable_segments:True"]
    assert "alloc expandable_segments:True" in seen[1][0]
