"""What preference tuning did, measured from real generations: KL to the reference, answers, implicit rewards.

    lowvram eval RUN_DIR [--best-of N]      # RUN/eval/*.jsonl: base, SFT and final answers side by side

Every model of the run (base, SFT, final) answers the held-out prompts the preference stage kept,
greedily and by sampling; the KL to the reference (lowvram/evaluate/kl.py), the DPO implicit reward and the
reward model's score (lowvram/train/reward.py) are measured on those answers, and best-of-N SFT samples are
set against the final model's single answer.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram import rundir
from lowvram.data import load_preference_data
from lowvram.errors import UserError
from lowvram.evaluate.kl import PROMPTS_FILE, adapter, answer_logps, generate, kl_from_samples, kl_text, prompt_text
from lowvram.evaluate.report import changed_lines
from lowvram.model.hf_backend import load_4bit
from lowvram.model.tiny import resolve_model_path
from lowvram.train.reward import load_scorer
from lowvram.utils.ui import quiet_libraries, table


def prompt_label(prompt) -> str:
    """The last user turn (or the raw prompt), for tables."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else str(prompt[-1].get("content", ""))
    return prompt


# ------------------------------------------------------------------ `lowvram eval RUN_DIR`


def heldout_prompts(recipe, limit: int, run_dir: Path | None = None) -> tuple[list, str]:
    """(prompts, where they come from): those the preference stage kept, else its held-out split reloaded."""

    kept = rundir.eval_dir(run_dir) / PROMPTS_FILE if run_dir is not None else None
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

    base = rundir.trained_base(run_dir)
    path = base.model_path or resolve_model_path(base.model)
    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(base.dtype, torch.float32)
    tok_dir = rundir.tokenizer_dir(run_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir if tok_dir.is_dir() else path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if base.load_in_4bit:  # the base the adapters were trained on
        device = torch.cuda.current_device() if cuda else "cpu"
        model = load_4bit(AutoModelForCausalLM, path, dtype, device_map={"": device})
    else:
        cards = {"device_map": {"": torch.cuda.current_device()}} if cuda else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **cards)
    names = {"base": None}
    for stage, name in (("sft", "sft"), ("dpo", "final")):
        ad = rundir.adapter_dir(run_dir, stage)
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
    run_dir = Path(run_dir)
    recipe = rundir.read_recipe(run_dir)
    cfg = recipe.eval
    best_of = cfg.best_of if best_of is None else best_of
    raw_prompts, source = heldout_prompts(recipe, prompts_limit or cfg.prompts, run_dir)
    quiet_libraries()
    model, tok, names = load_run_models(run_dir)
    ev = EvalSet(
        model=model,
        tok=tok,
        raw_prompts=list(raw_prompts),
        prompts=[prompt_text(tok, p) for p in raw_prompts],
        labels=[prompt_label(p) for p in raw_prompts],
        names=names,
        reference="sft" if "sft" in names else None,  # DPO/KTO continue the SFT adapter, which TRL freezes as "ref"
        recipe=recipe,
        run_dir=run_dir,
        best_of=best_of or 0,
    )

    rm = load_scorer(run_dir)  # None without an rm/ stage
    print(
        f"[eval] {source}; models: {', '.join(names)}; reference: {ev.reference or 'base'}"
        + (f"; reward model: {run_dir / 'rm' / 'adapter'}" if rm else ""),
        flush=True,
    )
    answers = answer_all(ev)
    judges = scorers(ev, rm)
    scores = score(answers, judges)
    out_dir = rundir.eval_dir(run_dir)
    out_dir.mkdir(exist_ok=True)
    summary = {
        "prompts_source": source,
        "prompts": len(ev.prompts),
        "reference": ev.reference or "base",
        "method": recipe.dpo.method,
        "beta": recipe.dpo.beta,
        "seed": recipe.seed,
        "max_new_tokens": cfg.max_new_tokens,
        "kl_samples": cfg.kl_samples,
        "kl_warn_nats": cfg.kl_warn_nats,
        "reward_model": str(rundir.adapter_dir(run_dir, "rm")) if rm else None,
        "models": [{**a.stats, **score_stats(scores, name)} for name, a in answers.items()],
    }
    if "sft" in answers and "final" in answers:
        summary["side_by_side"] = side_by_side(ev, answers["sft"].greedy, answers["final"].greedy)
    if ev.best_of > 0:
        summary["best_of_n"] = best_of_n(ev, answers, judges[0] if judges else None)
    _write_jsonl(out_dir / "answers.jsonl", answer_rows(ev, answers, scores))
    _write_jsonl(out_dir / "models.jsonl", summary["models"])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@dataclass(frozen=True)
class EvalSet:
    """What every model of a run is asked, and the model that answers: built once by evaluate_run."""

    model: Any  # the base with the run's adapters loaded by name (load_run_models)
    tok: Any
    raw_prompts: list  # as the data holds them (messages or text): what the reward model reads
    prompts: list[str]  # rendered as the preference trainer renders them
    labels: list[str]  # the last user turn, for tables; two prompts may share one
    names: dict[str, str | None]  # model -> its adapter ("base": None, "sft", "final")
    reference: str | None  # the adapter KL is measured against: "sft", or None for the base
    recipe: Any
    run_dir: Path
    best_of: int  # SFT samples per prompt that best-of-N draws; 0: no best-of-N


@dataclass(frozen=True)
class Answered:
    """One model's answers, prompt by prompt (in EvalSet.prompts' order), and what was measured on them."""

    greedy: list[list[int]]  # one greedy answer per prompt, as token ids
    samples: list[list[list[int]]]  # eval.kl_samples answers per prompt at temperature 1
    stats: dict  # lengths, KL to the reference, generation time: one row of models.jsonl


@dataclass(frozen=True)
class Scorer:
    kind: str  # "rm" or "implicit": the key its scores are written under
    label: str  # for tables: "reward model", "DPO implicit reward (beta=0.1)"
    score: Callable[[list[list[int]]], list[float]]  # one answer per prompt (token ids) -> one score each


def answer_all(ev: EvalSet) -> dict[str, Answered]:
    """Every model answers every prompt: greedily, and eval.kl_samples times by sampling (for the KL)."""
    cfg, out = ev.recipe.eval, {}
    for name, adapter_name in ev.names.items():
        t0 = time.monotonic()
        with adapter(ev.model, adapter_name):
            greedy = [
                a[0] for a in generate(ev.model, ev.tok, ev.prompts, sample=False, max_new_tokens=cfg.max_new_tokens)
            ]
            itself = adapter_name == ev.reference  # the reference's KL to itself is 0 exactly: nothing to sample
            samples = (
                [[] for _ in ev.prompts]
                if itself
                else generate(
                    ev.model,
                    ev.tok,
                    ev.prompts,
                    sample=True,
                    n=cfg.kl_samples,
                    seed=ev.recipe.seed,
                    max_new_tokens=cfg.max_new_tokens,
                )
            )
        stats = {
            "model": name,
            "adapter": None
            if adapter_name is None
            else str(rundir.adapter_dir(ev.run_dir, "sft" if name == "sft" else "dpo")),
            "median_answer_tokens": statistics.median(len(a) for a in greedy) if greedy else None,
            "ended_turn_share": _ended_share(greedy, ev.tok.eos_token_id),
            "mean_answer_tokens": _mean([len(a) for a in greedy]),
            "mean_answer_chars": _mean([len(t) for t in _texts(ev.tok, greedy)]),
            "mean_sampled_tokens": _mean([len(a) for grp in samples for a in grp]),
        }
        if itself:
            stats.update(kl=0.0, kl_per_token=0.0, kl_per_token_sem=0.0, kl_answers=0)
        else:
            stats.update(kl_from_samples(ev.model, ev.tok, ev.prompts, samples, adapter_name, ev.reference))
        stats["generate_s"] = round(time.monotonic() - t0, 2)
        if "sft" in out and name != "sft":
            stats["same_answers_as_sft"] = sum(a == b for a, b in zip(greedy, out["sft"].greedy))
        out[name] = Answered(greedy, samples, stats)
    return out


def scorers(ev: EvalSet, rm) -> list[Scorer]:
    """The reward model (when the run trained one), then DPO/KTO's implicit reward (when the run has one)."""
    found = []
    if rm is not None:
        found.append(Scorer("rm", "reward model", lambda answers: rm(ev.raw_prompts, _texts(ev.tok, answers))))
    if "final" in ev.names and ev.recipe.dpo.method in ("dpo", "kto"):
        beta = ev.recipe.dpo.beta

        def implicit(answers: list[list[int]]) -> list[float]:
            """DPO's implicit reward beta * (log pi_final - log pi_ref) of each answer."""
            with adapter(ev.model, "final"):
                lf = answer_logps(ev.model, ev.tok, ev.prompts, answers)
            with adapter(ev.model, ev.reference):
                lr = answer_logps(ev.model, ev.tok, ev.prompts, answers)
            return [beta * (a - b) for a, b in zip(lf, lr)]

        found.append(Scorer("implicit", f"DPO implicit reward (beta={beta:g})", implicit))
    return found


def score(answers: dict[str, Answered], judges: list[Scorer]) -> dict[str, dict[str, list[float]]]:
    """Each scorer on each model's greedy answers: {kind: {model: [one score per prompt, in order]}}."""
    return {j.kind: {name: j.score(a.greedy) for name, a in answers.items()} for j in judges}


def score_stats(scores: dict[str, dict[str, list[float]]], name: str) -> dict:
    """One model's mean scores, and how it compares with the SFT model's answers to the same prompts."""
    out = {}
    for kind, by_model in scores.items():
        mine, sft = by_model[name], by_model.get("sft")
        if kind == "implicit":
            out["implicit_reward"] = _mean(mine)
            if sft:
                out["implicit_margin_vs_sft"] = _mean([a - b for a, b in zip(mine, sft)])
        else:
            out["rm_score"] = _mean(mine)
            if sft:
                out["rm_win_rate_vs_sft"] = _win_rate(mine, sft)
    return out


SCORE_KEYS = {"implicit": "implicit_reward", "rm": "rm_score"}


def answer_rows(ev: EvalSet, answers: dict[str, Answered], scores: dict[str, dict[str, list[float]]]) -> list[dict]:
    """answers.jsonl: each model's greedy answer to each prompt, with its scores, then its sampled answers."""
    rows = []
    for name, a in answers.items():
        texts = _texts(ev.tok, a.greedy)
        for i, label in enumerate(ev.labels):  # scores by the prompt's position: two prompts may share a label
            row = {"prompt": label, "model": name, "mode": "greedy", "answer": texts[i], "tokens": len(a.greedy[i])}
            row.update({SCORE_KEYS[kind]: round(by_model[name][i], 4) for kind, by_model in scores.items()})
            rows.append(row)
            for k, sample in enumerate(a.samples[i]):
                rows.append(
                    {
                        "prompt": label,
                        "model": name,
                        "mode": "sample",
                        "sample": k,
                        "seed": ev.recipe.seed,
                        "answer": _texts(ev.tok, [sample])[0],
                        "tokens": len(sample),
                    }
                )
    return rows


def best_of_n(ev: EvalSet, answers: dict[str, Answered], judge: Scorer | None) -> dict:
    """N sampled SFT answers per prompt, the judge's favourite against the final model's greedy answer."""
    if "sft" not in answers or "final" not in answers:
        return {"skipped": "best-of-N needs both an SFT and a preference-tuned model in the run"}
    if judge is None:
        method = ev.recipe.dpo.method.upper()
        return {"skipped": f"no scorer: no reward model (rm stage) and {method} has no implicit reward"}
    n = ev.best_of
    t0 = time.monotonic()
    with adapter(ev.model, "sft"):
        cands = generate(
            ev.model,
            ev.tok,
            ev.prompts,
            sample=True,
            n=n,
            seed=ev.recipe.seed + 1,
            max_new_tokens=ev.recipe.eval.max_new_tokens,
        )
    gen_s = time.monotonic() - t0
    by_candidate = [judge.score([c[k] for c in cands]) for k in range(n)]  # the k-th candidate of every prompt at once
    scores = [[by_candidate[k][i] for k in range(n)] for i in range(len(ev.prompts))]
    best = [max(range(n), key=lambda k: s[k]) for s in scores]
    best_scores = [s[b] for s, b in zip(scores, best)]
    final = answers["final"].greedy
    final_scores = judge.score(final)
    rows = [
        {
            "prompt": label,
            "n": n,
            "scorer": judge.label,
            "best_of_n": _texts(ev.tok, [cands[i][best[i]]])[0],
            "best_of_n_score": round(best_scores[i], 4),
            "candidate_scores": [round(v, 4) for v in scores[i]],
            "final": _texts(ev.tok, [final[i]])[0],
            "final_score": round(final_scores[i], 4),
        }
        for i, label in enumerate(ev.labels)
    ]
    _write_jsonl(rundir.eval_dir(ev.run_dir) / "best_of_n.jsonl", rows)
    cand_tokens = sum(len(a) for grp in cands for a in grp)
    final_tokens = sum(len(a) for a in final)
    return {
        "n": n,
        "scorer": judge.label,
        "prompts": len(ev.prompts),
        "best_of_n_score": _mean(best_scores),
        "final_score": _mean(final_scores),
        "final_win_rate_vs_best_of_n": _win_rate(final_scores, best_scores),
        "generated_tokens_best_of_n": cand_tokens,
        "generated_tokens_final": final_tokens,
        "generation_cost_ratio": round(cand_tokens / final_tokens, 2) if final_tokens else None,
        "generate_s_best_of_n": round(gen_s, 2),
        "generate_s_final": answers["final"].stats["generate_s"],
        "cost_note": (
            f"best-of-{n} samples {n} SFT answers per prompt at temperature 1 ({cand_tokens} tokens) "
            f"and scores each with the {judge.label}; the final model answers once, greedily "
            f"({final_tokens} tokens)"
        ),
    }


def side_by_side(ev: EvalSet, sft: list[list[int]], final: list[list[int]]) -> list[dict]:
    """SFT's and the final model's greedy answers per prompt, the ones that changed most in length first."""
    side = [
        {
            "prompt": lab,
            "sft": ev.tok.decode(sft[i], skip_special_tokens=True).strip(),
            "sft_tokens": len(sft[i]),
            "final": ev.tok.decode(final[i], skip_special_tokens=True).strip(),
            "final_tokens": len(final[i]),
        }
        for i, lab in enumerate(ev.labels)
    ]
    return sorted(side, key=lambda r: -abs(r["sft_tokens"] - r["final_tokens"]))


def summary_lines(summary: dict) -> list[str]:
    """The eval as a table, for the terminal."""

    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    cap = summary["max_new_tokens"]
    rows = [
        (
            m["model"],
            f(m.get("median_answer_tokens"), "{:g}"),
            f(m.get("mean_answer_tokens"), "{:.1f}"),
            f(m.get("ended_turn_share"), "{:.0%}"),
            kl_text(m) or "-",
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
                f"KL to {summary['reference']}",
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
