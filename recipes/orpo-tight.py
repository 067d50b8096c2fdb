"""Run the recipe of the same name beside this file.

    python recipes/orpo-tight.py [--plan] [--vram GIB] [key=value ...]

Same as `lowvram run orpo-tight`; `--plan` only prints the plan.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout works without pip install

from lowvram.cli import run_recipe_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_recipe_script(__file__, sys.argv[1:]))
