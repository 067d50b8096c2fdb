"""The reward-model stage (`rm`): TRL's RewardTrainer, a LoRA plus a sequence-classification head on the base.

    adapter = run_rm(run_dir, recipe, plan, model_path)   # RUN/rm/{adapter,DONE,eval_after.json}
    score = load_scorer(run_dir)                          # score(prompts, answers) -> [float]

It reads the same preference data as DPO (`rm.data`, or the dpo stage's when empty) and reports its
accuracy on the held-out pairs (the share where chosen outscores rejected). `lowvram eval` uses it to
score answers and to rank best-of-N samples. It trains after the policy stages, on the base model, and
is sized with the preference stage's planned settings (batch, sequence length).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lowvram import rundir
from lowvram.data import load_preference_data
from lowvram.model.hf_backend import load_4bit
from lowvram.model.tiny import resolve_model_path
from lowvram.train.callbacks import make_callback
from lowvram.train.common import StageContext, eval_args, quiet_trainer, to_datasets, train_and_save, trainer_args
from lowvram.train.stage import load_tokenizer
from lowvram.utils.ui import quiet_libraries

RM_DIR = "rm"


def rm_data_config(recipe):
    """The rm stage's data: its own, or the preference stage's when it names none."""
    d = recipe.rm.data
    return d if (d.path or d.sample) else recipe.dpo.data


def _stage_context(run_dir: Path, recipe, plan, model_path: str):
    template = plan.stages.get("dpo") or next(iter(plan.stages.values()))
    plan = dataclasses.replace(plan, stages={**plan.stages, RM_DIR: dataclasses.replace(template, stage=RM_DIR)})
    return StageContext(Path(run_dir), recipe, plan, RM_DIR, model_path)


def _load_classifier(model_path: str, plan, adapter: Path | None = None, trainable: bool = False):
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.dtype, torch.float32)
    torch.manual_seed(0)  # the new score head starts the same way every time
    if plan.load_in_4bit:  # as the policy's base
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        model = load_4bit(AutoModelForSequenceClassification, model_path, dtype, num_labels=1, device_map={"": device})
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    return model


def run_rm(run_dir: Path, recipe, plan, model_path: str) -> Path:
    """Train the reward model on the preference pairs; return RUN/rm/adapter."""
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    quiet_libraries()
    ctx = _stage_context(run_dir, recipe, plan, model_path)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    cfg = rm_data_config(recipe)
    data = load_preference_data(cfg, recipe.sample_file(cfg), base_dir=Path.cwd(), seed=recipe.seed)
    print(
        f"[rm] reward model on {len(data.train)} pairs"
        + (f", {len(data.eval)} held out" if data.eval else "")
        + f" from {data.source}; LoRA r={plan.lora_r} + a scalar head on the base",
        flush=True,
    )
    tok = load_tokenizer(model_path, recipe)
    model = _load_classifier(model_path, plan)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
    peft_config = LoraConfig(
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        task_type="SEQ_CLS",
    )  # + the score head
    train_ds, eval_ds = to_datasets(data.train, data.eval)
    args = RewardConfig(
        **trainer_args(ctx), **eval_args(recipe.rm, eval_ds), max_length=ctx.sp.max_seq_len, dataset_num_proc=None
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[make_callback(RM_DIR, rundir.metrics_file(ctx.run_dir))],
    )
    quiet_trainer(trainer)
    if plan.load_in_4bit:
        _fp32_trainable(trainer.model)
    return train_and_save(ctx, trainer, trainer.model, tok)


def _fp32_trainable(model) -> None:
    """A 4-bit reward model trains its LoRA weights and its score head in fp32, as the policy's adapters do
    (hf_backend.fp32_adapters): TRL casts them to bf16, and the head then meets the fp32 output of the
    model's last norm (kept fp32 by the k-bit preparation) with bf16 weights, which a CPU matmul refuses."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def score_text(tok, prompt, answer: str) -> str:
    """prompt + answer as the RewardTrainer saw its pairs: chat template for messages, raw text + EOS otherwise."""
    if isinstance(prompt, list):
        return tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    return prompt + answer + (tok.eos_token or "")


def load_scorer(run_dir: Path):
    """A function (prompts, answers) -> scores from RUN/rm/adapter, or None when the run has no reward model."""
    adapter = rundir.adapter_dir(run_dir, RM_DIR)
    if not (adapter / "adapter_config.json").is_file():
        return None
    import torch
    from transformers import AutoTokenizer

    base = rundir.trained_base(run_dir)  # its dtype and load_in_4bit: as the policy's base was loaded
    path = base.model_path or resolve_model_path(base.model)
    tok = AutoTokenizer.from_pretrained(str(rundir.tokenizer_dir(run_dir)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = _load_classifier(path, base, adapter)
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    dev = next(model.parameters()).device

    def score(prompts: list, answers: list[str], batch_size: int = 16) -> list[float]:
        out: list[float] = []
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            with torch.no_grad():
                for i in range(0, len(prompts), batch_size):
                    texts = [
                        score_text(tok, p, a) for p, a in zip(prompts[i : i + batch_size], answers[i : i + batch_size])
                    ]
                    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
                    out.extend(model(**enc).logits[:, 0].float().tolist())
        finally:
            tok.padding_side = side
        return out

    return score
