"""Judges: who decides which of a policy's answers is better, all behind one interface.

    judge = make_judge(recipe.pairs.judge, recipe, run_dir)     # rules, reward_model or llm
    scores = judged(judge, prompt, answers)                     # one float per Answer, higher is better

- rules: built-ins named in the recipe (word/character limits, must and must-not patterns, valid JSON,
  stopping before the cap) plus a `module:function(prompt, answer) -> float` callable; the score is their sum.
- reward_model: the rm stage of this run, or of another run (lowvram.train.reward.load_scorer).
- llm: a local model (GGUF through llama.cpp, or a transformers folder) with a rubric, asked about every
  pair of answers in both orders, so that a preference for the first (or second) position cancels; a
  verdict that flips with the order counts as a tie and is recorded as an order disagreement.

`judged` is where faults become messages: a judge that raises, or returns NaN, names the prompt.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lowvram.errors import UserError
from lowvram.export.llamacpp import chat_completer
from lowvram.recipe import rubric_problem
from lowvram.train.reward import load_scorer

DEFAULT_RUBRIC = (
    "You compare two answers to the same request. Prefer the answer that is correct, follows the request, "
    "and says it briefly. Ignore which answer comes first.\n\n"
    "Request:\n{prompt}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n"
    "Which answer is better? Reply with one letter, A or B, or the word tie."
)


@dataclass(frozen=True)
class Answer:
    """One sampled answer: its text, its length in tokens, and whether it ended before the token cap."""

    text: str
    tokens: int
    stopped: bool


@dataclass
class Judge:
    """Base: `name` goes into every pair's provenance; `stats` collects what the judge saw (ties, ...)."""

    name: str
    stats: Counter = field(default_factory=Counter)

    def score(self, prompt: str, answers: list[Answer]) -> list[float]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Free the judge's model, if it has one (before the next phase loads)."""


def judged(judge: Judge, prompt: str, answers: list[Answer]) -> list[float]:
    """The judge's scores for one prompt's answers; a judge that raises or returns NaN is named with the prompt."""
    short = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    try:
        scores = judge.score(prompt, answers)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"The judge {judge.name} failed on the prompt {short!r}: {type(e).__name__}: {e}",
            hint="Fix the judge (run it on that prompt alone), then run again: finished prompts are kept.",
        ) from None
    if len(scores) != len(answers):
        raise UserError(f"The judge {judge.name} returned {len(scores)} scores for {len(answers)} answers.")
    bad = [s for s in scores if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s)]
    if bad:
        raise UserError(
            f"The judge {judge.name} returned {bad[0]!r} on the prompt {short!r}; a score must be a finite number.",
            hint="Make the judge return a float for every answer (no NaN, inf or None).",
        )
    return [float(s) for s in scores]


# ------------------------------------------------------------------ (c) rules


def load_callable(spec: str) -> Callable[[str, str], float]:
    """`module:function` imported (a module in the current folder counts), or a UserError saying why not."""
    import sys

    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise UserError(f"pairs.judge.callable: {spec!r} is not 'module:function'.")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the user's own judge.py beside the recipe they run
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UserError(
            f"pairs.judge.callable: cannot import module {module_name!r}: {type(e).__name__}: {e}",
            hint="Run from the folder that holds it, or put it on PYTHONPATH.",
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(
            f"pairs.judge.callable: module {module_name!r} has no function {func_name!r}.",
            hint=f"Define def {func_name}(prompt: str, answer: str) -> float in {getattr(module, '__file__', module_name)}.",
        )
    return func


class RulesJudge(Judge):
    """The sum of the named rules: 0 for an answer that keeps every one, less the further it strays."""

    def __init__(self, cfg):
        parts = []
        self.cfg = cfg
        for key in ("max_words", "max_chars", "min_words"):
            if getattr(cfg, key):
                parts.append(f"{key}={getattr(cfg, key)}")
        self.must = [self._compile(p, "must_match") for p in cfg.must_match]
        self.must_not = [self._compile(p, "must_not_match") for p in cfg.must_not_match]
        parts += [f"must_match={p!r}" for p in cfg.must_match] + [f"must_not_match={p!r}" for p in cfg.must_not_match]
        parts += [k for k in ("valid_json", "stops") if getattr(cfg, k)]
        self.func = load_callable(cfg.callable) if cfg.callable else None
        if cfg.callable:
            parts.append(cfg.callable)
        if not parts:
            raise UserError(
                "pairs.judge: kind rules names no rule.",
                hint="Name one: pairs.judge.max_words=30, must_match, must_not_match, valid_json, stops or callable.",
            )
        super().__init__(name=f"rules({', '.join(parts)})")

    @staticmethod
    def _compile(pattern: str, key: str):
        try:
            return re.compile(pattern)
        except re.error as e:
            raise UserError(f"pairs.judge.{key}: {pattern!r} is not a regular expression: {e}.") from None

    def one(self, prompt: str, a: Answer) -> float:
        c, score = self.cfg, 0.0
        words = len(a.text.split())
        if c.max_words:
            score -= max(0, words - c.max_words) / c.max_words
        if c.max_chars:
            score -= max(0, len(a.text) - c.max_chars) / c.max_chars
        if c.min_words:
            score -= max(0, c.min_words - words) / c.min_words
        score -= sum(1 for r in self.must if not r.search(a.text))
        score -= sum(1 for r in self.must_not if r.search(a.text))
        if c.valid_json:
            try:
                json.loads(a.text)
            except ValueError:
                score -= 1
        if c.stops and not a.stopped:
            score -= 1
        if self.func is not None:
            score += self.func(prompt, a.text)
        return score

    def score(self, prompt: str, answers: list[Answer]) -> list[float]:
        return [self.one(prompt, a) for a in answers]


# ------------------------------------------------------------------ (a) a reward model


class RewardModelJudge(Judge):
    """The scalar head of an rm stage (LoRA + a score head on the base), on prompt + answer."""

    def __init__(self, run_dir: Path, raw_prompts: dict[str, object] | None = None):

        run_dir = Path(run_dir)
        self.scorer = load_scorer(run_dir)
        if self.scorer is None:
            raise UserError(
                f"{run_dir} has no trained reward model (rm/adapter) to judge with.",
                hint="Train one (rm.enabled=true in that run's recipe), or name another run in pairs.judge.run.",
            )
        self.raw = raw_prompts or {}  # label -> the prompt as the reward model saw it (messages)
        super().__init__(name=f"reward_model({run_dir / 'rm' / 'adapter'})")

    def score(self, prompt: str, answers: list[Answer]) -> list[float]:
        raw = self.raw.get(prompt, [{"role": "user", "content": prompt}])
        return self.scorer([raw] * len(answers), [a.text for a in answers])

    def close(self) -> None:
        self.scorer = None


# ------------------------------------------------------------------ (b) a local LLM, pairwise


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie' from a judge's reply (its first word), or None when it said something else."""
    m = re.match(r"\W*(A|B|tie)\b", text.strip(), flags=re.IGNORECASE)
    if not m:
        return None
    v = m.group(1)
    return "tie" if v.lower() == "tie" else v.upper()


class LLMJudge(Judge):
    """A local model asked, for every pair of a prompt's answers, which is better, once in each order.

    Each answer's score is its share of the pairwise wins (a tie, or a verdict that flips when the answers
    swap places, is half a win each). stats: verdicts, ties, order disagreements, unreadable replies.
    """

    def __init__(self, complete: Callable[[str], str], model: str, rubric: str | None):
        problem = rubric_problem(rubric) if rubric is not None else None
        if problem:
            raise UserError(f"pairs.judge.rubric: {problem}.")
        self.complete = complete
        self.rubric = rubric or DEFAULT_RUBRIC
        self.log: list[dict] = []  # every comparison, for the round's judge.jsonl
        super().__init__(name=f"llm({model}, {'default rubric' if rubric is None else 'own rubric'})")

    def verdict(self, prompt: str, a: str, b: str) -> str | None:
        return parse_verdict(self.complete(self.rubric.format(prompt=prompt, answer_a=a, answer_b=b)))

    def compare(self, prompt: str, x: str, y: str) -> float:
        """x's share of the win against y over both orders: 1, 0.5 or 0."""
        first = self.verdict(prompt, x, y)  # x is A
        second = self.verdict(prompt, y, x)  # x is B
        self.stats["comparisons"] += 2
        for v in (first, second):
            self.stats["unreadable" if v is None else "readable"] += 1
        x_first = {"A": 1.0, "B": 0.0}.get(first or "tie", 0.5)
        x_second = {"B": 1.0, "A": 0.0}.get(second or "tie", 0.5)
        if "tie" in (first, second) or None in (first, second):
            self.stats["ties"] += 1
        if {x_first, x_second} == {0.0, 1.0}:
            self.stats["order_disagreements"] += 1  # the position decided, not the answer
        self.log.append({"prompt": prompt, "x": x, "y": y, "x_as_A": first, "x_as_B": second})
        return (x_first + x_second) / 2

    def score(self, prompt: str, answers: list[Answer]) -> list[float]:
        wins = [0.0] * len(answers)
        for i, j in itertools.combinations(range(len(answers)), 2):
            if answers[i].text == answers[j].text:
                wins[i] += 0.5
                wins[j] += 0.5
                continue
            w = self.compare(prompt, answers[i].text, answers[j].text)
            wins[i] += w
            wins[j] += 1 - w
        others = max(1, len(answers) - 1)
        return [w / others for w in wins]


def llm_completer(model: str, max_tokens: int, seed: int) -> tuple[Callable[[str], str], Callable[[], None]]:
    """(complete(user_text) -> reply, close): greedy, through llama.cpp for a .gguf, else transformers."""
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"pairs.judge.model: {model!r} does not exist.", hint="Name a .gguf file or a model folder.")
    if path.suffix == ".gguf":
        return chat_completer(str(path), max_tokens=max_tokens, seed=seed)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if torch.cuda.is_available():  # 16-bit on the card, as lowvram.pairs.memory plans it
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": torch.cuda.current_device()})
    else:
        lm = AutoModelForCausalLM.from_pretrained(str(path))
    lm.eval()

    def complete(text: str) -> str:
        import torch

        msgs = [{"role": "user", "content": text}]
        prompt = (
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else text
        )
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(lm.device)
        with torch.no_grad():
            out = lm.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def close() -> None:
        nonlocal lm
        lm = None

    return complete, close


# ------------------------------------------------------------------ choosing one


def make_judge(cfg, recipe, run_dir: Path | None = None, raw_prompts: dict | None = None) -> Judge:
    """The judge a recipe's pairs.judge names; faults in its settings are UserErrors, before any sampling."""
    if cfg.kind == "rules":
        return RulesJudge(cfg)
    if cfg.kind == "reward_model":
        where = Path(cfg.run) if cfg.run else run_dir
        if where is None:
            raise UserError("pairs.judge.kind reward_model: name the run whose rm stage judges (pairs.judge.run).")
        return RewardModelJudge(where, raw_prompts)
    complete, close = llm_completer(cfg.model, cfg.max_judge_tokens, recipe.seed)
    judge = LLMJudge(complete, cfg.model, cfg.rubric)
    judge.close = close  # type: ignore[method-assign]
    return judge
