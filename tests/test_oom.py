"""Out-of-memory step-down with the real TRL trainer on CPU.

The one stand-in: a training step raises torch.cuda.OutOfMemoryError while the per-device batch is
larger than one, as a card too small for that batch would. Everything else is the real run.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lowvram.cli import main
from lowvram.train.oom import MIN_SEQ_LEN, next_settings

pytestmark = pytest.mark.slow

SFT_ONLY = [
    "--no-export",
    "dpo.enabled=false",
    "sft.max_steps=4",
    "sft.batch_size=2",
    "sft.grad_accum=2",
    "sft.save_steps=1",
    "sft.epochs=1",
]


@pytest.fixture
def oom_above_batch_one(monkeypatch):
    """Training steps fail like a too-small card once step 2 is done, for any batch of more than one row."""
    import torch
    import transformers

    real = transformers.Trainer.training_step
    seen = []

    def step(self, model, inputs, *args, **kwargs):
        rows = inputs["input_ids"].shape[0]
        seen.append((self.state.global_step, rows))
        if rows > 1 and self.state.global_step >= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", step)
    return seen


def test_oom_steps_down_resumes_and_keeps_the_effective_batch(tiny_model_dir, tmp_path, oom_above_batch_one, capsys):
    run = tmp_path / "run"
    assert main(["run", "tiny", "--run-dir", str(run), *SFT_ONLY]) == 0
    out = capsys.readouterr().out
    assert "stepping down, batch 2 -> 1 with accumulation 2 -> 4 (same effective batch 4)" in out
    assert "resuming from checkpoint-2" in out

    steps = [json.loads(line) for line in (run / "sft" / "step_down.jsonl").read_text().splitlines()]
    assert len(steps) == 1
    assert steps[0]["from"] == {"batch_size": 2, "grad_accum": 2, "max_seq_len": 128}
    assert steps[0]["to"] == {"batch_size": 1, "grad_accum": 4} and steps[0]["resumed_from"] == "checkpoint-2"

    # The run finished with the stepped-down settings: every step after the failure saw one row,
    # and the trainer ran its 4 optimizer steps at an effective batch of 1 x 4.
    after = [rows for step, rows in oom_above_batch_one if step >= 2]
    assert after[0] == 2 and after[1:] == [1] * (2 * 4)  # the failed batch, then 2 steps x 4 micro-batches of 1
    final = json.loads((run / "sft" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert final["global_step"] == 4
    args = json.loads((run / "sft" / "train_stats.json").read_text())
    assert args["global_step"] == 4
    assert (run / "sft" / "DONE").is_file()
    memory = json.loads((run / "sft" / "memory.json").read_text())
    assert memory["batch_size"] * memory["grad_accum"] == 4 and memory["step_downs"] == 1
    assert memory["measured_peak_reserved_gib"] is None  # no CUDA here: nothing measured, and it says so


def test_oom_step_down_can_be_turned_off(tiny_model_dir, tmp_path, oom_above_batch_one, capsys):
    run = tmp_path / "run"
    assert main(["run", "tiny", "--run-dir", str(run), *SFT_ONLY, "sft.oom_step_down=false"]) == 3
    err = capsys.readouterr().err
    assert "CUDA ran out of memory in sft at batch 2" in err and "sft.batch_size=1" in err
    assert not (run / "sft" / "step_down.jsonl").exists() and not (run / "sft" / "DONE").exists()


def _sp(bs, ga, seq):
    return SimpleNamespace(batch_size=bs, grad_accum=ga, max_seq_len=seq)


def test_step_down_order_batch_first_then_sequence():
    changes, why = next_settings(_sp(8, 1, 2048))
    assert changes == {"batch_size": 4, "grad_accum": 2} and "same effective batch 8" in why
    assert next_settings(_sp(3, 2, 2048))[0] == {"batch_size": 1, "grad_accum": 6}
    assert next_settings(_sp(5, 1, 2048))[0] == {"max_seq_len": 1024}  # 5 cannot halve and keep 5: shorten
    assert next_settings(_sp(1, 8, 2048))[0] == {"max_seq_len": 1024}
    assert next_settings(_sp(2, 4, 1024), min_batch=2)[0] == {"max_seq_len": 512}  # KTO keeps two rows
    assert next_settings(_sp(1, 8, MIN_SEQ_LEN)) is None


def test_a_resumed_stage_keeps_what_an_earlier_out_of_memory_stepped_down_to(tmp_path):
    import dataclasses

    from lowvram.plan.hardware import Device
    from lowvram.plan.planner import make_plan
    from lowvram.recipe import load_recipe
    from lowvram.train.oom import run_with_step_down
    from lowvram.train.stage import StageContext

    recipe, _ = load_recipe("tiny", ["sft.batch_size=4", "sft.grad_accum=2"])
    plan = make_plan(recipe, Device("cpu", "CPU", 0, 0, None, "none"))
    ctx = StageContext(tmp_path, recipe, plan, "sft", "builtin:tiny-llama")
    ctx.stage_dir.mkdir()
    (ctx.stage_dir / "step_down.jsonl").write_text(
        json.dumps(
            {
                "step": 1,
                "from": {"batch_size": 4, "grad_accum": 2, "max_seq_len": 128},
                "to": {"batch_size": 2, "grad_accum": 4},
                "why": "",
                "resumed_from": "checkpoint-3",
            }
        )
        + "\n"
    )
    seen = []
    run_with_step_down(ctx, lambda c: seen.append(c.sp) or tmp_path)
    assert (seen[0].batch_size, seen[0].grad_accum) == (2, 4)  # same effective batch 8, the smaller split
    # Off: the plan's own settings.
    off = dataclasses.replace(
        ctx, recipe=load_recipe("tiny", ["sft.batch_size=4", "sft.grad_accum=2", "sft.oom_step_down=false"])[0]
    )
    run_with_step_down(off, lambda c: seen.append(c.sp) or tmp_path)
    assert seen[1].batch_size == 4
