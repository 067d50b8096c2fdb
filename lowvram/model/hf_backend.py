"""The transformers + PEFT backend: CPU, Apple, or CUDA without Unsloth (bitsandbytes 4-bit there).

    model, tok = load_base(ctx)              # ctx: lowvram.train.stage.StageContext
    ...                                      # lowvram.train.stage.load_model fixes the turn tokens here
    model = add_adapter(model, ctx, adapter) # a PeftModel whose LoRA adapter trains

With `adapter`, that adapter is loaded and training continues it (DPO after SFT); without, a fresh
adapter is added.

With `plan.load_in_4bit` the base's linear layers are bitsandbytes NF4 with double quantization,
computing in the plan's dtype: the QLoRA path of every CUDA user without Unsloth. bitsandbytes
(>= 0.49) also runs it on CPU, slowly, which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lowvram.errors import UserError
from lowvram.model.turn_tokens import without_rows

if TYPE_CHECKING:  # annotations only: the backends take a plan and a recipe, they do not build them
    from lowvram.plan.planner import Plan
    from lowvram.recipe import Recipe

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(plan: Plan):
    import torch

    return getattr(torch, TORCH_DTYPES[plan.dtype])


def lora_config(plan: Plan, recipe: Recipe):
    from peft import LoraConfig

    return LoraConfig(
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization_config(dtype, fsdp: bool = False):
    """NF4 with double quantization, computing in `dtype` (a torch dtype; what Unsloth's 4-bit checkpoints use)."""
    from transformers import BitsAndBytesConfig

    # FSDP shards flat tensors of one dtype: 4-bit weights stored in the compute dtype (QLoRA with FSDP)
    storage = {"bnb_4bit_quant_storage": dtype} if fsdp else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        **storage,
    )


def saved_quantization(model_path: str) -> dict | None:
    """The quantization_config a checkpoint was saved with (Unsloth's -bnb-4bit repos), or None."""
    from transformers import AutoConfig

    q = getattr(AutoConfig.from_pretrained(model_path), "quantization_config", None)
    return q if isinstance(q, dict) else (q.to_dict() if q is not None else None)


def four_bit_kwargs(model_path: str, dtype, fsdp: bool = False) -> dict:
    """from_pretrained's quantization argument for a 4-bit base: quantization_config(...), unless the checkpoint
    is saved already quantized. transformers then uses the saved config and ignores (with a warning) the one
    passed, compute dtype included: Unsloth's -bnb-4bit configs say bfloat16, and a T4 has no bf16. So none is
    passed, and `use_compute_dtype` gives the loaded layers the plan's dtype. A checkpoint quantized another way
    (GPTQ, AWQ, bitsandbytes 8-bit) cannot be this base: a UserError."""
    saved = saved_quantization(model_path)
    if saved is None:
        return {"quantization_config": quantization_config(dtype, fsdp)}
    if saved.get("quant_method") == "bitsandbytes" and (saved.get("load_in_4bit") or saved.get("_load_in_4bit")):
        return {}
    how = saved.get("quant_method", "an unknown method")
    if how == "bitsandbytes":
        how = "bitsandbytes 8-bit"
    raise UserError(
        f"{model_path} is saved quantized with {how}; lowvram trains on a bitsandbytes 4-bit (NF4) base.",
        hint="Use the model's 16-bit original (lowvram quantizes it to 4-bit as it loads), "
        "or its bitsandbytes 4-bit version (Unsloth's -bnb-4bit repos).",
    )


def load_4bit(auto_class, model_path: str, dtype, fsdp: bool = False, **kwargs):
    """`auto_class.from_pretrained` of a 4-bit base (four_bit_kwargs), its layers computing in `dtype`."""
    model = auto_class.from_pretrained(model_path, dtype=dtype, **four_bit_kwargs(model_path, dtype, fsdp), **kwargs)
    use_compute_dtype(model, dtype)
    no_cpu_repack(model)
    return model


def no_cpu_repack(model) -> int:
    """Keep every 4-bit weight in bitsandbytes' one layout on a CPU with AVX512-BF16; the count of layers.

    bitsandbytes (0.50) there repacks a 4-bit weight in place, for a faster kernel, the first time it
    runs without grad: the evaluation before training, a reward model's scoring, generation. That
    kernel has no backward, so training after it would lose the gradient paths through the base
    layers, and the repack asserts (`N must be divisible by block_n`) on a layer whose output width is
    not a multiple of its block, which the reward model's stage met first. Off for every model that
    load_4bit loads (policy, reward model, evaluation): the same dequantize-and-matmul that CUDA runs.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def use_compute_dtype(model, dtype) -> int:
    """Every bitsandbytes 4-bit layer computes in `dtype` (the plan's), whatever its checkpoint said; the count."""
    layers = [m for m in model.modules() if m.__class__.__name__ == "Linear4bit"]
    for m in layers:
        m.compute_dtype, m.compute_type_is_set = dtype, True  # not re-guessed from the first input
    return len(layers)


def device_map(plan: Plan) -> dict:
    """Everything on the one training device: the current CUDA card, or the CPU."""
    import torch

    return {"": torch.cuda.current_device()} if plan.device.kind == "cuda" else {"": "cpu"}


def prepare_4bit_model(model, dtype, grad_ckpt: str = "off") -> dict[str, int]:
    """PEFT's `prepare_model_for_kbit_training`, without paying fp32 for the embeddings.

    PEFT freezes the base and upcasts every weight bitsandbytes did not quantize to fp32: norms,
    biases, and the input embeddings and lm_head, vocabulary x hidden each (2 GiB of fp32 on the
    8B Llama, whose 4-bit linears take 3.5 GiB). Frozen embeddings gain nothing from fp32: a lookup,
    and a matmul that autocast runs in the compute dtype anyway. So here norms and biases become fp32
    (tiny, and the stability PEFT adds them for) and the embeddings stay in the compute dtype, never
    upcast, so their fp32 copy is not even allocated for a moment. Returns bytes per dtype of the
    non-quantized weights, for the log line.
    """
    import torch

    embeddings = {
        id(m.weight)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None and getattr(m, "weight", None) is not None
    }
    by_dtype: dict[str, int] = {}
    for param in model.parameters():
        param.requires_grad = False
        if param.__class__.__name__ == "Params4bit":
            continue
        want = dtype if id(param) in embeddings else torch.float32
        if param.dtype in (torch.float16, torch.bfloat16, torch.float32) and param.dtype != want:
            param.data = param.data.to(want)
        key = str(param.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + param.numel() * param.element_size()
    if grad_ckpt != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return by_dtype


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.1f} KiB"


def load_base(ctx):
    """(base model, tokenizer) for a training stage: 16-bit, or NF4 with `plan.load_in_4bit`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan, grad_ckpt = ctx.plan, ctx.sp.grad_ckpt
    tok = AutoTokenizer.from_pretrained(ctx.model_path)
    if plan.load_in_4bit:
        model = load_4bit(
            AutoModelForCausalLM,
            ctx.model_path,
            torch_dtype(plan),
            plan.parallel == "fsdp",
            device_map=device_map(plan),
        )
        other = prepare_4bit_model(model, torch_dtype(plan), grad_ckpt)
        parts = ", ".join(f"{_size(n)} {k}" for k, n in sorted(other.items()))
        print(
            f"[4-bit] NF4 linears with double quantization, computing in {plan.dtype}; other weights: {parts} "
            f"(embeddings in {plan.dtype}, norms fp32)",
            flush=True,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch_dtype(plan))
        if grad_ckpt != "off":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    return model, tok


def add_adapter(model, ctx, adapter: Path | None = None):
    """`model` as a PeftModel with a trainable LoRA adapter: `adapter` loaded (its trained turn-token rows
    are already in lowvram's row wrappers: special_tokens.without_rows), or a fresh one."""
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), config=without_rows(adapter), is_trainable=True)
    return get_peft_model(model, lora_config(ctx.plan, ctx.recipe))


@contextmanager
def fp32_adapters(model, stage: str = ""):
    """Around a TRL trainer's constructor: keep the trainable LoRA weights fp32 master weights.

    TRL (1.15, 1.16) casts every trainable weight of a 4-bit model to bf16 when it builds its SFT, DPO
    or KTO trainer, whatever the training dtype. bf16 keeps 8 bits of mantissa: an Adam step of 5e-6
    (DPO's learning rate) on a weight of 0.01 is below half a bf16 ulp and rounds away, and under fp16
    autocast (a T4) the masters would not even be in the autocast dtype. The tensors are put back as
    they were, bit for bit, so DPO's frozen "ref" copy (taken before TRL's cast) still equals the policy.
    """
    import torch

    kept = [(p, p.data) for p in model.parameters() if p.requires_grad and p.dtype == torch.float32]
    yield
    restored = 0
    for p, data in kept:
        if p.dtype != data.dtype:
            p.data = data
            restored += 1
    if restored:
        where = f"[{stage}] " if stage else ""
        print(
            f"{where}LoRA weights kept in fp32 ({restored} tensors that TRL cast to bf16 for the 4-bit base)",
            file=sys.stderr,
            flush=True,
        )
