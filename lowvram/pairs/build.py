"""Preference pairs the user does not have: sample the policy's own answers, judge them, pair best with worst.

    lowvram pairs RECIPE [key=value ...] [--policy RUN_DIR|ADAPTER|MODEL] [--out DIR]
    lowvram run RECIPE            # with pairs.enabled: SFT, then `rounds` x (sample, judge, pair, DPO)

A pairs folder (RUN/rounds/round-K/ inside a run):
    samples.jsonl   one line per finished prompt: its N answers, their scores, the seed (append-only, so a
                    killed run resumes without sampling those prompts again)
    pairs.jsonl     the kept pairs, written atomically at the end: prompt/chosen/rejected rows that
                    `lowvram data check` and every preference stage read, each with its scores and provenance
    summary.json    sampling settings, judge, pairs kept and dropped (and why), length bias

Iterated DPO: round K samples from round K-1's policy (round 1: the SFT adapter), trains DPO on the pairs
starting from that adapter, whose frozen copy TRL keeps as the reference (lowvram.train.stage: no second model);
then the judge compares the new policy with the previous one on held-out prompts (win rate, length, share
that hit the cap, KL to the previous policy). A round that gains nothing stops the loop and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

from lowvram import rundir
from lowvram.data import load_preference_data
from lowvram.data.check import length_bias
from lowvram.data.formats import FORMAT_KIND
from lowvram.data.load import parse_records, read_source, resolve_path
from lowvram.errors import UserError
from lowvram.evaluate.kl import generate, kl_from_samples, prompt_text
from lowvram.evaluate.run import prompt_label
from lowvram.model.hf_backend import load_4bit
from lowvram.model.tiny import resolve_model_path
from lowvram.pairs.judges import Answer, Judge, judged, make_judge
from lowvram.pairs.memory import check_phases
from lowvram.pairs.sampler import choose_sampler, using
from lowvram.recipe import DataConfig
from lowvram.train.common import StageContext
from lowvram.train.reward import run_rm
from lowvram.train.stage import load_tokenizer, release_memory, run_stage
from lowvram.utils.fileio import atomic_write_text, check_writable
from lowvram.utils.ui import quiet_libraries

SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILE = "summary.json"
ROUND_FILE = "round.json"
# what evaluate.generate does when sample=True: the policy's own distribution
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


class NoPairs(UserError):
    """Every prompt's answers scored alike (or too close): nothing to learn from."""


# ------------------------------------------------------------------ prompts


def _as_messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def _label(prompt) -> str:

    return prompt_label(prompt)


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def prompts_config(recipe):
    """pairs.prompts, or the sft stage's data when it names none."""
    p = recipe.pairs.prompts
    return p if (p.path or p.sample) else recipe.sft.data


def read_prompts(recipe, base_dir: Path | None) -> tuple[list[list[dict]], str]:
    """(prompts as chat messages, where from): a .txt file (one per line), a JSONL of {prompt}, or a dataset.

    A dataset in any supported format gives its prompts: a preference row's prompt, an SFT conversation up
    to its last answer, a prompt/completion row's prompt. Repeated prompts count once. Files are only read.
    """

    cfg = prompts_config(recipe)
    sample = recipe.sample_file(cfg)
    path = sample or (resolve_path(cfg.path, base_dir) if cfg.path else None)
    prompts: list = []
    if path is not None and path.is_file() and path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        prompts = [x.strip() for x in lines if x.strip()]
        source, how = str(path), "one prompt per line"
    else:
        source, records, _ = read_source(cfg, sample, base_dir)
        rows = [r.row for r in records if isinstance(r.row, dict)]
        answer_keys = {"chosen", "rejected", "completion", "messages", "conversations", "text", "output"}
        if rows and all("prompt" in r for r in rows) and not any(answer_keys & r.keys() for r in rows):
            prompts, how = [r["prompt"] for r in rows], "a prompt per row"
        else:
            parsed = parse_records(records, source, None, cfg.format, cfg.columns)
            kind = FORMAT_KIND.get(parsed.format)
            for _, _, canon in parsed.rows:
                if "prompt" in canon:
                    prompts.append(canon["prompt"])
                elif "messages" in canon:
                    msgs = canon["messages"]
                    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
                    if last > 0:
                        prompts.append(msgs[:last])
            how = f"the prompts of its {parsed.format} {kind or ''} rows".replace("  ", " ")
    unique: dict[str, list[dict]] = {}
    for p in prompts:
        if isinstance(p, str) and not p.strip():
            continue
        m = _as_messages(p)
        unique.setdefault(_key(m), m)
    if not unique:
        raise UserError(
            f"{source}: no prompts found ({how}).",
            hint='Give pairs.prompts a .txt file (one prompt per line), a JSONL of {"prompt": ...}, or chat data.',
        )
    return list(unique.values()), f"{len(unique)} prompts from {source} ({how})"


def split_prompts(prompts: list, heldout: int, seed: int) -> tuple[list, list]:
    """(sampling prompts, held-out prompts): the same seed holds out the same ones."""
    if len(prompts) < heldout + 2:
        raise UserError(
            f"pairs: {len(prompts)} prompts cannot spare {heldout} held out and still make pairs.",
            hint="Add prompts, or lower pairs.heldout_prompts.",
        )
    held = set(random.Random(seed).sample(range(len(prompts)), heldout))
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


# ------------------------------------------------------------------ the policy


def load_policy(model_path: str, adapters: dict[str, Path | None], recipe, plan=None, tokenizer_dir=None):
    """(model, tokenizer): the base with each adapter loaded under its name (None: the base itself)."""

    quiet_libraries()  # before PEFT imports bitsandbytes, whose CPU notice is nothing to act on
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(plan, "dtype", None), torch.float32)
    tok = load_tokenizer(str(tokenizer_dir or model_path), recipe)
    try:
        if plan is not None and plan.load_in_4bit:
            device = torch.cuda.current_device() if cuda else "cpu"
            model = load_4bit(AutoModelForCausalLM, model_path, dtype, device_map={"": device})
        else:
            cards = {"device_map": {"": torch.cuda.current_device()}} if cuda else {}
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **cards)
    except OSError as e:
        raise UserError(f"Cannot load the policy model {model_path!r}: {e}") from None
    real = {n: p for n, p in adapters.items() if p is not None}
    # trained turn-token rows are inside each adapter (PEFT trainable tokens): PeftModel loads them itself
    for name, path in real.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"{path} is not a LoRA adapter folder (no adapter_config.json).")
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    return model, tok


def _answers(tok, ids: list[list[int]]) -> list[Answer]:
    eos = tok.eos_token_id
    return [Answer(tok.decode(a, skip_special_tokens=True).strip(), len(a), bool(a) and a[-1] == eos) for a in ids]


# ------------------------------------------------------------------ sample and judge, resumably


def _read_done(path: Path) -> dict[str, dict]:
    """Finished prompts of an earlier, interrupted run; a line cut short by a kill is cut off the file."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end != len(raw):  # the kill landed mid-line: drop the partial line so appends start clean
        with path.open("r+b") as fh:
            fh.truncate(end)
    for line in raw[:end].decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[_key(rec["prompt"])] = rec
    return done


def pending(out_dir: Path, prompts: list) -> list:
    """The prompts an earlier run in out_dir has not finished."""
    done = _read_done(out_dir / SAMPLES_FILE)
    return [p for p in prompts if _key(p) not in done]


def make_sampler(pcfg, model, tok, policy, model_path, adapter, tokenizer_dir, out_dir: Path, prompts, label):
    """The sampler for this round (lowvram.pairs.sampler), its choice printed with the reason."""

    left = pending(out_dir, prompts)
    probe = prompt_text(tok, left[0]) if left else None
    sampler, reason = choose_sampler(
        pcfg.sampler,
        model,
        tok,
        policy,
        model_path,
        adapter,
        tokenizer_dir,
        out_dir / "gguf",
        probe,
        pcfg.samples,
        pcfg.max_new_tokens,
        len(left),
        pcfg.sampler_gguf,
    )
    print(f"{label} sampler: {reason}", flush=True)
    return sampler


def sample_and_judge(
    sampler, tok, prompts: list, judge: Judge, pcfg, seed: int, out_dir: Path, label: str
) -> list[dict]:
    """Per prompt: `pcfg.samples` seeded answers from the policy, scored by the judge, appended to samples.jsonl."""

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SAMPLES_FILE
    settings = {"samples": pcfg.samples, "max_new_tokens": pcfg.max_new_tokens, **SAMPLING, "judge": judge.name}
    done = _read_done(path)
    for rec in done.values():
        if rec.get("settings") != settings:
            raise UserError(
                f"{path} holds answers sampled or judged with other settings ({rec.get('settings')}), not {settings}.",
                hint="Use another output folder (--out), or delete that one to start over.",
            )
    todo = [(i, p) for i, p in enumerate(prompts) if _key(p) not in done]
    if done:
        print(f"{label} resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already sampled in {path}")
    t0, n = time.monotonic(), 0
    out = dict(done)
    with path.open("a", encoding="utf-8") as fh:
        for i, p in todo:
            text = prompt_text(tok, p)
            ids = sampler.sample(text, pcfg.samples, seed + i, pcfg.max_new_tokens)
            answers = _answers(tok, ids)
            before = Counter(judge.stats)
            scores = judged(judge, _label(p), answers)
            verdicts = dict(Counter(judge.stats) - before)  # an LLM judge's ties and order disagreements
            rec = {
                "index": i,
                "prompt": p,
                "seed": seed + i,
                "sampler": sampler.name,
                "answers": [dataclasses.asdict(a) for a in answers],
                "scores": scores,
                "settings": settings,
            }
            if verdicts:
                rec["judge_stats"] = verdicts
            if getattr(judge, "log", None):
                rec["judge_log"] = judge.log
                judge.log = []
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            out[_key(p)] = rec
            n += 1
            if n % 10 == 0 or n == len(todo):
                rate = n / max(time.monotonic() - t0, 1e-9)
                print(f"{label} sampled and judged {n}/{len(todo)} prompts ({rate:.2f} prompts/s)", flush=True)
    return [out[_key(p)] for p in prompts]


# ------------------------------------------------------------------ pairing


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def make_pairs(records: list[dict], min_gap: float, provenance: dict) -> tuple[list[dict], Counter]:
    """(pairs, dropped reason -> count): each prompt's best answer against its worst, when the gap is real."""
    rows, dropped, seen = [], Counter(), set()
    for rec in records:
        ranked = sorted(zip(rec["scores"], (a["text"] for a in rec["answers"])), key=lambda x: -x[0])
        best_score, best = ranked[0]
        rest = [(s, t) for s, t in ranked if _norm(t) != _norm(best)]
        if not _norm(best):
            dropped["best answer empty"] += 1
            continue
        if not rest:
            dropped["all answers identical (chosen == rejected)"] += 1
            continue
        worst_score, worst = rest[-1]
        gap = best_score - worst_score
        if gap == 0:
            dropped["tie: every answer scored alike"] += 1
            continue
        if gap < min_gap:
            dropped[f"gap below min_gap {min_gap:g}"] += 1
            continue
        key = (_key(rec["prompt"]), _norm(best), _norm(worst))
        if key in seen:
            dropped["duplicate pair"] += 1
            continue
        seen.add(key)
        rows.append(
            {
                "prompt": rec["prompt"],
                "chosen": [{"role": "assistant", "content": best}],
                "rejected": [{"role": "assistant", "content": worst}],
                "score_chosen": round(best_score, 6),
                "score_rejected": round(worst_score, 6),
                "provenance": {**provenance, "seed": rec["seed"]},
            }
        )
    return rows, dropped


def length_check(rows: list[dict]) -> tuple[dict, str | None]:
    """The data check's length-bias rule on the kept pairs: (stats, warning or None)."""

    ratios, longer, shorter = [], 0, 0
    for r in rows:
        lc, lr = len(r["chosen"][0]["content"]), len(r["rejected"][0]["content"])
        if lc and lr:
            longer += lc > lr
            shorter += lc < lr
            ratios.append(lc / lr)
    if not ratios:
        return {}, None
    n, med = len(ratios), statistics.median(ratios)
    stats = {
        "chosen_longer_share": round(longer / n, 3),
        "chosen_shorter_share": round(shorter / n, 3),
        "median_length_ratio": round(med, 3),
    }
    return stats, length_bias(n, longer / n, shorter / n, med)


def no_pairs_message(records: list[dict], dropped: Counter, min_gap: float) -> str:
    answers = sum(len(r["answers"]) for r in records)
    why = "; ".join(f"{n} {reason}" for reason, n in dropped.most_common())
    return (
        f"no pairs with a gap: {len(records)} prompts, {answers} answers, none with a score difference of at "
        f"least min_gap {min_gap:g} between two different answers ({why})"
    )


def write_pairs(out_dir: Path, records: list[dict], pcfg, provenance: dict, label: str) -> dict:
    """pairs.jsonl (atomic) and summary.json from the judged samples; NoPairs when none has a gap."""

    rows, dropped = make_pairs(records, pcfg.min_gap, provenance)
    stats, bias = length_check(rows)
    summary = {
        "prompts": len(records),
        "answers": sum(len(r["answers"]) for r in records),
        "pairs_kept": len(rows),
        "pairs_dropped": sum(dropped.values()),
        "dropped_why": dict(dropped),
        "min_gap": pcfg.min_gap,
        "sampling": {"samples": pcfg.samples, "max_new_tokens": pcfg.max_new_tokens, **SAMPLING},
        **provenance,
        "mean_answer_tokens": round(statistics.mean(a["tokens"] for r in records for a in r["answers"]), 2),
        "answers_hitting_cap": round(
            statistics.mean(0.0 if a["stopped"] else 1.0 for r in records for a in r["answers"]), 3
        ),
        "length": stats,
        "length_bias": bias,
    }
    verdicts = sum((Counter(r.get("judge_stats", {})) for r in records), Counter())
    if verdicts:  # pairwise judges: comparisons asked, ties, order disagreements, unreadable replies
        summary["judge_stats"] = dict(verdicts)
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    if not rows:
        raise NoPairs(
            no_pairs_message(records, dropped, pcfg.min_gap) + ".",
            hint="A judge that cannot tell the answers apart teaches nothing: use a sharper rule, more samples "
            "(pairs.samples), or a lower pairs.min_gap.",
        )
    atomic_write_text(out_dir / PAIRS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common()) or "none"
    print(f"{label} {len(rows)} pairs kept of {len(records)} prompts; dropped: {why}", flush=True)
    if bias:
        print(f"{label} warning: {bias}", flush=True)
    return summary


# ------------------------------------------------------------------ `lowvram pairs`


def resolve_policy(spec: str | None, recipe, plan) -> tuple[str, Path | None, Path | None, str]:
    """(base model path, adapter or None, tokenizer folder or None, description) for --policy."""

    if spec is None:
        return resolve_model_path(plan.model), None, None, f"the recipe's model {plan.model}"
    p = Path(spec).expanduser()
    if rundir.recipe_file(p).is_file():  # a run directory: its final adapter, else its SFT adapter
        base = rundir.trained_base(p)
        model = base.model_path or resolve_model_path(base.model)
        for stage, what in (("dpo", "final"), ("sft", "SFT")):
            if rundir.is_done(p, stage):
                tok = rundir.tokenizer_dir(p)
                adapter = rundir.adapter_dir(p, stage)
                return model, adapter, tok if tok.is_dir() else None, f"the {what} adapter of {p}"
        raise UserError(f"{p} has no finished stage (sft/DONE or dpo/DONE) to sample from.")
    if (p / "adapter_config.json").is_file():
        cfg = json.loads((p / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{p}/adapter_config.json names no base model.", hint="Pass the run directory instead.")
        return resolve_model_path(base), p, None, f"the adapter {p} on {base}"
    return resolve_model_path(spec), None, None, f"the model {spec}"


def run_pairs_command(recipe, recipe_dir: Path | None, plan, policy: str | None, out: Path) -> int:
    """`lowvram pairs`: sample, judge and pair every prompt of the recipe's pairs.prompts into OUT/."""

    check_writable(out, "pairs folder", hint="Choose a writable place with --out DIR.")

    print("\n".join(check_phases(recipe, plan)), flush=True)  # refuses before anything loads
    prompts, source = read_prompts(recipe, recipe_dir)
    if recipe.pairs.max_prompts:
        prompts = prompts[: recipe.pairs.max_prompts]
    model_path, adapter, tok_dir, desc = resolve_policy(policy, recipe, plan)
    run_dir = Path(policy) if policy and rundir.recipe_file(Path(policy)).is_file() else None
    judge = make_judge(recipe.pairs.judge, recipe, run_dir, {_label(p): p for p in prompts})
    print(f"[pairs] {source}; policy: {desc}; judge: {judge.name}", flush=True)
    model, tok = load_policy(model_path, {"policy": adapter}, recipe, plan, tok_dir)
    provenance = {"policy": desc, "judge": judge.name}
    policy = "policy" if adapter else None
    sampler = make_sampler(recipe.pairs, model, tok, policy, model_path, adapter, tok_dir, out, prompts, "[pairs]")
    try:
        records = sample_and_judge(sampler, tok, prompts, judge, recipe.pairs, recipe.seed, out, "[pairs]")
        summary = write_pairs(out, records, recipe.pairs, provenance, "[pairs]")
    finally:
        sampler.close()
        judge.close()
        del model, sampler
        release_memory()
    print(f"Pairs: {out / PAIRS_FILE}   Check: lowvram data check {out / PAIRS_FILE}")
    print(f"Train on them: dpo.data.path={out / PAIRS_FILE}  ({summary['pairs_kept']} pairs)")
    return 0


# ------------------------------------------------------------------ iterated DPO inside `lowvram run`


def _kl_to_previous(model, tok, texts, drawn, new: str, prev: str | None) -> float | None:
    """KL(new || previous) on the new policy's samples, nats per answer: eval's exact per-token KL (never < 0)."""
    if not any(drawn):
        return None
    return kl_from_samples(model, tok, texts, drawn, new, prev)["kl"]


def _side_stats(answers: list[Answer], scores: list[float]) -> dict:
    return {
        "mean_tokens": round(statistics.mean(a.tokens for a in answers), 2),
        "mean_words": round(statistics.mean(len(a.text.split()) for a in answers), 2),
        "hit_cap_share": round(statistics.mean(0.0 if a.stopped else 1.0 for a in answers), 3),
        "mean_judge_score": round(statistics.mean(scores), 4),
    }


def compare_policies(model, tok, heldout: list, judge: Judge, pcfg, seed: int, new: str, prev: str | None) -> dict:
    """The judge's verdict on the new policy against the previous one, on held-out prompts it never sampled."""

    texts = [prompt_text(tok, p) for p in heldout]
    kw = dict(sample=True, n=pcfg.heldout_samples, seed=seed, max_new_tokens=pcfg.max_new_tokens)
    with using(model, new):
        drawn_new = generate(model, tok, texts, **kw)
    with using(model, prev):
        drawn_prev = generate(model, tok, texts, **kw)
    wins, a_new, a_prev, s_new, s_prev = [], [], [], [], []
    for p, gn, gp in zip(heldout, drawn_new, drawn_prev):
        for x, y in zip(_answers(tok, gn), _answers(tok, gp)):
            sx, sy = judged(judge, _label(p), [x, y])
            wins.append(1.0 if sx > sy else 0.5 if sx == sy else 0.0)
            a_new.append(x)
            a_prev.append(y)
            s_new.append(sx)
            s_prev.append(sy)
    kl = _kl_to_previous(model, tok, texts, drawn_new, new, prev)
    return {
        "heldout_prompts": len(heldout),
        "comparisons": len(wins),
        "win_rate": round(statistics.mean(wins), 4),
        "new": _side_stats(a_new, s_new),
        "previous": _side_stats(a_prev, s_prev),
        "kl_to_previous": None if kl is None else round(kl, 4),
    }


def _relabel_metrics(run_dir: Path, old: str, new: str) -> None:
    """Move a round's DPO lines in metrics.jsonl under their own stage name: the next round starts at step 0."""

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("stage") == old:
            row["stage"] = new
            line = json.dumps(row)
        out.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in out))


def _append_metrics(run_dir: Path, record: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _round_line(rec: dict) -> str:
    c = rec["compare"]
    kl = "-" if c["kl_to_previous"] is None else f"{c['kl_to_previous']:.2f}"
    return (
        f"[round {rec['round']}] judge win rate vs previous policy {c['win_rate']:.0%} on {c['comparisons']} "
        f"held-out answers; words {c['previous']['mean_words']:.1f} -> {c['new']['mean_words']:.1f}; "
        f"hit the cap {c['previous']['hit_cap_share']:.0%} -> {c['new']['hit_cap_share']:.0%}; "
        f"KL to previous {kl} nats; pairs kept {rec['pairs']['pairs_kept']}, dropped {rec['pairs']['pairs_dropped']}"
    )


def run_rounds(rdir: Path, recipe, plan, model_path: str, recipe_dir: Path | None, start: Path | None) -> Path:
    """`rounds` x (sample, judge, pair, DPO from the last policy); RUN/dpo/adapter is the policy kept."""

    @dataclasses.dataclass
    class RoundContext(StageContext):
        round_dir: Path | None = None

        @property
        def stage_dir(self) -> Path:
            return self.round_dir / "dpo"

    pcfg = recipe.pairs
    print("\n".join(check_phases(recipe, plan)), flush=True)  # refuses before anything loads
    prompts, source = read_prompts(recipe, recipe_dir)
    train_prompts, heldout = split_prompts(prompts, pcfg.heldout_prompts, recipe.seed)
    if pcfg.max_prompts:
        train_prompts = train_prompts[: pcfg.max_prompts]
    print(
        f"[pairs] {source}: {len(train_prompts)} to sample, {len(heldout)} held out to judge each round; "
        f"{recipe.rounds} round(s)",
        flush=True,
    )
    if pcfg.judge.kind == "reward_model" and not pcfg.judge.run and not (rdir / "rm" / "DONE").is_file():
        print("[pairs] the judge is this run's reward model: training it first (rm stage)", flush=True)
        run_rm(rdir, recipe, plan, model_path)
        release_memory()
    raw = {_label(p): p for p in prompts}
    prev, kept, stop_reason, history = start, start, None, []
    kept_round = 0
    for k in range(1, recipe.rounds + 1):
        rd = rundir.rounds_dir(rdir) / f"round-{k}"
        label = f"[round {k}]"
        if (rd / "DONE").is_file():
            rec = json.loads((rd / ROUND_FILE).read_text())
            print(f"{label} already done, skipping", flush=True)
            history.append(rec)
            if rec.get("kept"):
                kept, kept_round = rd / "dpo" / "adapter", k
            if rec.get("stop_reason"):
                stop_reason = rec["stop_reason"]
                break
            prev = rd / "dpo" / "adapter"
            continue
        prov = {"run": str(rdir), "round": k, "policy": str(prev) if prev else f"base {model_path}"}
        judge = make_judge(pcfg.judge, recipe, rdir, raw)
        prov["judge"] = judge.name
        if not (rd / PAIRS_FILE).is_file():
            model, tok = load_policy(model_path, {"policy": prev}, recipe, plan)
            policy = "policy" if prev else None
            sampler = make_sampler(
                pcfg, model, tok, policy, model_path, prev, rdir / "tokenizer", rd, train_prompts, label
            )
            try:
                records = sample_and_judge(sampler, tok, train_prompts, judge, pcfg, recipe.seed + 1000 * k, rd, label)
            finally:
                sampler.close()
                del model, sampler
                release_memory()
            try:
                summary = write_pairs(rd, records, pcfg, prov, label)
            except NoPairs as e:
                judge.close()
                if k == 1:
                    raise
                stop_reason = f"round {k} found {e.message[0].lower()}{e.message[1:]}"
                atomic_write_text(rd / ROUND_FILE, json.dumps({"round": k, "stop_reason": stop_reason}))
                atomic_write_text(rd / "DONE", "")
                break
        else:
            summary = json.loads((rd / SUMMARY_FILE).read_text())
        judge.close()
        shutil.rmtree(rd / "gguf", ignore_errors=True)  # the sampler's GGUF of the previous policy
        held = recipe.dpo.data.eval_fraction if summary["pairs_kept"] >= 4 else 0.0  # too few pairs to split
        dcfg = DataConfig(path=str(rd / PAIRS_FILE), eval_fraction=held)
        data = load_preference_data(dcfg, None, base_dir=None, seed=recipe.seed)
        ctx = RoundContext(rdir, recipe, plan, "dpo", model_path, recipe_dir, prev, round_dir=rd)
        print(f"{label} DPO on {len(data.train)} pairs from {prev or 'the base'} (the reference)", flush=True)
        run_stage(ctx, data)
        _relabel_metrics(rdir, "dpo", f"dpo round {k}")
        new = rd / "dpo" / "adapter"
        judge = make_judge(pcfg.judge, recipe, rdir, raw)
        model, tok = load_policy(model_path, {"new": new, "prev": prev}, recipe, plan)
        try:
            comp = compare_policies(model, tok, heldout, judge, pcfg, recipe.seed, "new", "prev" if prev else None)
        finally:
            judge.close()
            del model
            release_memory()
        rec = {"round": k, "pairs": summary, "compare": comp, "kept": True}
        print(_round_line(rec), flush=True)
        if comp["win_rate"] <= pcfg.stop_below_win_rate:
            rec["kept"] = k == 1  # round 1 is the only DPO there is; later rounds that gain nothing are not kept
            stop_reason = (
                f"round {k} gained nothing: the new policy wins {comp['win_rate']:.0%} of held-out comparisons "
                f"against the previous one (pairs.stop_below_win_rate {pcfg.stop_below_win_rate:.0%})"
            )
            rec["stop_reason"] = stop_reason
        _append_metrics(
            rdir,
            {
                "stage": "rounds",
                "step": k,
                "round": k,
                "win_rate": comp["win_rate"],
                "kl_to_previous": comp["kl_to_previous"],
                **{f"new_{a}": b for a, b in comp["new"].items()},
                **{f"previous_{a}": b for a, b in comp["previous"].items()},
                "pairs_kept": summary["pairs_kept"],
                "pairs_dropped": summary["pairs_dropped"],
                "dropped_why": summary["dropped_why"],
            },
        )
        atomic_write_text(rd / ROUND_FILE, json.dumps(rec, indent=2))
        atomic_write_text(rd / "DONE", "")
        history.append(rec)
        if rec["kept"]:
            kept, kept_round = new, k
        if stop_reason:
            break
        prev = new
    if stop_reason:
        print(f"[rounds] stopped early: {stop_reason}.", flush=True)
    if kept is None or kept_round == 0:
        raise UserError("No round trained a policy.")  # pragma: no cover - round 1 either trains or raises
    print(f"[rounds] the final policy is round {kept_round}'s ({kept})", flush=True)
    _relabel_metrics(rdir, f"dpo round {kept_round}", "dpo")  # the report's DPO curves: the kept round
    _finish(rdir, kept, kept_round, heldout, history, stop_reason)
    return rdir / "dpo" / "adapter"


def _finish(rdir: Path, kept: Path, kept_round: int, heldout: list, history: list, stop_reason) -> None:
    """RUN/dpo/ as if one DPO stage had trained the kept policy: eval, export and report read it there."""

    dpo = rdir / "dpo"
    dpo.mkdir(exist_ok=True)
    if (dpo / "adapter").exists():
        shutil.rmtree(dpo / "adapter")
    shutil.copytree(kept, dpo / "adapter")
    for name in ("train_stats.json", "eval_before.json", "eval_after.json"):
        if (kept.parent / name).is_file():
            shutil.copyfile(kept.parent / name, dpo / name)
    (rdir / "eval").mkdir(exist_ok=True)  # `lowvram eval` answers the loop's own held-out prompts
    atomic_write_text(
        rdir / "eval" / "heldout_prompts.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in heldout)
    )
    summary = {"rounds": history, "kept_round": kept_round, "stop_reason": stop_reason}
    atomic_write_text(rundir.rounds_dir(rdir) / SUMMARY_FILE, json.dumps(summary, indent=2))
    atomic_write_text(dpo / "DONE", json.dumps({"kept_round": kept_round}))
