"""Verification of exported GGUF files: is the conversion right, and what did quantization cost?

    rows = verify_ggufs(merged_dir, {"f16": path, "q4_k_m": path}, system_prompt)
    print(verify_table(rows))         # per type: conversion checks (ok/FAIL) and the measured loss
    for r in rows: print(cost_line(r, rows))   # "q4_k_m costs this 135M-parameter model 0.11 nats/token ..."

Two questions, answered separately:
(a) Is the conversion right? This decides the check. Each file must
    - tokenize the probes exactly as transformers does;
    - hold the merged model's tensors, each within its GGML type's rounding (gguf_weights: every tensor
      dequantized by gguf-py, mapped back to its Hugging Face name, compared);
    - make llama.cpp compute what transformers computes with THE FILE'S OWN WEIGHTS (loaded into the model):
      mean KL divergence under CONVERSION_KL and the same top-1 token wherever transformers' choice is
      clear (margin >= CLEAR_MARGIN), on the probe prompts' greedy continuations and the sample texts.
    A wrong tokenizer, template, rope, tensor layout or damaged tensor fails one of these whatever the type;
    a faithful file passes whatever its quantization, since rounding is on both sides.
(b) How much did quantization cost? Measured against the merged model in transformers, reported, never
    judged: KL divergence per token (as llama.cpp's --kl-divergence), top-1 agreement where the merged
    model's choice is clear, and the perplexity change (on text the model finds near-random, perplexity
    moves with noise; that is said beside it). cost_line() turns it into advice by model size and type.

Cost: transformers runs one batched forward for the merged model, and one per quantized type with that
file's weights on the continuations and the prose (none for a 16-bit file whose tensors equal the merged ones). Each GGUF then evaluates
each probe once in llama.cpp, teacher-forced; the greedy continuations come from the most precise file.
"""

from __future__ import annotations

import math
from pathlib import Path

from lowvram.export.gguf_weights import load_gguf_weights
from lowvram.export.llamacpp import GGUFModel
from lowvram.export.ollama import probe_conversations
from lowvram.plan.hardware import available_ram_bytes
from lowvram.utils.ui import table

GREEDY_TOKENS = 24
MAX_PROBE_TOKENS = 256
FAITHFUL = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
SIXTEEN_BIT = ("f16", "bf16")
PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.", "Why is the sky blue?")
# Plain English beside the chat probes: a tuned model may find the sample conversations near-random.
PROSE = (
    "The printing press changed Europe within a lifetime. Before it, a book was copied by hand over months; "
    "after it, a workshop could print hundreds of copies in a week. Books became cheaper, more people learned "
    "to read, and news, maps and new ideas travelled faster than ever before."
)
CLEAR_MARGIN = 2.0  # logit gap top-1 minus runner-up: the top-1 is >= 7x as likely, beyond rounding noise
# llama.cpp vs transformers on the same weights, mean KL per token. 16-bit files: llama.cpp rounds activations
# to f16 (measured 1e-5 on SmolLM2-135M). Quantized files: it also rounds activations to 8 bits for its
# integer dot products (measured 0.003-0.016 for q8_0 and q4_k_m on SmolLM2-135M). A wrong rope base
# (1e4 for 1e5) measured 0.08-0.10 on the same q8_0; a wrong layout or tokenizer, whole nats.
CONVERSION_KL = {"16-bit": 1e-3, "quantized": 0.04}
CONVERSION_TOP1 = 0.95  # where transformers' choice is clear, llama.cpp's must be the same (a few flips allowed)
MIN_CLEAR = 10  # fewer clear positions than this: the top-1 check has too little to say
HARD_TEXT_PPL = 100.0  # perplexity above this on the probe texts: its change is mostly noise
SMALL_MODEL = 1e9  # below this many parameters quantization costs several times the 7-8B figures
STATUS_ORDER = {"ok": 0, "warn": 1, "FAIL": 2}


def judge(row: dict) -> tuple[str, list[str]]:
    """(status, reasons) for one row: FAIL when the conversion is wrong; the quantization cost never fails."""
    reasons: list[str] = []
    status = "ok"

    def worse(level: str, why: str) -> None:
        nonlocal status
        if STATUS_ORDER[level] > STATUS_ORDER[status]:
            status = level
        reasons.append(why)

    if not row["tokens_same"]:
        worse("FAIL", f"llama.cpp tokenizes the probes differently: {row.get('tokens_note', '')}".rstrip(": "))
    for p in row.get("weight_problems", []):
        worse("FAIL", p)
    for p in row.get("weight_warnings", []):
        worse("warn", p)
    if not row.get("finite", True):
        worse("FAIL", "logits are not finite (NaN or infinity)")
    kl, bound = row.get("conv_kl", 0.0), row.get("conv_kl_bound", math.inf)
    if not kl <= bound:
        worse(
            "FAIL",
            f"llama.cpp's output differs from transformers running the file's own weights: KL {kl:.2g} "
            f"nats/token (rounding stays under {bound:g})",
        )
    if row.get("conv_clear", 0) >= MIN_CLEAR and not row["conv_top1"] >= CONVERSION_TOP1:
        worse(
            "FAIL",
            f"llama.cpp picks another top-1 token than transformers on the same weights at "
            f"{100 * (1 - row['conv_top1']):.0f}% of the {row['conv_clear']} positions where the choice is clear",
        )
    return status, reasons


def explain(row: dict, n_params: int | None = None) -> str:
    """A paragraph for a type that did not pass: what is wrong, and what to do."""
    head = f"{row['type']}: {row['status']}: " + "; ".join(row["reasons"]) + "."
    if row["status"] == "FAIL":
        return head + (
            " This is not quantization loss (that is measured against the file's own weights and passes "
            "whatever the type): the conversion or the file is broken. See export.log; export again, and "
            "report it if it repeats."
        )
    return head + " The file was only partly checked; the figures above cover the rest."


def _params(n: int | None) -> str:
    if not n:
        return "this model"
    return f"this {n / 1e9:.1f}B-parameter model" if n >= 1e9 else f"this {n / 1e6:.0f}M-parameter model"


def cost_line(row: dict, rows: list[dict] | None = None) -> str | None:
    """What quantization cost this type, with advice by model size and type; None for a 16-bit file."""
    t = row["type"]
    if t in SIXTEEN_BIT or "kl" not in row or row["status"] == "FAIL":
        return None
    n = row.get("n_params")
    line = (
        f"{t} costs {_params(n)} {row['kl']:.3g} nats/token (KL divergence from the merged model); "
        f"top-1 agreement {100 * row['agree']:.0f}% where the merged model is confident"
    )
    if math.isfinite(row.get("ppl_change", math.nan)):
        line += f", perplexity {100 * row['ppl_change']:+.1f}%"
        if row.get("ppl_hf", 0) > HARD_TEXT_PPL:
            line += " (on text it finds hard, so mostly noise)"
    line += "."
    q8 = next((r for r in rows or [] if r["type"] == "q8_0" and "kl" in r and r["status"] != "FAIL"), None)
    small = n is not None and n < SMALL_MODEL
    if t == "q8_0":
        line += " That is the least a quantized file loses; f16 keeps the merged weights."
        if small:
            line += " Small models lose more in 8 bits than the ~0.001 nats/token quoted for 7-8B models."
    elif small:
        line += (
            " Small models lose several times what 7-8B models do (q4_k_m there: about 0.03); prefer q8_0 below "
            "1B parameters" + (f" (it costs this one {q8['kl']:.3g})" if q8 else "") + "."
        )
    else:
        line += " Fewer bits lose more: q5_k_m, q6_k or q8_0 keep more of the model if it matters."
    return line


def _logp(logits):
    import numpy as np

    lg = logits.astype(np.float64)
    lg -= lg.max(-1, keepdims=True)
    return lg - np.log(np.exp(lg).sum(-1, keepdims=True))


def _kl(p_logits, q_logits):
    """KL(p || q) per position, in nats (float64)."""
    import numpy as np

    lp, lq = _logp(p_logits), _logp(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _nll(logits, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1]."""
    import numpy as np

    return float(-_logp(logits[:-1])[np.arange(len(ids) - 1), ids[1:]].sum())


def _margin(logits):
    import numpy as np

    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def _forward(model, seqs: list[list[int]], pad: int) -> list:
    """Next-token logits (float32 numpy) for each sequence, one right-padded batch (exact for a causal LM)."""
    import torch

    longest = max(len(s) for s in seqs)
    batch = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs])
    with torch.no_grad():
        logits = model(input_ids=batch, attention_mask=mask).logits.float().numpy()
    return [logits[i, : len(s)] for i, s in enumerate(seqs)]


def _probes(tok, system: str | None) -> tuple[list[list[int]], list[list[int]]]:
    """(chat prompts, texts) as token ids."""

    def ids_of(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"][:MAX_PROBE_TOKENS]

    sys_msg = [{"role": "system", "content": system}] if system else []
    prompts = []
    for q in PROMPTS:
        msgs = sys_msg + [{"role": "user", "content": q}]
        try:
            prompts.append(ids_of(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)))
        except Exception:  # a template without a system role
            prompts.append(ids_of(tok.apply_chat_template(msgs[-1:], tokenize=False, add_generation_prompt=True)))
    texts = []
    for conv in probe_conversations():
        try:
            texts.append(ids_of(tok.apply_chat_template(conv, tokenize=False)))
        except Exception:
            continue
    texts.append(ids_of(PROSE))
    return prompts, texts


def verify_ggufs(merged_dir: Path, ggufs: dict, system: str | None, stop_ids: set[int] | None = None) -> list[dict]:
    """Check each GGUF's conversion and measure its quantization cost; one row per type (see the docstring)."""
    import time

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    # float32 arithmetic on the merged 16-bit weights is the reference; a model too big for that in
    # RAM is compared in its own 16-bit dtype instead (noisier, so near-ties are more frequent).
    merged_bytes = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    big = merged_bytes * 2 > 0.5 * available_ram_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto" if big else torch.float32)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    if stop_ids is None:
        stop_ids = {i for i in [tok.eos_token_id] if i is not None}
    prompts, texts = _probes(tok, system)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # The greedy continuations come from the most precise file (llama.cpp decodes fast); every file is then
    # checked teacher-forced on them: at each step its choice must be the one transformers makes.
    first = min(ggufs, key=lambda t: FAITHFUL.index(t) if t in FAITHFUL else len(FAITHFUL))
    with GGUFModel(ggufs[first], n_ctx=max(512, max(len(p) for p in prompts) + GREEDY_TOKENS)) as g:
        cands = [g.greedy(ids, GREEDY_TOKENS, stop_ids) for ids in prompts]
    seqs = [p + c for p, c in zip(prompts, cands)] + texts
    longest = max(len(s) for s in seqs)
    ref = _forward(model, seqs, pad)
    # predicted positions: the continuation of each prompt, and every position of each text
    cont = [slice(len(p) - 1, len(p) - 1 + len(c)) for p, c in zip(prompts, cands)]
    spans = cont + [slice(0, len(s) - 1) for s in texts]
    check = [*range(len(prompts)), len(seqs) - 1]  # what the conversion check runs: continuations and PROSE
    n_pred = sum(len(ids) - 1 for ids in texts)
    nll_ref = sum(_nll(h, ids) for h, ids in zip(ref[len(prompts) :], texts))

    rows = []
    for t, path in ggufs.items():
        t0 = time.perf_counter()
        weights = load_gguf_weights(Path(path), model, merged_dir)
        # a 16-bit file of a 16-bit merge holds the merged weights exactly: the reference forward stands for it.
        # Otherwise transformers runs the file's weights on the prompts' continuations and the prose only (about
        # half the tokens, still ~100 positions): the conversion check needs them, the cost uses every probe.
        own = ref if weights.exact else _forward(model, [seqs[i] for i in check], pad)
        with GGUFModel(path, n_ctx=max(512, longest)) as g:
            mismatch = None
            for ids in seqs:
                text = tok.decode(ids)
                if tok(text, add_special_tokens=False)["input_ids"] == ids and g.tokenize(text) != ids:
                    mismatch = text[:60]
                    break
            gg = [g.logits(ids) for ids in seqs]
        if weights.exact:
            own = [own[i] for i in check]
        own_p = np.concatenate([h[spans[i]] for h, i in zip(own, check)])
        ref_p = np.concatenate([h[s] for h, s in zip(ref, spans)])
        gg_p = np.concatenate([h[s] for h, s in zip(gg, spans)])
        gg_check = np.concatenate([gg[i][spans[i]] for i in check])
        finite = bool(np.isfinite(own_p).all() and np.isfinite(gg_p).all() and np.isfinite(ref_p).all())
        # (a) llama.cpp against transformers on the same weights
        conv_kl = float(_kl(own_p, gg_check).mean()) if finite else math.nan
        same = own_p.argmax(-1) == gg_check.argmax(-1)
        clear = _margin(own_p) >= CLEAR_MARGIN
        n_cont = sum(len(c) for c in cands)
        same_cont, clear_cont = same[:n_cont], clear[:n_cont]
        if same_cont.all():
            greedy = f"same {n_cont}/{n_cont}"
        elif same_cont[clear_cont].all():
            greedy = f"same up to near-ties ({int(same_cont.sum())}/{n_cont})"
        else:
            greedy = f"DIFFERS ({int(same_cont.sum())}/{n_cont})"
        quantized = any(k not in ("F32", "F16", "BF16") for k in weights.types)
        # (b) the cost: llama.cpp's file against the merged model
        kl = float(_kl(ref_p, gg_p).mean()) if finite else math.nan
        ref_clear = _margin(ref_p) >= CLEAR_MARGIN
        agree = float((ref_p.argmax(-1) == gg_p.argmax(-1))[ref_clear].mean()) if ref_clear.any() else math.nan
        nll_g = sum(_nll(h, ids) for h, ids in zip(gg[len(prompts) :], texts))
        ppl_ref, ppl_g = float(np.exp(nll_ref / n_pred)), float(np.exp(nll_g / n_pred))
        row = {
            "type": t,
            "size_mib": Path(path).stat().st_size / 2**20,
            "n_params": n_params,
            "tokens_same": mismatch is None,
            "tokens_note": f"first at {mismatch!r}" if mismatch else "",
            "weights": weights.line(),
            "weight_problems": weights.problems,
            "weight_warnings": weights.warnings,
            "finite": finite,
            "greedy": greedy,
            "conv_kl": conv_kl,
            "conv_kl_bound": CONVERSION_KL["quantized" if quantized else "16-bit"],
            "conv_top1": float(same[clear].mean()) if clear.any() else math.nan,
            "conv_clear": int(clear.sum()),
            "kl": kl,
            "agree": agree,
            "agree_n": int(ref_clear.sum()),
            "ppl_hf": ppl_ref,
            "ppl_gguf": ppl_g,
            "ppl_change": ppl_g / ppl_ref - 1 if ppl_ref and math.isfinite(ppl_ref) else math.nan,
            "seconds": time.perf_counter() - t0,
        }
        row["status"], row["reasons"] = judge(row)
        row["ok"] = row["status"] != "FAIL"
        rows.append(row)
    del model
    return rows


def verify_table(rows: list[dict]) -> str:

    def num(x, fmt: str) -> str:
        return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "-"

    out = []
    for r in rows:
        out.append(
            (
                r["type"],
                f"{r['size_mib']:.1f} MiB",
                "same" if r["tokens_same"] else "DIFFERENT",
                r["greedy"],
                num(r.get("conv_kl"), "{:.1e}"),
                num(r.get("kl"), "{:.4f}"),
                num(r.get("agree"), "{:.1%}"),
                f"{num(r.get('ppl_hf'), '{:.2f}')} -> {num(r.get('ppl_gguf'), '{:.2f}')} "
                f"({num(r.get('ppl_change'), '{:+.2%}')})",
                r["status"],
            )
        )
    return table(
        out,
        (
            "type",
            "size",
            "tokens",
            f"greedy ({GREEDY_TOKENS} tokens x {len(PROMPTS)})",
            "conversion KL",
            "cost KL",
            "top-1 (clear)",
            "perplexity hf -> gguf",
            "check",
        ),
    )
