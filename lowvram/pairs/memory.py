"""Memory of the pairs loop on one card: generate (+ judge beside it) -> train, each phase freed before the next.

    phases = plan_phases(recipe, plan)          # [Phase(name, gib, parts)], before anything loads
    check_phases(recipe, plan)                  # UserError, saying what would fit, when a phase cannot fit

- generate: the policy's weights (as the plan loads them) plus the KV cache of `pairs.samples` answers
  drawn together (one prompt at a time, num_return_sequences = samples), prompt + max_new_tokens long;
- judge: beside the generator, since each prompt's answers are judged as soon as they are drawn. Rules
  cost nothing; a reward model is the base again with a score head, on the card when the plan is 4-bit
  (lowvram.train.reward loads it there) and in RAM otherwise; an LLM judge in a transformers folder sits on
  the card in 16-bit; a GGUF judge runs in llama.cpp on the CPU (no layers offloaded): RAM, not VRAM;
- train: the dpo stage's own estimate (lowvram.plan.memory), after the generator and the judge are freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lowvram.errors import UserError
from lowvram.plan.catalog import get_spec
from lowvram.plan.memory import DTYPE_BYTES, STACKS, _weights_bytes

PROMPT_TOKENS = 256  # a prompt's length when the plan has no data lengths: a chat turn with its template
GIB = 2**30


@dataclass(frozen=True)
class Phase:
    name: str
    gib: float  # on the card
    parts: dict[str, float] = field(default_factory=dict)
    ram_gib: float = 0.0  # in CPU RAM instead (a GGUF judge)


def _weights_gib(spec, load_in_4bit: bool, elem: int) -> float:

    return _weights_bytes(spec, load_in_4bit, elem, STACKS["hf"]) / GIB


def kv_cache_gib(spec, sequences: int, tokens: int, elem: int) -> float:
    """Keys and values of every layer for `sequences` x `tokens`."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * elem * sequences * tokens / GIB


def _folder_gib(path: Path) -> float:
    return (
        sum(p.stat().st_size for p in path.glob("*.safetensors")) / GIB
        or sum(p.stat().st_size for p in path.glob("*.bin")) / GIB
    )


def judge_gib(recipe, plan, spec, elem: int) -> tuple[float, float, str]:
    """(on the card, in RAM, what it is) for the recipe's judge."""
    j = recipe.pairs.judge
    if j.kind == "rules":
        return 0.0, 0.0, "rules: no model"
    if j.kind == "reward_model":
        if spec is None:
            return 0.0, 0.0, "reward model: size unknown (the base is not in lowvram's catalog)"
        w = _weights_gib(spec, plan.load_in_4bit, elem)
        if plan.load_in_4bit:
            return w, 0.0, f"reward model: the 4-bit base again ({w:.2f} GiB) with a score head"
        return 0.0, w, f"reward model: the base again ({w:.2f} GiB) in RAM"
    p = Path(j.model or "").expanduser()
    if p.suffix == ".gguf":
        size = p.stat().st_size / GIB if p.is_file() else 0.0
        return 0.0, size, f"LLM judge {p.name}: {size:.2f} GiB in llama.cpp on the CPU"
    if p.is_dir():
        on_disk = _folder_gib(p)

        jspec = get_spec(str(p))
        w = _weights_gib(jspec, False, 2) if jspec is not None else on_disk / 2
        kv = kv_cache_gib(jspec, 1, 512 + 2 * recipe.pairs.max_new_tokens, 2) if jspec is not None else 0.0
        if plan.device.kind == "cuda":  # judges.llm_completer puts it there, in 16-bit
            return w + kv, 0.0, f"LLM judge {p.name}: {w + kv:.2f} GiB on the card in 16-bit"
        return 0.0, w, f"LLM judge {p.name}: {w:.2f} GiB in RAM"
    return 0.0, 0.0, f"LLM judge {j.model}: size unknown (not a local file or folder)"


def plan_phases(recipe, plan, prompt_tokens: int = PROMPT_TOKENS) -> tuple[list[Phase], list[str]]:
    """The loop's phases with what each holds on the card, and notes on what could not be sized."""

    p = recipe.pairs
    elem = DTYPE_BYTES.get(plan.dtype, 4)
    spec = get_spec(plan.model)
    notes = []
    if spec is None:
        notes.append(f"{plan.model} is not in lowvram's catalog: the generate phase is not sized")
        gen = Phase("generate + judge", 0.0)
    else:
        w = _weights_gib(spec, plan.load_in_4bit, elem)
        kv = kv_cache_gib(spec, p.samples, prompt_tokens + p.max_new_tokens, elem)
        logits = p.samples * spec.vocab_size * 4 / GIB  # the fp32 next-token scores of each sequence
        jv, jr, what = judge_gib(recipe, plan, spec, elem)
        notes.append(f"judge: {what}")
        parts = {"policy weights": w, f"KV cache ({p.samples} x {prompt_tokens + p.max_new_tokens} tokens)": kv}
        parts["logits"] = logits
        if jv:
            parts["judge"] = jv
        gen = Phase("generate + judge", sum(parts.values()), parts, jr)
    sp = plan.stages.get("dpo")
    train = Phase("train (dpo)", sp.estimate.total_gib if sp and sp.estimate else 0.0)
    return [gen, train], notes


def phase_lines(recipe, plan) -> list[str]:
    """The plan's lines for the loop: each phase, what it holds, and the rule that frees it."""
    phases, notes = plan_phases(recipe, plan)
    budget = _budget(plan)
    out = [f"pairs loop: {recipe.rounds} round(s) of generate + judge -> train; each phase is freed before the next"]
    where = "on the card" if plan.device.kind == "cuda" else "in RAM (no CUDA card)"
    for ph in phases:
        if not ph.gib and not ph.parts:
            out.append(f"  {ph.name}: not estimated")
            continue
        parts = ", ".join(f"{k} {v:.2f}" for k, v in ph.parts.items())
        ram = f"; {ph.ram_gib:.2f} GiB in RAM" if ph.ram_gib else ""
        against = f" of {budget:.2f}" if budget else ""
        out.append(f"  {ph.name}: {ph.gib:.2f}{against} GiB {where}" + (f" ({parts})" if parts else "") + ram)
    out += [f"  {n}" for n in notes]
    return out


def _budget(plan) -> float | None:
    sp = plan.stages.get("dpo") or next(iter(plan.stages.values()), None)
    return sp.budget_gib if sp is not None else None


def check_phases(recipe, plan) -> list[str]:
    """The phase lines; UserError before anything loads when the generate + judge phase cannot fit the card."""
    lines = phase_lines(recipe, plan)
    budget = _budget(plan)
    if budget is None:
        return lines + ["  not checked: no CUDA card, so no VRAM budget"]
    gen = plan_phases(recipe, plan)[0][0]
    if gen.gib <= budget:
        return lines
    judge = gen.parts.get("judge", 0.0)
    policy = gen.gib - judge
    fixes = []
    if judge and policy <= budget:
        fixes.append(
            f"a judge of at most {budget - policy:.2f} GiB beside the policy, or the same judge as a GGUF "
            "(pairs.judge.model=judge.gguf: llama.cpp on the CPU, no VRAM)"
        )
    kv = next((v for k, v in gen.parts.items() if k.startswith("KV")), 0.0)
    if kv and recipe.pairs.samples > 2:
        per = kv / recipe.pairs.samples
        fit = int(max(2, min(recipe.pairs.samples - 1, (budget - (gen.gib - kv)) // per))) if per else 2
        fixes.append(f"fewer answers per prompt (pairs.samples={fit}; each costs {per:.2f} GiB of KV cache)")
    raise UserError(
        f"The pairs loop does not fit this card: generate + judge needs {gen.gib:.2f} GiB, the budget is "
        f"{budget:.2f} GiB.",
        [f"{k}: {v:.2f} GiB" for k, v in gen.parts.items()],
        hint=("What would fit: " + "; or ".join(fixes) + ".") if fixes else "Use a smaller model or judge.",
    )
