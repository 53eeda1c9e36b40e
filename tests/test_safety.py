"""The files we load and the config we compose cannot run code (issue #10).

Adapters load only from safetensors, routers only from their JSON + safetensors format (a pickle
beside or instead of them is never opened), `trust_remote_code` is off at every Hugging Face load and
no config can turn it on, and config instantiates nothing: a Hydra `_target_` anywhere in our config
is an unknown key. Each "evil" file below would create a marker file if it were ever executed.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest

from experts.errors import ArtifactError, ConfigError

PACKAGES = [Path(__file__).resolve().parents[1] / name for name in ("experts", "router", "serving")]


class _Evil:
    """Unpickling this touches `marker`: proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_Evil(marker)))
    return path


def _sources() -> list[Path]:
    return [p for package in PACKAGES for p in sorted(package.rglob("*.py"))]


# --------------------------------------------------------------------------------------------
# Adapters: safetensors only
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tiny_app):
    from experts.adapters import ExpertPool

    return ExpertPool.load(tiny_app, names=[], device="cpu", precision="fp32")


def test_a_pickled_adapter_is_refused_unopened(pool, tiny_app, tmp_path):
    from tests.experts.test_adapters import make_adapter

    folder, marker = tmp_path / "legal", tmp_path / "UNPICKLED"
    make_adapter(tiny_app, folder, seed=0)
    (folder / "adapter_model.safetensors").unlink()
    evil_pickle(folder / "adapter_model.bin", marker)
    with pytest.raises(ArtifactError, match=r"expert 'legal': missing .*adapter_model.safetensors.*pickled"):
        pool.add("legal", folder)
    assert "legal" not in pool.adapters and not marker.exists()


def test_a_pickle_beside_the_safetensors_is_never_read(pool, tiny_app, tmp_path):
    from tests.experts.test_adapters import make_adapter

    folder, marker = tmp_path / "legal", tmp_path / "UNPICKLED"
    make_adapter(tiny_app, folder, seed=0)
    evil_pickle(folder / "adapter_model.bin", marker)
    evil_pickle(folder / "training_args.bin", marker)
    pool.add("legal", folder)
    assert "legal" in pool.adapters and not marker.exists()


def test_safetensors_without_lora_weights_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from experts.adapters import check_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ArtifactError, match="expert 'x': .*holds no LoRA weights"):
        check_adapter("x", tmp_path)


# --------------------------------------------------------------------------------------------
# Routers: router.json + router.safetensors only
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def router_folder(tmp_path_factory):
    from router.features import TfidfFeatures
    from router.train import fit_router
    from tests.router.conftest import LABELS, TOY_SPEC, make_examples

    router, _ = fit_router(
        list(LABELS), make_examples(60, seed=0), make_examples(20, seed=1), TOY_SPEC, TfidfFeatures()
    )
    folder = tmp_path_factory.mktemp("router") / "router"
    router.save(folder)
    return folder


@pytest.mark.parametrize("name", ["router.joblib", "router.pkl", "model.pickle"])
def test_a_router_folder_holding_a_pickle_is_refused_unopened(tmp_path, name):
    from router.model import Router

    marker = tmp_path / "UNPICKLED"
    (tmp_path / "router").mkdir()
    evil_pickle(tmp_path / "router" / name, marker)
    with pytest.raises(ArtifactError, match="no trained router in .*router; run `moe train-router`"):
        Router.load(tmp_path / "router")
    assert not marker.exists()


def test_a_pickle_beside_a_router_is_never_read(router_folder, tmp_path):
    from router.model import Router

    folder, marker = tmp_path / "router", tmp_path / "UNPICKLED"
    shutil.copytree(router_folder, folder)
    for name in ("router.joblib", "features.pkl"):
        evil_pickle(folder / name, marker)
    assert Router.load(folder).decide(["copyright licence terms"])[0].expert == "legal"
    assert not marker.exists()


@pytest.mark.parametrize("pipeline", ["pickle", "os.system", "joblib:load"])
def test_a_router_naming_code_as_its_pipeline_is_refused(router_folder, tmp_path, pipeline):
    from router.model import Router

    folder = tmp_path / "router"
    shutil.copytree(router_folder, folder)
    meta = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**meta, "pipeline": pipeline}))
    with pytest.raises(ArtifactError, match=f"router pipeline {pipeline!r} is unknown"):
        Router.load(folder)


# --------------------------------------------------------------------------------------------
# trust_remote_code: off everywhere, and no config turns it on
# --------------------------------------------------------------------------------------------
def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                found.append((path, node))
    return found


def test_every_transformers_load_passes_trust_remote_code_false():
    loads = [
        (path, call)
        for path, call in _calls("from_pretrained")
        if not (isinstance(call.func.value, ast.Name) and call.func.value.id == "PeftModel")  # no such flag
    ]
    assert len(loads) >= 5  # tokenizer and model loads in experts/ and router/
    for path, call in loads:
        flags = {k.arg: k.value for k in call.keywords}
        where = f"{path.name}:{call.lineno}"
        assert "trust_remote_code" in flags, f"{where} loads without trust_remote_code=False"
        value = flags["trust_remote_code"]
        assert isinstance(value, ast.Constant) and value.value is False, (
            f"{where} trust_remote_code is not False"
        )
    for path in _sources():
        assert "trust_remote_code=True" not in path.read_text().replace(" ", ""), path


def test_config_cannot_ask_for_remote_code(tmp_path):
    from experts.config import compose, load_expert_file

    for override in ("+base_model.trust_remote_code=true", "+router.trust_remote_code=true"):
        with pytest.raises(ConfigError, match="unknown key.*trust_remote_code"):
            compose(["base_model=tiny", override])
    path = tmp_path / "legal.yaml"
    path.write_text("expert:\n  name: legal\n  trust_remote_code: true\n  data: {source: folder, path: /x}\n")
    with pytest.raises(ConfigError, match="unknown key.*trust_remote_code"):
        load_expert_file(path)


def test_a_model_folder_asking_for_remote_code_never_runs_it(tiny_app, tmp_path):
    """A local model folder whose config maps the Auto classes to its own Python file: the code is
    never imported (transformers uses its own Llama class or refuses)."""
    from experts.base_model import ensure_base_model, load_base_model, load_tokenizer
    from experts.config import compose

    folder, marker = tmp_path / "model", tmp_path / "IMPORTED"
    shutil.copytree(ensure_base_model(tiny_app.base_model, tiny_app.paths), folder)
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    app = compose(["base_model=local", f"base_model.path={folder}"])
    try:
        model = load_base_model(app.base_model, app.paths)
        assert type(model).__name__ == "LlamaForCausalLM"
        load_tokenizer(app.base_model, app.paths)
    except ValueError as exc:  # refusing is as good as ignoring
        assert "trust_remote_code" in str(exc)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Config instantiates nothing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "+_target_=os.system",
        "+router._target_=os.system",
        "+serve._target_=builtins.exec",
        "+train._target_=os.system",
    ],
)
def test_a_hydra_target_in_config_is_refused(override):
    from experts.config import compose

    with pytest.raises(ConfigError, match="unknown key.*_target_"):
        compose(["base_model=tiny", override])


def test_a_hydra_target_in_an_expert_file_is_refused(tmp_path):
    from experts.config import load_expert_file

    nested = tmp_path / "legal.yaml"
    nested.write_text("expert:\n  name: legal\n  _target_: os.system\n  data: {source: folder, path: /x}\n")
    with pytest.raises(ConfigError, match="unknown key.*_target_"):
        load_expert_file(nested)
    top = tmp_path / "biomedical.yaml"
    top.write_text("_target_: os.system\nexpert:\n  name: biomedical\n  data: {source: folder, path: /x}\n")
    with pytest.raises(ConfigError, match="unknown top-level key.*_target_"):
        load_expert_file(top)


def test_pluggable_pieces_are_looked_up_by_name_not_imported():
    from experts.data.readers import get_reader
    from serving.cli import COMMANDS

    for name in ("os.system", "builtins:exec", "../evil"):
        with pytest.raises(ConfigError, match="unknown data.source"):
            get_reader(name)
    # the CLI resolves `module:function` from its own fixed table only, all in this project
    assert all(cmd.target.split(".")[0] in {"experts", "router", "serving"} for cmd in COMMANDS.values())


def test_no_code_path_instantiates_from_config_or_unpickles():
    banned = ("hydra.utils", "instantiate(", "get_class(", "get_method(", "import pickle", "import joblib")
    banned += ("from joblib", "torch.load(", "weights_only=False")
    for path in _sources():
        source = path.read_text()
        for word in banned:
            assert word not in source, f"{path.name} uses {word}"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "__import__"), f"{path.name}:{node.lineno}"


def test_only_hydra_plugin_config_names_a_target():
    """conf/hydra/ configures Hydra's own sweeper (`moe ... -m`); nothing else in conf/ has a `_target_`."""
    conf = PACKAGES[0].parent / "conf"
    for path in conf.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.strip().startswith("_target_:"):
                assert path.relative_to(conf).parts[0] == "hydra", path
                assert line.split(":", 1)[1].strip().startswith(("hydra_plugins.", "optuna.")), line
