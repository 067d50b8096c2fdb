"""The training callbacks: progress and metrics.jsonl, Ctrl-C, and KL to the reference at each held-out eval.

    with graceful_interrupt(): trainer.train()           # first Ctrl-C: checkpoint after this step, then stop
    callbacks = [kl_callback(eval_rows, tok, recipe, run_dir), make_callback("dpo", run_dir / "metrics.jsonl")]

The KL callback comes first so that its number lands in the row the logger writes. The KL itself is
measured by lowvram/evaluate/kl.py.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from lowvram import rundir
from lowvram.evaluate.kl import PROMPTS_FILE, REFERENCE, kl_text, kl_to_reference, prompt_text
from lowvram.utils import ui
from lowvram.utils.dist import is_main


class _Stop:
    requested = False


def interrupt_requested() -> bool:
    """Whether a Ctrl-C asked the stage to stop after its current step (graceful_interrupt)."""
    return _Stop.requested


@contextmanager
def graceful_interrupt():
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop now."""
    _Stop.requested = False
    if sys.platform == "win32" or not hasattr(signal, "SIGINT"):
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread
        yield
        return

    def handler(signum, frame):
        if _Stop.requested:
            raise KeyboardInterrupt
        _Stop.requested = True
        print(
            "\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to stop now).",
            file=sys.stderr,
            flush=True,
        )

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


KEY_METRICS = {
    "sft": [("loss", "loss", "{:.3f}"), ("mean_token_accuracy", "tok_acc", "{:.2f}")],
    "dpo": [
        ("loss", "loss", "{:.3f}"),
        ("rewards/accuracies", "pref_acc", "{:.2f}"),
        ("rewards/margins", "margin", "{:+.3f}"),
    ],  # and KL to the reference at a held-out eval, with its standard error (kl_text)
    "rm": [("loss", "loss", "{:.3f}"), ("accuracy", "pair_acc", "{:.2f}"), ("margin", "margin", "{:+.3f}")],
}


def make_callback(stage: str, metrics_path: Path):
    """A TrainerCallback that logs JSON lines, shows progress (lowvram.utils.ui), and honours Ctrl-C."""
    from transformers import TrainerCallback

    metrics = KEY_METRICS[stage if stage in KEY_METRICS else "sft"]  # DPO, IPO, KTO, ORPO all log rewards/*

    class LowvramCallback(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.last_t = None
            self.last_tokens = None
            self.tokens_per_s = None
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.monotonic()
            if state.is_world_process_zero:  # one bar in a process group, as one writer
                self.bar = ui.progress(stage, state.max_steps, metrics, start=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            if _Stop.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or not state.is_world_process_zero:  # one writer in a process group
                return
            now = time.monotonic()
            tokens = logs.get("num_tokens")
            if tokens is not None and self.last_tokens is not None and now > self.last_t:
                self.tokens_per_s = (tokens - self.last_tokens) / (now - self.last_t)
            if tokens is not None:
                self.last_tokens, self.last_t = tokens, now
            record = {
                "stage": stage,
                "step": state.global_step,
                "max_steps": state.max_steps,
                "elapsed_s": round(now - (self.t0 or now), 3),
                **logs,
            }
            eval_mode = any(k.startswith("eval_") for k in logs)
            if self.tokens_per_s is not None and not eval_mode:
                record["tokens_per_s"] = round(self.tokens_per_s, 1)
            with metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if eval_mode:
                when = "before training" if state.global_step == 0 else f"at step {state.global_step}"
                kl = kl_text(logs, "eval_")
                shown = (ui.metric_text(logs, metrics, "eval_"), f"KL {kl}" if kl else "")
                ui.note(f"[{stage} held-out eval] {when}", *shown, bar=self.bar)
            elif self.bar is not None and "train_runtime" not in logs:  # not the Trainer's closing summary
                self.bar.update(state.global_step, logs, self.tokens_per_s)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return LowvramCallback()


# ------------------------------------------------------------------ KL to the reference


def kl_callback(eval_rows: list[dict], tok, recipe, run_dir: Path | None = None):
    """A TrainerCallback that adds `eval_kl` (and its spread) to each held-out evaluation's logs.

    It runs in on_log, before lowvram's logger callback, so the number lands in the same metrics.jsonl row
    as the held-out loss and preference accuracy. With `run_dir`, the held-out prompts are kept in
    RUN/eval/heldout_prompts.jsonl, so `lowvram eval` answers the same ones without the data at hand.
    """
    from transformers import TrainerCallback

    cfg = recipe.eval
    if run_dir is not None and is_main():
        rundir.eval_dir(run_dir).mkdir(parents=True, exist_ok=True)
        kept = "".join(json.dumps({"prompt": r["prompt"]}, ensure_ascii=False) + "\n" for r in eval_rows)
        (rundir.eval_dir(run_dir) / PROMPTS_FILE).write_text(kept, encoding="utf-8")
    prompts = [prompt_text(tok, r["prompt"]) for r in eval_rows[: cfg.prompts]]

    class KLCallback(TrainerCallback):
        measured: tuple[int, dict] | None = None  # (step, KL): the final evaluation often repeats the last periodic one

        def on_log(self, args, state, control, logs=None, model=None, **kw):
            if not logs or model is None or not any(k.startswith("eval_") for k in logs) or "eval_kl" in logs:
                return
            if not state.is_world_process_zero:  # measured and logged by the main process only
                return
            if REFERENCE not in getattr(model, "peft_config", {}):
                return  # no frozen reference adapter (PEFT fallback): nothing to compare against
            if state.global_step == 0:
                # before the first step the policy is the reference's own copy (checked by _check_reference):
                # the KL is 0 exactly, so no answers are sampled to show it
                self.measured = (0, {"kl": 0.0, "kl_per_token": 0.0, "kl_per_token_sem": 0.0, "kl_answers": 0})
            elif self.measured is None or self.measured[0] != state.global_step:
                try:
                    kl = kl_to_reference(
                        model, tok, prompts, samples=cfg.kl_samples, max_new_tokens=cfg.max_new_tokens, seed=recipe.seed
                    )
                except Exception as e:  # a monitor must not end the training (generation on Unsloth: not run on a GPU)
                    print(
                        f"warning: KL to the reference not measured at step {state.global_step}: "
                        f"{type(e).__name__}: {e}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                self.measured = (state.global_step, kl)
            logs.update({f"eval_{k}": round(v, 6) if isinstance(v, float) else v for k, v in self.measured[1].items()})

    return KLCallback()
