"""Unsloth patches only what is imported after it: on its backend, nothing may import transformers first.

The GPU run of tests/test_gpu.py caught it: planning from the data's token lengths loads the model's
tokenizer (transformers) before the first stage imported Unsloth. Unsloth cannot import without a GPU,
so this test puts a stand-in `unsloth` package first on the path that only records which Hugging Face
libraries were already imported when it was, then fails the import; the pipeline under test is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, os, sys
with open(os.environ["UNSLOTH_PROBE_OUT"], "w") as fh:
    json.dump(sorted(m for m in ("transformers", "trl", "peft", "datasets") if m in sys.modules), fh)
raise ImportError("stand-in unsloth: stop after recording the import order")
"""

DRIVER = """
import sys
from pathlib import Path
import lowvram.pipeline as pipeline
from lowvram.errors import UserError
from lowvram.plan.hardware import Device

# This machine has no CUDA card; the pipeline is told it trains on one (a 24 GiB card).
pipeline.training_device = lambda vram, gpu: Device("cuda", "test card", 24.0, 24.0, (8, 9), "torch")
try:
    pipeline.run_pipeline(pipeline.RunRequest("tiny", tuple(sys.argv[2:]), run_dir=Path(sys.argv[1])))
except UserError as e:
    print("UserError:", e)
"""


def test_unsloth_is_imported_before_any_hugging_face_library(tmp_path, tiny_init_model_dir):
    fake = tmp_path / "site" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(PROBE)
    out = tmp_path / "order.json"
    env = {
        **os.environ,
        "UNSLOTH_PROBE_OUT": str(out),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    # A local model folder with its tokenizer and local sample data: the data-aware planner reads both.
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            DRIVER,
            str(tmp_path / "run"),
            f"model.name={tiny_init_model_dir}",
            "model.backend=unsloth",
            "use_samples=true",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.is_file(), res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads(out.read_text()) == [], "imported before unsloth: " + out.read_text()
    assert "unsloth does not import" in res.stdout  # the stand-in's failure reaches the user as a clear error
    assert not Path(tmp_path / "run").exists()  # and nothing was created before it
