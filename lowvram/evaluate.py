"""What preference tuning did, measured from real generations: KL to the reference, answers, implicit rewards.

    lowvram eval RUN_DIR [--best-of N]      # RUN/eval/*.jsonl: base, SFT and final answers side by side

Every model of the run (base, SFT, final) answers the held-out prompts the preference stage kept,
greedily and by sampling; the KL to the reference (lowvram/kl.py), the DPO implicit reward and the
reward model's score (lowvram/reward.py) are measured on those answers, and best-of-N SFT samples are
set against the final model's single answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lowvram.errors import UserError
from lowvram.kl import PROMPTS_FILE, adapter, answer_logps, generate, kl_from_samples, prompt_text
from lowvram.tiny import resolve_model_path
from lowvram.ui import quiet_libraries


def prompt_label(prompt) -> str:
    """The last user turn (or the raw prompt), for tables."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else str(prompt[-1].get("content", ""))
    return prompt


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


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


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
    quiet_libraries()
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
            "mean_answer_tokens": _mean([len(a) for a in g]),
            "mean_answer_chars": _mean([len(t) for t in _texts(tok, g)]),
            "mean_sampled_tokens": _mean([len(a) for grp in s for a in grp]),
        }
        stats.update(kl_from_samples(model, tok, prompts, s, adapter_name, reference))
        stats["generate_s"] = round(time.monotonic() - t0, 2)
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

    rows = [
        (
            m["model"],
            f(m.get("mean_answer_tokens"), "{:.1f}"),
            f(m.get("kl"), "{:.2f}"),
            f(m.get("implicit_margin_vs_sft"), "{:+.3f}"),
            f(m.get("rm_score"), "{:+.3f}"),
            f(m.get("rm_win_rate_vs_sft"), "{:.2f}"),
        )
        for m in summary["models"]
    ]
    lines = [
        f"Eval on {summary['prompts_source']} (reference: {summary['reference']}):",
        table(
            rows,
            (
                "model",
                "answer tokens",
                f"KL to {summary['reference']} (nats)",
                "implicit margin vs sft",
                "RM score",
                "RM win vs sft",
            ),
        ),
    ]
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
