"""One self-contained page per run: RUN/report.html (inline images and styles, no network).

    lowvram report RUN_DIR        # rebuild it (after `lowvram eval` or `lowvram export`, for example)

Sections: the plan and its memory breakdown, the data check, the training curves with held-out points,
the answers side by side, the reward-model and best-of-N tables, and the export verification.
Everything is read from files in the run directory; a section whose files are missing says how to fill it.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from lowvram import rundir
from lowvram.data.check import check_data
from lowvram.evaluate.kl import kl_text
from lowvram.evaluate.report import changed_lines, summarize, summary_lines, write_plots

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#f3f3f3}
.answers td{max-width:320px;white-space:pre-wrap}.warn{color:#a40000;font-weight:bold}
.note{color:#555}.ok{color:#176117}.fail{color:#a40000;font-weight:bold}img{max-width:520px;margin:.3em}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _fmt(v, fmt: str = "{:.3f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt.format(v)
    return str(v)


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# ------------------------------------------------------------------ sections


def _plan_section(run_dir: Path) -> str:
    plan = _read_json(rundir.plan_file(run_dir))
    if not plan:
        return "<p class='note'>No plan.json in this run.</p>"
    reasons = plan.get("reasons", {})
    rows = [
        [
            _e(k),
            _e(plan.get(k) if k != "lora" else f"r={plan.get('lora_r')} alpha={plan.get('lora_alpha')}"),
            _e(reasons.get(k, "")),
        ]
        for k in ("tier", "model", "backend", "dtype", "load_in_4bit", "lora")
    ]
    out = [f"<p>Device: {_e(plan.get('device', {}).get('name'))}</p>", _table(["setting", "value", "why"], rows)]
    stage_rows, mem_rows = [], []
    for name, sp in plan.get("stages", {}).items():
        stage_rows.append(
            [
                _e(name),
                _e(sp.get("max_seq_len")),
                _e(f"{sp.get('batch_size')} x {sp.get('grad_accum')}"),
                _e(sp.get("grad_ckpt")),
                _e(sp.get("optim")),
                "<br>".join(f"{_e(k)}: {_e(v)}" for k, v in sp.get("reasons", {}).items()),
            ]
        )
        est = sp.get("estimate")
        if est:
            parts = {k: v for k, v in est.items() if k.endswith("_gib") and isinstance(v, (int, float))}
            mem_rows.append(
                [
                    _e(name),
                    "<br>".join(f"{_e(k[:-4])}: {v:.2f} GiB" for k, v in parts.items()),
                    _e(_fmt(sp.get("budget_gib"), "{:.1f} GiB")),
                    {True: "<span class='ok'>fits</span>", False: "<span class='fail'>does not fit</span>"}.get(
                        sp.get("fits"), "-"
                    ),
                ]
            )
    out.append(_table(["stage", "max_seq_len", "batch x accum", "grad_ckpt", "optim", "why"], stage_rows))
    out.append("<h3>Memory breakdown</h3>")
    if mem_rows:
        out.append(_table(["stage", "estimated peak VRAM, by part", "budget", ""], mem_rows))
    else:
        out.append(
            f"<p class='note'>Not estimated: {_e(reasons.get('memory', 'no CUDA card, so no VRAM budget'))}. "
            "<code>lowvram plan RECIPE --vram GIB</code> shows the breakdown for a card.</p>"
        )
    return "\n".join(out)


def _data_section(run_dir: Path) -> str:

    try:
        recipe = rundir.read_recipe(run_dir)
    except Exception as e:  # the report still renders the rest
        return f"<p class='note'>Data check unavailable: {_e(e)}</p>"
    out = []
    for stage in recipe.stages():
        try:
            data = getattr(recipe, stage).data
            rep = check_data(data, sample=recipe.sample_file(data), base_dir=Path.cwd(), stage=stage)
            out.append(f"<pre>{_e(chr(10).join(rep.lines()))}</pre>")
        except Exception as e:
            out.append(f"<p class='note'>{_e(stage)}: data check unavailable here ({_e(e)}).</p>")
    return "\n".join(out)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _curves_section(run_dir: Path) -> str:
    plots = write_plots(run_dir)
    if not plots:
        return "<p class='note'>No metrics logged yet.</p>"
    return (
        "<p class='note'>Lines: training steps. Dots: held-out evaluations (before training, every "
        "eval_steps, after). KL and answer length are measured on the policy's own samples on held-out prompts."
        "</p>" + "".join(_img(p, p.stem.replace("_", " ")) for p in plots)
    )


def _summary_section(run_dir: Path) -> str:

    lines = summary_lines(summarize(run_dir))
    if not lines:
        return "<p class='note'>No stage has finished yet.</p>"
    return "".join(f"<p class='{'warn' if x.startswith('WARNING') else ''}'>{_e(x.strip())}</p>" for x in lines)


def _eval_sections(run_dir: Path) -> tuple[str, str, str]:
    summary = _read_json(rundir.eval_dir(run_dir) / "summary.json")
    if not summary:
        msg = f"<p class='note'>No evaluation yet: <code>lowvram eval {_e(run_dir)}</code>.</p>"
        return msg, msg, msg
    ref = summary.get("reference")
    rows = []
    for m in summary["models"]:
        kl = m.get("kl")
        kl_cell = _e(kl_text(m) or "-")
        if m["model"] == "final" and kl is not None and kl > summary.get("kl_warn_nats", 10):
            kl_cell = (
                f"<span class='warn'>{kl_cell} ({kl:.1f} nats per answer, over {summary['kl_warn_nats']:g})</span>"
            )
        rows.append(
            [
                _e(m["model"]),
                _fmt(m.get("median_answer_tokens"), "{:g}"),
                _fmt(m.get("ended_turn_share"), "{:.0%}"),
                _fmt(m.get("mean_answer_tokens"), "{:.1f}"),
                _fmt(m.get("mean_answer_chars"), "{:.0f}"),
                kl_cell,
                _fmt(m.get("implicit_margin_vs_sft"), "{:+.3f}"),
                _fmt(m.get("rm_score"), "{:+.3f}"),
                _fmt(m.get("rm_win_rate_vs_sft"), "{:.2f}"),
            ]
        )
    models = (
        f"<p>{_e(summary['prompts_source'])}; greedy answers; KL from {summary['kl_samples']} sampled answers "
        f"per prompt (seed {summary['seed']}), reference: {_e(ref)}.</p>"
        + _table(
            [
                "model",
                "median answer tokens",
                f"answers ending their turn before {summary.get('max_new_tokens', '?')} tokens",
                "mean answer tokens",
                "answer chars",
                f"KL to {ref}",
                "DPO implicit margin vs sft",
                "reward-model score",
                "RM win rate vs sft",
            ],
            rows,
            "models",
        )
    )
    changed = changed_lines(summary, show=0)
    if changed:
        models += f"<p><b>{_e(changed[0])}</b></p>"
    answers = _read_jsonl(rundir.eval_dir(run_dir) / "answers.jsonl")
    names = [m["model"] for m in summary["models"]]
    by_prompt: dict[str, dict] = {}
    for a in answers:
        if a.get("mode") == "greedy":
            by_prompt.setdefault(a["prompt"], {})[a["model"]] = a
    side_rows = []
    for prompt, got in by_prompt.items():
        cells = [_e(prompt)]
        for n in names:
            a = got.get(n, {})
            score = []
            if a.get("implicit_reward") is not None:
                score.append(f"implicit {a['implicit_reward']:+.2f}")
            if a.get("rm_score") is not None:
                score.append(f"RM {a['rm_score']:+.2f}")
            cells.append(
                f"{_e(a.get('answer'))}<br><span class='note'>{a.get('tokens', '-')} tokens"
                f"{'; ' + '; '.join(score) if score else ''}</span>"
            )
        side_rows.append(cells)
    side = (
        "<p class='note'>Greedy answers to the same held-out prompts; sampled ones are in eval/answers.jsonl.</p>"
        + _table(["prompt", *names], side_rows, "answers")
    )
    b = summary.get("best_of_n")
    rm_rows = []
    rm_eval = _read_json(rundir.stage_dir(run_dir, "rm") / "eval_after.json")
    if rm_eval:
        rm_rows.append(f"<p>Reward model held-out pair accuracy: {_fmt(rm_eval.get('accuracy'), '{:.2f}')}</p>")
    if not b:
        rm_rows.append("<p class='note'>Best-of-N not run: <code>lowvram eval RUN --best-of 4</code>.</p>")
    elif "skipped" in b:
        rm_rows.append(f"<p class='note'>Best-of-N skipped: {_e(b['skipped'])}</p>")
    else:
        rm_rows.append(
            _table(
                ["", f"best-of-{b['n']} (SFT)", "final model"],
                [
                    [
                        "mean score (" + _e(b["scorer"]) + ")",
                        _fmt(b["best_of_n_score"], "{:+.3f}"),
                        _fmt(b["final_score"], "{:+.3f}"),
                    ],
                    [
                        "win rate",
                        _fmt(1 - b["final_win_rate_vs_best_of_n"], "{:.2f}"),
                        _fmt(b["final_win_rate_vs_best_of_n"], "{:.2f}"),
                    ],
                    ["generated tokens", _e(b["generated_tokens_best_of_n"]), _e(b["generated_tokens_final"])],
                    [
                        "generation seconds",
                        _fmt(b["generate_s_best_of_n"], "{:.1f}"),
                        _fmt(b["generate_s_final"], "{:.1f}"),
                    ],
                ],
                "bestofn",
            )
            + f"<p>Extra cost: {_e(b['generation_cost_ratio'])}x the generated tokens. {_e(b['cost_note'])}.</p>"
        )
        bon = _read_jsonl(rundir.eval_dir(run_dir) / "best_of_n.jsonl")
        rm_rows.append(
            _table(
                ["prompt", f"best of {b['n']} SFT answers", "score", "final answer", "score"],
                [
                    [
                        _e(r["prompt"]),
                        _e(r["best_of_n"]),
                        _fmt(r["best_of_n_score"], "{:+.2f}"),
                        _e(r["final"]),
                        _fmt(r["final_score"], "{:+.2f}"),
                    ]
                    for r in bon
                ],
                "answers",
            )
        )
    return models, side, "".join(rm_rows)


def _export_section(run_dir: Path) -> str:
    found = sorted(run_dir.glob(f"{rundir.EXPORT}*/verify.json"))
    if not found:
        return f"<p class='note'>No export yet: <code>lowvram export {_e(run_dir)}</code>.</p>"
    out = []
    for path in found:
        data = _read_json(path) or {}
        rows = []
        for t, v in data.items():
            status = str(v.get("status"))
            cls = {"ok": "ok", "FAIL": "fail"}.get(status, "warn")
            rows.append(
                [
                    _e(t),
                    f"<span class='{cls}'>{_e(status)}</span>",
                    _fmt(v.get("conv_kl"), "{:.1e}"),
                    _fmt(v.get("kl"), "{:.4f}"),
                    _fmt(v.get("agree"), "{:.2f}"),
                    _fmt(v.get("ppl_change"), "{:+.3f}"),
                    _e(v.get("tokens_same")),
                    _e("; ".join(v.get("reasons") or [])),
                ]
            )
        out.append(
            f"<p>{_e(path.parent)}</p>"
            + _table(
                [
                    "GGUF",
                    "conversion (ok/FAIL)",
                    "conversion KL",
                    "cost: KL nats/token",
                    "cost: top-1 where confident",
                    "cost: perplexity change",
                    "same tokens",
                    "reasons",
                ],
                rows,
                "verify",
            )
        )
    return "".join(out)


def _rounds_section(run_dir: Path) -> str:

    return rounds_section(run_dir) or "<p>No rounds: the preference data was given, not sampled.</p>"


def write_html(run_dir: Path) -> Path:
    """Build RUN/report.html from the run's files; return its path."""
    run_dir = Path(run_dir)
    models, side, rm = _eval_sections(run_dir)
    sections = [
        ("summary", "Summary", _summary_section(run_dir)),
        ("plan", "Plan and memory", _plan_section(run_dir)),
        ("data", "Data check", _data_section(run_dir)),
        ("curves", "Training curves", _curves_section(run_dir)),
        ("rounds", "Rounds of sampled pairs (iterated DPO)", _rounds_section(run_dir)),
        ("models", "Base vs SFT vs final", models),
        ("answers", "Answers side by side", side),
        ("reward", "Reward model and best-of-N", rm),
        ("export", "Export verification", _export_section(run_dir)),
    ]
    body = "\n".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>\n{content}</section>' for sid, title, content in sections
    )
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lowvram report: {_e(run_dir.name)}</title>"
        f"<style>{CSS}</style></head><body><h1>lowvram report: {_e(run_dir.name)}</h1>\n{body}\n</body></html>\n"
    )
    out = rundir.report_file(run_dir)
    out.write_text(page, encoding="utf-8")
    return out


def rounds_section(run_dir: Path) -> str:
    """report.html: one row per round (empty when the run had no rounds)."""
    path = rundir.rounds_dir(run_dir) / "summary.json"
    if not path.is_file():
        return ""
    s = json.loads(path.read_text())
    head = (
        "<tr><th>round</th><th>win rate vs previous</th><th>words prev -> new</th><th>hit cap prev -> new</th>"
        "<th>KL to previous (nats)</th><th>pairs kept</th><th>dropped (why)</th></tr>"
    )
    body = []
    for r in s["rounds"]:
        if "compare" not in r:
            body.append(f"<tr><td>{r['round']}</td><td colspan='6'>{html.escape(r.get('stop_reason', ''))}</td></tr>")
            continue
        c, p = r["compare"], r["pairs"]
        why = ", ".join(f"{n} {k}" for k, n in p["dropped_why"].items()) or "-"
        kl = "-" if c["kl_to_previous"] is None else f"{c['kl_to_previous']:.3f}"
        body.append(
            f"<tr><td>{r['round']}</td><td>{c['win_rate']:.0%}</td>"
            f"<td>{c['previous']['mean_words']:.1f} -> {c['new']['mean_words']:.1f}</td>"
            f"<td>{c['previous']['hit_cap_share']:.0%} -> {c['new']['hit_cap_share']:.0%}</td><td>{kl}</td>"
            f"<td>{p['pairs_kept']}</td><td>{html.escape(why)}</td></tr>"
        )
    note = f"<p>Kept: round {s['kept_round']}." + (
        f" Stopped early: {html.escape(s['stop_reason'])}.</p>" if s.get("stop_reason") else "</p>"
    )
    return f"<table>{head}{''.join(body)}</table>{note}"
