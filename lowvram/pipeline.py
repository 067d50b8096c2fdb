"""`lowvram run`: recipe -> plan -> SFT -> DPO, in one run directory."""

from __future__ import annotations

from lowvram.hardware import detect_device
from lowvram.planner import make_plan
from lowvram.recipe import load_recipe


def run_pipeline(recipe_name: str | None, overrides: list[str], vram=None, gpu=None, resume=None, run_dir=None,
                 stages=None) -> int:
    recipe, path = load_recipe(recipe_name or "demo", overrides)
    plan = make_plan(recipe, detect_device(vram_gib=vram, gpu=gpu))
    print(f"Plan for {recipe.name} ({path}) on {plan.device.name}:")
    print("\n".join(plan.lines()))
    print("Training is not implemented yet: this run stops after planning.")
    return 0
