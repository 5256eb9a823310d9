"""`peftplan models`: readable at 80 columns, names never cut, a filter, MoE active parameters; and the
issue's commands for the new families (estimate, compare)."""

import pytest
from typer.testing import CliRunner

from peftplan.catalog import model_names
from peftplan.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "80"})


def test_models_fit_80_columns_with_full_names():
    r = run("models")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in r.output
    names = {line.split()[0] for line in lines if line.strip()}
    assert set(model_names()) <= names  # every catalog name printed whole
    mixtral = next(line for line in lines if line.startswith("mixtral-8x7b "))
    assert "46.70B" in mixtral and "12.88B" in mixtral  # total and active


def test_models_filter_and_hub_ids():
    r = run("models", "qwen3")
    assert r.exit_code == 0, r.output
    listed = {line.split()[0] for line in r.output.splitlines() if line.startswith("qwen")}
    assert listed == {n for n in model_names() if n.startswith("qwen3")}
    assert "gemma" not in r.output
    r = run("models", "moe", "--hub")  # by model_type, with hub ids
    assert r.exit_code == 0 and "Qwen/Qwen3-30B-A3B" in r.output


def test_models_filter_without_match_is_a_one_line_error():
    r = run("models", "no-such-model-xyz")
    assert r.exit_code == 2 and "no catalog model matches" in r.output


@pytest.mark.parametrize("args", [
    ("--model", "qwen3-30b-a3b", "--method", "qlora", "--gpu", "rtx4090", "--targets", "all-linear"),
    ("--model", "gpt-oss-20b", "--method", "lora", "--gpu", "h100", "--targets", "all-linear"),
    ("--model", "Qwen/Qwen3-8B", "--method", "lora", "--gpu", "h100"),  # hub id resolves offline
])
def test_issue_estimates_run(args):
    r = run("estimate", *args)
    assert r.exit_code == 0, r.output
    assert "peak allocated" in r.output


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gpt-oss-20b"])
def test_moe_without_targets_says_what_peft_does(model):
    """peft has no usable default target modules here (a LoraConfig without them raises): the estimate says so
    and uses all-linear, instead of refusing (estimate.py build_tuned)."""
    r = run("estimate", "--model", model, "--method", "lora", "--gpu", "h100")
    assert r.exit_code == 0, r.output
    assert "no default lora target modules" in " ".join(r.output.split()) and "all-linear" in r.output


def test_compare_new_models_renders():
    r = run("compare", "--models", "qwen3-8b,gemma3-4b,llama3.1-8b", "--methods", "lora,qlora", "--gpus", "a100-80g",
            "--seq", "1024", "--batch", "1")
    assert r.exit_code == 0, r.output
    for name in ("qwen3-8b", "gemma3-4b", "llama3.1-8b"):
        assert name in r.output
