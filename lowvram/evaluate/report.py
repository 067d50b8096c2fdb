"""Run summary and plots from RUN/metrics.jsonl.

    summary = write_report(run_dir)   # RUN/summary.json and RUN/plots/*.png

The summary carries the evidence that each stage did its job: SFT loss at the start vs the end,
and on held-out pairs the preference accuracy and margin before vs after DPO.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowvram import rundir
from lowvram.evaluate.kl import kl_text
from lowvram.utils.fileio import atomic_write_text


def _parse_lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill -9: skip it, keep the rest
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _kind(row: dict) -> str:
    if "eval" in row:
        return f"eval:{row['eval']}"
    if any(str(k).startswith("eval_") for k in row):
        return "eval"
    return "end" if "train_runtime" in row else "train"  # the Trainer's closing record shares the last step


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl, each (stage, step, kind) once: a later record replaces an earlier one.

    After a resume the steps between the checkpoint and the interruption are trained again; the file
    is trimmed when that happens (`rundir.supersede_metrics`), and this also holds for files written before.
    """
    path = rundir.metrics_file(run_dir)
    if not path.is_file():
        return []
    latest: dict[tuple, dict] = {}
    for row in _parse_lines(path):
        latest.pop((row.get("stage"), row.get("step"), _kind(row)), None)  # re-inserted last: file order kept
        latest[(row.get("stage"), row.get("step"), _kind(row))] = row
    return list(latest.values())


def _train_logs(rows: list[dict], stage: str) -> list[dict]:
    return [r for r in rows if r.get("stage") == stage and "loss" in r and "eval" not in r]


def _window(n: int, k: int = 3) -> int:
    """How many logged losses _head_tail averages at each end."""
    return max(1, min(k, n // 2))


def _head_tail(values: list[float], k: int = 3) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    k = _window(len(values), k)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def summarize(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    out: dict = {"run_dir": str(run_dir)}
    sft = _train_logs(rows, "sft")
    ht = _head_tail([r["loss"] for r in sft])
    if ht:
        out["sft"] = {
            "loss_start": round(ht[0], 4),
            "loss_end": round(ht[1], 4),
            "steps": sft[-1]["step"],
            "loss_fell": ht[1] < ht[0],
            "loss_window": _window(len(sft)),
        }
    dpo = _train_logs(rows, "dpo")
    if dpo:
        d: dict = {"steps": dpo[-1]["step"]}
        ht = _head_tail([r["loss"] for r in dpo])
        if ht:
            d["loss_start"], d["loss_end"] = round(ht[0], 4), round(ht[1], 4)
        evals = {r["eval"]: r for r in rows if r.get("stage") == "dpo" and "eval" in r}
        for when in ("before", "after"):
            e = evals.get(when)
            if not e:
                continue
            d[f"heldout_{when}"] = {
                "reward_accuracy": e.get("rewards/accuracies"),
                "reward_margin": e.get("rewards/margins"),
                # how much more likely the policy finds the chosen answer than the rejected one
                "logp_margin": (e["logps/chosen"] - e["logps/rejected"]) if "logps/chosen" in e else None,
                # KL(policy || reference) from the policy's own samples on held-out prompts (lowvram/evaluate/run.py)
                "kl": e.get("kl"),
                "kl_per_token": e.get("kl_per_token"),
                "kl_per_token_sem": e.get("kl_per_token_sem"),
                "answer_tokens": e.get("kl_mean_tokens"),
            }
        b, a = d.get("heldout_before"), d.get("heldout_after")
        if b and a and a["reward_accuracy"] is not None and b["reward_accuracy"] is not None:
            d["heldout_accuracy_rose"] = a["reward_accuracy"] > b["reward_accuracy"]
            if a["logp_margin"] is not None and b["logp_margin"] is not None:
                d["heldout_logp_margin_rose"] = a["logp_margin"] > b["logp_margin"]
        kl = (d.get("heldout_after") or {}).get("kl")
        if kl is not None:
            d["kl_warn_nats"] = kl_warn_nats(run_dir)
            d["kl_too_high"] = kl > d["kl_warn_nats"]
        out["dpo"] = d
    return out


def kl_warn_nats(run_dir: Path) -> float:
    """The run's eval.kl_warn_nats (10 nats unless the recipe says otherwise)."""
    import yaml

    try:
        recipe = yaml.safe_load(rundir.recipe_file(run_dir).read_text()) or {}
        return float((recipe.get("eval") or {}).get("kl_warn_nats", 10.0))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 10.0


def heldout_points(rows: list[dict], stage: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a held-out metric: the before/after evaluations and the periodic ones (eval_steps)."""
    pts: dict[int, float] = {}
    for r in rows:
        if r.get("stage") != stage:
            continue
        value = r.get(key) if "eval" in r else r.get(f"eval_{key}")
        if isinstance(value, (int, float)):
            pts[r["step"]] = value
    return sorted(pts.items())


PLOTS = [
    ("loss", "loss", ["sft", "dpo"]),
    ("reward_margin", "rewards/margins", ["dpo"]),
    ("preference_accuracy", "rewards/accuracies", ["dpo"]),
    ("rewards_chosen_rejected", ("rewards/chosen", "rewards/rejected"), ["dpo"]),
    # measured only on held-out prompts, at each evaluation (lowvram/evaluate/run.py)
    ("kl_to_reference", "kl", ["dpo"]),
    ("answer_length", "kl_mean_tokens", ["dpo"]),
]
YLABELS = {"kl_to_reference": "KL(policy || reference), nats", "answer_length": "sampled answer, tokens"}


def write_plots(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = rundir.plots_dir(run_dir)
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, keys, stages in PLOTS:
        keys = keys if isinstance(keys, tuple) else (keys,)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for stage in stages:
            logs = _train_logs(rows, stage)
            for key in keys:
                label = f"{stage} {key}" if len(stages) + len(keys) > 2 else key
                pts = [(r["step"], r[key]) for r in logs if key in r]
                if pts:
                    line = ax.plot(*zip(*pts), label=label)[0]
                    drawn = True
                held = heldout_points(rows, stage, key)
                if held:
                    ax.plot(*zip(*held), "o--", color=line.get_color() if pts else None, label=f"{label} (held-out)")
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("optimizer step")
        if name in YLABELS:
            ax.set_ylabel(YLABELS[name])
        ax.set_title(name.replace("_", " "))
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(run_dir: Path) -> dict:
    summary = summarize(run_dir)
    summary["plots"] = [str(p.relative_to(run_dir)) for p in write_plots(run_dir)]

    atomic_write_text(rundir.summary_file(run_dir), json.dumps(summary, indent=2))
    return summary


def summary_lines(summary: dict) -> list[str]:
    lines = []
    if "sft" in summary:
        s = summary["sft"]
        k = s.get("loss_window", 3)
        which = "logged step" if k == 1 else f"{k} logged steps"
        lines.append(
            f"SFT   training loss (mean of the first {which} -> the last): {s['loss_start']:.3f} -> "
            f"{s['loss_end']:.3f} over {s['steps']} steps ({'fell' if s['loss_fell'] else 'did NOT fall'})"
        )
    if "dpo" in summary:
        d = summary["dpo"]
        if "loss_start" in d:
            lines.append(f"DPO   loss {d['loss_start']:.3f} -> {d['loss_end']:.3f} over {d['steps']} steps")
        b, a = d.get("heldout_before"), d.get("heldout_after")
        if b and a:
            labels = [
                ("reward_accuracy", "preference accuracy", "{:.2f}"),
                ("reward_margin", "reward margin", "{:+.3f}"),
                ("logp_margin", "log-prob margin chosen-rejected", "{:+.2f}"),
            ]
            shown = [
                f"{label} {fmt.format(b[k])} -> {fmt.format(a[k])}"
                for k, label, fmt in labels
                if b.get(k) is not None and a.get(k) is not None
            ]
            if shown:
                lines.append("      held-out " + "; ".join(shown))
            if b.get("kl_per_token") is not None and a.get("kl_per_token") is not None:
                length = (
                    f"; sampled answer length {b['answer_tokens']:.1f} -> {a['answer_tokens']:.1f} tokens"
                    if b.get("answer_tokens") is not None and a.get("answer_tokens") is not None
                    else ""
                )
                lines.append(f"      KL(policy || reference) on held-out prompts {kl_text(b)} -> {kl_text(a)}" + length)
        if d.get("kl_too_high"):
            lines.append(
                f"WARNING: the policy drifted {a['kl']:.1f} nats from the reference (more than "
                f"eval.kl_warn_nats={d['kl_warn_nats']:g}): it may have learned to game the preference "
                "(length, filler) rather than answer better. Read its answers (lowvram eval); lower "
                "dpo.learning_rate or raise dpo.beta."
            )
    return lines


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
    for p in (summary.get("side_by_side") or [])[:show]:
        lines.append(f"  Q: {p['prompt']}")
        for name in ("sft", "final"):
            text = " ".join(p[name].split())
            text = text if len(text) <= width else text[: width - 3] + "..."
            lines.append(f"    {name:5} ({p[name + '_tokens']} tok): {text}")
    return lines
