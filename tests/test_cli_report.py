"""`peftplan compare` and `peftplan plan`: JSON shape, files (no overwrite without --force, directories
created), one-line did-you-mean errors, the empty plan's advice, token counts like 1e8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftplan.cli import app
from peftplan.cli.common import parse_count

pytest.importorskip("pandas")
pytest.importorskip("plotly")

runner = CliRunner()
EVIL = "<script>alert('x')</script>"


def run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def _one_line_error(r, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.output


def test_compare_json_rows_per_gpu_precision_and_options() -> None:
    r = run("compare", "--model", "llama3.2-1b", "--methods", "full,lora,bitfit", "--gpus", "t4,a100-80g",
            "--seq", "256,512", "--batch", "2", "--rank", "16", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rows = d["rows"]
    ok = [x for x in rows if x["status"] == "ok"]
    assert len(ok) == 2 * 2 * 2 and len(rows) == 12  # bitfit skipped (no biases) on 2 GPUs x 2 seqs
    assert {x["precision"] for x in ok if x["gpu"] == "t4"} == {"fp16-mixed"}  # no bf16 on the T4
    assert {x["precision"] for x in ok if x["gpu"] == "a100-80g"} == {"bf16-mixed"}
    assert any("t4 has no bf16" in n for n in d["notes"])
    assert all(x["micro_batch"] == 2 for x in ok)
    assert {json.loads(x["options"]).get("rank") for x in ok if x["method"] == "lora"} == {16}
    assert all(json.loads(x["options"]) == {} for x in ok if x["method"] == "full")  # --rank not sent to full
    # memory grows with the sequence; the GPU changes only the precision
    by = {(x["method"], x["gpu"], x["seq_len"]): x for x in ok}
    assert by[("lora", "a100-80g", 512)]["peak_allocated_bytes"] > by[("lora", "a100-80g", 256)]["peak_allocated_bytes"]
    assert by[("full", "t4", 512)]["fits"] is False and by[("full", "a100-80g", 512)]["fits"] is True


def test_compare_writes_html_and_csv_and_refuses_to_overwrite(tmp_path: Path) -> None:
    html = tmp_path / "new" / "dir" / "r.html"  # directories that do not exist are created
    csv = tmp_path / "other" / "r.csv"
    args = ["compare", "--models", "gpt2,opt-350m", "--methods", "lora,qlora", "--gpus", "t4", "--seq", "128,256",
            "--title", f"t {EVIL}", "--html", str(html), "--csv", str(csv)]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and "opt-350m" in r.stdout
    text = html.read_text(encoding="utf-8")
    assert EVIL not in text and "t &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert text.count("Plotly.newPlot") >= 5 and "<script src=" not in text
    lines = csv.read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 2 and lines[0].startswith("model,method,gpu")

    before = html.stat().st_mtime_ns, html.read_bytes()
    r = run(*args)  # both exist: refused before any work, files untouched
    _one_line_error(r, "exists (use --force to overwrite)")
    assert (html.stat().st_mtime_ns, html.read_bytes()) == before
    r = run(*args[:-2])  # only --html given, it exists
    _one_line_error(r, "--html")
    r = run(*args, "--force")
    assert r.exit_code == 0, r.output
    r = run("compare", "--model", "gpt2", "--html", str(tmp_path))  # a directory, not a file
    _one_line_error(r, "is a directory")


@pytest.mark.parametrize("args, fragment", [
    (("--model", "llama3-8x", "--methods", "lora"), "did you mean"),
    (("--model", "gpt2", "--methods", "lora,qlra"), "did you mean qlora"),
    (("--model", "gpt2", "--gpus", "a100-80g,t5"), "did you mean"),
    (("--models", "gpt2,bert-larg"), "did you mean"),
    (("--model", "gpt2", "--methods", "full", "--rank", "8"), "--rank applies to none"),
    (("--model", "gpt2", "--seq", "512,abc"), "not a positive integer"),
    (("--model", "gpt2", "--precision", "bf17"), "unknown precision"),
    (("--methods", "lora"), "--model or --models is required"),
])
def test_compare_errors_are_one_line(args: tuple[str, ...], fragment: str) -> None:
    _one_line_error(run("compare", *args), fragment)


def test_plan_json_ranked_with_time_and_cost() -> None:
    r = run("plan", "--model", "gpt2", "--gpu", "t4", "--seq", "512", "--tokens", "1e8", "--price", "0.5",
            "--methods", "lora,full,bitfit", "--ranks", "8,16", "--batches", "1,4", "--objective", "speed", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["objective"] == "speed"
    assert d["tokens"] == 100_000_000 and d["price_per_hour"] == 0.5 and d["precision"] == "fp16-mixed"
    fits = d["fits"]
    assert fits and all(x["fits"] for x in fits)
    tps = [x["tokens_per_s"] for x in fits]
    assert all(a >= b * (1 - 1e-12) for a, b in zip(tps, tps[1:]))  # fastest first
    best = fits[0]
    assert best["train_time_s"] == pytest.approx(1e8 / best["tokens_per_s"])
    assert best["train_cost_usd"] == pytest.approx(best["train_time_s"] / 3600 * 0.5)
    assert {x["method"] for x in fits} <= {"lora", "full", "bitfit"} and best["flags"].startswith("--method ")
    assert {lim["method"] for lim in d["limits"]} == {"lora", "full", "bitfit"}
    assert all(lim["max_seq_len"] for lim in d["limits"])
    assert "ranks first" in d["explanation"]


def test_plan_objective_and_global_batch_flags() -> None:
    r = run("plan", "--model", "gpt2", "--gpu", "t4", "--seq", "256", "--methods", "lora,ia3", "--ranks", "8",
            "--targets", "default,all-linear", "--global-batch", "8", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["objective"] == "quality" and d["global_batch"] == 8
    assert all(x["micro_batch"] * x["grad_accum"] == 8 for x in d["fits"])
    quals = [x["quality_prior"] for x in d["fits"]]
    assert quals[0] == max(quals) and d["fits"][0]["targets"] == "all-linear"
    for args, fragment in ((("--objective", "fastest"), "--objective must be one of"),
                           (("--targets", "qkv"), "--targets takes"),
                           (("--global-batch", "0"), "--global-batch must be")):
        _one_line_error(run("plan", "--model", "gpt2", "--gpu", "t4", *args), fragment)


def test_plan_table_explains_the_winner() -> None:
    r = run("plan", "--model", "gpt2", "--gpu", "rtx4090", "--methods", "lora,full", "--ranks", "8",
            "--batches", "1,8", "--tokens", "100M")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "configurations that fit, by quality" in out and "largest that fits, per method" in out
    assert "why:" in out and "ranks first by quality" in out and "quality prior" in out
    assert "no price per hour" in out  # the catalog has no price for the rtx4090 and none was given


def test_plan_multi_gpu_is_wired_through() -> None:
    r = run("plan", "--model", "gpt2", "--gpu", "t4", "--gpus", "4", "--methods", "lora", "--ranks", "8",
            "--batches", "1", "--tokens", "1e7", "--price", "1", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["n_gpus"] == 4
    best = d["fits"][0]
    assert best["n_gpus"] == 4 and f"--gpus 4 --shard {best['shard']}" in best["flags"]
    assert {x["shard"] for x in d["fits"]} >= {"ddp"}
    # estimate()'s tokens/s counts every rank (estimate.py: n_gpus x tokens x accumulation / step time)
    assert best["train_time_s"] == pytest.approx(1e7 / best["tokens_per_s"])
    assert best["train_cost_usd"] == pytest.approx(best["train_time_s"] / 3600 * 4)  # four GPUs paid for
    from peftplan.catalog import load_gpu, load_model
    from peftplan.planner import sharding_modelled

    if not sharding_modelled(load_model("gpt2"), load_gpu("t4"), 4):
        assert any("not modelled" in n for n in d["notes"])
    _one_line_error(run("plan", "--model", "gpt2", "--gpus", "2", "--shard", "zero4"), "unknown sharding")


def test_plan_nothing_fits_says_what_would() -> None:
    r = run("plan", "--model", "llama3.2-1b", "--gpu", "t4", "--gpu-memory", "1GiB", "--methods", "lora,qlora",
            "--ranks", "8", "--batches", "1", "--seq", "512")
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "nothing fits; least memory first" in out
    assert "Nothing fits on t4@" in out and "To make it fit: a GPU with at least" in out
    assert "it fits on the" in out  # a catalog GPU that holds the least memory-hungry configuration


@pytest.mark.parametrize("args, fragment", [
    (("--model", "gpt2", "--methods", "lorra"), "did you mean lora"),
    (("--model", "gpt-2"), "did you mean"),
    (("--model", "gpt2", "--gpu", "rtx4900"), "did you mean"),
    (("--model", "gpt2", "--tokens", "lots"), "cannot read 'lots'"),
    (("--model", "gpt2", "--tokens", "0"), "at least 1"),
    (("--model", "gpt2", "--gpus", "0"), "positive integer"),
    (("--model", "gpt2", "--price", "-1"), "--price"),
])
def test_plan_errors_are_one_line(args: tuple[str, ...], fragment: str) -> None:
    _one_line_error(run("plan", *args), fragment)


def test_parse_count() -> None:
    assert parse_count("1e8") == 100_000_000
    assert parse_count("1.5e9") == 1_500_000_000
    assert parse_count("100M") == parse_count("100m") == 100_000_000
    assert parse_count("2B") == 2_000_000_000 and parse_count("3k") == 3000 and parse_count("1_000") == 1000
    for bad in ("", "abc", "1e8x", "-5", "0.2", "inf", "nan"):
        with pytest.raises(ValueError):
            parse_count(bad)


def test_cli_startup_imports_neither_pandas_nor_plotly() -> None:
    code = ("import sys, peftplan.cli; from typer.main import get_command; g = get_command(peftplan.cli.app); "
            "[g.get_command(None, n) for n in g.list_commands(None)]; "  # every command module imported
            "bad = [m for m in ('pandas', 'plotly', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from typer.main import get_command

    from peftplan.cli import app as the_app

    group = get_command(the_app)
    names = set(group.list_commands(None))  # type: ignore[arg-type]
    assert {"compare", "plan"} <= names and group.get_command(None, "plan").name == "plan"  # type: ignore[arg-type,union-attr]
