"""Peak VRAM of 4-bit LoRA training, predicted before anything loads.

    from lowvram.plan.memory import estimate
    from lowvram.plan.catalog import get_spec

    est = estimate(get_spec("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"), "sft", max_seq_len=2048,
                   batch_size=2, lora_r=16, grad_ckpt="unsloth", optim="adamw_8bit", dtype="fp16")
    print(est.total_gib, est.lines())

A pure function of the model's dimensions and the training settings: no torch, no download.
The result is a breakdown in GiB whose lines add up to `total_gib`, the peak as `nvidia-smi` sees it.
`reserved_gib` leaves out the CUDA context: it is what `torch.cuda.max_memory_reserved()` reports.

How the peak is built (each term is a section below, each coefficient says where it comes from):
- weights: linear layers in NF4 (0.5 byte/param + double-quant scales); embeddings and lm_head stay
  16-bit (bitsandbytes quantizes nn.Linear only and skips lm_head); the hf backend keeps norms in
  fp32, as PEFT's prepare_model_for_kbit_training does, but not the embeddings (PEFT upcasts those
  too: scripts/bench_4bit_weights.py measures both).
- LoRA: adapters, their gradients (fp32) and the optimizer states.
- activations: what the forward keeps for the backward, per token, from the modules the backend
  runs (Unsloth's fused kernels, or transformers + PEFT under autocast), times the tokens in one
  micro-batch; gradient checkpointing keeps one layer input per layer instead (Unsloth's offloaded
  mode sends even those to CPU RAM), plus one layer recomputed during the backward.
- logits: batch x sequence x vocabulary. fp32 over a 128k-152k vocabulary dominates at short
  sequences unless the loss is chunked: Unsloth's fused loss takes the tokens in chunks sized to
  the memory it finds free (so pass `vram_gib`) and, since unsloth_zoo 2026.10.9, at most 2 GiB;
  TRL >= 1.15's LM head in fixed tiles, which DPO uses on both backends (it bypasses Unsloth's
  head); ORPO on Unsloth gets the full 16-bit logits.
- phases (Unsloth SFT): the fused loss computes its gradient during the forward and frees its
  chunk before the backward starts, so the peak is the larger of the loss phase and the backward
  phase, not their sum.
- ref forward (DPO): the no-grad reference forward over chosen+rejected, run while the policy's
  activations are still held, plus the frozen copy of the adapter TRL keeps as the reference.
  DPO and ORPO put chosen and rejected through the policy together: twice the tokens of SFT.
- overhead: CUDA context (outside PyTorch's allocator), allocator slack and fragmentation, and the
  16-bit buffer bitsandbytes dequantizes each 4-bit weight into. Fragmentation follows the
  allocation pattern: Unsloth's per-layer temporaries repeat the same sizes layer after layer, so
  the cache reuses them and costs about one extra block of the largest; transformers' loss makes
  several differently sized full-logits copies, and costs a share of everything that comes and goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from lowvram.plan.catalog import ModelSpec

GIB = 1024**3

# ---------------------------------------------------------------- coefficients

# bitsandbytes NF4 packs two 4-bit codes per byte.
NF4_BYTES_PER_PARAM = 0.5
# Double quantization (Unsloth and lowvram's hf backend both turn it on): blocks of 64 weights share
# one absmax, stored in 8 bits, with one fp32 scale per 256 absmax values (QLoRA paper, section 2).
NF4_SCALE_BYTES_PER_PARAM = 1 / 64 + 4 / (64 * 256)

# LoRA adapters train in fp32 in both backends: PEFT upcasts adapters (autocast_adapter_dtype=True)
# and fp16 mixed precision needs fp32 master weights. Their gradients are fp32 too.
LORA_PARAM_BYTES = 4
LORA_GRAD_BYTES = 4

# Optimizer state bytes per trainable parameter.
OPTIMIZER_STATE_BYTES: dict[str, float] = {
    # bitsandbytes 8-bit AdamW: two uint8 moments plus an fp32 absmax per 2048-value block.
    "adamw_8bit": 2 + 8 / 2048,
    "paged_adamw_8bit": 2 + 8 / 2048,
    "adamw_bnb_8bit": 2 + 8 / 2048,
    # torch AdamW: two fp32 moments.
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "paged_adamw_32bit": 8,
    "adafactor": 4,  # factored second moment is tiny; the update buffer is a full fp32 copy
    "sgd": 0,
}

# CUDA context: driver state, kernel images and library handles (cuBLAS, Triton, flash-attention).
# It lives outside PyTorch's allocator, so nvidia-smi counts it and torch.cuda.max_memory_reserved()
# does not. Unsloth's estimator budgets 1.4 GB (1.30 GiB) for "CUDA driver + PyTorch runtime",
# calibrated on an RTX 5070 Ti (VRAM_ESTIMATION.md, section 7); the allocator's own slack, measured
# below in reserved memory, is 0.5 GiB of that, which leaves 0.8 GiB for the context.
CUDA_CONTEXT_GIB = 0.8

# Reserved memory the allocator holds beyond live tensors, in two parts:
# - a fixed slack: right after loading, the Unsloth T4 notebooks report 0.5 GiB more reserved than
#   weights + adapters (Llama-3.1-8B: 5.98 GiB reserved vs 5.47; Mistral-7B: 4.52 vs 4.01).
# - fragmentation of the per-step tensors: fms-acceleration's A100 runs (HF PEFT + bitsandbytes)
#   report nvidia-smi peaks 1.29-1.41x torch's peak allocated; about 30% of the memory that comes
#   and goes each step (activations, logits) is lost to blocks the caching allocator cannot reuse.
ALLOCATOR_SLACK_GIB = 0.5
ALLOCATOR_FRAGMENTATION = 0.30
# Unsloth's backward runs one layer at a time with the same tensor sizes in every layer, so the
# caching allocator hands the same blocks back each layer; what it loses is about one extra block of
# the largest temporary (a tokens x intermediate_size activation), reserved when the cached blocks
# are split. Cross-check, not a fit: with this one block, the per-token cost of Llama-3.1-8B at
# r=32 near its longest context comes to 228 KiB/token against the 222 KiB/token slope of Unsloth's
# published max-context table (docs.unsloth.ai/basics/unsloth-benchmarks: 2,972 tokens at 8 GB ...
# 342,733 at 80 GB, 18,876 tokens per 4 GB); scripts/calibrate_vram.py prints the ratios.
UNSLOTH_FRAGMENTATION_BLOCKS = 1

# Unsloth's fused cross-entropy (unsloth_zoo fused_losses/cross_entropy_loss.py,
# unsloth_fused_ce_loss; unsloth/models/llama.py calls it with target_gb=None):
# - it splits the tokens into chunks whose logits take at most half of the memory free when the
#   loss first runs (get_chunk_size: target_gb = 0.5 x torch.cuda.mem_get_info free; the target is
#   set for the fp32 logits, and torch.compile, its default, fuses the upcast into the kernel);
# - each chunk computes loss and gradient at once (torch.func.grad_and_value over
#   compute_fused_ce_loss): the 16-bit logits from the LM head, their fp32 upcast for
#   cross_entropy, and the 16-bit gradient fed back through the head, 2 + 4 + 2 bytes per logit;
# - the chunk is freed before the backward; only the hidden-state gradient (tokens x hidden) stays.
# 8 bytes is the uncompiled path and an upper bound for the compiled one. Cross-check, not a fit:
# Unsloth's Llama-3.2-3B conversational notebook (T4, batch 2 x 2048 of chat rows that fill it,
# Unsloth 2024.10) reports 3.90 GiB of training memory over the loaded model; 4,096 x 128,256 x 8
# bytes is 3.91 GiB, and activations and optimizer states add about 0.8 GiB more: an upper bound.
UNSLOTH_CE_BYTES_PER_LOGIT = 2 + 4 + 2
UNSLOTH_CE_FREE_SHARE = 0.5
# unsloth_zoo 2026.10.9 (the version lowvram's GPU check ran) routes that loss through a chunked CE by
# default (fused_losses/cross_entropy_loss.py: _use_chunked_ce, UNSLOTH_CHUNKED_CE=1 and
# UNSLOTH_FUSED_LINEAR=1 unless turned off): its forward keeps only a per-token logsumexp and the
# backward recomputes each chunk. fused_losses/chunked_logprob.py, chunked_logprob_rows: a chunk
# holds min(2 GiB (_CHUNK_GB), half the free memory) at 8 bytes a logit (_BYTES_PER_LOGIT), and never
# more rows than max(512 (_MIN_ROWS), tokens / 8): at least 8 chunks for a large batch. So on a
# large card the chunk no longer grows with the free memory. The gpu extra asks for unsloth_zoo >=
# 2026.10.9: 2026.10.1-2026.10.8 have no chunked CE (their old loss sizes a chunk to min(half the free
# memory, 4 GiB) at 16 bytes a logit, with no minimum number of chunks). Older Unsloth (the 2024
# notebooks) sized one chunk to half the free memory alone: Stack.ce_chunk_cap_gib=None describes it.
UNSLOTH_CE_CHUNK_CAP_GIB = 2.0
UNSLOTH_CE_MIN_ROWS = 512
UNSLOTH_CE_MIN_CHUNKS = 8

# DPO (and KTO) on TRL >= 1.15 never calls the model's own LM head: DPOTrainer.__init__ patches the
# causal LM with trl.trainer.utils.add_fused_lm_head, and _compute_loss calls
# model(..., fused_lm_head=True), which runs the backbone (`self.base_model`, Unsloth's fast
# LlamaModel forward) and scores the labelled positions through _ChunkedLogProbFunction in tiles of
# TRL_TOKEN_TILE x TRL_VOCAB_TILE (below): no batch x sequence x vocabulary logits, 16- or 32-bit,
# for the policy or the reference. Chosen and rejected go through it concatenated, as one batch of
# 2 x batch rows ("batch is [chosen, rejected]"); the reference forward runs after the policy
# forward, under no_grad, with the "ref" adapter. Unsloth 2026.10.7 does not change this: its DPO
# patches (unsloth/models/rl_replacements.py) rewrite `concatenated_forward`, which TRL 1.15's
# DPOTrainer no longer has, and only with UNSLOTH_FUSED_PREFERENCE_LOSS=1. So a DPO step on the
# Unsloth backend costs TRL's tiles, like the hf backend, and its allocator pattern is Unsloth's
# per-layer one (no full-logits buffers come and go). Measured on an H100 (scripts/data/README.md):
# reserved minus allocated is 0.07-0.46 GiB in every Unsloth DPO run.
# ORPO (trl.experimental.orpo, TRL 1.15) still calls model(...) without labels, so Unsloth's
# CausalLM forward returns the full 16-bit logits (unsloth/models/llama.py): "unsloth_chunked" below.

# TRL >= 1.15 scores tokens through the LM head in tiles of 4096 tokens x 32768 vocabulary entries
# (trl/kernels/chunked_logprob.py: TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768

# transformers' own loss on full logits: the 16-bit logits, their fp32 upcast (ForCausalLMLoss),
# the log-softmax output cross_entropy keeps for backward, and its fp32 gradient.
FULL_LOGITS_FP32_EXTRA_BYTES = 4 + 4 + 4

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = ("sft", "dpo", "orpo")
GRAD_CKPT = ("off", "standard", "unsloth")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Stack:
    """How one training stack spends memory. `STACKS` holds lowvram's two backends.

    kernels:      "unsloth" (fused Triton kernels, LoRA folded into them) or "hf" (transformers
                  modules + PEFT LoRA layers under autocast).
    logits:       "unsloth_chunked" Unsloth's fused loss, chunked to the free memory (SFT; DPO
                  ORPO needs the logits themselves: 16-bit logits, log-softmax and gradient; DPO
                  uses TRL's fused LM head instead, "chunked");
                  "fused_16bit" one 16-bit logits buffer, gradient written in place (Unsloth's
                  older cross-entropy kernel); "chunked" TRL's fused LM head tiles; "full_fp32"
                  transformers' loss on full logits upcast to fp32 (TRL < 1.15, plain Trainer).
    ce_chunk_cap_gib: the most one chunk of Unsloth's SFT loss holds (unsloth_zoo >= 2026.10.9's chunked CE,
                  which also splits a batch in at least 8 chunks); None for the older loss sized to the
                  free memory alone.
    fp32_non_quantized: norms upcast to fp32 around a 4-bit base (lowvram's hf backend, like PEFT's
                  prepare_model_for_kbit_training; unlike PEFT it leaves the embeddings and lm_head
                  in the compute dtype); the residual stream then runs in fp32 too.
    """

    name: str
    kernels: str
    logits: str
    fp32_non_quantized: bool
    ce_chunk_cap_gib: float | None = None  # Unsloth's SFT loss chunk cap (UNSLOTH_CE_CHUNK_CAP_GIB); None: none


STACKS: dict[str, Stack] = {
    "unsloth": Stack(
        "unsloth",
        kernels="unsloth",
        logits="unsloth_chunked",
        fp32_non_quantized=False,
        ce_chunk_cap_gib=UNSLOTH_CE_CHUNK_CAP_GIB,
    ),
    "hf": Stack("hf", kernels="hf", logits="chunked", fp32_non_quantized=True),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak VRAM of one training stage, in GiB. The lines add up to `total_gib`."""

    weights_gib: float  # base model weights as loaded (4-bit linears, 16/32-bit embeddings and norms)
    lora_gib: float  # adapters + their gradients + optimizer states
    activations_gib: float  # kept for backward, plus one layer recomputed and its gradients
    logits_gib: float  # LM head output and loss buffers
    ref_forward_gib: float  # DPO reference: no-grad forward and the frozen reference adapter
    overhead_gib: float  # CUDA context + allocator slack and fragmentation + 4-bit dequant buffer
    total_gib: float
    tokens: int  # tokens in one micro-batch through the policy (DPO: chosen + rejected)
    details: dict[str, float] = field(default_factory=dict)  # the overhead's parts, trainable params

    @property
    def reserved_gib(self) -> float:
        """What torch.cuda.max_memory_reserved() would report: the total without the CUDA context."""
        return self.total_gib - self.details.get("cuda_context_gib", 0.0)

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights_gib),
            ("LoRA+optimizer", self.lora_gib),
            ("activations", self.activations_gib),
            ("logits", self.logits_gib),
            ("ref forward", self.ref_forward_gib),
            ("overhead", self.overhead_gib),
            ("total", self.total_gib),
        ]

    def lines(self) -> list[str]:
        return [f"{name:<15} {gib:6.2f} GiB" for name, gib in self.rows()]

    def to_dict(self) -> dict:
        return {**asdict(self), "reserved_gib": self.reserved_gib}


# ---------------------------------------------------------------- parameter counts


def _linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder linear layer."""
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    h, m = spec.hidden_size, spec.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, m),
        "up_proj": (h, m),
        "down_proj": (m, h),
    }


def lora_params(spec: ModelSpec, lora_r: int, target_modules: Sequence[str] = ALL_LINEAR) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted linear, in every layer."""
    shapes = _linear_shapes(spec)
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"target modules {unknown} are not decoder linears; expected some of {list(shapes)}")
    per_layer = sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in set(target_modules))
    return per_layer * spec.num_layers


def _weights_bytes(spec: ModelSpec, load_in_4bit: bool, elem: int, stack: Stack) -> float:
    linear = sum(i * o for i, o in _linear_shapes(spec).values()) * spec.num_layers
    embeddings = spec.vocab_size * spec.hidden_size * (1 if spec.tied_embeddings else 2)
    norms = spec.hidden_size * (2 * spec.num_layers + 1)
    if not load_in_4bit:
        return (linear + embeddings + norms) * elem
    norm_bytes = 4 if stack.fp32_non_quantized else elem
    return linear * (NF4_BYTES_PER_PARAM + NF4_SCALE_BYTES_PER_PARAM) + embeddings * elem + norms * norm_bytes


# ---------------------------------------------------------------- activations (bytes per token)


def _layer_saved_bytes(spec: ModelSpec, stack: Stack, elem: int, targets: Sequence[str], load_in_4bit: bool) -> float:
    """Bytes one decoder layer keeps for its backward, per token."""
    h, m = spec.hidden_size, spec.intermediate_size
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    if stack.kernels == "unsloth":
        # unsloth/kernels/fast_lora.py: LoRA_QKV and LoRA_W save their input X, LoRA_MLP saves X and
        # the gate and up outputs e, g (SwiGLU is recomputed in the backward); the RMSNorm kernel
        # saves its input; attention saves q, k, v and its output. The LoRA matmuls reuse those inputs.
        return elem * (h + h + (q + 2 * kv) + q + h + h + 2 * m)
    # transformers + PEFT under autocast, checked against autograd's saved tensors on CPU
    # (tests/test_memory.py):
    # - each RMSNorm upcasts its input to fp32 and keeps it (4 bytes x hidden, two norms);
    # - attention (SDPA / flash) keeps q, k, v and its output;
    # - SiLU keeps the gate output, the product keeps SiLU's output and the up output;
    # - each PEFT LoRA layer casts its input to the adapter's fp32 and autocast casts it back: lora_A
    #   keeps its own 16-bit copy of the input, one per targeted linear.
    # - bitsandbytes' MatMul4Bit keeps its input too (a frozen 16-bit nn.Linear does not): one for
    #   q/k/v, o, gate/up and down each.
    shapes = _linear_shapes(spec)
    lora_inputs = sum(shapes[t][0] for t in set(targets))
    base_inputs = (h + q + h + m) if load_in_4bit else 0
    return 2 * 4 * h + elem * (2 * q + 2 * kv) + elem * 3 * m + elem * lora_inputs + elem * base_inputs


def _layer_backward_bytes(spec: ModelSpec, stack: Stack, elem: int) -> float:
    """Gradients alive while one layer runs its backward, per token."""
    h, m = spec.hidden_size, spec.intermediate_size
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    if stack.kernels == "unsloth":
        # Unsloth's SwiGLU backward works in place in the saved gate/up buffers; the down-proj
        # gradient (intermediate size) and two hidden-size input gradients are new.
        return elem * max(m + 2 * h, q + 2 * kv + 2 * h)
    # autograd: gradients of the down input, SiLU output and up output, plus input gradients.
    return elem * max(3 * m + 3 * h, 2 * (q + 2 * kv) + 3 * h)


def _layer_forward_bytes(spec: ModelSpec, elem: int) -> float:
    """Working set of one layer's forward without grad (the DPO reference), per token."""
    h, m = spec.hidden_size, spec.intermediate_size
    return elem * (3 * h + 4 * m)  # residual, normed input, attention out; gate, up, SiLU, product


def _head_bytes(spec: ModelSpec, stack: Stack, elem: int) -> float:
    """The final norm and the LM head's input, kept for backward, per token."""
    h = spec.hidden_size
    return (4 * h if stack.kernels == "hf" else elem * h) + elem * h


def _logits_bytes(spec: ModelSpec, stack: Stack, elem: int, tokens: int, grad: bool) -> float:
    v, h = spec.vocab_size, spec.hidden_size
    if stack.logits == "full_fp32":
        return tokens * v * (elem + (FULL_LOGITS_FP32_EXTRA_BYTES if grad else 4))
    if stack.logits == "fused_16bit":
        return tokens * v * elem + tokens * 4  # logits buffer (gradient in place) + fp32 logsumexp
    if stack.logits == "unsloth_chunked":
        # ORPO on Unsloth: the model returns its logits (TRL needs them), and TRL's
        # selective_log_softmax keeps each row's 16-bit log-softmax for the backward, which then
        # writes a 16-bit gradient: three 16-bit buffers with grad, the logits alone without.
        return tokens * v * elem * (3 if grad else 1) + tokens * 4
    if stack.logits == "chunked":
        tile = min(tokens, TRL_TOKEN_TILE) * min(v, TRL_VOCAB_TILE) * elem
        # the lm_head is in the compute dtype (the hf backend does not upcast it), so TRL's
        # weight[tile].to(compute_dtype) is a view, not a copy
        per_token = (4 + elem) * h if grad else 0  # fp32 hidden gradient + gathered hidden rows
        return tile + tokens * per_token
    raise ValueError(f"unknown logits mode {stack.logits!r}")


def unsloth_ce_chunk_bytes(
    spec: ModelSpec, tokens: int, free_bytes: float | None, cap_gib: float | None = UNSLOTH_CE_CHUNK_CAP_GIB
) -> float:
    """Working set of Unsloth's fused cross-entropy: one chunk's logits, upcast and gradient.

    Chunks are sized to half of `free_bytes` (the memory free when the loss first runs), so the loss
    takes the whole batch at 8 bytes a logit when that fits, and about half of what is free when it
    does not. Without `free_bytes` (no card known) the whole batch is one chunk: the most it costs.
    With `cap_gib` (unsloth_zoo >= 2026.10.9) a chunk also holds at most `cap_gib` and at most
    max(512, tokens / 8) rows, whatever is free.
    """
    per_row = spec.vocab_size * UNSLOTH_CE_BYTES_PER_LOGIT
    full = tokens * per_row
    if cap_gib is not None:
        rows = max(UNSLOTH_CE_MIN_ROWS, -(-tokens // UNSLOTH_CE_MIN_CHUNKS))
        full = min(full, cap_gib * GIB, rows * per_row)
    if free_bytes is None:
        return full
    return min(full, UNSLOTH_CE_FREE_SHARE * free_bytes)


# ---------------------------------------------------------------- the estimate


def estimate(
    spec: ModelSpec,
    stage: str = "sft",
    *,
    max_seq_len: int,
    batch_size: int,
    lora_r: int,
    target_modules: Sequence[str] = ALL_LINEAR,
    grad_ckpt: str = "unsloth",
    optim: str = "adamw_8bit",
    dtype: str = "bf16",
    backend: str | Stack = "unsloth",
    load_in_4bit: bool = True,
    vram_gib: float | None = None,
) -> MemoryEstimate:
    """Peak VRAM of one stage ("sft", "dpo" or "orpo") of LoRA training, as a breakdown in GiB.

    `backend` names a stack in STACKS ("unsloth", "hf") or is a Stack for another implementation.
    DPO and ORPO batches hold chosen and rejected together: twice SFT's tokens. DPO also runs the
    no-grad reference forward; ORPO has no reference.
    `vram_gib` is the card's memory, when known: Unsloth sizes its loss chunks to what is free.
    """
    stack = STACKS[backend] if isinstance(backend, str) else backend
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if grad_ckpt not in GRAD_CKPT:
        raise ValueError(f"grad_ckpt must be one of {GRAD_CKPT}, got {grad_ckpt!r}")
    if grad_ckpt == "unsloth" and stack.kernels != "unsloth":
        raise ValueError("offloaded ('unsloth') checkpointing needs the unsloth backend")
    if optim not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optim must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {optim!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if min(max_seq_len, batch_size, lora_r) < 1:
        raise ValueError("max_seq_len, batch_size and lora_r must be positive")
    elem = DTYPE_BYTES[dtype]
    if not load_in_4bit:
        stack = replace(stack, fp32_non_quantized=False)  # PEFT upcasts only around a quantized base
    if stage == "dpo" and stack.logits == "unsloth_chunked":
        stack = replace(
            stack, logits="chunked"
        )  # TRL's fused LM head, not Unsloth's (see the note above TRL_TOKEN_TILE)
    pairs = stage in ("dpo", "orpo")
    tokens = batch_size * max_seq_len * (2 if pairs else 1)

    weights = _weights_bytes(spec, load_in_4bit, elem, stack)
    n_lora = lora_params(spec, lora_r, target_modules)
    lora = n_lora * (LORA_PARAM_BYTES + LORA_GRAD_BYTES + OPTIMIZER_STATE_BYTES[optim])

    # Activations: what the forward keeps, then one layer recomputed and back-propagated.
    saved = _layer_saved_bytes(spec, stack, elem, target_modules, load_in_4bit)
    residual = spec.hidden_size * (4 if stack.fp32_non_quantized else elem)
    if grad_ckpt == "off":
        kept = spec.num_layers * saved
        recompute = 0.0
    elif grad_ckpt == "standard":
        kept = spec.num_layers * residual  # each layer's input
        recompute = saved
    else:  # Unsloth's offload: layer inputs go to CPU RAM; two are in flight on the GPU
        kept = 2 * residual
        recompute = saved
    per_token = kept + recompute + _layer_backward_bytes(spec, stack, elem) + _head_bytes(spec, stack, elem)
    if grad_ckpt != "off":
        per_token += residual  # the recomputed layer's output, alive while its backward runs
    activations = tokens * per_token

    # bitsandbytes dequantizes a 4-bit weight into a 16-bit buffer for each matmul; forward and
    # backward buffers of the largest linear can be alive together.
    largest = max(i * o for i, o in _linear_shapes(spec).values())
    dequant = 2 * largest * elem if load_in_4bit else 0.0
    context = CUDA_CONTEXT_GIB * GIB
    details: dict[str, float] = {}

    ref_forward = 0.0
    if stage == "dpo":
        # TRL runs the reference after the policy forward, so it stacks on the kept activations.
        ref_logits = _logits_bytes(spec, stack, elem, tokens, grad=False)
        ref_forward = (
            tokens * _layer_forward_bytes(spec, elem) + ref_logits + n_lora * LORA_PARAM_BYTES
        )  # the frozen "ref" copy of the SFT adapter

    if stack.logits == "unsloth_chunked" and stage == "sft":
        # Two phases that do not overlap. The loss phase: the forward's kept tensors, the hidden-state
        # gradient the fused loss hands to the backward, and one loss chunk. The backward phase: the
        # activations above, the same hidden-state gradient, and the allocator's extra block.
        grad_hidden = tokens * spec.hidden_size * elem
        kept_forward = tokens * (kept + _head_bytes(spec, stack, elem))
        fixed = weights + lora + dequant + ALLOCATOR_SLACK_GIB * GIB + context
        free = None if vram_gib is None else vram_gib * GIB - fixed - kept_forward - grad_hidden
        chunk = unsloth_ce_chunk_bytes(spec, tokens, None if free is None else max(free, 0.0), stack.ce_chunk_cap_gib)
        loss_phase = kept_forward + grad_hidden + chunk
        block = (
            tokens
            * elem
            * max(spec.intermediate_size, spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim)
        )
        backward_phase = activations + grad_hidden + UNSLOTH_FRAGMENTATION_BLOCKS * block
        # Report the backward phase as activations (+ the hidden-state gradient), what the loss phase
        # needs beyond it as logits, and the extra block as fragmentation.
        activations = activations + grad_hidden
        logits = max(0.0, loss_phase - backward_phase)
        allocator = ALLOCATOR_SLACK_GIB * GIB + UNSLOTH_FRAGMENTATION_BLOCKS * block
        details.update(
            loss_phase_gib=loss_phase / GIB, backward_phase_gib=backward_phase / GIB, loss_chunk_gib=chunk / GIB
        )
    else:
        # DPO scores through TRL's tiles (both backends); ORPO on Unsloth materialises full 16-bit
        # logits. Where differently sized buffers come and go (transformers + PEFT modules, or full
        # logits), fragmentation is a share of them, as measured for transformers + PEFT.
        logits = _logits_bytes(spec, stack, elem, tokens, grad=True)
        if stack.kernels == "unsloth" and stack.logits == "chunked":
            # DPO on Unsloth through TRL's tiles: Unsloth's per-layer pattern, one extra block (as SFT).
            block = (
                tokens
                * elem
                * max(spec.intermediate_size, spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim)
            )
            allocator = ALLOCATOR_SLACK_GIB * GIB + UNSLOTH_FRAGMENTATION_BLOCKS * block
        else:
            step_bytes = activations + logits + ref_forward + dequant
            allocator = ALLOCATOR_SLACK_GIB * GIB + ALLOCATOR_FRAGMENTATION * step_bytes
    overhead = context + allocator + dequant

    parts = [weights, lora, activations, logits, ref_forward, overhead]
    gib = [p / GIB for p in parts]
    details.update(
        {
            "cuda_context_gib": context / GIB,
            "allocator_gib": allocator / GIB,
            "dequant_buffer_gib": dequant / GIB,
            "lora_params_m": n_lora / 1e6,
        }
    )
    return MemoryEstimate(*gib, total_gib=sum(gib), tokens=tokens, details=details)
