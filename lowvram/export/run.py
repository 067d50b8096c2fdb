"""`lowvram export RUN_DIR`: merge the trained adapter, write GGUF files and Ollama Modelfiles, verify them.

    result = export_run(Path("runs/demo-20261122"), ExportOptions(gguf=("f16", "q4_k_m")))
    # runs/demo-.../export/demo-q4_k_m.gguf, demo-q4_k_m.Modelfile, ...

Order of work, so that a mistake costs nothing:
1. Check everything first: the run directory, the requested types, the adapter (readable, fits
   the base), the converter and runtime, the chat template, free disk for every file written.
2. Merge into a scratch folder inside the output folder (same filesystem, so renames are atomic).
3. Convert with llama.cpp's converter to a 16-bit GGUF, quantize the others from it.
4. Every file is written under a `.partial` name and renamed when complete; the scratch folder is
   removed on success, failure or Ctrl-C. An interrupted export never leaves a truncated file
   under a final name.
5. Verify each GGUF against the merged model in transformers and print a table.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lowvram import rundir
from lowvram.data.templates import resolve_chat_template
from lowvram.errors import UserError
from lowvram.export import llamacpp
from lowvram.export import merge as mg
from lowvram.export.gguf_checks import check_gguf_tokenizer, set_end_of_turn
from lowvram.export.llamacpp import BITS_PER_WEIGHT, GGUF_TYPES, export_tools
from lowvram.export.ollama import SYSTEM_MODES, TemplateUnsupported, from_tokenizer, modelfile, modelfile_problems
from lowvram.export.verify import verify_ggufs
from lowvram.model.adapters import check_saved_adapter_finite
from lowvram.plan.hardware import available_ram_bytes
from lowvram.utils.fileio import check_writable, disk_full
from lowvram.utils.runlock import folder_lock, pid_alive

if TYPE_CHECKING:
    from lowvram.export.llamacpp import ExportTools
    from lowvram.export.merge import Adapter, BaseChoice, ShardLayout
    from lowvram.export.ollama import ChatFormat

STAGES = ("dpo", "sft")  # latest first: DPO continues the SFT adapter, so it holds both
PARTIAL = ".partial"
SCRATCH_PREFIX = ".lowvram-export-"
FAITHFUL_ORDER = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")  # most faithful to the trained model first
VERIFY_FILE = "verify.json"
DISK_MARGIN = 1.1  # 10% over the estimate, plus a fixed reserve below
DISK_RESERVE_BYTES = 64 << 20


# ------------------------------------------------------------------ the run directory


@dataclass(frozen=True)
class RunInfo:
    """What export reads from a run directory."""

    run_dir: Path
    name: str
    stage: str  # the stage whose adapter is exported
    adapter_dir: Path
    tokenizer_dir: Path
    base_json: Path
    system_prompt: str | None
    recipe_gguf: tuple[str, ...]
    recipe_verify: bool
    chat_template: str | None = None  # the recipe's model.chat_template (a name or Jinja)


def inspect_run(run_dir: Path) -> RunInfo:
    """Check a run directory and find the adapter of its last completed stage; UserError lists what is missing."""
    if not run_dir.is_dir():
        raise UserError(
            f"No run directory {str(run_dir)!r}.",
            hint="Pass the folder `lowvram run` wrote (it prints it), e.g. runs/demo-YYYYMMDD-HHMMSS.",
        )
    problems = []
    done = [s for s in STAGES if rundir.is_done(run_dir, s)]
    if not done:
        started = [s for s in STAGES if rundir.stage_dir(run_dir, s).is_dir()]
        problems.append(
            "no completed stage: neither sft/DONE nor dpo/DONE exists"
            + (f" ({', '.join(started)} started but did not finish)" if started else "")
        )
    stage = done[0] if done else "sft"
    adapter = rundir.adapter_dir(run_dir, stage)
    if done and not adapter.is_dir():
        problems.append(f"{stage}/DONE exists but {stage}/adapter/ is missing")
    tokenizer, base_json = rundir.tokenizer_dir(run_dir), rundir.base_file(run_dir)
    for f in (base_json, tokenizer / "tokenizer_config.json"):
        if not f.is_file():
            problems.append(f"{f.relative_to(run_dir).as_posix()} is missing")
    for f in [base_json, *sorted(tokenizer.glob("*.json"))]:
        if f.is_file():  # a file cut short or overwritten would otherwise fail deep inside a library
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                problems.append(f"{f.relative_to(run_dir)} is corrupt: {e}")
    if problems:
        raise UserError(
            f"{run_dir} is not a complete run directory:",
            problems,
            hint=f"Finish training first: lowvram run --resume {run_dir}",
        )
    recipe = rundir.read_recipe(run_dir) if rundir.recipe_file(run_dir).is_file() else None
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", recipe.name if recipe else run_dir.name).strip("-.") or "model"
    return RunInfo(
        run_dir,
        name,
        stage,
        adapter,
        tokenizer,
        base_json,
        recipe.export.system_prompt if recipe else None,
        tuple(recipe.export.gguf) if recipe else ("q4_k_m",),
        recipe.export.verify if recipe else True,
        recipe.model.chat_template if recipe else None,
    )


def check_types(types: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validated, lower-cased, de-duplicated GGUF types; UserError naming each unknown one."""
    out, bad = [], []
    for t in types:
        t = t.lower()
        if t not in GGUF_TYPES:
            close = difflib.get_close_matches(t, GGUF_TYPES, n=1)
            bad.append(f"{t!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif t not in out:
            out.append(t)
    if bad:
        raise UserError(f"Unknown GGUF type {', '.join(bad)}.", hint=f"Choose from: {', '.join(GGUF_TYPES)}.")
    return tuple(out)


# ------------------------------------------------------------------ options and result


@dataclass(frozen=True)
class ExportOptions:
    gguf: tuple[str, ...] | None = None  # None: the recipe's export.gguf (when nothing else is asked)
    merged: bool = False  # keep the merged 16-bit Hugging Face folder
    lora: bool = False  # copy the adapter (with the tokenizer)
    verify: bool | None = None  # None: the recipe's export.verify
    out_dir: Path | None = None  # default RUN/export
    system_prompt: str | None = None  # default: the recipe's export.system_prompt
    dtype: str = "auto"  # merged dtype: auto, bf16 or f16
    strict: bool = False  # a verification warning also exits 1


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # "q4_k_m" -> GGUF, "merged" -> folder, ...
    modelfiles: dict[str, Path] = field(default_factory=dict)
    verify_rows: list[dict] = field(default_factory=list)
    verified_ok: bool = True
    notes: list[str] = field(default_factory=list)
    name: str = "model"  # the run's name, which the GGUF files and Ollama tags carry
    system_prompt: str | None = None  # the one the Modelfiles were written with


@dataclass(frozen=True)
class _Decided:
    """What step 1 settled, after every check passed: steps 2-5 only carry it out."""

    run: RunInfo
    opts: ExportOptions
    out_dir: Path
    adapter: Adapter
    types: tuple[str, ...]  # the GGUF types to write, checked
    verify: bool  # after the RAM and runtime checks
    system: str | None  # the system prompt the Modelfiles get
    need_merge: bool
    base: BaseChoice | None = None  # when merging
    layout: list[ShardLayout] | None = None  # when merging
    fmt: ChatFormat | None = None  # the Ollama template, when the chat template has one
    end_of_turn: str | None = None  # the token that ends the assistant's turn, when GGUFs are written
    intermediate: str | None = None  # the 16-bit GGUF the quantizer reads, when one is quantized
    tools: ExportTools | None = None  # when GGUFs are written
    eos: tuple[str, ...] = ()  # the tokenizer's EOS tokens, stops in every Modelfile

    def stops(self) -> list[str]:
        """The Modelfiles' stop tokens: the template's, the end of turn, the tokenizer's EOS."""
        return [*(self.fmt.stop if self.fmt else ()), self.end_of_turn, *self.eos]


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ atomic files


def _partial(scratch: Path, final: Path) -> Path:
    """Where `final` is written before it is complete: inside this export's own scratch folder."""
    return scratch / f"{final.name}{PARTIAL}"


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished file or folder onto its final name (replacing an older one).

    `tmp` lies in the scratch folder, which also receives the replaced folder until it is deleted.
    """
    if final.is_dir() and not final.is_symlink():
        old = tmp.with_name(f"{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_text(final: Path, text: str, scratch: Path) -> None:
    tmp = _partial(scratch, final)
    tmp.write_text(text, encoding="utf-8")
    _publish(tmp, final)


def _clean_leftovers(out_dir: Path) -> None:
    """Remove the scratch folders of earlier, killed exports (named .lowvram-export-PID; only ours).

    Nothing else in the folder is touched: a user's own hidden or .partial files stay.
    """

    for p in out_dir.glob(f"{SCRATCH_PREFIX}*"):
        pid = p.name[len(SCRATCH_PREFIX) :]
        if p.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------ disk


def free_disk_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def disk_needed(
    merged_bytes: int, types: tuple[str, ...], keep_merged: bool, intermediate: str | None, adapter_bytes: int
) -> dict[str, int]:
    """Bytes each output needs (estimates from the merged size and each type's bits per weight)."""

    n_weights = merged_bytes / 2  # the merged folder is 16-bit
    need = {"merged 16-bit folder" + ("" if keep_merged else " (temporary)"): merged_bytes}
    if intermediate and intermediate not in types:
        need[f"{intermediate} GGUF (temporary, quantizer input)"] = merged_bytes
    for t in types:
        need[f"{t} GGUF"] = int(n_weights * BITS_PER_WEIGHT[t] / 8)
    if adapter_bytes:
        need["adapter copy"] = adapter_bytes
    return need


def check_disk(out_dir: Path, need: dict[str, int]) -> None:
    total = int(sum(need.values()) * DISK_MARGIN) + DISK_RESERVE_BYTES
    free = free_disk_bytes(out_dir)
    if free < total:
        gib = 2**30
        raise UserError(
            f"Not enough free disk in {out_dir}: this export needs about {total / gib:.2f} GiB, "
            f"{free / gib:.2f} GiB is free.",
            problems=[f"{k}: {v / gib:.2f} GiB" for k, v in need.items()],
            hint="Free some space, export fewer types (--gguf q4_k_m), or write elsewhere with --out DIR.",
        )


# ------------------------------------------------------------------ the export


def export_run(run_dir: Path, opts: ExportOptions) -> ExportResult:
    """Merge, convert, quantize, write Modelfiles and verify, as asked. See the module docstring."""

    run = inspect_run(run_dir)
    asked_something = opts.gguf is not None or opts.merged or opts.lora
    if opts.gguf == () and not (opts.merged or opts.lora):
        raise UserError(
            "--gguf needs at least one type.", hint=f"For example --gguf q4_k_m; types: {', '.join(GGUF_TYPES)}."
        )
    types = check_types(opts.gguf if opts.gguf is not None else (() if asked_something else run.recipe_gguf))
    verify = run.recipe_verify if opts.verify is None else opts.verify
    verify = verify and bool(types)
    system = opts.system_prompt if opts.system_prompt is not None else run.system_prompt
    out_dir = (opts.out_dir or rundir.export_dir(run_dir)).resolve()
    need_merge = bool(types) or opts.merged
    result = ExportResult(out_dir, name=run.name, system_prompt=system)

    # 1. everything that can fail on the user's side, before writing anything
    adapter = mg.read_adapter(run.adapter_dir)
    base = layout = None
    merged_bytes = 0
    out_dtype = "bf16"
    if need_merge:
        base = mg.choose_base(run.base_json)
        out_dtype, _ = mg.merged_dtype(base.path, opts.dtype)
        layout = mg.merge_layout(base.path, adapter, base.quantized_4bit, out_dtype)
        merged_bytes = mg.merged_nbytes(layout)
    free_ram = available_ram_bytes()
    if verify and merged_bytes > 0.8 * free_ram:
        # verification loads the merged model in transformers; on free Colab an 8B one does not fit
        verify = False
        result.notes.append(
            f"verification skipped: the merged model ({merged_bytes / 2**30:.1f} GiB) does not fit in "
            f"the {free_ram / 2**30:.1f} GiB of free RAM; rerun on a bigger machine to verify"
        )
    tools = None
    if types:
        tools = export_tools()
        tools.require(types)  # each type this machine cannot write, with what it needs
        result.notes.append(tools.converter)
        if tools.runtime:
            result.notes.append(tools.runtime)
        elif verify:  # f16, bf16 and q8_0 need only the converter; running the files needs llama.cpp's library
            verify = False
            result.notes.append(f"verification skipped: {tools.verify_reason()}")
    fmt, end_of_turn = _chat_format(run, system) if types else (None, None)
    decided = _Decided(
        run,
        opts,
        out_dir,
        adapter,
        types,
        verify,
        system,
        need_merge,
        base=base,
        layout=layout,
        fmt=fmt,
        end_of_turn=end_of_turn,
        intermediate=_quant_source(types, out_dtype, tools),
        tools=tools,
        eos=tuple(_eos_tokens(run.tokenizer_dir)) if types else (),
    )
    if types:  # the Modelfiles are written after the GGUFs: make sure they can be, before anything is written
        problems = modelfile_problems(system, decided.stops())
        if problems:
            raise UserError(
                "Cannot write an Ollama Modelfile that Ollama would read back as written:",
                problems,
                hint="Change the SYSTEM prompt (--system TEXT, or export.system_prompt in the recipe).",
            )
    _check_adapter_finite(run)
    adapter_bytes = sum(p.stat().st_size for p in run.adapter_dir.iterdir() if p.is_file()) if opts.lora else 0

    check_writable(out_dir, "export folder", hint="Write elsewhere with --out DIR.")
    check_disk(
        out_dir,
        disk_needed(merged_bytes, types, opts.merged, decided.intermediate, adapter_bytes)
        if need_merge
        else {"adapter copy": adapter_bytes},
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"Cannot create the export folder {out_dir}: {e.strerror or e}.", hint="Write elsewhere with --out DIR."
        ) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(
            f"Cannot write to the export folder {out_dir}: it is read-only for this user.",
            hint="Write elsewhere with --out DIR.",
        )

    with folder_lock(out_dir, "export") as note:  # two exports into one folder would break each other
        if note:
            result.notes.append(note)
        _clean_leftovers(out_dir)
        try:
            return _export_locked(decided, result)
        except (OSError, RuntimeError) as e:
            if not disk_full(e, out_dir):
                raise
            raise UserError(
                f"The disk is full: export could not write to {out_dir} ({str(e)[:200]}).",
                hint="Free some space (nothing half-written was kept), export fewer types, "
                "or write elsewhere with --out DIR.",
            ) from None


def _check_adapter_finite(run: RunInfo) -> None:

    check_saved_adapter_finite(
        run.adapter_dir,
        f"Retrain {run.stage} with a lower {run.stage}.learning_rate "
        "(the run's metrics.jsonl shows where it diverged).",
    )


def _export_locked(d: _Decided, result: ExportResult) -> ExportResult:
    """Steps 2-5 of the module docstring, with the output folder locked and everything checked."""

    run, opts, out_dir, types = d.run, d.opts, d.out_dir, d.types
    _say(f"Exporting {run.run_dir} ({run.stage} adapter: {d.adapter.line()})")
    for note in result.notes:
        _say(f"  {note}")
    scratch = out_dir / f"{SCRATCH_PREFIX}{os.getpid()}"
    try:
        scratch.mkdir()
        if opts.lora:
            result.files["lora"] = _export_lora(run, out_dir, scratch)
            _say(f"  adapter -> {result.files['lora']}")
        if not d.need_merge:
            return result
        # 2. merge
        _say(f"  base: {d.base.reason}")
        t0 = time.perf_counter()
        merged_dir = scratch / "merged"
        report = mg.merge_lora(
            d.base, d.adapter, merged_dir, tokenizer_dir=run.tokenizer_dir, dtype=opts.dtype, layout=d.layout
        )
        if d.end_of_turn:
            note = set_end_of_turn(merged_dir, d.end_of_turn)
            if note:
                _say(f"  {note}")
        _say(
            f"  merge: {report.line().replace(str(merged_dir), 'the scratch folder')} "
            f"[{time.perf_counter() - t0:.1f} s]"
        )
        # 3. GGUF
        if types:
            _export_gguf(d, merged_dir, scratch, result)
            for t in types:
                mf = out_dir / f"{run.name}-{t}.Modelfile"
                _write_text(
                    mf,
                    modelfile(result.files[t].name, d.fmt, d.system, stop=[d.end_of_turn, *d.eos]),
                    scratch,
                )
                result.modelfiles[t] = mf
            stops = ", ".join(dict.fromkeys(d.stops()))
            _say(
                "  Modelfile: "
                + (
                    f"TEMPLATE from the chat template (system prompt: {SYSTEM_MODES[d.fmt.system_mode]})"
                    if d.fmt
                    else "TEMPLATE passes the prompt as is (no chat template)"
                )
                + f"; stop {stops}"
            )
        # 5. verify (before the merged folder is moved: it reads it)
        if d.verify:
            rows = verify_ggufs(
                merged_dir,
                {t: result.files[t] for t in types},
                d.system if d.fmt is None or d.fmt.takes_system else None,
            )
            result.verify_rows = rows
            result.verified_ok = all(r["status"] != "FAIL" for r in rows)
            _write_text(
                out_dir / VERIFY_FILE,
                json.dumps(
                    {
                        r["type"]: {
                            k: r.get(k)
                            for k in ("status", "reasons", "agree", "ppl_change", "tokens_same", "kl", "conv_kl")
                        }
                        for r in rows
                    },
                    indent=2,
                ),
                scratch,
            )
        if opts.merged:
            final = out_dir / "merged"
            _publish(merged_dir, final)
            result.files["merged"] = final
            _say(f"  merged 16-bit folder -> {final}")
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # what was not finished goes with it


def _quant_source(types: tuple[str, ...], merged_dtype: str, tools) -> str | None:
    """The 16-bit GGUF the quantizer reads: a requested one when possible, else the merged dtype."""
    if not any(tools.writer(t) == "quantizer" for t in types):
        return None
    if merged_dtype in types:
        return merged_dtype
    for t in ("f16", "bf16"):
        if t in types:
            return t
    return merged_dtype


def _export_gguf(d: _Decided, merged_dir: Path, scratch: Path, result: ExportResult) -> None:

    run, types, intermediate, tools, out_dir = d.run, d.types, d.intermediate, d.tools, d.out_dir
    log = out_dir / "export.log"
    sixteen = [t for t in types if tools.writer(t) == "converter"]  # q8_0 too where the quantizer is missing
    if intermediate and intermediate not in sixteen:
        sixteen.append(intermediate)
    produced: dict[str, Path] = {}
    for t in sixteen:
        final = out_dir / f"{run.name}-{t}.gguf"
        temp = _partial(scratch, final) if t in types else scratch / final.name
        t0 = time.perf_counter()
        llamacpp.convert(merged_dir, temp, t, log, model_name=run.name)
        if not produced:  # the quantized types share this vocabulary: one check covers them all
            info = check_gguf_tokenizer(
                temp, merged_dir, expect_eos=d.end_of_turn, expect_name=run.name, tokenize=tools.verifies
            )
            _say(f"  GGUF {info.line()}")
        if t in types:
            _publish(temp, final)
            result.files[t] = final
        produced[t] = final if t in types else temp
        _say(
            f"  {t}: {produced[t].stat().st_size / 2**20:.1f} MiB with llama.cpp's converter "
            f"[{time.perf_counter() - t0:.1f} s]" + ("" if t in types else " (quantizer input, temporary)")
        )
    for t in types:
        if tools.writer(t) != "quantizer":
            continue
        final = out_dir / f"{run.name}-{t}.gguf"
        t0 = time.perf_counter()
        note = llamacpp.quantize(produced[intermediate], _partial(scratch, final), t, log)
        _publish(_partial(scratch, final), final)
        result.files[t] = final
        _say(
            f"  {t}: {final.stat().st_size / 2**20:.1f} MiB with llama.cpp's quantizer from {intermediate} "
            f"[{time.perf_counter() - t0:.1f} s]" + (f"; {note}" if note else "")
        )


def _export_lora(run: RunInfo, out_dir: Path, scratch: Path) -> Path:
    tmp = scratch / f"lora{PARTIAL}"
    shutil.copytree(run.adapter_dir, tmp)
    shutil.copytree(run.tokenizer_dir, tmp / "tokenizer")
    final = out_dir / "lora"
    _publish(tmp, final)
    return final


def _chat_format(run: RunInfo, system: str | None):
    """(ChatFormat or None, end-of-turn token). None: the tokenizer has no chat template (a plain-text model).

    UserError when the chat template has no Go TEMPLATE equivalent: with no TEMPLATE, Ollama picks one
    of its own by edit distance and would prompt the model differently from how it was trained.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.tokenizer_dir))
    try:
        named = resolve_chat_template(run.chat_template)
    except UserError:
        named = None
    hint_eot = named.turn_end(tok.eos_token) if named else None
    if not getattr(tok, "chat_template", None):
        return None, tok.eos_token
    try:
        fmt = from_tokenizer(tok, hint_eot)
    except TemplateUnsupported as e:
        raise UserError(
            f"Cannot write an Ollama TEMPLATE for this model's chat template: {e}.",
            hint="Ollama does not run Jinja, and without a TEMPLATE it would guess another format. "
            "Train with a named template (lowvram recipes templates) or one of the same shape: "
            "each message wrapped alone, the system prompt its own turn or inside a user turn.",
        ) from None
    if system and not fmt.takes_system:
        raise UserError(
            f"A system prompt ({system!r}) was asked for, but this chat template has no place for one: "
            f"system messages are {SYSTEM_MODES[fmt.system_mode]}.",
            hint="Drop export.system_prompt (or --system), or train with a template that takes one.",
        )
    return fmt, (fmt.stop[0] if fmt.stop else tok.eos_token)


def _eos_tokens(tokenizer_dir: Path) -> list[str]:
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return [eos] if eos else []


# ------------------------------------------------------------------ `lowvram chat`'s target


def find_gguf(target: Path) -> tuple[Path, str | None]:
    """`lowvram chat` target: a .gguf file, or a run (or export) directory holding exported GGUFs.

    Returns the file and, when it was picked among several, a note saying which and why.
    """
    if target.is_file():
        if target.suffix != ".gguf":
            raise UserError(f"{target} is not a .gguf file.", hint="Pass a GGUF file or a run directory.")
        return target, None
    if not target.is_dir():
        raise UserError(f"No such file or directory {str(target)!r}.", hint="Pass a GGUF file or a run directory.")
    for folder in (rundir.export_dir(target), target):
        found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        status = {}
        if (folder / VERIFY_FILE).is_file():
            try:
                status = {t: v.get("status") for t, v in json.loads((folder / VERIFY_FILE).read_text()).items()}
            except (OSError, ValueError, AttributeError):
                status = {}
        ranked = [(t, f) for t in FAITHFUL_ORDER for f in found if f.name.endswith(f"-{t}.gguf")]
        ranked.sort(key=lambda tf: status.get(tf[0]) == "FAIL")  # stable: a failed file only as a last resort
        if ranked:
            t, f = ranked[0]
            others = ", ".join(x for x, _ in ranked[1:])
            why = f"verification: {status[t]}" if t in status else "not verified"
            return f, (
                f"Using {f.name}: the most faithful to the trained model of the exported types"
                + (f" (also: {others})" if others else "")
                + f"; {why}. Pass a .gguf file to pick another."
            )
        if found:
            return found[0], None
    raise UserError(
        f"No GGUF file in {target} or {target / 'export'}.",
        hint=f"Export one first: lowvram export {target} --gguf q4_k_m",
    )
