"""The `moe` CLI: help text, one-line errors, Hydra overrides reach the typed config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.cli import COMMANDS, _split


def moe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_help_lists_every_command():
    out = moe("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name):
    out = moe(name, "--help")
    assert out.returncode == 0 and COMMANDS[name].summary in out.stdout


@pytest.mark.parametrize("args", [["--help"], ["route", "--help"]])
def test_output_into_a_closed_pipe_ends_quietly(args):
    """`moe --help | head`: the reader is gone before moe writes; no traceback, SIGPIPE's status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # every reader gone: each write gets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_unknown_command_is_one_line_naming_choices():
    out = moe("trian")
    assert out.returncode == 2
    assert (
        out.stderr.strip().count("\n") == 0
        and "unknown command 'trian'" in out.stderr
        and "train" in out.stderr
    )


def test_train_without_expert_is_one_clear_line():
    out = moe("train", "paths.artifacts=/tmp/moe-cli-test")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "error: say which expert to train" in out.stderr and "biomedical" in out.stderr


def test_bad_override_value_is_reported_without_traceback():
    out = moe("fetch-model", "lora.r=0", "paths.artifacts=/tmp/moe-cli-test")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "lora.r 0 must be > 0" in out.stderr


def test_cfg_job_prints_overridden_config():
    out = moe("train", "expert=legal", "lora.r=4", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "r: 4" in out.stdout and "name: legal" in out.stdout


def test_positional_split_keeps_free_text_apart_from_overrides():
    cmd = COMMANDS["route"]
    overrides, texts = _split(cmd, ["router=embed", "what is x=5", "-m", "--", "router.c=2"])
    assert overrides == ["router=embed", "-m"]
    assert texts == ["what is x=5", "router.c=2"]


def test_every_config_field_is_an_override_on_positional_commands():
    """The keys `moe route` takes as overrides come from AppConfig itself, so a new field works."""
    import dataclasses

    from experts.config import AppConfig

    names = [f.name for f in dataclasses.fields(AppConfig)]
    overrides, texts = _split(
        COMMANDS["route"], [f"{n}.x=1" for n in names] + ["all_experts=true", "nokey.x=1"]
    )
    assert overrides == [f"{n}.x=1" for n in names] + ["all_experts=true"] and texts == ["nokey.x=1"]


def test_train_expert_all_trains_every_configured_expert(user_conf, tmp_path):
    """`moe train expert=all` (the README's command) trains each expert of `experts=[...]`."""
    from tests.conftest import run_moe, write_toy_folder

    write_toy_folder(tmp_path / "moon_texts", seed=1, words=("moon", "crater", "tide", "orbit", "regolith"))
    (user_conf / "expert" / "moon.yaml").write_text(
        (user_conf / "expert" / "toy.yaml")
        .read_text()
        .replace("name: toy", "name: moon")
        .replace(str(tmp_path / "toy_texts"), str(tmp_path / "moon_texts"))
    )
    base = ["base_model=tiny", "train=tiny", "experts=[toy,moon]"]
    assert run_moe("data", "expert=all", *base).returncode == 0
    out = run_moe("train", "expert=all", *base)
    assert out.returncode == 0, out.stderr
    for name in ("toy", "moon"):
        assert (tmp_path / "artifacts" / "experts" / name / "adapter_model.safetensors").exists(), name
