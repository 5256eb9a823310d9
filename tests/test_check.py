"""`peftplan check`: the gate's logic on synthetic records built from the engine's own prediction.

Each record is the engine's prediction for a real catalog configuration, perturbed by a known amount,
so the test knows which side of the tolerance / envelope it is on without hard-coding an answer.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftplan.catalog import load_config, load_gpu, load_model
from peftplan.check import CheckError, check_paths
from peftplan.cli import app
from peftplan.estimate import estimate
from peftplan.records import RecordError, write_record
from peftplan.training import Training

runner = CliRunner()
TR = Training(micro_batch=1, seq_len=512)


def _est(method="lora", gpu="a100-80g", model="llama3.2-1b", training=TR):
    return estimate(load_model(model), method, training, load_gpu(gpu), {})


def cpu_record(scale=1.0, method="lora", model="llama3.2-1b", params_delta=0, **extra):
    est = _est(method, model=model)
    _, config = load_config(model)
    rec = {
        "schema_version": 1, "kind": "cpu-trace", "model": {"name": model, "config": config},
        "method": method, "options": est.options, "training": asdict(est.training),
        "params": {"total": est.params.total + params_delta, "trainable": est.params.trainable},
        "memory": {"peak_allocated_bytes": int(est.memory.peak_allocated_bytes * scale),
                   "components": dict(est.memory.components), "peak_phase": {"phase": "backward", "step": 2}},
    }
    rec.update(extra)
    return rec


def gpu_record(measured, gpu="a100-80g", outcome="ok", capacity=None, reserved=None, step_time=None, method="lora"):
    est = _est(method, gpu=gpu)
    g = load_gpu(gpu)
    _, config = load_config("llama3.2-1b")
    rec = {
        "schema_version": 1, "kind": "gpu-profile", "model": {"name": "llama3.2-1b", "config": config},
        "method": method, "options": est.options, "training": asdict(est.training), "outcome": outcome,
        "params": {"total": est.params.total, "trainable": est.params.trainable},
        "memory": {"capacity_bytes": capacity or g.memory_bytes},
        "gpu": {"name": g.full_name, "memory_bytes": g.memory_bytes, "catalog_name": gpu},
    }
    if measured is not None:
        rec["memory"]["peak_allocated_bytes"] = measured
    if reserved is not None:
        rec["memory"]["peak_reserved_bytes"] = reserved
    if step_time is not None:
        rec["timing"] = {"step_time_s_median": step_time}
    return rec, est


def write(tmp_path: Path, name: str, rec) -> Path:
    return write_record(tmp_path / f"{name}.json", rec)


def test_cpu_trace_within_one_percent_passes_and_outside_fails(tmp_path):
    write(tmp_path, "ok", cpu_record(1.005))
    write(tmp_path, "low", cpu_record(1 / 1.02))
    res = check_paths([tmp_path])
    by = {Path(f.path).stem: f for f in res.findings}
    assert by["ok"].status == "ok" and abs(by["ok"].error_pct - (1 / 1.005 - 1) * 100) < 1e-3
    assert by["low"].status == "violation" and "peak" in by["low"].violations[0]
    assert by["low"].error_pct == pytest.approx(2.0, abs=1e-3)  # engine above the trace by 2%
    assert not res.ok and len(res.violations) == 1


def test_params_must_match_exactly(tmp_path):
    write(tmp_path, "p", cpu_record(1.0, params_delta=1))
    f = check_paths([tmp_path]).findings[0]
    assert f.status == "violation" and f.violations[0].startswith("params")


def test_gpu_profile_inside_and_outside_the_envelope(tmp_path):
    rec, est = gpu_record(0)
    m = est.memory
    assert m.envelope_high_bytes > m.envelope_low_bytes == m.peak_allocated_bytes
    inside, _ = gpu_record((m.envelope_low_bytes + m.envelope_high_bytes) // 2,
                           reserved=int(m.peak_reserved_bytes * 1.02), step_time=(est.compute.step_time_s or 1) * 2)
    above, _ = gpu_record(m.envelope_high_bytes + 1)
    below, _ = gpu_record(m.envelope_low_bytes - 1)
    huge_reserved, _ = gpu_record(m.peak_allocated_bytes, reserved=int(m.peak_reserved_bytes * 1.04))
    for name, r in (("inside", inside), ("above", above), ("below", below), ("reserved", huge_reserved)):
        write(tmp_path, name, r)
    by = {Path(f.path).stem: f for f in check_paths([tmp_path]).findings}
    assert by["inside"].status == "ok"
    assert by["inside"].step_time_error_pct == pytest.approx(-50.0)  # reported, never a violation
    assert by["inside"].step_time_within_target is False  # outside the roofline's 15% target
    assert by["above"].step_time_within_target is None  # no timing measured
    assert by["inside"].reserved_error_pct is not None
    assert by["above"].status == "violation" and "outside the envelope" in by["above"].violations[0]
    assert by["below"].status == "violation"
    assert by["reserved"].status == "violation" and by["reserved"].violations[0].startswith("reserved")


def test_oom_records_consistent_only_when_predicted_not_to_fit(tmp_path):
    _, est = gpu_record(0)
    low = est.memory.envelope_low_bytes
    write(tmp_path, "oom_ok", gpu_record(None, outcome="oom", capacity=low - 2**20)[0])
    write(tmp_path, "oom_bad", gpu_record(None, outcome="oom", capacity=low + 2**30)[0])
    by = {Path(f.path).stem: f for f in check_paths([tmp_path]).findings}
    assert by["oom_ok"].status == "ok"
    assert by["oom_bad"].status == "violation" and by["oom_bad"].violations[0].startswith("oom")


def test_xfail_is_a_known_deviation_and_xpass_fails(tmp_path):
    write(tmp_path, "known", cpu_record(1.5, xfail="engine misses X"))
    write(tmp_path, "fixed", cpu_record(1.0, xfail="engine misses X"))
    res = check_paths([tmp_path])
    by = {Path(f.path).stem: f for f in res.findings}
    assert by["known"].status == "known-deviation" and not by["known"].failing
    assert by["fixed"].status == "xpass" and by["fixed"].failing
    assert [Path(f.path).stem for f in res.violations] == ["fixed"]


def test_summary_groups_and_signs(tmp_path):
    write(tmp_path, "a", cpu_record(1 / 1.004))
    write(tmp_path, "b", cpu_record(1 / 0.998))
    write(tmp_path, "c", cpu_record(1.0, method="full"))
    s = check_paths([tmp_path]).summary()
    lora = next(r for r in s["by_method"] if r["group"] == "lora")
    assert lora["count"] == 2 and lora["worst_error_pct"] == pytest.approx(0.4, abs=1e-3)
    assert lora["median_error_pct"] == pytest.approx(0.1, abs=1e-3)
    assert [r["group"] for r in s["by_where"]] == ["cpu-trace:cpu"]


def test_bad_records_name_file_and_field(tmp_path):
    bad = cpu_record(1.0)
    bad["training"]["bogus"] = 1
    write(tmp_path, "bad", bad)
    with pytest.raises(CheckError, match=r"bad\.json: field 'training\.bogus'"):
        check_paths([tmp_path])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecordError, match=r"bad\.json: not valid JSON"):
        check_paths([tmp_path])


def test_cli_exit_codes_json_and_html(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    write(good, "r", cpu_record(1.0, model="llama3.2-1b"))
    r = runner.invoke(app, ["check", str(good)])
    assert r.exit_code == 0, r.output
    assert "1 records checked" in r.output
    write(bad, "r", cpu_record(1.2))
    r = runner.invoke(app, ["check", str(bad), "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["violations"] == 1 and d["findings"][0]["status"] == "violation"
    (tmp_path / "broken.json").write_text("[]")
    r = runner.invoke(app, ["check", str(tmp_path / "broken.json")])
    assert r.exit_code == 2 and "broken.json" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["check", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such file" in r.stderr


def test_html_report_is_escaped_and_refuses_overwrite(tmp_path):
    pytest.importorskip("plotly")
    rec = cpu_record(1.3)
    rec["model"]["name"] = "<script>alert(1)</script>"
    write(tmp_path / "recs", "r", rec)
    out = tmp_path / "reports" / "check.html"
    r = runner.invoke(app, ["check", str(tmp_path / "recs"), "--html", str(out)])
    assert r.exit_code == 1 and out.exists()
    text = out.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>alert(1)" not in text
    assert "<script src=\"http" not in text  # self-contained: plotly.js inline
    r = runner.invoke(app, ["check", str(tmp_path / "recs"), "--html", str(out)])
    assert r.exit_code == 2 and "exists" in r.stderr
    r = runner.invoke(app, ["check", str(tmp_path / "recs"), "--html", str(out), "--force"])
    assert r.exit_code == 1


# ---- peftplan trace ------------------------------------------------------------------------------

TINY_CONFIG = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 256, "num_hidden_layers": 2,
               "max_position_embeddings": 256, "tie_word_embeddings": False}


def test_trace_cli_json_out_and_check(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "recs" / "tiny-lora.json"
    args = ["trace", "--model", str(cfg), "--method", "lora", "--batch", "2", "--seq", "32"]
    r = runner.invoke(app, args + ["--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "cpu-trace" and d["params"]["trainable"] > 0
    assert d["memory"]["peak_allocated_bytes"] == sum(d["memory"]["components"].values())
    assert d["memory"]["peak_phase"]["phase"] in ("forward", "backward", "optimizer")
    assert json.loads(out.read_text())["memory"] == d["memory"]
    r = runner.invoke(app, args + ["--out", str(out)])
    assert r.exit_code == 2 and "exists" in r.stderr
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "peak allocated" in r.stdout and "engine" in r.stdout
    assert runner.invoke(app, ["check", str(out.parent)]).exit_code == 0  # the engine matches its own trace


def test_trace_cli_errors_are_one_line():
    pytest.importorskip("torch")
    for args, needle in (
        (["--model", "llama3-8b", "--optimizer", "paged-adamw", "--batch", "1", "--seq", "16"], "CUDA"),
        (["--model", "llama3-8b", "--method", "prefix", "--grad-ckpt"], "gradient checkpointing"),
        (["--model", "no-such-model"], "unknown model"),
        (["--matrix", "ci"], "--out-dir"),
        (["--matrix", "nope", "--out-dir", "x"], "unknown matrix"),
    ):
        r = runner.invoke(app, ["trace", *args])
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_tiny_matrix_is_well_formed():
    from peftplan.harness.matrix import NO_CKPT, XFAIL, matrix
    from peftplan.methods import method_names

    ci = matrix("ci")
    assert {e.method for e in ci} == set(method_names())
    assert not any(e.method in NO_CKPT and e.training.get("grad_ckpt") for e in ci)
    for method in method_names():  # two model sizes per method
        assert len({e.model for e in ci if e.method == method}) >= 2, method
    assert {e.training.get("attention", "sdpa") for e in ci} == {"sdpa", "eager"}
    assert all(e.xfail == XFAIL.get(e.id) for e in ci)
    assert len({e.id for e in ci}) == len(ci)


def test_reserved_is_checked_against_the_replay_under_the_records_alloc_conf(tmp_path):
    """A hand-made GPU record (never committed): its PYTORCH_CUDA_ALLOC_CONF (env) selects the replay."""
    rec, est = gpu_record(None, method="full")
    expandable = estimate(load_model("llama3.2-1b"), "full", est.training.with_(alloc_conf="expandable_segments:True"),
                          load_gpu("a100-80g")).memory
    assert expandable.peak_reserved_bytes != est.memory.peak_reserved_bytes
    rec["memory"]["peak_allocated_bytes"] = est.memory.peak_allocated_bytes
    rec["memory"]["peak_reserved_bytes"] = expandable.peak_reserved_bytes
    rec["env"] = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    write(tmp_path, "expandable", rec)
    f = check_paths([tmp_path]).findings[0]
    assert f.reserved_predicted_bytes == expandable.peak_reserved_bytes and f.reserved_error_pct == 0
    bad = tmp_path / "bad"
    rec["env"] = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:maybe"}
    write(bad, "expandable", rec)
    with pytest.raises(CheckError, match="training"):
        check_paths([bad])
