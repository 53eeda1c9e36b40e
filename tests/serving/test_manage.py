"""`moe add-expert` validates the one YAML file before any work starts."""

from __future__ import annotations

import pytest

from experts.config import compose
from experts.errors import ConfigError, DataError
from serving.manage import validate_new_expert


def write_expert(conf, slug: str, body: str) -> None:
    (conf / "expert" / f"{slug}.yaml").write_text("# @package _global_\nexpert:\n" + body)


def test_valid_user_expert_passes(user_conf):
    spec = validate_new_expert("toy", compose())
    assert spec.name == "toy" and spec.data.source == "folder"


@pytest.mark.parametrize(
    "slug,body,error,match",
    [
        ("nofile", None, ConfigError, r"no .*nofile\.yaml; write it first"),
        ("typo", "  name: typo\n  description: d\n  dta: {}\n", ConfigError, r"unknown key\(s\) \['dta'\]"),
        (
            "mismatch",
            "  name: other\n  description: d\n  data: {source: folder, path: /tmp}\n",
            ConfigError,
            "does not match its file name",
        ),
        (
            "nodata",
            "  name: nodata\n  description: d\n  data: {source: folder, path: /nonexistent/x}\n",
            DataError,
            "does not exist",
        ),
        (
            "nopath",
            "  name: nopath\n  description: d\n  data: {source: jsonl}\n",
            ConfigError,
            "needs data.path",
        ),
    ],
)
def test_bad_expert_files_fail_before_any_work(user_conf, slug, body, error, match):
    if body is not None:
        write_expert(user_conf, slug, body)
    with pytest.raises(error, match=match):
        validate_new_expert(slug, compose())


def test_existing_expert_needs_force(user_conf, tmp_path):
    app = compose()
    folder = app.paths.expert_dir("toy")
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already exists"):
        validate_new_expert("toy", app)
    assert validate_new_expert("toy", app, force=True).name == "toy"
