"""The memory estimator: how it moves with each setting, and its activation model against autograd."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import pytest

from lowvram.plan.catalog import CATALOG, ModelSpec
from lowvram.plan.memory import GIB, STACKS, Stack, estimate

LLAMA_8B = CATALOG["unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"]
QWEN_7B = CATALOG["unsloth/Qwen2.5-7B-Instruct-bnb-4bit"]
MISTRAL_7B = CATALOG["unsloth/mistral-7b-instruct-v0.3-bnb-4bit"]
MODELS = [LLAMA_8B, QWEN_7B, MISTRAL_7B, CATALOG["unsloth/Llama-3.2-1B-Instruct-bnb-4bit"]]
BACKENDS = [("unsloth", "unsloth"), ("hf", "standard")]  # (backend, its checkpointing)


def est(spec=LLAMA_8B, stage="sft", seq=1024, batch=1, r=16, backend="unsloth", ckpt=None, **kw):
    ckpt = ckpt or ("unsloth" if backend == "unsloth" else "standard")
    return estimate(spec, stage, max_seq_len=seq, batch_size=batch, lora_r=r, grad_ckpt=ckpt, backend=backend, **kw)


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name.split("/")[-1])
@pytest.mark.parametrize("backend,ckpt", BACKENDS)
@pytest.mark.parametrize("stage", ["sft", "dpo", "orpo"])
def test_estimate_grows_with_sequence_batch_and_rank(spec, backend, ckpt, stage):
    seqs = [est(spec, stage, seq=s, backend=backend, ckpt=ckpt).total_gib for s in (256, 512, 1024, 2048, 4096, 8192)]
    batches = [est(spec, stage, batch=b, backend=backend, ckpt=ckpt).total_gib for b in (1, 2, 4, 8)]
    ranks = [est(spec, stage, r=r, backend=backend, ckpt=ckpt).total_gib for r in (4, 8, 16, 32, 64, 128)]
    for series in (seqs, batches, ranks):
        assert all(a < b for a, b in pairwise(series)), series


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name.split("/")[-1])
@pytest.mark.parametrize("backend,ckpt", BACKENDS)
def test_preference_stages_cost_more_than_sft(spec, backend, ckpt):
    for seq, batch in ((512, 1), (1024, 2), (2048, 1)):
        sft, orpo, dpo = (
            est(spec, s, seq=seq, batch=batch, backend=backend, ckpt=ckpt) for s in ("sft", "orpo", "dpo")
        )
        assert sft.activations_gib < orpo.activations_gib == dpo.activations_gib
        if backend == "hf":  # the same LM head for all three: DPO adds its reference forward
            assert sft.total_gib < orpo.total_gib < dpo.total_gib
        else:  # ORPO gets Unsloth's full logits; DPO TRL's tiles, which at tiny batches cost less than SFT's loss chunk
            assert sft.total_gib < orpo.total_gib
        assert orpo.tokens == dpo.tokens == 2 * sft.tokens  # chosen and rejected together
        assert sft.ref_forward_gib == orpo.ref_forward_gib == 0 < dpo.ref_forward_gib


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.name.split("/")[-1])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_checkpointing_lowers_the_peak(spec, stage):
    off, std, offload = (est(spec, stage, seq=2048, ckpt=c).total_gib for c in ("off", "standard", "unsloth"))
    assert off > std > offload
    hf_off, hf_std = (est(spec, stage, seq=2048, backend="hf", ckpt=c).total_gib for c in ("off", "standard"))
    assert hf_off > hf_std


def test_breakdown_adds_up_and_reserved_leaves_out_the_context():
    e = est(stage="dpo", seq=2048, batch=2)
    parts = [v for k, v in e.rows() if k != "total"]
    assert sum(parts) == pytest.approx(e.total_gib)
    assert e.reserved_gib == pytest.approx(e.total_gib - e.details["cuda_context_gib"])
    assert e.to_dict()["reserved_gib"] == pytest.approx(e.reserved_gib)
    assert all(v >= 0 for v in parts)


def test_weights_follow_quantization_and_embeddings():
    # An 8B model in NF4 is about 5.3 GiB with its two 16-bit 128k x 4096 embedding matrices;
    # loaded 16-bit it is about 15 GiB.
    q4 = est(load_in_4bit=True).weights_gib
    full = est(load_in_4bit=False).weights_gib
    assert 5.0 < q4 < 5.6 and 14.5 < full < 15.5
    # The hf backend upcasts only the norms to fp32 (PEFT's prepare_model_for_kbit_training would
    # upcast the embeddings too: 2 GiB more on this model; scripts/bench_4bit_weights.py measures it).
    norms = 4096 * (2 * 32 + 1)
    assert est(backend="hf").weights_gib - q4 == pytest.approx(norms * (4 - 2) / GIB, rel=0.01)


def test_large_vocabulary_logits_dominate_short_sequences_activations_long_ones():
    # TRL's chunked LM head (lowvram's hf backend) bounds the logits; activations keep growing.
    short, long = est(seq=256, backend="hf"), est(seq=8192, backend="hf")
    assert short.logits_gib < 0.05  # tiles of 4096 tokens x 32768 entries, never batch x seq x vocab
    assert long.activations_gib > 3 * long.logits_gib
    # transformers' own loss upcasts full logits to fp32: over Qwen's 152k vocabulary they are the
    # largest per-step term even at 4096 tokens.
    full = Stack("hf full logits", kernels="hf", logits="full_fp32", fp32_non_quantized=False)
    e = est(QWEN_7B, seq=4096, backend=full)
    assert e.logits_gib > e.activations_gib and e.logits_gib > e.weights_gib
    # Unsloth's fused cross-entropy keeps one 16-bit buffer: vocabulary size is what matters.
    assert est(LLAMA_8B, seq=2048).logits_gib > 3.5 * est(MISTRAL_7B, seq=2048).logits_gib


@pytest.mark.parametrize(
    "bad",
    [
        {"stage": "kto"},
        {"ckpt": "sometimes"},
        {"optim": "lion"},
        {"dtype": "fp8"},
        {"backend": "hf", "ckpt": "unsloth"},
        {"seq": 0},
    ],
)
def test_invalid_inputs_are_bugs_not_user_errors(bad):
    with pytest.raises(ValueError):
        est(**bad)


def test_unknown_target_module_is_refused():
    with pytest.raises(ValueError, match="not decoder linears"):
        est(target_modules=("q_proj", "lm_head"))


def _autograd_saved_bytes_per_token(num_layers: int, targets: list[str], batch: int = 2, seq: int = 384) -> float:
    """Bytes autograd keeps for backward, per token, in a real transformers + PEFT forward (bf16 autocast, CPU)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        num_hidden_layers=num_layers,
        vocab_size=1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=8, target_modules=targets, lora_dropout=0.0)
    )
    tokens = batch * seq
    storages: dict[int, int] = {}

    def pack(t):
        # Per-token tensors only (weights cast by autocast are not activations; seq matches no weight
        # dimension); count each storage once.
        if t.dim() and (seq in t.shape or t.shape[0] == tokens):
            st = t.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(storages.values()) / tokens


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ],
    ids=["qkvo", "all-linear"],
)
def test_hf_activation_model_matches_what_autograd_saves(targets):
    """One decoder layer's saved activations, estimated vs counted in a real transformers + PEFT forward."""
    measured = (_autograd_saved_bytes_per_token(3, targets) - _autograd_saved_bytes_per_token(1, targets)) / 2

    def per_token(layers: int) -> float:
        spec = ModelSpec("tiny", "llama", 0.001, layers, 256, 4, 2, 688, 1024, False, False)
        e = estimate(
            spec,
            "sft",
            max_seq_len=384,
            batch_size=2,
            lora_r=8,
            target_modules=tuple(targets),
            grad_ckpt="off",
            optim="adamw_torch",
            dtype="bf16",
            backend=STACKS["hf"],
            load_in_4bit=False,
        )
        return e.activations_gib * GIB / e.tokens

    estimated = (per_token(3) - per_token(1)) / 2
    assert estimated == pytest.approx(measured, rel=0.10), (estimated, measured)


def test_unsloth_loss_is_chunked_to_free_memory_not_a_full_logits_buffer():
    # 78k tokens over a 128k vocabulary: a full 16-bit logits buffer alone would be 18.7 GiB.
    full = 78_475 * 128_256 * 2 / GIB
    on_24 = est(seq=78_475, r=32, vram_gib=24)
    assert on_24.logits_gib < 0.1 * full
    assert on_24.details["loss_chunk_gib"] <= 0.5 * 24  # half of what is free, at most
    # Without a card the whole batch is one chunk: the most the loss can cost, never less.
    assert est(seq=78_475, r=32).total_gib >= on_24.total_gib
    # 16-bit logits, fp32 upcast and 16-bit gradient, 8 bytes a logit. Unsloth's older loss (the
    # notebooks') takes a short batch in one chunk; unsloth_zoo >= 2026.10.9 splits it in at least 8
    # chunks of at least 512 rows, and caps a chunk at 2 GiB whatever is free.
    old = replace(STACKS["unsloth"], ce_chunk_cap_gib=None)
    assert est(seq=2048, batch=2, vram_gib=24, backend=old).details["loss_chunk_gib"] == pytest.approx(
        4096 * 128256 * 8 / GIB
    )
    assert est(seq=2048, batch=2, vram_gib=24).details["loss_chunk_gib"] == pytest.approx(512 * 128256 * 8 / GIB)
    assert est(seq=2048, batch=8, vram_gib=80).details["loss_chunk_gib"] == pytest.approx(2048 * 128256 * 8 / GIB)
    assert est(seq=8192, batch=8, vram_gib=80).details["loss_chunk_gib"] == pytest.approx(2.0)
    assert est(seq=8192, batch=8, vram_gib=80, backend=old).details["loss_chunk_gib"] > 20


def test_dpo_on_unsloth_scores_through_trl_tiles_and_orpo_gets_full_logits():
    # TRL >= 1.15's DPOTrainer scores through its own fused LM head on either backend, in tiles of
    # 4096 tokens x 32768 vocabulary entries: no tokens x vocabulary buffer, whatever the batch.
    for seq, batch in ((1024, 1), (1024, 2), (2048, 2), (8192, 4)):
        dpo = est(stage="dpo", seq=seq, batch=batch)
        hf = est(stage="dpo", seq=seq, batch=batch, backend="hf")
        assert dpo.logits_gib == pytest.approx(hf.logits_gib)
        assert dpo.logits_gib < 0.5 * dpo.tokens * 128_256 * 2 / GIB
        # Unsloth's per-layer allocation pattern: one extra block, not a share of the step.
        assert dpo.details["allocator_gib"] - 0.5 == pytest.approx(dpo.tokens * 14_336 * 2 / GIB)
    # TRL 1.15's ORPOTrainer asks the model for its logits: Unsloth returns the full 16-bit buffer.
    orpo = est(stage="orpo", seq=1024, batch=2)
    assert orpo.logits_gib >= orpo.tokens * 128_256 * 2 / GIB


def test_unsloth_fragmentation_follows_the_largest_block_not_a_share_of_the_step():
    # One extra block of the largest per-layer temporary: it grows with tokens x intermediate size,
    # and does not grow with the vocabulary (the loss chunk is freed before the backward).
    a = est(seq=32_768, vram_gib=80)
    frag = a.details["allocator_gib"] - 0.5
    assert frag == pytest.approx(32_768 * 14_336 * 2 / GIB)
    big_vocab = est(spec=QWEN_7B, seq=32_768, vram_gib=80)
    assert big_vocab.details["allocator_gib"] - 0.5 == pytest.approx(32_768 * 18_944 * 2 / GIB)
    # transformers + PEFT: several full-size logits copies come and go, a share of the step stays.
    hf = est(seq=4096, backend="hf")
    assert hf.details["allocator_gib"] - 0.5 > 0.25 * (hf.activations_gib + hf.logits_gib)


def test_head_dim_from_config_json_is_honoured(tmp_path):
    import json

    from lowvram.plan.catalog import get_spec, spec_from_config

    # google/gemma-2-9b-it: 16 heads of 256 over a 3584-wide residual (3584 / 16 would be 224).
    gemma = {
        "model_type": "gemma2",
        "hidden_size": 3584,
        "num_hidden_layers": 42,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "intermediate_size": 14336,
        "vocab_size": 256000,
    }
    spec = spec_from_config(gemma, "gemma-2-9b")
    assert spec.head_dim == 256 and spec.tied_embeddings
    assert spec.params_b == pytest.approx(9.24, abs=0.01)  # Google's published count
    (tmp_path / "config.json").write_text(json.dumps(gemma))
    assert get_spec(str(tmp_path)).head_dim == 256
    narrower = spec_from_config({**gemma, "head_dim": None}, "no head_dim")
    assert narrower.head_dim == 224
    assert est(spec=spec).weights_gib > est(spec=narrower).weights_gib  # q/k/v/o are wider
    # The shipped Mistral-Nemo entry: 32 heads of 128 over 5120.
    assert CATALOG["unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit"].head_dim == 128
