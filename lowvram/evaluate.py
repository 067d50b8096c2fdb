"""What preference tuning did, measured from real generations: KL to the reference, answers, implicit rewards.

    lowvram eval RUN_DIR [--best-of N]      # RUN/eval/*.jsonl: base, SFT and final answers side by side

During DPO/KTO, `kl_callback` adds `eval_kl` to every held-out evaluation (before, during, after):
KL(policy || reference) estimated from the policy's own samples on held-out prompts,

    KL = E_{y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]   (nats per answer)

averaged over prompts and samples. The samples are drawn at temperature 1 with no top-k/top-p, so they
come from pi itself and the average is an unbiased estimate; answers are cut at `max_new_tokens`, so it
is the KL of the answers' first tokens. The reference is TRL's frozen "ref" adapter (the SFT policy).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from lowvram.errors import UserError

REFERENCE = "ref"  # TRL's frozen copy of the SFT adapter inside a DPO/KTO PeftModel


# ------------------------------------------------------------------ prompts, generation, log-probabilities


def prompt_text(tok, prompt) -> str:
    """The prompt as the preference trainer renders it: chat template for messages, raw text otherwise."""
    if isinstance(prompt, list):
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def prompt_label(prompt) -> str:
    """The last user turn (or the raw prompt), for tables."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else str(prompt[-1].get("content", ""))
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


def answer_logps(model, tok, prompts: list[str], answers: list[list[int]], batch_size: int = 16) -> list[float]:
    """Sum over the answer's tokens of log p(token | prompt, earlier tokens), one per (prompt, answer) pair."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[float] = []
    with inference(model, tok):
        for i in range(0, len(prompts), batch_size):
            rows = []
            for text, ans in zip(prompts[i : i + batch_size], answers[i : i + batch_size]):
                p = tok(text, add_special_tokens=False)["input_ids"]
                rows.append((p, list(ans)))
            width = max(len(p) + len(a) for p, a in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            target = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, (p, a) in enumerate(rows):
                seq = p + a
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                target[r, len(p) : len(seq)] = True
            dev = _device(model)
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok_logp = logp.gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
            tok_logp = tok_logp * target[:, 1:].to(dev)
            out.extend(tok_logp.sum(-1).tolist())
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


def kl_from_samples(
    model, tok, prompts: list[str], samples: list[list[list[int]]], policy: str | None, reference: str | None
) -> dict:
    """KL(policy || reference) from answers sampled from the policy: mean of log pi - log pi_ref per answer."""
    ps, ans = _flat(prompts, samples)
    with adapter(model, policy):
        lp = answer_logps(model, tok, ps, ans)
    with adapter(model, reference):
        lr = answer_logps(model, tok, ps, ans)
    diffs = [a - b for a, b in zip(lp, lr)]
    tokens = sum(len(a) for a in ans)
    return {
        "kl": _mean(diffs),
        "kl_sem": _sem(diffs),
        "kl_per_token": sum(diffs) / tokens if tokens else None,
        "kl_answers": len(diffs),
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


# ------------------------------------------------------------------ the training hook

PROMPTS_FILE = "heldout_prompts.jsonl"  # RUN/eval/: the held-out prompts the preference stage used


def kl_callback(eval_rows: list[dict], tok, recipe, run_dir: Path | None = None):
    """A TrainerCallback that adds `eval_kl` (and its spread) to each held-out evaluation's logs.

    It runs in on_log, before lowvram's logger callback, so the number lands in the same metrics.jsonl row
    as the held-out loss and preference accuracy. With `run_dir`, the held-out prompts are kept in
    RUN/eval/heldout_prompts.jsonl, so `lowvram eval` answers the same ones without the data at hand.
    """
    from transformers import TrainerCallback

    from lowvram.distributed import is_main

    cfg = recipe.eval
    if run_dir is not None and is_main():
        (Path(run_dir) / "eval").mkdir(parents=True, exist_ok=True)
        _write_jsonl(Path(run_dir) / "eval" / PROMPTS_FILE, [{"prompt": r["prompt"]} for r in eval_rows])
    prompts = [prompt_text(tok, r["prompt"]) for r in eval_rows[: cfg.prompts]]

    class KLCallback(TrainerCallback):
        measured: tuple[int, dict] | None = None  # (step, KL): the final evaluation often repeats the last periodic one

        def on_log(self, args, state, control, logs=None, model=None, **kw):
            if not logs or model is None or not any(k.startswith("eval_") for k in logs) or "eval_kl" in logs:
                return
            if not state.is_world_process_zero:  # measured and logged by the main process only
                return
            if REFERENCE not in getattr(model, "peft_config", {}):
                return  # no frozen reference adapter (PEFT fallback): nothing to compare against
            if self.measured is None or self.measured[0] != state.global_step:
                try:
                    kl = kl_to_reference(
                        model, tok, prompts, samples=cfg.kl_samples, max_new_tokens=cfg.max_new_tokens, seed=recipe.seed
                    )
                except Exception as e:  # a monitor must not end the training (generation on Unsloth: not run on a GPU)
                    import sys

                    print(
                        f"warning: KL to the reference not measured at step {state.global_step}: "
                        f"{type(e).__name__}: {e}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                self.measured = (state.global_step, kl)
            logs.update({f"eval_{k}": round(v, 6) if isinstance(v, float) else v for k, v in self.measured[1].items()})

    return KLCallback()


# ------------------------------------------------------------------ `lowvram eval RUN_DIR`


def heldout_prompts(recipe, limit: int, run_dir: Path | None = None) -> tuple[list, str]:
    """(prompts, where they come from): those the preference stage kept, else its held-out split reloaded."""
    from lowvram.data import load_preference_data

    kept = Path(run_dir) / "eval" / PROMPTS_FILE if run_dir is not None else None
    if kept is not None and kept.is_file():
        rows = [json.loads(x) for x in kept.read_text(encoding="utf-8").splitlines() if x.strip()]
        return [r["prompt"] for r in rows[:limit]], f"{min(limit, len(rows))} held-out prompts of the preference stage"
    data = load_preference_data(
        recipe.dpo.data, recipe.sample_file(recipe.dpo.data), base_dir=Path.cwd(), seed=recipe.seed
    )
    if data.eval:
        return [
            r["prompt"] for r in data.eval[:limit]
        ], f"{min(limit, len(data.eval))} held-out prompts of {data.source}"
    # no held-out split: the last training prompts, and the tables say so
    return [r["prompt"] for r in data.train[-limit:]], (
        f"{min(limit, len(data.train))} TRAINING prompts of {data.source} "
        "(no held-out split: set dpo.data.eval_fraction)"
    )


def load_run_models(run_dir: Path):
    """(model, tokenizer, names): the base with the run's adapters loaded by name ('sft', 'final')."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.train import resolve_model_path

    plan = json.loads((run_dir / "plan.json").read_text())
    base = json.loads((run_dir / "base.json").read_text()) if (run_dir / "base.json").is_file() else {}
    path = base.get("model_path") or resolve_model_path(plan["model"])
    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.get("dtype"), torch.float32)
    tok_dir = run_dir / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tok_dir if tok_dir.is_dir() else path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if plan.get("load_in_4bit"):  # the base the adapters were trained on
        from lowvram.hf_backend import load_4bit

        device = torch.cuda.current_device() if cuda else "cpu"
        model = load_4bit(AutoModelForCausalLM, path, dtype, device_map={"": device})
    else:
        cards = {"device_map": {"": torch.cuda.current_device()}} if cuda else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **cards)
    names = {"base": None}
    for stage, name in (("sft", "sft"), ("dpo", "final")):
        ad = run_dir / stage / "adapter"
        if not (ad / "adapter_config.json").is_file():
            continue
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, str(ad), adapter_name=name)
        else:
            model.load_adapter(str(ad), adapter_name=name)
        names[name] = name
    if not isinstance(model, PeftModel):
        raise UserError(
            f"{run_dir} has no trained adapter (sft/adapter or dpo/adapter) to evaluate.",
            hint="Evaluate a run directory after 'lowvram run' finished a stage.",
        )
    return model, tok, names


def _texts(tok, answers: list[list[int]]) -> list[str]:
    return [tok.decode(a, skip_special_tokens=True).strip() for a in answers]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _ended_share(answers: list[list[int]], eos: int | None) -> float | None:
    """Share of answers that end on the end-of-turn token (EOS), i.e. before the max_new_tokens cap."""
    if not answers:
        return None
    return sum(1 for a in answers if a and a[-1] == eos) / len(answers)


def _win_rate(a: list[float], b: list[float]) -> float | None:
    """Share of prompts where a beats b (ties count half)."""
    if not a:
        return None
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def evaluate_run(run_dir: Path, best_of: int | None = None, prompts_limit: int | None = None) -> dict:
    """Answer held-out prompts with every model of the run; write RUN/eval/*.jsonl and RUN/eval/summary.json."""
    import yaml

    from lowvram.recipe import parse_recipe

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(
            f"{run_dir} is not a lowvram run directory (no recipe.yaml).",
            hint="Pass the folder 'lowvram run' created, e.g. runs/demo-20261122-101500.",
        )
    recipe = parse_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()), source=str(run_dir / "recipe.yaml"))
    cfg = recipe.eval
    best_of = cfg.best_of if best_of is None else best_of
    raw_prompts, source = heldout_prompts(recipe, prompts_limit or cfg.prompts, run_dir)
    from lowvram.train import _quiet_libraries

    _quiet_libraries()
    model, tok, names = load_run_models(run_dir)
    prompts = [prompt_text(tok, p) for p in raw_prompts]
    labels = [prompt_label(p) for p in raw_prompts]
    reference = "sft" if "sft" in names else None  # DPO/KTO continue the SFT adapter, which TRL freezes as "ref"
    method = recipe.dpo.method
    implicit = "final" in names and method in ("dpo", "kto")
    beta = recipe.dpo.beta
    from lowvram.reward import load_scorer

    rm = load_scorer(run_dir)  # None without an rm/ stage
    print(
        f"[eval] {source}; models: {', '.join(names)}; reference: {reference or 'base'}"
        + (f"; reward model: {run_dir / 'rm' / 'adapter'}" if rm else ""),
        flush=True,
    )

    def implicit_rewards(answers: list[list[int]]) -> list[float]:
        """DPO's implicit reward beta * (log pi_final - log pi_ref) of each answer."""
        with adapter(model, "final"):
            lf = answer_logps(model, tok, prompts, answers)
        with adapter(model, reference):
            lr = answer_logps(model, tok, prompts, answers)
        return [beta * (a - b) for a, b in zip(lf, lr)]

    rows, per_model, greedy = [], {}, {}
    for name, adapter_name in names.items():
        t0 = time.monotonic()
        with adapter(model, adapter_name):
            g = [a[0] for a in generate(model, tok, prompts, sample=False, max_new_tokens=cfg.max_new_tokens)]
            s = generate(
                model, tok, prompts, sample=True, n=cfg.kl_samples, seed=recipe.seed, max_new_tokens=cfg.max_new_tokens
            )
        greedy[name] = g
        stats = {
            "model": name,
            "adapter": None if adapter_name is None else str(run_dir / ("sft" if name == "sft" else "dpo") / "adapter"),
            "median_answer_tokens": statistics.median(len(a) for a in g) if g else None,
            "ended_turn_share": _ended_share(g, tok.eos_token_id),
            "mean_answer_tokens": _mean([len(a) for a in g]),
            "mean_answer_chars": _mean([len(t) for t in _texts(tok, g)]),
            "mean_sampled_tokens": _mean([len(a) for grp in s for a in grp]),
        }
        stats.update(kl_from_samples(model, tok, prompts, s, adapter_name, reference))
        stats["generate_s"] = round(time.monotonic() - t0, 2)
        if "sft" in greedy and name != "sft":
            stats["same_answers_as_sft"] = sum(a == b for a, b in zip(g, greedy["sft"]))
        per_model[name] = stats
        g_text = _texts(tok, g)
        for i, lab in enumerate(labels):
            rows.append({"prompt": lab, "model": name, "mode": "greedy", "answer": g_text[i], "tokens": len(g[i])})
            for k, a in enumerate(s[i]):
                rows.append(
                    {
                        "prompt": lab,
                        "model": name,
                        "mode": "sample",
                        "sample": k,
                        "seed": recipe.seed,
                        "answer": tok.decode(a, skip_special_tokens=True).strip(),
                        "tokens": len(a),
                    }
                )
    base_scores: dict = {}
    for name in names:
        st = per_model[name]
        if implicit:
            r = implicit_rewards(greedy[name])
            base_scores.setdefault("implicit", {})[name] = r
        if rm:
            base_scores.setdefault("rm", {})[name] = rm(raw_prompts, _texts(tok, greedy[name]))
    for kind, by_model in base_scores.items():
        ref_scores = by_model.get("sft")
        for name, sc in by_model.items():
            st = per_model[name]
            if kind == "implicit":
                st["implicit_reward"] = _mean(sc)
                if ref_scores:
                    st["implicit_margin_vs_sft"] = _mean([a - b for a, b in zip(sc, ref_scores)])
            else:
                st["rm_score"] = _mean(sc)
                if ref_scores:
                    st["rm_win_rate_vs_sft"] = _win_rate(sc, ref_scores)
    for row in rows:  # per-answer scores for the greedy answers, so a reader can see which answer won
        if row["mode"] == "greedy":
            i = labels.index(row["prompt"])
            for kind, key in (("implicit", "implicit_reward"), ("rm", "rm_score")):
                if kind in base_scores:
                    row[key] = round(base_scores[kind][row["model"]][i], 4)

    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    summary = {
        "prompts_source": source,
        "prompts": len(prompts),
        "reference": reference or "base",
        "method": method,
        "beta": beta,
        "seed": recipe.seed,
        "max_new_tokens": cfg.max_new_tokens,
        "kl_samples": cfg.kl_samples,
        "kl_warn_nats": cfg.kl_warn_nats,
        "reward_model": str(run_dir / "rm" / "adapter") if rm else None,
        "models": list(per_model.values()),
    }
    if "sft" in greedy and "final" in greedy:  # the answers that changed most first: what the reader looks at
        side = [
            {
                "prompt": lab,
                "sft": tok.decode(greedy["sft"][i], skip_special_tokens=True).strip(),
                "sft_tokens": len(greedy["sft"][i]),
                "final": tok.decode(greedy["final"][i], skip_special_tokens=True).strip(),
                "final_tokens": len(greedy["final"][i]),
            }
            for i, lab in enumerate(labels)
        ]
        summary["side_by_side"] = sorted(side, key=lambda r: -abs(r["sft_tokens"] - r["final_tokens"]))
    if best_of and best_of > 0:
        summary["best_of_n"] = _best_of_n(
            model,
            tok,
            prompts,
            raw_prompts,
            labels,
            best_of,
            recipe,
            greedy,
            names,
            rm,
            implicit_rewards if implicit else None,
            out_dir,
            per_model,
        )
    _write_jsonl(out_dir / "answers.jsonl", rows)
    _write_jsonl(out_dir / "models.jsonl", list(per_model.values()))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _best_of_n(
    model, tok, prompts, raw_prompts, labels, n, recipe, greedy, names, rm, implicit_rewards, out_dir, per_model
) -> dict:
    """N sampled SFT answers per prompt, the scorer's favourite against the final model's greedy answer."""
    if "sft" not in names or "final" not in names:
        return {"skipped": "best-of-N needs both an SFT and a preference-tuned model in the run"}
    if rm is not None:
        scorer, scorer_name = (lambda answers: rm(raw_prompts, _texts(tok, answers))), "reward model"
    elif implicit_rewards is not None:
        scorer, scorer_name = implicit_rewards, f"DPO implicit reward (beta={recipe.dpo.beta:g})"
    else:
        return {
            "skipped": f"no scorer: no reward model (rm stage) and {recipe.dpo.method.upper()} has no implicit reward"
        }
    t0 = time.monotonic()
    with adapter(model, "sft"):
        cands = generate(
            model, tok, prompts, sample=True, n=n, seed=recipe.seed + 1, max_new_tokens=recipe.eval.max_new_tokens
        )
    gen_s = time.monotonic() - t0
    scores = [[0.0] * n for _ in prompts]
    for k in range(n):  # score the k-th candidate of every prompt in one batch
        col = scorer([c[k] for c in cands])
        for i, v in enumerate(col):
            scores[i][k] = v
    best = [max(range(n), key=lambda k: scores[i][k]) for i in range(len(prompts))]
    best_scores = [scores[i][best[i]] for i in range(len(prompts))]
    final_scores = scorer(greedy["final"])
    rows = []
    for i, lab in enumerate(labels):
        rows.append(
            {
                "prompt": lab,
                "n": n,
                "scorer": scorer_name,
                "best_of_n": tok.decode(cands[i][best[i]], skip_special_tokens=True).strip(),
                "best_of_n_score": round(best_scores[i], 4),
                "candidate_scores": [round(v, 4) for v in scores[i]],
                "final": tok.decode(greedy["final"][i], skip_special_tokens=True).strip(),
                "final_score": round(final_scores[i], 4),
            }
        )
    _write_jsonl(out_dir / "best_of_n.jsonl", rows)
    cand_tokens = sum(len(a) for grp in cands for a in grp)
    final_tokens = sum(len(a) for a in greedy["final"])
    return {
        "n": n,
        "scorer": scorer_name,
        "prompts": len(prompts),
        "best_of_n_score": _mean(best_scores),
        "final_score": _mean(final_scores),
        "final_win_rate_vs_best_of_n": _win_rate(final_scores, best_scores),
        "generated_tokens_best_of_n": cand_tokens,
        "generated_tokens_final": final_tokens,
        "generation_cost_ratio": round(cand_tokens / final_tokens, 2) if final_tokens else None,
        "generate_s_best_of_n": round(gen_s, 2),
        "generate_s_final": per_model["final"]["generate_s"],
        "cost_note": (
            f"best-of-{n} samples {n} SFT answers per prompt at temperature 1 ({cand_tokens} tokens) "
            f"and scores each with the {scorer_name}; the final model answers once, greedily "
            f"({final_tokens} tokens)"
        ),
    }


def summary_lines(summary: dict) -> list[str]:
    """The eval as a table, for the terminal."""
    from lowvram.ui import table

    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    cap = summary["max_new_tokens"]
    rows = [
        (
            m["model"],
            f(m.get("median_answer_tokens"), "{:g}"),
            f(m.get("mean_answer_tokens"), "{:.1f}"),
            f(m.get("ended_turn_share"), "{:.0%}"),
            kl_text(m.get("kl"), m.get("kl_sem")),
            f(m.get("implicit_margin_vs_sft"), "{:+.3f}"),
            f(m.get("rm_score"), "{:+.3f}"),
            f(m.get("rm_win_rate_vs_sft"), "{:.2f}"),
        )
        for m in summary["models"]
    ]
    lines = [
        f"Eval on {summary['prompts_source']} (reference: {summary['reference']}; greedy answers, cap {cap} tokens):",
        table(
            rows,
            (
                "model",
                "median tokens",
                "mean tokens",
                f"ended turn < {cap}",
                f"KL to {summary['reference']} (nats)",
                "implicit margin vs sft",
                "RM score",
                "RM win vs sft",
            ),
        ),
    ]
    lines += changed_lines(summary)
    for m in summary["models"]:
        if m["model"] == "final" and m.get("kl") is not None and m["kl"] > summary["kl_warn_nats"]:
            lines.append(
                f"WARNING: the final model drifted {m['kl']:.1f} nats from the reference (> eval.kl_warn_nats "
                f"{summary['kl_warn_nats']:g}): read its answers; lower dpo.learning_rate or raise dpo.beta."
            )
    b = summary.get("best_of_n")
    if b and "skipped" not in b:
        lines.append(
            f"Best-of-{b['n']} SFT vs final, by the {b['scorer']}: {b['best_of_n_score']:+.3f} vs "
            f"{b['final_score']:+.3f}; final wins {b['final_win_rate_vs_best_of_n']:.0%} of prompts. "
            f"Cost: {b['generation_cost_ratio']:g}x the generated tokens ({b['cost_note']})."
        )
    elif b:
        lines.append(f"Best-of-N skipped: {b['skipped']}")
    return lines


def kl_text(kl: float | None, sem: float | None) -> str:
    """A KL estimate with its standard error; one within noise of zero reads as such, never as negative."""
    if kl is None:
        return "-"
    if sem is not None and abs(kl) <= 2 * sem:
        return f"~0 (±{sem:.2f})"
    return f"{kl:.2f}" + (f" ±{sem:.2f}" if sem is not None else "")


def changed_lines(summary: dict, show: int = 3, width: int = 160) -> list[str]:
    """What the preference stage changed in the answers: length, turn endings, and a few side by side."""
    by = {m["model"]: m for m in summary["models"]}
    sft, final = by.get("sft"), by.get("final")
    if not sft or not final:
        return []
    lines = []
    ms, mf = sft.get("median_answer_tokens"), final.get("median_answer_tokens")
    if ms and mf is not None:
        lines.append(
            f"Final vs SFT on {summary['prompts']} held-out prompts: median answer {ms:g} -> {mf:g} tokens "
            f"({mf / ms:.2f}x); ended their turn before the cap {sft['ended_turn_share']:.0%} -> "
            f"{final['ended_turn_share']:.0%}; answers identical to the SFT model's: "
            f"{final.get('same_answers_as_sft', '-')} of {summary['prompts']}"
        )
    pairs = summary.get("side_by_side") or []
    for p in pairs[:show]:
        lines.append(f"  Q: {p['prompt']}")
        for name in ("sft", "final"):
            text = " ".join(p[name].split())
            text = text if len(text) <= width else text[: width - 3] + "..."
            lines.append(f"    {name:5} ({p[name + '_tokens']} tok): {text}")
    return lines
