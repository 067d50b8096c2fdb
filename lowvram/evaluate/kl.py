"""KL(policy || reference) measured on answers the policy samples itself; generation and log-probabilities.

    kl = kl_to_reference(model, tok, prompts, samples=2)     # {"kl": nats per answer, "kl_sem": ..., ...}
    with adapter(model, "sft"): answers = generate(model, tok, prompts, sample=False)

    KL = E_{y ~ pi(.|x)} [ sum_t KL( pi(. | x, y_<t) || pi_ref(. | x, y_<t) ) ]   (nats per answer)

averaged over prompts and samples: at each position of a sampled answer the KL between the two
next-token distributions is summed exactly over the vocabulary, so no term is negative. The samples
are drawn at temperature 1 with no top-k/top-p, so they come from pi itself and the average is an
unbiased estimate of the answers' KL (the chain rule); answers are cut at `max_new_tokens`, so it is
the KL of the answers' first tokens. The reference is TRL's frozen "ref" adapter (the SFT policy).
The per-answer-token value is shown with its standard error over the answers (`kl_text`:
"0.004 ± 0.003 nats/token"), so that sampling noise is not read as an effect.

It imports no other lowvram module: the training callback (callbacks.kl_callback) and `lowvram eval`
(evaluate.py) both measure with it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

REFERENCE = "ref"  # TRL's frozen copy of the SFT adapter inside a DPO/KTO PeftModel
PROMPTS_FILE = "heldout_prompts.jsonl"  # RUN/eval/: the held-out prompts the preference stage used


def prompt_text(tok, prompt) -> str:
    """The prompt as the preference trainer renders it: chat template for messages, raw text otherwise."""
    if isinstance(prompt, list):
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


@contextmanager
def adapter(model, name: str | None):
    """Run `model` with one adapter active (None: adapters off = the base); trainability is left as it was."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    previous = model.active_adapter
    try:
        if name is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(name)
            yield
    finally:
        if name is not None:
            model.set_adapter(previous)
        for n, p in model.named_parameters():  # PEFT's set_adapter makes the active adapter trainable
            p.requires_grad_(grads[n])


@contextmanager
def inference(model, tok):
    import torch

    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"  # generation continues the prompt's last token
    try:
        with torch.no_grad():
            yield
    finally:
        tok.padding_side = side
        if was_training:
            model.train()


def _device(model):
    return next(model.parameters()).device


def generate(
    model,
    tok,
    prompts: list[str],
    *,
    sample: bool,
    n: int = 1,
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[list[list[int]]]:
    """Per prompt, `n` answers as token ids, each cut after its first EOS (kept: it is part of the answer).

    Sampling is at temperature 1 with no top-k/top-p, i.e. from the model's own distribution; seeded.
    """
    import torch

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out: list[list[list[int]]] = []
    torch.manual_seed(seed)
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    gen.update(max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad, eos_token_id=eos)
    with inference(model, tok):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(_device(model))
            ids = model.generate(**enc, **gen)[:, enc["input_ids"].shape[1] :].tolist()
            for j in range(len(chunk)):
                answers = []
                for seq in ids[j * n : (j + 1) * n]:
                    cut = seq.index(eos) + 1 if eos in seq else len(seq)
                    answers.append(seq[:cut])
                out.append(answers)
    return out


def _batch(tok, prompts: list[str], answers: list[list[int]]):
    """(input ids, attention mask, answer mask) of prompt + answer pairs, right-padded."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [(tok(text, add_special_tokens=False)["input_ids"], list(ans)) for text, ans in zip(prompts, answers)]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (p, a) in enumerate(rows):
        seq = p + a
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        target[r, len(p) : len(seq)] = True
    return ids, mask, target


def _next_token_logps(model, ids, mask):
    """log p(. | tokens so far) at every position but the last: [batch, length - 1, vocabulary]."""
    import torch

    dev = _device(model)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1)


def answer_logps(model, tok, prompts: list[str], answers: list[list[int]], batch_size: int = 16) -> list[float]:
    """Sum over the answer's tokens of log p(token | prompt, earlier tokens), one per (prompt, answer) pair."""
    out: list[float] = []
    with inference(model, tok):
        for i in range(0, len(prompts), batch_size):
            ids, mask, target = _batch(tok, prompts[i : i + batch_size], answers[i : i + batch_size])
            logp = _next_token_logps(model, ids, mask)
            dev = logp.device
            tok_logp = logp.gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
            out.extend((tok_logp * target[:, 1:].to(dev)).sum(-1).tolist())
    return out


def token_kls(
    model,
    tok,
    prompts: list[str],
    answers: list[list[int]],
    policy: str | None,
    reference: str | None,
    batch_size: int = 8,
) -> list[list[float]]:
    """Per answer, per answer token t: KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t)), summed over the whole vocabulary.

    Exact at each position, so never negative (up to rounding, clipped at 0); only the positions y_<t
    are sampled. Its sum over t is an unbiased estimate of the answers' KL with far less noise than
    log pi(y) - log pi_ref(y) of the sampled tokens alone, whose value for one answer can be negative.
    """
    out: list[list[float]] = []
    with inference(model, tok):
        for i in range(0, len(prompts), batch_size):
            ids, mask, target = _batch(tok, prompts[i : i + batch_size], answers[i : i + batch_size])
            at = target[:, 1:]  # the positions that predict an answer token
            with adapter(model, policy):
                lp = _next_token_logps(model, ids, mask)[at.to(_device(model))]
            with adapter(model, reference):
                lr = _next_token_logps(model, ids, mask)[at.to(_device(model))]
            kl = (lp.exp() * (lp - lr)).sum(-1).clamp_min(0.0).tolist()
            del lp, lr
            start = 0
            for n in at.sum(-1).tolist():
                out.append(kl[start : start + n])
                start += n
    return out


def _flat(prompts: list[str], answers: list[list[list[int]]]) -> tuple[list[str], list[list[int]]]:
    ps, ans = [], []
    for p, group in zip(prompts, answers):
        for a in group:
            ps.append(p)
            ans.append(a)
    return ps, ans


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _sem(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _ratio_sem(values: list[float], weights: list[int]) -> float | None:
    """Standard error of sum(values) / sum(weights) over independent (value, weight) pairs (delta method)."""
    if len(values) < 2 or not sum(weights):
        return None
    r = sum(values) / sum(weights)
    mean_w = sum(weights) / len(weights)
    resid = [v - r * w for v, w in zip(values, weights)]
    return math.sqrt(sum(e * e for e in resid) / (len(resid) - 1) / len(resid)) / mean_w


def kl_from_samples(
    model, tok, prompts: list[str], samples: list[list[list[int]]], policy: str | None, reference: str | None
) -> dict:
    """KL(policy || reference) on answers sampled from the policy: per answer (nats) and per answer token.

    Each answer's KL is the sum of token_kls over its tokens (>= 0); `kl_sem` and `kl_per_token_sem`
    are the standard errors over the answers, so a value within about two of them of 0 is noise.
    """
    ps, ans = _flat(prompts, samples)
    per_answer = [sum(t) for t in token_kls(model, tok, ps, ans, policy, reference)]
    lengths = [len(a) for a in ans]
    tokens = sum(lengths)
    return {
        "kl": _mean(per_answer),
        "kl_sem": _sem(per_answer),
        "kl_per_token": sum(per_answer) / tokens if tokens else None,
        "kl_per_token_sem": _ratio_sem(per_answer, lengths),
        "kl_answers": len(per_answer),
        "kl_mean_tokens": tokens / len(ans) if ans else None,
    }


def kl_to_reference(
    model,
    tok,
    prompts: list[str],
    *,
    policy: str | None = "default",
    reference: str | None = REFERENCE,
    samples: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict:
    """Sample `samples` answers per prompt from the policy, then KL(policy || reference) on them (nats per answer)."""
    with adapter(model, policy):
        drawn = generate(model, tok, prompts, sample=True, n=samples, seed=seed, max_new_tokens=max_new_tokens)
    return kl_from_samples(model, tok, prompts, drawn, policy, reference)


def kl_text(stats: dict, prefix: str = "") -> str | None:
    """`0.004 ± 0.003 nats/token` from kl_from_samples' numbers (`prefix` "eval_": as logged at a held-out eval)."""
    value, sem = stats.get(prefix + "kl_per_token"), stats.get(prefix + "kl_per_token_sem")
    if value is None:
        return None
    return f"{value:.3f} ± {sem:.3f} nats/token" if sem is not None else f"{value:.3f} nats/token"
