"""The training stages: SFT with TRL's SFTTrainer, then DPO (or ORPO) with TRL's preference trainers.

    adapter_dir = run_stage(ctx, data)   # ctx = StageContext(run_dir, recipe, plan, stage="sft"|"dpo", ...)

Each stage trains on `data`, which pipeline.load_stage_data read and validated before any model
loaded; it loads the model through the plan's backend, trains with checkpoints in
RUN/<stage>/checkpoints (resumable), and writes RUN/<stage>/adapter and RUN/<stage>/DONE.
DPO continues the SFT adapter: TRL copies it into a frozen "ref" adapter, so the reference is the
SFT policy and no second copy of the model is held.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lowvram.adapters import save_policy
from lowvram.errors import Interrupted, OutOfMemory, UserError
from lowvram.planner import Plan, StagePlan
from lowvram.recipe import Recipe


@dataclass
class StageContext:
    run_dir: Path
    recipe: Recipe
    plan: Plan
    stage: str  # "sft" or "dpo"
    model_path: str  # resolved base model (local path or hub id)
    recipe_dir: Path | None = None
    init_adapter: Path | None = None  # adapter to continue (DPO after SFT, or --from)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage

    @property
    def sp(self) -> StagePlan:
        return self.plan.stages[self.stage]


# ------------------------------------------------------------------ progress, metrics, Ctrl-C


class _Stop:
    requested = False


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
        ("kl", "KL", "{:.2f} nats"),
    ],
    "rm": [("loss", "loss", "{:.3f}"), ("accuracy", "pair_acc", "{:.2f}"), ("margin", "margin", "{:+.3f}")],
}


def make_callback(stage: str, metrics_path: Path):
    """A TrainerCallback that logs JSON lines, shows progress (lowvram.ui), and honours Ctrl-C."""
    from transformers import TrainerCallback

    from lowvram import ui

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
                ui.note(f"[{stage} held-out eval] {when}", ui.metric_text(logs, metrics, "eval_"), bar=self.bar)
            elif self.bar is not None and "train_runtime" not in logs:  # not the Trainer's closing summary
                self.bar.update(state.global_step, logs, self.tokens_per_s)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return LowvramCallback()


# ------------------------------------------------------------------ loading


def resolve_model_path(name: str) -> str:
    """A local folder for `builtin:` models; otherwise the name as given (Hub id or path)."""
    from lowvram.models import BUILTIN_PREFIX

    if name.startswith(BUILTIN_PREFIX):
        from lowvram.tiny import TINY_NAME, ensure_tiny_model

        if name != TINY_NAME:
            raise UserError(f"Unknown built-in model {name!r}.", hint=f"The built-in model is {TINY_NAME}.")
        return str(ensure_tiny_model())
    return name


def load_tokenizer(source: str, recipe: Recipe):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise UserError(
            f"Cannot load the tokenizer of {source!r}: {e}",
            hint="Offline? Use a model already in the Hugging Face cache or a local folder.",
        ) from None
    _apply_template(tok, recipe)
    if tok.pad_token is None:
        # Padding is masked out of the loss, so reusing EOS as pad is safe for training.
        tok.pad_token = tok.eos_token
    return tok


def load_model(ctx: StageContext, adapter: Path | None):
    """(PeftModel, tokenizer) through the plan's backend: the base, then its turn tokens, then the adapter.

    The chat template's untrained turn tokens are checked and fixed on the base, before the adapter is
    added (special_tokens.prepare, the same code for both backends); their rows train in SFT only.
    """
    from lowvram.special_tokens import prepare, train_rows

    if ctx.plan.backend == "unsloth":
        from lowvram import unsloth_backend as backend
    else:
        from lowvram import hf_backend as backend
    try:
        model, tok = backend.load_base(ctx)
        _apply_template(tok, ctx.recipe, model)
        if tok.pad_token is None:  # padding is masked out of the loss, so reusing EOS as pad is safe for training
            tok.pad_token = tok.eos_token
        lr = getattr(ctx.recipe, ctx.stage).learning_rate
        prepare(model, tok, ctx.recipe.model.chat_template, ctx.init_adapter, learning_rate=lr)
        model = backend.add_adapter(model, ctx, adapter)
    except OSError as e:
        raise UserError(
            f"Cannot load model {ctx.model_path!r}: {e}",
            hint="Offline? Use a model already in the Hugging Face cache, a local folder, or builtin:tiny-llama.",
        ) from None
    train_rows(model, ctx.stage, ctx.recipe.dpo.method)
    return model, tok


def _apply_template(tok, recipe: Recipe, model=None) -> None:
    """The recipe's chat template, and its end-of-turn token as the EOS that generation stops on.

    A base model's EOS ends a document (<|endoftext|>, <eos>, <|end_of_text|>), not a turn: a named
    template ends each turn with its own token (<|im_end|>, <end_of_turn>, <|eot_id|>). Instruct
    releases make that token the tokenizer's EOS and put it in generation_config.json; without it
    generation (lowvram's evaluation, transformers' generate, the saved tokenizer) never stops at the
    end of an answer. The base's EOS then pads, where there is no pad token.
    """
    if not recipe.model.chat_template:
        return
    from lowvram.templates import chat_template_text, resolve_chat_template

    tok.chat_template = chat_template_text(recipe.model.chat_template)
    named = resolve_chat_template(recipe.model.chat_template)
    eot = named.end_of_turn if named else None
    if not eot or eot not in tok.get_vocab():
        return
    if tok.eos_token != eot:
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        print(
            f"[tokens] EOS set to {eot} (the {named.name} template ends each turn with it; the base's "
            f"EOS {tok.eos_token} ends documents" + (" and pads)" if tok.pad_token == tok.eos_token else ")"),
            flush=True,
        )
        tok.eos_token = eot
    if model is not None:
        stop_on(model, tok.eos_token_id)


def stop_on(model, token_id: int) -> None:
    """Add `token_id` to the model's generation stops (config and generation_config), first."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    have = gen.eos_token_id
    have = [] if have is None else [have] if isinstance(have, int) else list(have)
    if token_id not in have:
        gen.eos_token_id = [token_id, *have]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (every file written and readable; see lowvram.checkpoints)."""
    from lowvram.checkpoints import newest_complete

    return newest_complete(ckpt_dir)[0]


def _resume_point(ctx: StageContext, required: tuple[str, ...] = ()) -> Path | None:
    """The checkpoint to resume from; newer incomplete ones are named, with why, and set aside."""
    from lowvram.checkpoints import checkpoint_step, newest_complete, set_aside
    from lowvram.distributed import is_main, wait_for_everyone
    from lowvram.report import supersede_metrics

    wait_for_everyone()
    if not is_main():  # the main process sets aside and trims; the others then read what it left
        wait_for_everyone()
        return newest_complete(ctx.stage_dir / "checkpoints", required)[0]
    try:
        return _main_resume_point(ctx, required, checkpoint_step, newest_complete, set_aside, supersede_metrics)
    finally:
        wait_for_everyone()


def _main_resume_point(ctx: StageContext, required, checkpoint_step, newest_complete, set_aside, supersede_metrics):
    resume_from, skipped = newest_complete(ctx.stage_dir / "checkpoints", required)
    for path, why in skipped:
        moved = set_aside(path)
        print(
            f"[{ctx.stage}] skipped {path.name}: {why}; it is incomplete (moved to {moved.name}, "
            "delete it to free the space)",
            flush=True,
        )
    # the steps after the checkpoint are trained again: their old metrics lines would be logged twice
    supersede_metrics(ctx.run_dir, ctx.stage, checkpoint_step(resume_from) if resume_from else None)
    return resume_from


def _resume_cmd(ctx: StageContext, *overrides: str) -> str:
    import shlex

    from lowvram.distributed import world_size

    group = ["--gpus", str(world_size())] if world_size() > 1 else []  # the same number of processes
    return shlex.join(["lowvram", "run", "--resume", str(ctx.run_dir), *group, *overrides])


def _common_args(ctx: StageContext) -> dict:
    cfg = getattr(ctx.recipe, ctx.stage)
    sp = ctx.sp
    cuda = ctx.plan.device.kind == "cuda"
    return dict(
        output_dir=str(ctx.stage_dir / "checkpoints"),
        per_device_train_batch_size=sp.batch_size,
        per_device_eval_batch_size=sp.batch_size,
        gradient_accumulation_steps=sp.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        optim=sp.optim,
        bf16=ctx.plan.dtype == "bf16",
        fp16=ctx.plan.dtype == "fp16",
        gradient_checkpointing=sp.grad_ckpt == "standard" and ctx.plan.backend == "hf" and not ctx.plan.load_in_4bit,
        report_to="none",
        disable_tqdm=True,
        seed=ctx.recipe.seed,
        data_seed=ctx.recipe.seed,
        use_cpu=not cuda and ctx.plan.device.kind != "mps",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # LoRA: every trainable weight is used in each forward
        save_only_model=False,
    )


def _eval_args(cfg, eval_ds) -> dict:
    """Evaluate every eval_steps when asked; otherwise only before and after training (see _train_and_save)."""
    periodic = eval_ds is not None and cfg.eval_steps is not None
    return {"eval_strategy": "steps" if periodic else "no", "eval_steps": cfg.eval_steps}


def _datasets(rows_train, rows_eval):
    from datasets import Dataset

    train = Dataset.from_list(rows_train)
    evald = Dataset.from_list(rows_eval) if rows_eval else None
    return train, evald


# ------------------------------------------------------------------ SFT


def sft_loss_mode(tok, rows: list[dict], assistant_only: bool) -> tuple[list[dict], bool, str]:
    """(rows, assistant_only_loss flag for TRL, reason) for how the SFT loss is masked."""
    first = rows[0]
    if "messages" in first:
        if not assistant_only:
            return rows, False, "loss on every token (sft.assistant_only_loss is off)"
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        if template and has_generation_markers(template):
            return rows, True, "assistant tokens only (the chat template marks them)"
        try:
            if template and get_training_chat_template(tok) is not None:
                return rows, True, "assistant tokens only (TRL's training variant of this model's chat template)"
        except ValueError:
            pass
        # Any template works this way: the prompt is everything before the last assistant turn.
        split = []
        for r in rows:
            msgs = r["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            split.append({"prompt": msgs[:last], "completion": [msgs[last]]})
        return (
            split,
            False,
            (
                "assistant tokens only, via a prompt/completion split (TRL cannot add generation "
                "markers to this chat template): in multi-turn rows only the last answer is a target"
            ),
        )
    if "completion" in first:
        return rows, False, "loss on the completion only"
    return rows, False, "plain text: loss on every token"


def _check_has_template(tok, rows: list[dict], what: str) -> None:
    first = rows[0]
    conversational = isinstance(first.get("messages") or first.get("prompt") or first.get("chosen"), list)
    if conversational and not tok.chat_template:
        raise UserError(
            f"The {what} data is chat-formatted but the model's tokenizer has no chat template.",
            hint="Set model.chat_template in the recipe, or use an instruct model that ships one.",
        )


def run_sft(ctx: StageContext, data) -> Path:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.recipe.sft
    model, tok = load_model(ctx, ctx.init_adapter)
    _check_has_template(tok, data.train, "SFT")
    rows, assistant_only, reason = sft_loss_mode(tok, data.train, cfg.assistant_only_loss)
    eval_rows = sft_loss_mode(tok, data.eval, cfg.assistant_only_loss)[0] if data.eval else None
    print(f"[sft] loss mask: {reason}", flush=True)
    train_ds, eval_ds = _datasets(rows, eval_rows)
    args = SFTConfig(
        **_common_args(ctx),
        max_length=ctx.sp.max_seq_len,
        packing=cfg.packing,
        assistant_only_loss=assistant_only,
        **_eval_args(cfg, eval_ds),
        dataset_num_proc=None,
    )
    with _fp32_adapters(ctx, model):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            callbacks=[make_callback("sft", ctx.run_dir / "metrics.jsonl")],
        )
    _quiet(trainer)
    return _train_and_save(ctx, trainer, model, tok)


# ------------------------------------------------------------------ DPO / ORPO


def run_preference(ctx: StageContext, data) -> Path:
    cfg = ctx.recipe.dpo
    model, tok = load_model(ctx, ctx.init_adapter)
    _check_has_template(tok, data.train, "preference")
    train_ds, eval_ds = _datasets(data.train, data.eval)
    callbacks = [make_callback("dpo", ctx.run_dir / "metrics.jsonl")]
    kwargs = {**_common_args(ctx), **_eval_args(cfg, eval_ds), "beta": cfg.beta, "max_length": ctx.sp.max_seq_len}
    if cfg.method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    elif cfg.method == "kto":
        # Paired rows are fine: TRL unpairs them (chosen -> desirable, rejected -> undesirable).
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        kwargs["loss_type"] = [cfg.loss_type]
    if cfg.method in ("dpo", "kto") and data.eval:  # KL(policy || reference) at each held-out evaluation
        from lowvram.evaluate import kl_callback

        callbacks.insert(
            0, kl_callback(data.eval, tok, ctx.recipe, ctx.run_dir)
        )  # first: it adds to the row the logger writes
    with _fp32_adapters(ctx, model):
        trainer = Trainer(
            model=model,
            args=Config(**kwargs),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            callbacks=callbacks,
        )
    _quiet(trainer)
    if cfg.method != "orpo":
        _check_reference(ctx, trainer, model)
    return _train_and_save(ctx, trainer, model, tok)


def _check_reference(ctx: StageContext, trainer, model) -> None:
    """DPO/KTO: stop unless the reference is a frozen copy of the SFT policy and the rewards start at 0."""
    from lowvram.adapters import check_reference, check_start_rewards, start_rewards

    print(f"[dpo] reference: {check_reference(model, ctx.init_adapter)}", flush=True)
    if latest_checkpoint(ctx.stage_dir / "checkpoints") is None:  # a resumed policy has moved on
        # a check, not a result: lowvram's callbacks (progress, metrics.jsonl, KL) must not see its evaluation
        handler = trainer.callback_handler
        ours = handler.callbacks
        handler.callbacks = [cb for cb in ours if type(cb).__module__.startswith("transformers.")]
        try:
            rewards = start_rewards(trainer, ctx.sp.batch_size)
        finally:
            handler.callbacks = ours
        print(f"[dpo] reference: {check_start_rewards(rewards)}", flush=True)


# ------------------------------------------------------------------ shared


def _fp32_adapters(ctx: StageContext, model):
    """TRL casts a 4-bit model's LoRA weights to bf16 in its constructors; the hf backend keeps them fp32."""
    from contextlib import nullcontext

    if ctx.plan.backend != "hf" or not ctx.plan.load_in_4bit:
        return nullcontext()
    from lowvram.hf_backend import fp32_adapters

    return fp32_adapters(model, ctx.stage)


def _quiet(trainer) -> None:
    """Our callback prints progress; drop the Trainer's raw dict printer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _evaluate(trainer, ctx: StageContext, when: str) -> dict:
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate(metric_key_prefix=f"eval_{when}")
    out = {}
    for key, value in metrics.items():  # TRL logs its own metrics as eval_*, the Trainer as eval_<when>_*
        for prefix in (f"eval_{when}_", "eval_"):
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
    if trainer.is_world_process_zero():
        with (ctx.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": ctx.stage, "eval": when, "step": trainer.state.global_step, **out}) + "\n")
    return out


def _oom_message(ctx: StageContext) -> OutOfMemory:
    sp = ctx.sp
    st = ctx.stage
    floor = 2 if st == "dpo" and ctx.recipe.dpo.method == "kto" else 1  # KTO needs 2 per device
    if sp.batch_size > floor:
        new_bs = max(floor, sp.batch_size // 2)
        new_ga = sp.grad_accum * sp.batch_size // new_bs
        fix = (
            f"Lower {st}.batch_size to {new_bs} with {st}.grad_accum={new_ga} (same effective batch "
            f"{sp.effective_batch})"
        )
        overrides = f"{st}.batch_size={new_bs} {st}.grad_accum={new_ga}"
    else:
        new_seq = max(128, sp.max_seq_len // 2)
        fix = f"Lower {st}.max_seq_len from {sp.max_seq_len} to {new_seq} (longer examples are truncated)"
        overrides = f"{st}.max_seq_len={new_seq}"
    return OutOfMemory(
        f"CUDA ran out of memory in {st} at batch {sp.batch_size}, sequence length {sp.max_seq_len}.",
        [fix + "."],
        hint=f"Resume from the last checkpoint with: {_resume_cmd(ctx, *overrides.split())}",
    )


def _train_and_save(ctx: StageContext, trainer, model, tok) -> Path:
    import torch

    from lowvram.checkpoints import completion_callback
    from lowvram.fileio import atomic_write_text
    from lowvram.guards import divergence_error, finite_callback, nonfinite_parameters
    from lowvram.special_tokens import restore_rows, save_rows, trains_rows

    guard = finite_callback(fp16=ctx.plan.dtype == "fp16")
    rows = trains_rows(model)  # untrained turn tokens: their rows train with the adapter (special_tokens.py)
    trainer.add_callback(completion_callback(save_extra=save_rows if rows else None))
    trainer.add_callback(guard)  # last: it sees the save decision of every other callback
    resume_from = _resume_point(ctx)
    if resume_from is not None:
        from lowvram.adapters import restore_policy

        # the Trainer restores the optimizer and step; under transformers 5.17 not the policy adapter of a
        # checkpoint that also holds DPO's ref/ adapter (lowvram.adapters), so load it here under every version
        restore_policy(model, resume_from)
        if rows:  # written into the checkpoint's adapter by completion_callback, outside PEFT's state dict
            print(
                f"[{ctx.stage}] turn-token rows {restore_rows(model, resume_from)} restored from {resume_from.name}",
                flush=True,
            )
        print(f"[{ctx.stage}] resuming from {resume_from.name}", flush=True)
    elif trainer.eval_dataset is not None:
        before = _evaluate(trainer, ctx, "before")
        if before and trainer.is_world_process_zero():
            atomic_write_text(ctx.stage_dir / "eval_before.json", json.dumps(before, indent=2))
    from lowvram import ui

    try:
        with graceful_interrupt():
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError:
        raise _oom_message(ctx) from None
    except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint of this step; say where the last one is
        ckpt = latest_checkpoint(ctx.stage_dir / "checkpoints")
        where = (
            f"The newest complete checkpoint is {ckpt} (step {ckpt.name.split('-')[-1]}); later steps are lost."
            if ckpt
            else f"No checkpoint was saved yet: resuming starts {ctx.stage} again."
        )
        raise Interrupted(
            f"Stopped {ctx.stage} at once at step {trainer.state.global_step}. {where}",
            hint=f"Resume with: {_resume_cmd(ctx)}",
        ) from None
    finally:
        ui.close_progress()  # a bar left live by an exception would keep the cursor hidden and stdout redirected
    if guard.problem:
        raise divergence_error(ctx.stage, guard.problem, ctx.run_dir, ctx.recipe, guard.step)
    if _Stop.requested:
        raise Interrupted(
            f"Stopped {ctx.stage} at step {trainer.state.global_step}; a checkpoint was saved.",
            hint=f"Resume with: {_resume_cmd(ctx)}",
        )
    stats = {
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_loss": result.metrics.get("train_loss"),
    }
    from lowvram.distributed import is_main, wait_for_everyone

    bad = nonfinite_parameters(model)
    if bad or not math.isfinite(stats["train_loss"] or 0.0):
        what = f"non-finite weights in {', '.join(bad[:3])}" if bad else f"the training loss is {stats['train_loss']}"
        raise divergence_error(ctx.stage, what, ctx.run_dir, ctx.recipe, trainer.state.global_step)
    after = _evaluate(trainer, ctx, "after")
    adapter_dir = ctx.stage_dir / "adapter"
    # FSDP: each process holds a shard; gathering the full weights takes every process (not run on a GPU yet)
    full = trainer.accelerator.get_state_dict(trainer.model) if getattr(trainer, "is_fsdp_enabled", False) else None
    if is_main():  # one writer; the group's processes hold the same weights
        if after:
            atomic_write_text(ctx.stage_dir / "eval_after.json", json.dumps(after, indent=2))
        save_policy(model, adapter_dir, full)
        save_rows(model, adapter_dir)  # trained turn-token rows, if any: into the adapter, as PEFT trainable tokens
        tok.save_pretrained(str(ctx.run_dir / "tokenizer"))
        atomic_write_text(ctx.stage_dir / "train_stats.json", json.dumps(stats, indent=2))
        atomic_write_text(ctx.stage_dir / "DONE", json.dumps(stats))  # last: the stage counts as done only now
    wait_for_everyone()  # the next stage, in every process, loads this adapter
    return adapter_dir


def _not_the_kernels_notice(record) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def _quiet_libraries() -> None:
    """Per-dataset-map progress bars and weight-loading bars drown the training progress."""
    import logging
    import warnings

    import datasets
    import transformers

    # transformers 5 renamed the checkpointing flags that TRL and PEFT still pass; nothing for the user to do
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)
    # bitsandbytes, imported on a CPU with AVX512-BF16, asks for the `kernels` package, which fetches its faster
    # 4-bit CPU kernel from the Hub at run time; its own kernel works, offline: nothing for the user to do
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_notice)  # once: a set of filters
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run_stage(ctx: StageContext, data) -> Path:
    """Train one stage (`ctx.stage`) on already-validated data; return the adapter folder."""
    if ctx.plan.backend == "unsloth":
        from lowvram import unsloth_backend

        unsloth_backend.activate()  # before TRL is imported below
    _quiet_libraries()
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    from lowvram.oom import run_with_step_down  # CUDA out-of-memory: smaller settings, resume (lowvram/oom.py)

    train = run_sft if ctx.stage == "sft" else run_preference
    try:
        return run_with_step_down(ctx, lambda c: train(c, data))
    except (OSError, RuntimeError) as e:
        from lowvram.fileio import disk_full

        if not disk_full(e, ctx.stage_dir):
            raise
        ckpt = latest_checkpoint(ctx.stage_dir / "checkpoints")
        where = f"The newest complete checkpoint is {ckpt.name}." if ckpt else "No checkpoint was completed."
        raise UserError(
            f"The disk is full: {ctx.stage} could not write to {ctx.run_dir} ({str(e)[:200]}). {where}",
            hint=f"Free some space, then resume: {_resume_cmd(ctx)}",
        ) from None
    finally:
        release_memory()


def release_memory() -> None:
    """Free the finished stage's model, trainer and optimizer before the next stage loads in this process.

    Their modules form reference cycles (PEFT's layers, Unsloth's patched forwards), so the weights
    outlive the objects until the garbage collector runs; on a GPU the cached blocks go back too.
    """
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
