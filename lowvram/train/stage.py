"""The training stages: SFT with TRL's SFTTrainer, then DPO (or ORPO) with TRL's preference trainers.

    adapter_dir = run_stage(ctx, data)   # ctx = StageContext(run_dir, recipe, plan, stage="sft"|"dpo", ...)

Each stage trains on `data`, which pipeline.load_stage_data read and validated before any model
loaded; it loads the model through the plan's backend, trains with checkpoints in
RUN/<stage>/checkpoints (resumable), and writes RUN/<stage>/adapter and RUN/<stage>/DONE.
DPO continues the SFT adapter: TRL copies it into a frozen "ref" adapter, so the reference is the
SFT policy and no second copy of the model is held. What every stage shares (the trainer's
arguments, train_and_save, resume) is in train_common.py; the callbacks are in callbacks.py.
"""

from __future__ import annotations

from pathlib import Path

from lowvram import rundir
from lowvram.data.templates import chat_template_text, resolve_chat_template
from lowvram.errors import UserError
from lowvram.model import hf_backend, unsloth_backend
from lowvram.model.adapters import check_reference, check_start_rewards, start_rewards
from lowvram.model.hf_backend import fp32_adapters
from lowvram.model.turn_tokens import prepare, train_rows
from lowvram.recipe import Recipe
from lowvram.train.callbacks import kl_callback, make_callback
from lowvram.train.common import (
    StageContext,
    eval_args,
    latest_checkpoint,
    quiet_trainer,
    resume_cmd,
    to_datasets,
    train_and_save,
    trainer_args,
)
from lowvram.train.oom import run_with_step_down
from lowvram.utils.fileio import disk_full
from lowvram.utils.ui import quiet_libraries

# ------------------------------------------------------------------ loading


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
    added (turn_tokens.prepare, the same code for both backends); their rows train in SFT only.
    """
    backend = unsloth_backend if ctx.plan.backend == "unsloth" else hf_backend
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
    train_ds, eval_ds = to_datasets(rows, eval_rows)
    args = SFTConfig(
        **trainer_args(ctx),
        max_length=ctx.sp.max_seq_len,
        packing=cfg.packing,
        assistant_only_loss=assistant_only,
        **eval_args(cfg, eval_ds),
        dataset_num_proc=None,
    )
    with _fp32_adapters(ctx, model):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            callbacks=[make_callback("sft", rundir.metrics_file(ctx.run_dir))],
        )
    quiet_trainer(trainer)
    return train_and_save(ctx, trainer, model, tok)


# ------------------------------------------------------------------ DPO / ORPO


def run_preference(ctx: StageContext, data) -> Path:
    cfg = ctx.recipe.dpo
    model, tok = load_model(ctx, ctx.init_adapter)
    _check_has_template(tok, data.train, "preference")
    train_ds, eval_ds = to_datasets(data.train, data.eval)
    callbacks = [make_callback("dpo", rundir.metrics_file(ctx.run_dir))]
    kwargs = {**trainer_args(ctx), **eval_args(cfg, eval_ds), "beta": cfg.beta, "max_length": ctx.sp.max_seq_len}
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
    quiet_trainer(trainer)
    if cfg.method != "orpo":
        _check_reference(ctx, trainer, model)
    return train_and_save(ctx, trainer, model, tok)


def _check_reference(ctx: StageContext, trainer, model) -> None:
    """DPO/KTO: stop unless the reference is a frozen copy of the SFT policy and the rewards start at 0."""

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

    return fp32_adapters(model, ctx.stage)


def run_stage(ctx: StageContext, data) -> Path:
    """Train one stage (`ctx.stage`) on already-validated data; return the adapter folder."""
    if ctx.plan.backend == "unsloth":
        unsloth_backend.activate()  # before TRL is imported below
    quiet_libraries()
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)

    train = run_sft if ctx.stage == "sft" else run_preference
    try:
        return run_with_step_down(ctx, lambda c: train(c, data))
    except (OSError, RuntimeError) as e:
        if not disk_full(e, ctx.stage_dir):
            raise
        ckpt = latest_checkpoint(ctx.stage_dir / "checkpoints")
        where = f"The newest complete checkpoint is {ckpt.name}." if ckpt else "No checkpoint was completed."
        raise UserError(
            f"The disk is full: {ctx.stage} could not write to {ctx.run_dir} ({str(e)[:200]}). {where}",
            hint=f"Free some space, then resume: {resume_cmd(ctx)}",
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
