"""Training with the real TRL trainers on the built-in tiny Llama (CPU, offline)."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowvram.cli import main

pytestmark = pytest.mark.slow

QUICK = ["sft.epochs=1", "dpo.epochs=1", "rm.enabled=false", "eval.enabled=false"]  # rm, eval: tests/test_evaluate.py


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "tiny", "--run-dir", str(run), *QUICK])
    (run.parent / "stdout.txt").write_text(out.getvalue())
    assert code == 0, out.getvalue()
    return run


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_run_directory_has_everything_export_needs(demo_run):
    for rel in (
        "recipe.yaml",
        "plan.json",
        "base.json",
        "tokenizer/tokenizer_config.json",
        "metrics.jsonl",
        "summary.json",
        "sft/adapter/adapter_config.json",
        "sft/DONE",
        "dpo/adapter/adapter_config.json",
        "dpo/DONE",
        "plots/loss.png",
        "plots/reward_margin.png",
        "plots/preference_accuracy.png",
        "plots/rewards_chosen_rejected.png",
    ):
        assert (demo_run / rel).exists(), rel
    for t in ("f16", "q8_0", "q4_k_m"):  # `lowvram run` ends with the recipe's GGUF export
        assert (demo_run / "export" / f"tiny-{t}.gguf").is_file(), t
        assert "TEMPLATE" in (demo_run / "export" / f"tiny-{t}.Modelfile").read_text()
    base = json.loads((demo_run / "base.json").read_text())
    assert base["model"] == "builtin:tiny-llama" and Path(base["model_path"]).is_dir()
    rows = [json.loads(x) for x in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"sft", "dpo"}
    assert any("tokens_per_s" in r for r in rows)


def test_progress_off_a_terminal_is_one_plain_line_per_logged_step(demo_run):
    """The run's real output, not to a terminal: every logged step is one line with the stage's key metrics and
    ETA, in the order the metrics log has them, with nothing only a terminal would read (no \\r, no ANSI)."""
    import importlib.util
    import re

    out = (demo_run.parent / "stdout.txt").read_text()
    assert "\r" not in out and "\x1b" not in out
    rows = [json.loads(x) for x in (demo_run / "metrics.jsonl").read_text().splitlines()]
    metrics = {
        "sft": r"loss \d+\.\d{3}  tok_acc \d\.\d\d",
        "dpo": r"loss \d+\.\d{3}  pref_acc \d\.\d\d  margin [+-]\d+\.\d{3}",
    }
    for stage, shown in metrics.items():
        logged = [r["step"] for r in rows if r["stage"] == stage and "loss" in r and "eval" not in r]
        lines = re.findall(rf"^\[{stage}\] step (\d+)/\d+  {shown}(?:  [\d,]+ tok/s)?  ETA \d+:\d\d$", out, re.M)
        assert logged and [int(s) for s in lines] == logged, out[-3000:]
    assert re.search(r"^\[dpo held-out eval\] before training  pref_acc \d\.\d\d  margin [+-]", out, re.M)
    if importlib.util.find_spec("xllamacpp"):  # the export verifies in llama.cpp: its table, as plain columns
        assert re.search(r"^type +size .*\n-{4,}", out, re.M)


def test_lora_weights_move_and_only_lora_is_trainable(demo_run, tiny_model_dir):
    from lowvram.model import hf_backend
    from lowvram.plan.hardware import Device
    from lowvram.plan.planner import make_plan
    from lowvram.recipe import load_recipe
    from lowvram.train.common import StageContext

    recipe, _ = load_recipe("tiny")
    plan = make_plan(recipe, Device("cpu", "CPU", 0, 0, None, "none"))
    ctx = StageContext(demo_run, recipe, plan, "sft", str(tiny_model_dir))
    fresh = hf_backend.add_adapter(hf_backend.load_base(ctx)[0], ctx)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen

    sft, dpo = _tensors(demo_run / "sft" / "adapter"), _tensors(demo_run / "dpo" / "adapter")
    assert set(sft) == set(dpo) and all("lora_" in k for k in sft)  # no base weight was saved
    lora_b = [k for k in sft if "lora_B" in k]
    assert lora_b and all(sft[k].abs().max() > 0 for k in lora_b)  # B starts at zero: SFT moved it
    assert any((sft[k] - dpo[k]).abs().max() > 0 for k in sft)  # DPO moved the same adapter further


def test_sft_loss_falls_and_dpo_improves_heldout_preferences(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["sft"]["loss_end"] < summary["sft"]["loss_start"]
    dpo = summary["dpo"]
    assert dpo["heldout_after"]["reward_accuracy"] > dpo["heldout_before"]["reward_accuracy"]
    assert dpo["heldout_after"]["reward_margin"] > 0


def test_dpo_reference_is_the_sft_policy(demo_run, tiny_model_dir):
    """At step 0 the policy and reference agree (margin 0), and that policy is the SFT model, not the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = json.loads((demo_run / "dpo" / "eval_before.json").read_text())
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert before["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert before["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)

    tok = AutoTokenizer.from_pretrained(str(demo_run / "tokenizer"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    sft = PeftModel.from_pretrained(base, str(demo_run / "sft" / "adapter"))
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        with_adapter = sft(ids).logits
        with sft.disable_adapter():
            without = sft(ids).logits
    assert (with_adapter - without).abs().max() > 1e-3  # had the reference been the base, margins would not start at 0


def test_dpo_reference_is_checked_and_only_the_policy_is_saved(demo_run):
    """lowvram checked that TRL's reference is a frozen copy of the SFT adapter and the rewards start at 0."""
    out = (demo_run.parent / "stdout.txt").read_text()
    assert f"[dpo] reference: a frozen copy of the SFT adapter ({demo_run / 'sft' / 'adapter'})" in out
    assert (
        "[dpo] reference: at step 0 the policy equals its reference: chosen +0.0000, rejected +0.0000, "
        "margins +0.0000" in out
    )
    adapter = demo_run / "dpo" / "adapter"
    assert not (adapter / "ref").exists() and sorted(p.name for p in adapter.iterdir() if p.is_dir()) == []
    assert json.loads((adapter / "adapter_config.json").read_text())["inference_mode"] is True


def test_reference_check_stops_a_reference_that_is_not_the_sft_policy(tiny_model_dir, tmp_path):
    """Real PEFT models: no ref adapter, a trainable one, or one that differs from the SFT adapter all stop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lowvram.model.adapters import BadReference, check_reference, check_start_rewards

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), lora())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained SFT adapter
    model.save_pretrained(str(tmp_path / "sft"))
    with pytest.raises(BadReference, match="no frozen reference adapter"):
        check_reference(model, tmp_path / "sft")

    model.add_adapter("ref", lora())  # as TRL does: a copy of the policy, frozen
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n:
                model.get_parameter(n.replace(".default.", ".ref.")).copy_(p)
    assert "a frozen copy of the SFT adapter" in check_reference(model, tmp_path / "sft")

    ref_b = next(p for n, p in model.named_parameters() if ".ref." in n and "lora_B" in n)
    ref_b.requires_grad_(True)
    with pytest.raises(BadReference, match="being trained"):
        check_reference(model, tmp_path / "sft")
    ref_b.requires_grad_(False)
    with torch.no_grad():
        ref_b.zero_()  # a reference that is the base model, not the SFT policy
    with pytest.raises(BadReference, match="differs from the policy"):
        check_reference(model, tmp_path / "sft")

    assert "margins +0.0000" in check_start_rewards({"rewards/margins": 0.0})
    with pytest.raises(BadReference, match="margins \\+0.3000"):
        check_start_rewards({"rewards/chosen": 0.1, "rewards/rejected": -0.2, "rewards/margins": 0.3})


def test_sft_model_is_freed_before_dpo_loads(tiny_model_dir, tmp_path, monkeypatch):
    """Two stages in one process: the SFT model's weights are freed before DPO loads its model.

    The model, trainer and optimizer objects go with their last reference, but their modules form
    reference cycles that keep the weights (on a GPU: its memory) until the garbage collector runs.
    """
    import weakref

    from lowvram.train import stage as train

    loaded, alive_when_dpo_loads = [], []
    real_load = train.load_model

    def load_model(ctx, adapter):
        if ctx.stage == "dpo":
            alive_when_dpo_loads.extend(ref() is not None for ref in loaded)
        model, tok = real_load(ctx, adapter)
        params = dict(model.named_parameters())  # the tensors that hold (GPU) memory, base and LoRA
        loaded.extend(
            weakref.ref(params[n])
            for n in (next(n for n in params if "lora_" not in n), next(n for n in params if "lora_B" in n))
        )
        return model, tok

    monkeypatch.setattr(train, "load_model", load_model)
    gc.disable()  # as when the collector has not happened to run yet: only lowvram's own cleanup frees cycles
    try:
        assert (
            main(
                [
                    "run",
                    "tiny",
                    "--run-dir",
                    str(tmp_path / "r"),
                    "--no-export",
                    "sft.max_steps=2",
                    "dpo.max_steps=1",
                    "rm.enabled=false",
                    "eval.enabled=false",
                ]
            )
            == 0
        )
    finally:
        gc.enable()
    assert alive_when_dpo_loads == [False, False]


def test_invalid_recipe_is_rejected_before_anything_loads(tmp_path, capsys):
    run = tmp_path / "never"
    assert main(["run", "tiny", "--run-dir", str(run), "sft.learning_rate=-1", "dpo.loss_type=sigmod"]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and not run.exists()


def test_bad_data_is_rejected_before_the_model_loads(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n'
    )
    run = tmp_path / "run"
    code = main(
        ["run", "tiny", "--run-dir", str(run), "use_samples=false", f"sft.data.path={bad}", "dpo.enabled=false"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
    assert not (run / "sft" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["sft.enabled=false", "dpo.loss_type=ipo", "dpo.max_steps=2"],
        ["sft.enabled=false", "dpo.loss_type=hinge", "dpo.max_steps=2"],
        ["sft.enabled=false", "dpo.method=kto", "dpo.max_steps=2"],
    ],
)
def test_dpo_loss_variants_run(tiny_model_dir, tmp_path, overrides, capsys):
    assert (
        main(
            [
                "run",
                "tiny",
                "--run-dir",
                str(tmp_path / "r"),
                "--no-export",
                *overrides,
                "rm.enabled=false",
                "eval.enabled=false",
            ]
        )
        == 0
    )
    assert (tmp_path / "r" / "dpo" / "DONE").is_file()
    assert not (tmp_path / "r" / "dpo" / "adapter" / "ref").exists()
    out = capsys.readouterr().out
    assert "[dpo] reference: a frozen copy of a fresh adapter (the base model)" in out
    assert "[dpo] reference: at step 0 the policy equals its reference: chosen +0.0000, rejected +0.0000" in out


def test_orpo_single_stage_recipe_runs(tiny_model_dir, tmp_path, capsys):
    args = [
        "run",
        "orpo-tight",
        "--run-dir",
        str(tmp_path / "orpo"),
        "--no-export",
        "use_samples=true",
        "model.name=builtin:tiny-llama",
        "dpo.max_steps=3",
        "dpo.batch_size=4",
        "dpo.grad_accum=1",
    ]
    assert main(args) == 0
    assert (tmp_path / "orpo" / "dpo" / "adapter" / "adapter_config.json").is_file()
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dpo] step ")]
    assert len(steps) == 3 and all(" pref_acc " in line and " margin " in line for line in steps), steps  # ORPO's too
    assert not (tmp_path / "orpo" / "sft").exists()


def _spawn(args, env_extra=None, terminal=False):
    """`lowvram ARGS` in a child process. `terminal`: its stdout is a pseudo-terminal (so lowvram draws with rich),
    read in the background; `proc.terminal_output()` returns what it showed."""
    env = {**os.environ, **(env_extra or {})}
    if not terminal:
        return subprocess.Popen(
            [sys.executable, "-m", "lowvram", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    import threading

    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowvram", *args],
        stdout=follower,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "TERM": "xterm", "COLUMNS": "120"},
    )
    os.close(follower)
    chunks: list[bytes] = []

    def drain():
        try:
            while data := os.read(leader, 65536):
                chunks.append(data)
        except OSError:  # EIO: the child has exited
            pass
        finally:
            os.close(leader)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def terminal_output(wait=True) -> str:
        """What the terminal showed: once the process has ended, or (`wait=False`) so far."""
        if wait:
            reader.join(30)
        return b"".join(chunks).decode(errors="replace")

    proc.terminal_output = terminal_output
    return proc


def _wait_for_checkpoint(ckpt_dir: Path, proc, timeout_s=120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if any((p / "trainer_state.json").is_file() for p in ckpt_dir.glob("checkpoint-*")):
            return
        if proc.poll() is not None:
            raise AssertionError("training ended before a checkpoint: " + proc.stderr.read())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


LONG_SFT = ["--no-export", "dpo.enabled=false", "sft.epochs=100", "sft.save_steps=5"]


def _sft_steps(run: Path) -> list[int]:
    """The training steps logged in metrics.jsonl, in file order (a line cut short by a kill is skipped)."""
    steps = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("stage") == "sft" and "loss" in r and "eval" not in r:
            steps.append(r["step"])
    return steps


def test_killed_run_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    run = tmp_path / "killed"
    env = {"LOWVRAM_CACHE": os.environ["LOWVRAM_CACHE"]}
    proc = _spawn(["run", "tiny", "--run-dir", str(run), *LONG_SFT], env)
    _wait_for_checkpoint(run / "sft" / "checkpoints", proc)
    from lowvram.train.stage import latest_checkpoint

    ckpt_step = int(latest_checkpoint(run / "sft" / "checkpoints").name.split("-")[1])
    while max(_sft_steps(run), default=0) <= ckpt_step + 1 and proc.poll() is None:
        time.sleep(0.05)  # kill it once steps after the checkpoint are logged: they will be trained again
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt_step = int(latest_checkpoint(run / "sft" / "checkpoints").name.split("-")[1])
    assert max(_sft_steps(run)) > ckpt_step

    res = subprocess.run(
        [sys.executable, "-m", "lowvram", "run", "--resume", str(run), "--no-export", f"sft.max_steps={ckpt_step + 3}"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert res.returncode == 0, res.stderr
    assert f"resuming from checkpoint-{ckpt_step}" in res.stdout
    # each step once: the lines logged after the checkpoint by the killed process are superseded
    assert _sft_steps(run) == list(range(1, ckpt_step + 4))
    assert json.loads((run / "sft" / "DONE").read_text())["global_step"] == ckpt_step + 3

    again = subprocess.run(
        [sys.executable, "-m", "lowvram", "run", "--resume", str(run), "--no-export"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert again.returncode == 0 and "[sft] already done, skipping" in again.stdout


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path):
    run = tmp_path / "interrupted"
    proc = _spawn(["run", "tiny", "--run-dir", str(run), *LONG_SFT], {"LOWVRAM_CACHE": os.environ["LOWVRAM_CACHE"]})
    _wait_for_checkpoint(run / "sft" / "checkpoints", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"lowvram run --resume {run}" in err and "Traceback" not in err
    assert "pip install kernels" not in err  # bitsandbytes' notice on a CPU with AVX512-BF16 (this CI's): not ours
    from lowvram.train.stage import latest_checkpoint

    state = json.loads((latest_checkpoint(run / "sft" / "checkpoints") / "trainer_state.json").read_text())
    stopped_at = int(err.split("at step ")[1].split(";")[0])
    assert state["global_step"] == stopped_at  # the checkpoint is the step we stopped at


def test_second_ctrl_c_stops_at_once_and_names_the_newest_checkpoint(tiny_model_dir, tmp_path):
    """In a terminal: the progress bar that the interrupt leaves live is closed, the cursor shown again."""
    run = tmp_path / "twice"
    proc = _spawn(
        ["run", "tiny", "--run-dir", str(run), *LONG_SFT], {"LOWVRAM_CACHE": os.environ["LOWVRAM_CACHE"]}, terminal=True
    )
    _wait_for_checkpoint(run / "sft" / "checkpoints", proc)
    proc.send_signal(signal.SIGINT)
    # the second Ctrl-C only once the first has been handled: two signals that arrive while the main thread is in
    # one C call (a tensor op, a file write) reach Python's handler as one, as they would for a user
    # (in a terminal the message goes where the live bar is drawn: rich redirects stderr while a bar is live)
    while "Ctrl-C again to stop now" not in proc.terminal_output(wait=False):
        assert proc.poll() is None, proc.stderr.read()  # the child ended without handling the first Ctrl-C
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    from lowvram.train.stage import latest_checkpoint

    newest = latest_checkpoint(run / "sft" / "checkpoints")
    assert f"The newest complete checkpoint is {newest}" in err, err
    assert f"Resume with: lowvram run --resume {run}" in err
    shown = proc.terminal_output()
    assert "\x1b[?25l" in shown and "━" in shown and "[sft]" in shown  # rich's bar, cursor hidden while live
    assert shown.rfind("\x1b[?25h") > shown.rfind("━"), shown[-500:]  # shown again after the last bar: closed
    assert "The newest complete checkpoint" not in shown  # the error went to stderr, not into the bar


def test_out_of_memory_message_names_the_setting_and_a_value(tmp_path):
    from lowvram.plan.hardware import known_card
    from lowvram.plan.planner import make_plan
    from lowvram.recipe import load_recipe
    from lowvram.train.common import StageContext, oom_message

    recipe, _ = load_recipe("chat-assistant", ["sft.batch_size=4", "sft.grad_accum=2"])
    plan = make_plan(recipe, known_card("t4"))
    err = oom_message(StageContext(tmp_path, recipe, plan, "sft", "unused"))
    text = err.render()
    assert err.exit_code == 3
    assert "sft.batch_size to 2" in text and "sft.grad_accum=4" in text and "same effective batch 8" in text
    assert f"lowvram run --resume {tmp_path} sft.batch_size=2 sft.grad_accum=4" in text

    recipe, _ = load_recipe("chat-assistant", ["dpo.batch_size=1"])
    plan = make_plan(recipe, known_card("t4"))
    seq = plan.stages["dpo"].max_seq_len
    text = oom_message(StageContext(tmp_path, recipe, plan, "dpo", "unused")).render()
    assert f"dpo.max_seq_len from {seq} to {seq // 2}" in text


def _wait_for_step(ckpt_dir: Path, proc, step: int, timeout_s=300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if any(
            int(p.name.split("-")[1]) >= step and (p / "trainer_state.json").is_file()
            for p in ckpt_dir.glob("checkpoint-*")
        ):
            return
        if proc.poll() is not None:
            raise AssertionError("training ended before the checkpoint: " + proc.stderr.read())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} appeared")


def _margins(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["rewards/margins"] for r in rows if r.get("stage") == "dpo" and "rewards/margins" in r}


def test_killed_dpo_resumes_with_the_checkpoint_policy(tiny_model_dir, tmp_path, monkeypatch):
    """kill -9 during DPO, resume: the policy adapter is the checkpoint's, and the margin curve goes on.

    transformers 5.17 (what Unsloth pins) reloads only the checkpoint's `ref/` subfolder adapter on
    resume, so the policy silently restarted from the SFT adapter (margin back to 0) before lowvram
    loaded it itself. The GPU-versions CI leg (make test-gpu-versions) runs this under 5.17.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from lowvram.train import stage as train

    run = tmp_path / "dpo-killed"
    proc = _spawn(
        [
            "run",
            "tiny",
            "--run-dir",
            str(run),
            "--no-export",
            "sft.max_steps=6",
            "dpo.epochs=100",
            "dpo.save_steps=5",
            "dpo.learning_rate=1e-3",
            "rm.enabled=false",
            "eval.enabled=false",
        ],
        {"LOWVRAM_CACHE": os.environ["LOWVRAM_CACHE"]},
    )
    _wait_for_step(run / "dpo" / "checkpoints", proc, 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = train.latest_checkpoint(run / "dpo" / "checkpoints")
    step = int(ckpt.name.split("-")[1])
    before = _margins(run)
    trained = sum(before[s] for s in range(step - 3, step + 1)) / 4  # the curve just before the checkpoint
    assert trained > 0.1, before  # DPO moved the policy away from its reference

    at_resume = {}
    real_callback = train.make_callback

    def spying_callback(stage, metrics_path):
        cb = real_callback(stage, metrics_path)
        begin = cb.on_train_begin

        def on_train_begin(args, state, control, model=None, **kw):  # after the Trainer loaded the checkpoint
            if stage == "dpo":
                at_resume.update(
                    {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}
                )
            return begin(args, state, control, model=model, **kw)

        cb.on_train_begin = on_train_begin
        return cb

    monkeypatch.setattr(train, "make_callback", spying_callback)
    assert main(["run", "--resume", str(run), "--no-export", f"dpo.max_steps={step + 2}"]) == 0

    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert at_resume.keys() == saved.keys()
    assert all(at_resume[k].float().equal(saved[k].float()) for k in saved), "policy adapter is not the checkpoint's"
    first = _margins(run)[step + 1]  # each step once: a step logged before the kill was trimmed and trained again
    print(f"margin: {trained:+.3f} over the 4 steps to checkpoint-{step}, {first:+.3f} at step {step + 1} after resume")
    assert first > 0.5 * trained, (trained, first)  # a policy restarted from its reference logs ~0


def test_report_shows_the_export_verification(demo_run):
    """`lowvram run` rebuilds report.html after its export: the verification table is on the page."""
    page = (demo_run / "report.html").read_text()
    verify = json.loads((demo_run / "export" / "verify.json").read_text())
    assert set(verify) == {"f16", "q8_0", "q4_k_m"}
    for gguf, row in verify.items():
        assert f"<td>{gguf}</td><td><span class='" in page and f">{row['status']}</span>" in page
