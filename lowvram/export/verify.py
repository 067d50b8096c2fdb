"""Verification that can fail: each GGUF in llama.cpp against the merged model in transformers.

    rows = verify_ggufs(merged_dir, {"f16": path, "q4_k_m": path}, system_prompt)
    print(verify_table(rows))        # type, tokens, greedy, top-1 agreement, perplexity change, ok/warn/FAIL

What is compared, on a bounded probe set (3 chat prompts, 4 sample conversations, at most
MAX_PROBE_TOKENS tokens each):
- tokens: llama.cpp's token ids equal transformers' on every probe (else FAIL).
- greedy: transformers' greedy continuation (up to GREEDY_TOKENS) of each prompt is fed to llama.cpp in one
  pass; the GGUF's own greedy output is the same up to the first position where its argmax differs.
  For f16/bf16/q8_0 a difference FAILs unless transformers' top two logits there are closer than the
  logit error measured on the same sequence (a near-tie any rounding flips).
- top-1 agreement and perplexity change on the sample conversations, against per-type tolerances
  (TOLERANCES): within the first bound "ok", within the second "warn", beyond it "FAIL".

Cost: transformers runs one batched forward for all types. The greedy candidates come from the most
precise GGUF (llama.cpp decodes them); that forward checks them, and each is kept up to and including
transformers' first own choice, which is transformers' greedy output without a token-by-token
generate. Each GGUF then evaluates each probe once, teacher-forced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lowvram.export.llamacpp import GGUFModel
from lowvram.export.ollama import probe_conversations
from lowvram.plan.hardware import available_ram_bytes
from lowvram.utils.ui import table

GREEDY_TOKENS = 24
MAX_PROBE_TOKENS = 256
EXACT_TYPES = ("f16", "bf16", "q8_0")  # greedy output must match the merged model (up to near-ties)
FAITHFUL = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.", "Why is the sky blue?")


@dataclass(frozen=True)
class Tolerance:
    """|perplexity change| and top-1 agreement bounds: (ok, warn); beyond warn is FAIL."""

    ppl_change: tuple[float, float]
    agree: tuple[float, float]


# 16-bit and q8_0 must reproduce the model; K-quants lose precision, more the fewer the bits. Published
# llama.cpp figures for 7-8B models are +0.1% (q8_0) to about +3-5% (q4_k_m) perplexity; models under 1B
# lose several times more, hence the wider K-quant bounds. A file that is broken, not merely rounded,
# moves perplexity by tens of percent and agrees on under half of the tokens.
TOLERANCES = {
    "f16": Tolerance((0.01, 0.03), (0.98, 0.95)),
    "bf16": Tolerance((0.02, 0.05), (0.97, 0.93)),
    "q8_0": Tolerance((0.02, 0.05), (0.95, 0.90)),
    "q6_k": Tolerance((0.05, 0.15), (0.90, 0.80)),
    "q5_k_m": Tolerance((0.08, 0.20), (0.88, 0.75)),
    "q4_k_m": Tolerance((0.15, 0.30), (0.80, 0.65)),
}
STATUS_ORDER = {"ok": 0, "warn": 1, "FAIL": 2}


def _level(value: float, bounds: tuple[float, float], higher_is_better: bool) -> str:
    if not math.isfinite(value):
        return "FAIL"
    ok, warn = bounds
    if higher_is_better:
        return "ok" if value >= ok else "warn" if value >= warn else "FAIL"
    return "ok" if value <= ok else "warn" if value <= warn else "FAIL"


def judge(row: dict) -> tuple[str, list[str]]:
    """(status, reasons) for one verification row, from TOLERANCES[row['type']]."""
    t = row["type"]
    tol = TOLERANCES[t]
    reasons = []
    status = "ok"

    def worse(level: str, why: str) -> None:
        nonlocal status
        if STATUS_ORDER[level] > STATUS_ORDER[status]:
            status = level
        if level != "ok":
            reasons.append(why)

    if not row["tokens_same"]:
        worse("FAIL", f"llama.cpp tokenizes the probes differently: {row.get('tokens_note', '')}".rstrip(": "))
    if t in EXACT_TYPES and not row["greedy_ok"]:
        worse("FAIL", "greedy output differs from transformers where the top logits are not a near-tie")
    change = abs(row["ppl_change"]) if math.isfinite(row["ppl_change"]) else math.inf
    worse(
        _level(change, tol.ppl_change, False),
        f"perplexity changed by {100 * row['ppl_change']:+.1f}% (ok within ±{100 * tol.ppl_change[0]:g}%, "
        f"FAIL beyond ±{100 * tol.ppl_change[1]:g}%)",
    )
    worse(
        _level(row["agree"], tol.agree, True),
        f"top-1 agreement {100 * row['agree']:.1f}% (ok from {100 * tol.agree[0]:g}%, FAIL under "
        f"{100 * tol.agree[1]:g}%)",
    )
    return status, reasons


def explain(row: dict, n_params: int | None = None) -> str:
    """A paragraph for a type that did not pass: what moved, and what to do."""
    t = row["type"]
    size = f" ({n_params / 1e6:.0f}M parameters)" if n_params else ""
    head = f"{t}: {row['status']}: " + "; ".join(row["reasons"]) + "."
    if t in EXACT_TYPES:
        return head + (
            f" A {t} file should reproduce the merged model; this one does not, so the conversion or the "
            "file is broken (see export.log), not merely rounded."
        )
    return head + (
        f" {t} keeps about {_BITS.get(t, '?')} bits per weight; small models{size} lose the most "
        "from K-quants. Try a type with more bits (q5_k_m, q6_k, q8_0). A change this large can "
        "also mean a damaged file: q8_0 and f16 passing while this fails points at the quantization."
    )


_BITS = {"q4_k_m": "4.9", "q5_k_m": "5.7", "q6_k": "6.6"}


def _nll(logits, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64 log-softmax)."""
    import numpy as np

    lg = logits[:-1].astype(np.float64)
    lg -= lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def verify_ggufs(merged_dir: Path, ggufs: dict, system: str | None, stop_ids: set[int] | None = None) -> list[dict]:
    """Compare each GGUF with the merged model in transformers; one row per type, with status and reasons."""
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
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # Greedy candidates come from the most precise GGUF (llama.cpp decodes fast); transformers checks them in
    # the one batched forward below and keeps each up to and including its own first different choice:
    # that prefix is exactly transformers' greedy output, without a token-by-token generate.
    first = min(ggufs, key=lambda t: FAITHFUL.index(t) if t in FAITHFUL else len(FAITHFUL))
    with GGUFModel(ggufs[first], n_ctx=max(512, max(len(p) for p in prompts) + GREEDY_TOKENS)) as g:
        cands = [g.greedy(ids, GREEDY_TOKENS, stop_ids) for ids in prompts]
    with torch.no_grad():
        seqs = [p + c for p, c in zip(prompts, cands)] + texts
        longest = max(len(s) for s in seqs)
        batch = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs])
        logits = model(input_ids=batch, attention_mask=mask).logits.float().numpy()  # right padding: exact
    hf = [logits[i, : len(s)] for i, s in enumerate(seqs)]
    ref_greedy = []
    for ids, cand, h in zip(prompts, cands, hf):
        choice = h[len(ids) - 1 : len(ids) - 1 + len(cand)].argmax(-1).tolist()
        k = next((i for i, (a, b) in enumerate(zip(cand, choice)) if a != b), None)
        ref_greedy.append(cand if k is None else cand[:k] + [choice[k]])
    n_pred = sum(len(ids) - 1 for ids in texts)
    nll_hf = sum(_nll(h, ids) for h, ids in zip(hf[len(prompts) :], texts))
    del model

    rows = []
    for t, path in ggufs.items():
        with GGUFModel(path, n_ctx=max(512, longest)) as g:
            mismatch = None
            for ids in seqs:
                text = tok.decode(ids)
                if tok(text, add_special_tokens=False)["input_ids"] == ids and g.tokenize(text) != ids:
                    mismatch = text[:60]
                    break
            n_same = n_total = 0
            greedy_ok, same_all, notes = True, True, []
            for ids, ref, h in zip(prompts, ref_greedy, hf):
                seq = ids + ref
                gl = g.logits(seq)
                got = gl[len(ids) - 1 : len(seq) - 1].argmax(-1).tolist()  # the GGUF's choice at each step
                k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
                n_same += k
                n_total += len(ref)
                if k < len(ref):
                    same_all = False
                    pos = len(ids) - 1 + k
                    gap = float(h[pos, ref[k]] - h[pos, got[k]])
                    noise = float(np.abs(h[: len(seq)] - gl).max())
                    near_tie = gap <= 2 * noise
                    greedy_ok = greedy_ok and near_tie
                    notes.append((k, gap, noise, near_tie))
            agree_n = agree_d = 0
            nll_g = 0.0
            for ids, h in zip(texts, hf[len(prompts) :]):
                gl = g.logits(ids)
                agree_n += int((h.argmax(-1) == gl.argmax(-1)).sum())
                agree_d += len(ids)
                nll_g += _nll(gl, ids)
        ppl_hf, ppl_g = float(np.exp(nll_hf / n_pred)), float(np.exp(nll_g / n_pred))
        if same_all:
            greedy = f"same {n_same}/{n_total}"
        elif t not in EXACT_TYPES:  # K-quants are expected to drift: report how far they agree
            greedy = f"{n_same}/{n_total} before first difference"
        elif greedy_ok:
            greedy = f"same up to near-ties ({n_same}/{n_total})"
        else:
            greedy = f"DIFFERS ({n_same}/{n_total})"
        row = {
            "type": t,
            "size_mib": Path(path).stat().st_size / 2**20,
            "tokens_same": mismatch is None,
            "tokens_note": f"first at {mismatch!r}" if mismatch else "",
            "greedy": greedy,
            "greedy_same": same_all,
            "greedy_ok": greedy_ok,
            "divergences": notes,
            "agree": agree_n / agree_d,
            "ppl_hf": ppl_hf,
            "ppl_gguf": ppl_g,
            "ppl_change": ppl_g / ppl_hf - 1 if ppl_hf else math.nan,
            "n_params": n_params,
        }
        row["status"], row["reasons"] = judge(row)
        row["ok"] = row["status"] != "FAIL"
        rows.append(row)
    return rows


def verify_table(rows: list[dict]) -> str:

    out = []
    for r in rows:
        tol = TOLERANCES[r["type"]]
        out.append(
            (
                r["type"],
                f"{r['size_mib']:.1f} MiB",
                "same" if r["tokens_same"] else "DIFFERENT",
                r["greedy"],
                f"{100 * r['agree']:.1f}%",
                f"{r['ppl_hf']:.2f} -> {r['ppl_gguf']:.2f} ({100 * r['ppl_change']:+.2f}%)",
                f"±{100 * tol.ppl_change[0]:g}% / {100 * tol.agree[0]:g}%",
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
            "top-1 agree",
            "perplexity hf -> gguf",
            "ok within",
            "check",
        ),
    )
