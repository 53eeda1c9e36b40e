"""A real Hydra sweep through the `moe` CLI, then `moe sweep-report` over its trials."""

from __future__ import annotations

import json

import pytest

from experts.sweeps import collect_trials, render
from tests.conftest import run_moe as moe


@pytest.mark.integration
def test_sweep_runs_every_trial_and_reports_sorted(user_conf, tiny_app, tmp_path):
    built = moe("data", "expert=toy", "base_model=tiny")
    assert built.returncode == 0, built.stderr[-2000:]
    sweep_dir = tmp_path / "sweep"
    run = moe(
        "train",
        "-m",
        "expert=toy",
        "base_model=tiny",
        "train=tiny",
        "lora.r=2,4",
        "train.lr=1e-3,5e-3",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(trials) == 4
    for trial in trials:  # each trial writes its own adapter and metrics, not the shared expert folder
        assert (trial / "adapter_model.safetensors").exists() and (trial / "metrics.json").exists()
    assert not (tmp_path / "artifacts" / "experts" / "toy").exists()
    report = moe("sweep-report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    rows = json.loads((sweep_dir / "sweep_report.json").read_text())
    assert len(rows) == 4
    vals = [r["val_ppl"] for r in rows]
    assert vals == sorted(vals)
    assert {o for r in rows for o in r["overrides"].split() if o.startswith("lora.r=")} == {
        "lora.r=2",
        "lora.r=4",
    }


def test_report_ranks_failed_trials_last(tmp_path):
    for i, val in enumerate([None, 12.5, 9.0]):
        trial = tmp_path / str(i)
        (trial / ".hydra").mkdir(parents=True)
        (trial / ".hydra" / "overrides.yaml").write_text(f"- lora.r={i}\n")
        if val is not None:
            metrics = {
                "best_val_perplexity": val,
                "test_perplexity": {"expert": val, "base": 20.0},
                "test_ratio": val / 20,
                "steps": 4,
                "seconds": 1.0,
            }
            (trial / "metrics.json").write_text(json.dumps(metrics))
    rows = collect_trials(tmp_path)
    assert [r["trial"] for r in rows] == ["2", "1", "0"]
    table = render(rows)
    assert table.splitlines()[2].startswith("| 1 | 2 |") and "failed" in table.splitlines()[-1]
