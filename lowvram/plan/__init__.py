"""Plan for the card: detect the GPU, pick model and settings by VRAM tier, estimate the peak, refuse what will not fit.

hardware.py   the device and its usable memory     catalog.py    model families and their dimensions
tiers.py      the 8/12/16/24 GB tiers              memory.py     the peak-memory estimate of a stage
planner.py    the plan, each choice with a reason  lengths.py    sequence lengths from the data
parallel.py   the plan per card for --gpus N       preflight.py  model folder, chat template, turn tokens
"""

from lowvram._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "Device": "hardware",
        "detect_device": "hardware",
        "ModelSpec": "catalog",
        "get_spec": "catalog",
        "estimate": "memory",
        "MemoryEstimate": "memory",
        "Plan": "planner",
        "StagePlan": "planner",
        "make_plan": "planner",
        "choose_backend": "planner",
        "plan_with_data": "lengths",
        "plan_per_card": "parallel",
        "preflight": "preflight",
    },
)
