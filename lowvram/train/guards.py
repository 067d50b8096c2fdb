"""Nothing non-finite is trained on, saved or exported.

    callback = FiniteGuard(stage="dpo", run_dir=run, recipe=recipe)   # stops a stage that diverges
    bad = nonfinite_parameters(model)          # ["...lora_B.default.weight", ...]

A stage stops at the first logged metric (loss, grad_norm, reward margin, ...) that is NaN or
infinite, and before a checkpoint of non-finite weights is written; the error names the setting
to lower and the command that resumes from the last good checkpoint. A saved adapter is checked
again before it is exported (adapters.check_saved_adapter_finite).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from lowvram import rundir
from lowvram.errors import UserError
from lowvram.train.checkpoints import newest_complete


class Diverged(UserError):
    """Training produced NaN or infinite values; nothing non-finite was saved."""


def nonfinite_metrics(logs: dict) -> list[str]:
    """`key=value` for each numeric log value that is NaN or infinite."""
    bad = []
    for k, v in logs.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            bad.append(f"{k}={v}")
    return bad


def nonfinite_parameters(model, trainable_only: bool = True, limit: int = 5) -> list[str]:
    """Names of (trainable) parameters holding NaN or inf; at most `limit` of them."""
    import torch

    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            if not bool(torch.isfinite(p).all()):
                bad.append(name)
                if len(bad) >= limit:
                    break
    return bad


def _fmt(x: float) -> str:
    return f"{x:g}"


def divergence_error(stage: str, what: str, run_dir: Path, recipe, step: int) -> Diverged:
    """The message for a stage that went non-finite: what, the setting to lower (with a value), how to resume."""
    cfg = getattr(recipe, stage)
    lr = cfg.learning_rate
    overrides = [f"{stage}.learning_rate={_fmt(lr / 4)}"]
    fixes = [f"Lower {stage}.learning_rate from {_fmt(lr)} to {_fmt(lr / 4)}."]
    if stage == "dpo" and cfg.beta > 1:
        fixes.append(f"dpo.beta={_fmt(cfg.beta)} is large (0.1 is usual): lower it too.")
        overrides.append("dpo.beta=0.1")

    ckpt, _ = newest_complete(rundir.checkpoints_dir(run_dir, stage))
    where = (
        f"the last good checkpoint, {ckpt.name}"
        if ckpt is not None
        else "the start of the stage (no checkpoint was saved before it diverged)"
    )
    cmd = shlex.join(["lowvram", "run", "--resume", str(run_dir), *overrides])
    return Diverged(
        f"{stage} diverged at step {step}: {what}. Stopped; no non-finite weights were saved.",
        fixes,
        hint=f"Resume from {where} with: {cmd}",
    )


def finite_callback(fp16: bool = False):
    """A TrainerCallback that stops training at the first non-finite metric or weight.

    The reason is left in `callback.problem` (None when training stayed finite). With fp16 mixed
    precision an infinite grad_norm is normal (the loss scaler skips that step and lowers its scale),
    so it is not a divergence there.
    """
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        problem: str | None = None
        step: int = 0

        def _stop(self, control, state, what: str):
            if self.problem is None:
                self.problem, self.step = what, state.global_step
            control.should_training_stop = True
            control.should_save = False  # never checkpoint what diverged
            control.should_evaluate = False

        def on_step_end(self, args, state, control, model=None, **kw):
            # A checkpoint is due after this step: its weights must be finite. (Logged metrics are
            # checked in on_log, which runs before the save of the same step.)
            if control.should_save and model is not None:
                bad = nonfinite_parameters(model)
                if bad:
                    self._stop(control, state, f"non-finite weights in {', '.join(bad[:3])}")

        def on_log(self, args, state, control, logs=None, **kw):
            bad = nonfinite_metrics(logs or {})
            if fp16:
                bad = [b for b in bad if not b.startswith("grad_norm=")]
            if bad:
                self._stop(control, state, ", ".join(bad[:4]))

    return FiniteGuard()
