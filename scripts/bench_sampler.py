"""Answers per second of the pairs loop's samplers, side by side, at the same settings, in one run.

    python scripts/bench_sampler.py                                  # the built-in tiny model (built once)
    python scripts/bench_sampler.py --model /path/to/hf-folder --prompts 8 --samples 4 --max-new-tokens 64

Both draw `samples` answers per prompt at temperature 1 (no top-k/top-p/min-p) from the same weights:
plain transformers `model.generate` (lowvram.evaluate.run.generate, one prompt at a time with
num_return_sequences = samples, as the loop calls it) and llama.cpp on f16 and q8_0 GGUFs of the model
(lowvram.export.llamacpp.token_sampler: a prompt's answers side by side, one batch per step). The GGUF export
is timed and printed apart. Answers stop at EOS or the cap, so both rates are also given per generated token.
Then `auto`'s choice, as the loop would print it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a transformers model folder (default: builtin:tiny-llama)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); llama.cpp takes the free cores")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lowvram.evaluate.run import prompt_text
    from lowvram.export.llamacpp import _threads
    from lowvram.model.tiny import resolve_model_path
    from lowvram.pairs.build import load_policy, read_prompts
    from lowvram.pairs.sampler import HFSampler, LlamaCppSampler, choose_sampler, policy_gguf
    from lowvram.recipe import load_recipe

    model_path = args.model or resolve_model_path("builtin:tiny-llama")
    recipe, _ = load_recipe("self-pairs", [f"model.name={model_path}"])
    prompts = read_prompts(recipe, None)[0][: args.prompts]
    model, tok = load_policy(model_path, {"policy": None}, recipe)
    texts = [prompt_text(tok, p) for p in prompts]
    n, cap = args.samples, args.max_new_tokens
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_s, samplers = {}, [HFSampler(model, tok, None)]
        for gtype in ("f16", "q8_0"):
            t0 = time.monotonic()
            gguf = policy_gguf(model_path, None, None, Path(tmp), gtype)
            export_s[gtype] = round(time.monotonic() - t0, 1)
            samplers.append(LlamaCppSampler(gguf, tok, 1024 + cap))
        for s in samplers:
            s.sample(texts[0], 1, 0, 4)  # warm-up: first-call costs are not the rate
            t0 = time.monotonic()
            answers = [a for i, t in enumerate(texts) for a in s.sample(t, n, 100 + i, cap)]
            dt = time.monotonic() - t0
            tokens = sum(len(a) for a in answers)
            rows[s.name] = {
                "answers": len(answers),
                "seconds": round(dt, 2),
                "answers_per_s": round(len(answers) / dt, 2),
                "tokens_per_s": round(tokens / dt, 1),
                "mean_answer_tokens": round(tokens / len(answers), 1),
            }
        _, reason = choose_sampler(
            "auto", model, tok, None, model_path, None, None, Path(tmp) / "auto", texts[0], n, cap, len(texts)
        )
        for sm in samplers[1:]:
            sm.close()
    hf = rows["transformers"]
    print(
        f"model {model_path}; {len(texts)} prompts x {n} answers, max_new_tokens {cap}, temperature 1; "
        f"torch {torch.__version__} on {torch.get_num_threads()} threads, llama.cpp on {_threads()} "
        f"(the free cores); GGUF export {export_s} s"
    )
    print(f"{'sampler':<24}{'answers/s':>11}{'tokens/s':>10}{'mean tokens':>13}{'seconds':>9}")
    for name, r in rows.items():
        print(
            f"{name:<24}{r['answers_per_s']:>11.2f}{r['tokens_per_s']:>10.1f}{r['mean_answer_tokens']:>13.1f}{r['seconds']:>9.2f}"
        )
    for name, r in rows.items():
        if name != "transformers":
            print(
                f"{name} / transformers: {r['answers_per_s'] / hf['answers_per_s']:.1f}x answers/s, "
                f"{r['tokens_per_s'] / hf['tokens_per_s']:.1f}x tokens/s"
            )
    print(f"auto chooses: {reason}")
    print(json.dumps({"export_s": export_s, **rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
