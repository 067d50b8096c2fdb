"""`python recipes/self-pairs.py [--plan] [key=value ...]`: lowvram run (--plan: plan) with the YAML beside this file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout runs without pip install
from lowvram.cli import run_recipe_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_recipe_script(__file__, sys.argv[1:]))
