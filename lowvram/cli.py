"""The `lowvram` command. `main(argv) -> int` so tests can call it.

    lowvram doctor                      what this machine can do
    lowvram recipes [show|copy] NAME    the shipped recipes (`recipes templates`: named chat templates)
    lowvram plan RECIPE [k=v ...]       settings for this card, with reasons
    lowvram run RECIPE [k=v ...]        SFT, then DPO, into a run directory
    lowvram data check PATH             bad lines and weak pairs in training data, before training
    lowvram pairs RECIPE [--policy RUN] sample, judge and pair the policy's own answers (preference data)
    lowvram export RUN_DIR --gguf q4_k_m  merge, GGUF + Ollama Modelfile, verified in llama.cpp
    lowvram chat GGUF_OR_RUN_DIR        try an exported model
    lowvram eval RUN_DIR [--best-of N]  base vs SFT vs final on held-out prompts: KL, length, rewards
    lowvram report RUN_DIR              rebuild RUN_DIR/report.html

Heavy libraries (torch, transformers, trl) are imported only by the commands that train or export.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from lowvram import __version__
from lowvram.errors import EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK, UserError


def _device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("card to plan for (default: detect)")
    g.add_argument("--vram", metavar="GIB", help="plan for a card with this much memory (env LOWVRAM_VRAM_GIB)")
    g.add_argument("--gpu", metavar="NAME", help="plan for a known card: t4, rtx3060, rtx4090, ... (env LOWVRAM_GPU)")


def _device(args: argparse.Namespace, use_torch: bool = False):
    from lowvram.plan.hardware import detect_device

    return detect_device(vram_gib=getattr(args, "vram", None), gpu=getattr(args, "gpu", None), use_torch=use_torch)


# ------------------------------------------------------------------ commands


def cmd_doctor(args: argparse.Namespace) -> int:
    from lowvram.doctor import doctor_rows
    from lowvram.utils.ui import echo, table

    echo(table(doctor_rows(_device(args))))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from lowvram.recipe import find_recipe, recipe_summary, shipped_recipes
    from lowvram.utils.ui import echo, table

    if args.action == "templates":
        from lowvram.data.templates import templates_table

        echo(templates_table())
        print("\nUse one for a base model without a chat template: model.chat_template=NAME (or the Jinja text).")
        return 0
    if args.action == "list":
        rows = [(name, recipe_summary(path)) for name, path in shipped_recipes().items()]
        echo(table(rows, ("recipe", "what it does")))
        print(
            "\nRun one: lowvram run NAME [key=value ...]   Show: lowvram recipes show NAME   Copy: lowvram recipes copy NAME DEST"
        )
        return 0
    if not args.name:
        raise UserError(
            f"'lowvram recipes {args.action}' needs a recipe name.", hint="Run 'lowvram recipes' to list them."
        )
    path = find_recipe(args.name)
    if args.action == "show":
        print(path.read_text(encoding="utf-8"), end="")
        return 0
    dest = Path(args.dest or f"{path.stem}.yaml")
    if dest.is_dir():
        dest = dest / path.name
    if dest.exists() and not args.force:
        raise UserError(f"{dest} already exists.", hint="Pick another destination or pass --force to overwrite it.")
    try:
        shutil.copyfile(path, dest)
    except OSError as e:
        raise UserError(
            f"Cannot copy {path.stem} to {dest}: {e.strerror or e}.",
            hint="Pick a destination in an existing, writable folder.",
        ) from None
    print(f"Copied {path.stem} to {dest}. Edit it, then: lowvram run {dest}")
    return 0


def _group_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("more than one GPU (through accelerate; README: More than one GPU)")
    g.add_argument("--gpus", type=int, metavar="N", help="train in N processes, one card each (default 1)")
    g.add_argument(
        "--strategy",
        default="auto",
        choices=("auto", "ddp", "fsdp", "deepspeed"),
        help="with --gpus: auto = DDP, or FSDP when one card cannot hold the model",
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from lowvram.plan.parallel import plan_per_card
    from lowvram.recipe import load_recipe

    recipe, path = load_recipe(args.recipe, args.overrides)
    # sized for the data's own lengths when local; per card with --gpus
    plan = plan_per_card(recipe, _device(args), path.parent, args.gpus or 1, args.strategy)
    from lowvram.plan.preflight import preflight

    preflight(recipe, plan.model, path.parent)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, allow_nan=False))  # strict JSON: no NaN or Infinity
        return 0
    print(f"Plan for {recipe.name} ({path}) on {plan.device.name}:")
    from lowvram.utils.ui import echo

    echo(plan.lines())
    from lowvram.plan.preflight import turn_token_note

    note = turn_token_note(recipe, plan.model)
    if note:
        print(note)
    if recipe.export.gguf:
        from lowvram.export.llamacpp import export_tools

        print(export_tools().plan_line(recipe.export.gguf))  # before hours of training, not after
    if recipe.pairs.enabled:
        from lowvram.pairs.memory import phase_lines

        print("\n".join(phase_lines(recipe, plan)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lowvram.pipeline import RunRequest, run_pipeline

    recipe, overrides = args.recipe, list(args.overrides or [])
    if recipe and "=" in recipe:  # `run --resume DIR key=value`: argparse took the override for the recipe
        recipe, overrides = None, [recipe, *overrides]
    req = RunRequest(
        recipe,
        tuple(overrides),
        vram=args.vram,
        gpu=args.gpu,
        resume=Path(args.resume) if args.resume else None,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        export=not args.no_export,
        gpus=args.gpus,
        strategy=args.strategy,
    )
    if req.gpus not in (None, 1) or req.strategy != "auto":
        from lowvram.launch import launch_run

        code = launch_run(req)  # None: already inside a launched group
        if code is not None:
            return code
    return run_pipeline(req, _export_run)


def _export_run(run_dir: Path, gguf: tuple[str, ...] | None = None) -> int:
    """The export at the end of `lowvram run`: the recipe's GGUF types (or those of them this machine can
    write), reported as `lowvram export` does."""
    from lowvram.export.run import ExportOptions

    return export_and_report(run_dir, ExportOptions(gguf=gguf))


def cmd_stage(args: argparse.Namespace) -> int:
    """`lowvram sft` / `lowvram dpo`: one stage alone, optionally continuing an existing adapter."""
    from lowvram.pipeline import RunRequest, run_pipeline
    from lowvram.rundir import adapter_dir

    init = None
    if getattr(args, "from_", None):
        src = Path(args.from_)
        if (src / "adapter_config.json").is_file():
            init = src
        elif (adapter_dir(src, "sft") / "adapter_config.json").is_file():
            init = adapter_dir(src, "sft")
        else:
            raise UserError(
                f"--from {src}: neither a LoRA adapter folder nor a run directory with sft/adapter.",
                hint="Pass a run directory made by 'lowvram run' or 'lowvram sft', or an adapter folder.",
            )
    req = RunRequest(
        args.recipe,
        tuple(args.overrides),
        vram=args.vram,
        gpu=args.gpu,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        stages=(args.command,),
        init_adapter=init,
    )
    return run_pipeline(req)


def cmd_pairs(args: argparse.Namespace) -> int:
    """`lowvram pairs`: sample the policy's answers to the recipe's prompts, judge them, write preference pairs."""
    from lowvram.offline import network_policy
    from lowvram.pairs.build import run_pairs_command
    from lowvram.plan.planner import make_plan
    from lowvram.recipe import load_recipe

    recipe, path = load_recipe(args.recipe, args.overrides)
    print(network_policy(recipe, recipe.model.name, ["sft"] if not recipe.pairs.prompts.path else []), flush=True)
    plan = make_plan(recipe, _device(args, use_torch=True))
    out = Path(args.out) if args.out else Path(recipe.output_dir) / f"{recipe.name}-pairs"
    return run_pairs_command(recipe, path.parent, plan, args.policy, out)


def cmd_data(args: argparse.Namespace) -> int:
    """`lowvram data check`: print the report(s); exit status 0 clean, 1 errors (or warnings with --strict)."""
    from lowvram.data.check import CheckReport, check_data
    from lowvram.recipe import DataConfig

    path, overrides = args.path, list(args.overrides or [])
    if path and "=" in path and not Path(path).exists():  # `data check --recipe R key=value`: no PATH given
        path, overrides = None, [path, *overrides]
    if overrides and not args.recipe:
        raise UserError(
            f"Overrides ({' '.join(overrides)}) apply to a recipe; pass --recipe too.",
            hint="lowvram data check --recipe RECIPE [PATH] [key=value ...]",
        )
    reports: list[CheckReport] = []
    if args.recipe is None:
        if not path:
            raise UserError(
                "'lowvram data check' needs a data file, folder or Hub dataset, or --recipe.",
                hint="Example: lowvram data check prefs.jsonl --kind preference",
            )
        reports.append(check_data(DataConfig(path=path, format=args.format or "auto"), args.kind))
    else:
        reports += _check_recipe_data(path, args.kind, args.format, args.recipe, lambda: _device(args), overrides)
    code = max(r.exit_code(args.strict) for r in reports)
    if args.json:
        print(json.dumps({"reports": [r.to_dict(args.strict) for r in reports], "exit_code": code}, indent=2))
    else:
        from lowvram.utils.ui import echo

        echo([line for i, r in enumerate(reports) for line in [*([""] if i else []), *r.lines(args.strict)]])
    return code


def _check_recipe_data(
    path: str | None, kind: str | None, fmt: str | None, recipe_name: str, device_fn, overrides: list[str]
) -> list:
    """Each stage's data of a recipe (or PATH checked as the stage its kind belongs to), with its token budget."""
    import dataclasses

    from lowvram.data.check import add_token_budget, check_data
    from lowvram.data.templates import chat_template_text
    from lowvram.plan.lengths import local_tokenizer, stage_budget
    from lowvram.plan.preflight import CHAT_FORMATS, check_chat_template, check_model_path
    from lowvram.recipe import DataConfig, load_recipe

    recipe, recipe_path = load_recipe(recipe_name, overrides)
    stage_of = {"sft": "sft", "preference": "dpo"}
    if path:
        if kind is None and len(recipe.stages()) == 1:
            kind = "sft" if recipe.stages() == ["sft"] else "preference"
        elif kind is None:  # let the columns say which stage this file is for
            kind = check_data(DataConfig(path=path, format=fmt or "auto")).kind
        stage = stage_of[kind or "sft"]
        if stage not in recipe.stages():
            raise UserError(
                f"Recipe {recipe.name!r} has no enabled {stage} stage to check {kind} data against.",
                hint="Check it without --recipe, or with a recipe whose stage uses this kind of data.",
            )
        # The recipe's Hub splits belong to its own data.path, not to the PATH checked here.
        data = dataclasses.replace(getattr(recipe, stage).data, path=path, split="train", eval_split=None)
        targets = [(stage, data, None, None)]
    else:
        targets = [
            (s, getattr(recipe, s).data, recipe.sample_file(getattr(recipe, s).data), recipe_path.parent)
            for s in recipe.stages()
            if not (s == "dpo" and recipe.pairs.enabled)  # its pairs are sampled: lowvram pairs, then check them
        ]
        if kind is not None:
            targets = [t for t in targets if t[0] == stage_of[kind]]
            if not targets:
                raise UserError(f"Recipe {recipe.name!r} has no enabled {stage_of[kind]} stage to check.")
    device = device_fn()
    tokenizers: dict[str, tuple] = {}
    reports = []
    for stage, data, sample, base_dir in targets:
        if fmt:
            data = dataclasses.replace(data, format=fmt)
        report = check_data(data, "sft" if stage == "sft" else "preference", sample, base_dir, stage=stage)
        max_seq_len, budget_from, model = stage_budget(recipe, stage, device)
        if report.format in CHAT_FORMATS:  # the run would refuse it: say so now, with the options
            check_model_path(model)
            check_chat_template(recipe, model, True)
        if model not in tokenizers:
            tokenizers[model] = local_tokenizer(model)
        tokenizer, label = tokenizers[model]
        add_token_budget(
            report, max_seq_len, budget_from, tokenizer, label, chat_template_text(recipe.model.chat_template)
        )
        reports.append(report)
    return reports


def cmd_export(args: argparse.Namespace) -> int:
    """`lowvram export RUN_DIR [--gguf TYPE ...] [--merged] [--lora] [--no-verify] [--out DIR]`."""
    from lowvram.export.run import ExportOptions
    from lowvram.offline import local_only

    local_only()  # export reads only local files: no Hub lookups, no telemetry

    opts = ExportOptions(
        gguf=tuple(args.gguf) if args.gguf is not None else None,
        merged=args.merged,
        lora=args.lora,
        verify=False if args.no_verify else None,
        out_dir=Path(args.out) if args.out else None,
        system_prompt=args.system,
        dtype=args.dtype,
        strict=args.strict,
    )
    from lowvram.rundir import report_file

    code = export_and_report(Path(args.run_dir), opts)
    if report_file(args.run_dir).is_file():  # the run's report gains the export verification table
        from lowvram.evaluate.report_html import write_html

        write_html(Path(args.run_dir))
    return code


def export_and_report(run_dir: Path, opts) -> int:
    """Export, then print the verification table and the commands to run the result; the exit status.

    `lowvram export` and the export at the end of `lowvram run` (the ExportStep given to pipeline.run_pipeline) both end here.
    """
    import shlex

    from lowvram.export.run import export_run
    from lowvram.export.verify import cost_line, explain, verify_table

    result = export_run(run_dir, opts)
    if result.verify_rows:
        print(
            "\nVerification: each GGUF in llama.cpp against transformers. The check (ok/FAIL) asks whether the\n"
            "conversion is right: same tokens, the merged tensors within their type's rounding, and llama.cpp\n"
            "computing what transformers computes with the file's own weights (conversion KL). The cost columns\n"
            "say what quantization lost against the merged model (KL nats/token; top-1 where it is confident).\n",
            flush=True,
        )
        from lowvram.utils.ui import echo

        echo(verify_table(result.verify_rows))
        for r in result.verify_rows:
            line = cost_line(r, result.verify_rows)
            if line:
                print(f"  {line}", flush=True)
    if result.modelfiles:
        print("\nRun it:", flush=True)
        for line in usage_lines(result):
            print(f"  {line}", flush=True)
        print(f"  {shlex.join(['lowvram', 'chat', str(result.files[next(iter(result.modelfiles))])])}", flush=True)
    flagged = [r for r in result.verify_rows if r["status"] != "ok"]
    for r in flagged:
        print("\n" + explain(r, r.get("n_params")), flush=True)
    failed = [r["type"] for r in flagged if r["status"] == "FAIL"]
    warned = [r["type"] for r in flagged if r["status"] == "warn"]
    if failed or (opts.strict and warned):
        what = f"failed for {', '.join(failed)}" if failed else f"warned for {', '.join(warned)} (--strict)"
        print(
            f"error: verification {what}: the conversion is wrong, not merely rounded (see the table). "
            f"The files are kept for inspection.",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    return EXIT_OK


def usage_lines(result) -> list[str]:
    """The exact commands to run each exported GGUF (an export.ExportResult) with Ollama and llama.cpp."""
    import shlex

    q = shlex.join  # copy-pasted into a shell: a `$(...)` in a system prompt must stay text
    lines = []
    for t, mf in result.modelfiles.items():
        tag = f"{result.name}:{t.replace('_', '-')}"
        lines.append(f"{q(['ollama', 'create', tag, '-f', str(mf)])} && {q(['ollama', 'run', tag])}")
    system = result.system_prompt
    for t in result.modelfiles:
        g = str(result.files[t])
        lines.append(q(["llama-cli", "-m", g, "--jinja", "-cnv", *(["-sys", system] if system else [])]))
        lines.append(q(["llama-server", "-m", g, "--jinja", "--port", "8080"]))
        break  # one example is enough; the other types take the same commands
    return lines


def cmd_chat(args: argparse.Namespace) -> int:
    """`lowvram chat GGUF_OR_RUN_DIR [--prompt TEXT] [--system TEXT]`."""
    from lowvram.export.llamacpp import chat, check_runtime
    from lowvram.export.run import find_gguf, inspect_run
    from lowvram.offline import local_only

    local_only()

    check_runtime()
    target = Path(args.target)
    gguf, note = find_gguf(target)
    if note:
        print(note, flush=True)
    system = args.system
    if system is None and target.is_dir():
        try:
            system = inspect_run(target).system_prompt
        except UserError:
            system = None
    return chat(gguf, args.prompt, system, max_tokens=args.max_tokens, temperature=args.temperature)


def cmd_eval(args: argparse.Namespace) -> int:
    from lowvram.evaluate.run import evaluate_run, summary_lines
    from lowvram.utils.ui import echo

    run_dir = Path(args.run_dir)
    echo(summary_lines(evaluate_run(run_dir, best_of=args.best_of, prompts_limit=args.prompts)))
    from lowvram.rundir import eval_dir

    print(f"Answers side by side: {eval_dir(run_dir) / 'answers.jsonl'}")
    from lowvram.evaluate.report_html import write_html

    print(f"Report: {write_html(run_dir)}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from lowvram.evaluate.report_html import write_html
    from lowvram.rundir import require_run_dir

    print(f"Report: {write_html(require_run_dir(args.run_dir))}")
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowvram",
        description="Fine-tune (SFT then DPO) and export GGUF on one consumer GPU.",
        epilog="Start with: lowvram doctor, lowvram recipes, lowvram plan demo, lowvram run demo",
    )
    p.add_argument("--version", action="version", version=f"lowvram {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("doctor", help="what this machine can do: GPU, tier, backend, versions")
    _device_args(d)
    d.set_defaults(func=cmd_doctor)

    r = sub.add_parser("recipes", help="list, show or copy the shipped recipes")
    r.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=("list", "show", "copy", "templates"),
        help="list (default), show NAME, copy NAME [DEST], or templates: the named chat templates",
    )
    r.add_argument("name", nargs="?", help="recipe name (for show and copy)")
    r.add_argument("dest", nargs="?", help="where to copy it (copy)")
    r.add_argument("--force", action="store_true", help="overwrite the destination (copy)")
    r.set_defaults(func=cmd_recipes)

    pl = sub.add_parser("plan", help="settings this card gets for a recipe, with reasons")
    pl.add_argument("recipe", help="shipped recipe name or path to a recipe .yaml")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    _device_args(pl)
    _group_args(pl)
    pl.set_defaults(func=cmd_plan)

    ru = sub.add_parser("run", help="run a recipe: SFT, then DPO, then the recipe's GGUF export")
    ru.add_argument("recipe", nargs="?", help="shipped recipe name or path to a recipe .yaml")
    ru.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2 sft.max_steps=20")
    ru.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint")
    ru.add_argument("--run-dir", metavar="DIR", help="write the run here instead of OUTPUT_DIR/NAME-TIMESTAMP")
    ru.add_argument("--no-export", action="store_true", help="stop after training (export later: lowvram export RUN)")
    _device_args(ru)
    _group_args(ru)
    ru.set_defaults(func=cmd_run)

    for stage, text in (
        ("sft", "run only the SFT stage of a recipe"),
        ("dpo", "run only the preference stage, optionally on top of an SFT run (--from)"),
    ):
        st = sub.add_parser(stage, help=text)
        st.add_argument("recipe", help="shipped recipe name or path to a recipe .yaml")
        st.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2")
        st.add_argument("--run-dir", metavar="DIR", help="write the run here instead of OUTPUT_DIR/NAME-TIMESTAMP")
        if stage == "dpo":
            st.add_argument(
                "--from",
                dest="from_",
                metavar="RUN_OR_ADAPTER",
                help="continue this SFT run's adapter (or an adapter folder); the reference is that model",
            )
        _device_args(st)
        st.set_defaults(func=cmd_stage)
    pa = sub.add_parser(
        "pairs", help="make preference pairs: sample the policy's answers to prompts, judge them, pair best with worst"
    )
    pa.add_argument("recipe", help="recipe whose pairs block names the prompts, the judge and the sampling")
    pa.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pairs.samples=8 pairs.judge.max_words=30")
    pa.add_argument(
        "--policy",
        metavar="RUN|ADAPTER|MODEL",
        help="who answers: a run directory (its final, else its SFT adapter), an adapter folder, or a model "
        "(default: the recipe's model)",
    )
    pa.add_argument(
        "--out", metavar="DIR", help="folder for samples.jsonl, pairs.jsonl, summary.json; run again to resume"
    )
    _device_args(pa)
    pa.set_defaults(func=cmd_pairs)
    da = sub.add_parser("data", help="check training data: formats, bad lines, weak preference pairs, length")
    da.add_argument("action", choices=("check",), help="check: validate and lint, without training")
    da.add_argument(
        "path", nargs="?", help="data file, folder or Hub dataset (default with --recipe: its stages' data)"
    )
    da.add_argument("overrides", nargs="*", help="dotted overrides of the --recipe, e.g. model.name=./my-model")
    da.add_argument("--kind", choices=("sft", "preference"), help="what the data is for (default: from its columns)")
    da.add_argument("--format", metavar="F", help="data format instead of auto-detection (see README: Data)")
    da.add_argument("--recipe", metavar="R", help="check against a recipe: its column mapping and token budget")
    da.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    da.add_argument("--json", action="store_true", help="machine-readable output")
    _device_args(da)
    da.set_defaults(func=cmd_data)

    ex = sub.add_parser("export", help="merge the adapter; write GGUF files, Ollama Modelfiles; verify in llama.cpp")
    ex.add_argument("run_dir", help="run directory written by 'lowvram run'")
    ex.add_argument(
        "--gguf",
        nargs="*",
        metavar="TYPE",
        help="GGUF types: f16 bf16 q8_0 q4_k_m q5_k_m q6_k (default: the recipe's export.gguf)",
    )
    ex.add_argument("--merged", action="store_true", help="also keep the merged 16-bit Hugging Face folder")
    ex.add_argument("--lora", action="store_true", help="copy the adapter (with its tokenizer) only")
    ex.add_argument("--no-verify", action="store_true", help="skip comparing each GGUF with transformers")
    ex.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/export)")
    ex.add_argument("--system", metavar="TEXT", help="SYSTEM prompt for the Modelfile (default: the recipe's)")
    ex.add_argument("--dtype", default="auto", choices=("auto", "bf16", "f16"), help="merged weights' dtype")
    ex.add_argument("--strict", action="store_true", help="exit 1 when verification warns, not only when it fails")
    ex.set_defaults(func=cmd_export)

    ch = sub.add_parser("chat", help="try an exported model in llama.cpp: one prompt, or interactive")
    ch.add_argument("target", help="a .gguf file, or a run directory with exported GGUFs")
    ch.add_argument("--prompt", "-p", help="ask once and exit (default: interactive)")
    ch.add_argument("--system", help="system prompt (default: the run's recipe export.system_prompt)")
    ch.add_argument("--max-tokens", type=int, default=256, help="longest answer, in tokens")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    ch.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="answer held-out prompts with the base, SFT and final models; KL, length, rewards")
    ev.add_argument("run_dir", help="run directory written by 'lowvram run'")
    ev.add_argument(
        "--best-of",
        type=int,
        metavar="N",
        help="also sample N SFT answers per prompt and rank them (default: the recipe's eval.best_of)",
    )
    ev.add_argument(
        "--prompts", type=int, metavar="K", help="answer at most K held-out prompts (default: eval.prompts)"
    )
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="rebuild RUN_DIR/report.html: plan, data, curves, answers, rewards, export")
    rp.add_argument("run_dir", help="run directory written by 'lowvram run'")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`run demo --vram 12 dpo.beta=0.2`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        from lowvram.utils.dist import is_main

        if is_main() or e.exit_code != EXIT_INTERRUPTED:  # after a Ctrl-C every process says the same: one does
            print(f"error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_recipe_script(script: str, argv: list[str]) -> int:
    """Entry point of `python recipes/<name>.py [--plan] [overrides]`: run the YAML beside the script."""
    yaml_path = str(Path(script).with_suffix(".yaml"))
    if argv[:1] == ["--plan"]:
        return main(["plan", yaml_path, *argv[1:]])
    return main(["run", yaml_path, *argv])


if __name__ == "__main__":
    sys.exit(main())
