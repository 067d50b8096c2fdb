"""Nothing non-finite is trained on, checkpointed or saved: recipes refuse inf/NaN, a diverging stage stops."""

from __future__ import annotations

import json

import pytest

from lowvram.cli import main
from lowvram.errors import UserError
from lowvram.recipe import load_recipe


def test_recipe_refuses_non_finite_numbers():
    with pytest.raises(UserError) as e:
        load_recipe("tiny", ["dpo.beta=.inf", "sft.learning_rate=.nan", "sft.weight_decay=1e400"])
    text = e.value.render()
    assert "3 problems" in text
    for key in (
        "dpo.beta: must be a finite number, got inf",
        "sft.learning_rate: must be a finite number, got nan",
        "sft.weight_decay: must be a finite number, got inf",
    ):
        assert key in text, text


def test_run_with_an_infinite_beta_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "tiny", "--run-dir", str(run), "dpo.beta=.inf"]) == 2
    err = capsys.readouterr().err
    assert "dpo.beta: must be a finite number" in err and not run.exists()


@pytest.mark.slow
def test_a_diverging_stage_stops_and_saves_nothing_non_finite(tiny_model_dir, tmp_path, capsys):
    """beta=1e30 is finite but makes DPO's gradient infinite at the first step; the weights would turn NaN."""
    from lowvram.model.adapters import nonfinite_tensors

    run = tmp_path / "run"
    rc = main(
        [
            "run",
            "tiny",
            "--run-dir",
            str(run),
            "--no-export",
            "sft.enabled=false",
            "dpo.beta=1e30",
            "dpo.max_steps=3",
            "dpo.save_steps=1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "dpo diverged at step 1" in err and "grad_norm=inf" in err and "Traceback" not in err
    assert "Lower dpo.learning_rate" in err and "dpo.beta=1e+30 is large" in err
    assert f"lowvram run --resume {run} dpo.learning_rate=" in err
    assert not (run / "dpo" / "DONE").exists() and not (run / "dpo" / "adapter").exists()
    for ckpt in (run / "dpo" / "checkpoints").glob("checkpoint-*"):  # none, or only finite ones
        assert nonfinite_tensors(ckpt / "adapter_model.safetensors") == [], ckpt
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 1  # stopped at the first non-finite metric
