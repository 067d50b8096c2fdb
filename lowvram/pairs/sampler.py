"""Who draws the pairs loop's answers: transformers' generate, or llama.cpp on an f16 GGUF of the policy.

    sampler, reason = choose_sampler("auto", model, tok, "policy", model_path, adapter, work_dir, probe, ...)
    ids = sampler.sample(prompt_text, n=4, seed=7, max_new_tokens=64)     # n answers as token ids

Both draw from the policy's own distribution (temperature 1, no top-k/top-p/min-p, no penalties) and stop
at the same EOS token, so a pair sampled either way means the same thing. llama.cpp needs the policy as a
GGUF: the adapter is merged into the base (lowvram.export.merge) and converted to f16 (llama.cpp's converter),
which takes seconds for a small model. `auto` measures: on a CPU it samples the first prompt both ways
and takes llama.cpp when its projected time for all prompts, the export included, is shorter; on a GPU,
transformers generates on the card (this llama.cpp build runs on the CPU).
"""

from __future__ import annotations

import time
from pathlib import Path

from lowvram.errors import UserError
from lowvram.evaluate.kl import adapter, generate
from lowvram.export.llamacpp import convert, runtime_installed, token_sampler
from lowvram.export.merge import BaseChoice, _is_4bit, local_checkpoint, merge_lora, read_adapter


def using(model, name: str | None):
    """`model` with the adapter `name` active (None: the base); a plain model as it is."""
    from contextlib import nullcontext

    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return nullcontext()

    return adapter(model, name)


class HFSampler:
    name = "transformers"

    def __init__(self, model, tok, policy: str | None):
        self.model, self.tok, self.policy = model, tok, policy

    def sample(self, text: str, n: int, seed: int, max_new_tokens: int) -> list[list[int]]:

        with using(self.model, self.policy):
            return generate(self.model, self.tok, [text], sample=True, n=n, seed=seed, max_new_tokens=max_new_tokens)[0]

    def close(self) -> None:
        pass


class LlamaCppSampler:
    def __init__(self, gguf: Path, tok, n_ctx: int):

        self.gguf, self.tok = gguf, tok
        self.name = f"llama.cpp ({gguf.stem.rsplit('-', 1)[-1]} GGUF)"
        self._sample, self._close = token_sampler(str(gguf), n_ctx=n_ctx)
        self.stop = {tok.eos_token_id}

    def sample(self, text: str, n: int, seed: int, max_new_tokens: int) -> list[list[int]]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._sample(ids, n, seed, max_new_tokens, self.stop)

    def close(self) -> None:
        self._close()


def policy_gguf(
    model_path: str, adapter: Path | None, tokenizer_dir: Path | None, work_dir: Path, gguf_type: str = "f16"
) -> Path:
    """A GGUF (f16 or q8_0) of base + adapter in work_dir (merged one tensor at a time, then llama.cpp's converter)."""
    import shutil

    base = local_checkpoint(model_path)
    if base is None:
        raise UserError(f"llama.cpp sampling needs the base on this machine; {model_path!r} is not.")
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / f"policy-{gguf_type}.gguf"
    if out.is_file():
        return out
    src = base
    if adapter is not None:
        merged = work_dir / "merged"
        shutil.rmtree(merged, ignore_errors=True)
        merge_lora(BaseChoice(base, _is_4bit(base), "the policy's base"), read_adapter(adapter), merged, tokenizer_dir)
        src = merged
    tmp = work_dir / f"policy-{gguf_type}.gguf.part"
    convert(src, tmp, gguf_type, work_dir / "convert.log")
    tmp.replace(out)
    if adapter is not None:
        shutil.rmtree(work_dir / "merged", ignore_errors=True)  # the GGUF holds it now
    return out


def choose_sampler(
    mode: str,
    model,
    tok,
    policy: str | None,
    model_path: str,
    adapter: Path | None,
    tokenizer_dir: Path | None,
    work_dir: Path,
    probe: str | None,
    n: int,
    max_new_tokens: int,
    prompts_left: int,
    gguf_type: str = "f16",
):
    """(sampler, reason): the recipe's choice, or on `auto` the faster one as measured here."""
    import torch

    hf = HFSampler(model, tok, policy)
    n_ctx = 1024 + max_new_tokens
    if mode == "transformers":
        return hf, "transformers: set by the recipe (pairs.sampler)"
    if mode == "llamacpp":
        return LlamaCppSampler(policy_gguf(model_path, adapter, tokenizer_dir, work_dir, gguf_type), tok, n_ctx), (
            f"llama.cpp on an {gguf_type} GGUF of the policy: set by the recipe (pairs.sampler)"
        )
    if torch.cuda.is_available():
        return hf, "transformers: a CUDA card generates there (llama.cpp here samples on the CPU)"

    if not runtime_installed():
        return hf, "transformers: llama.cpp (the xllamacpp wheel) is not installed"
    if probe is None or prompts_left <= 1:
        return hf, "transformers: too few prompts left to repay a GGUF export"
    if local_checkpoint_missing(model_path):
        return hf, f"transformers: the base {model_path} is not a local checkpoint llama.cpp can convert"
    t0 = time.monotonic()
    hf.sample(probe, n, 0, max_new_tokens)
    hf_s = time.monotonic() - t0
    t0 = time.monotonic()
    gguf = policy_gguf(model_path, adapter, tokenizer_dir, work_dir, gguf_type)
    export_s = time.monotonic() - t0
    lc = LlamaCppSampler(gguf, tok, n_ctx)
    t0 = time.monotonic()
    lc.sample(probe, n, 0, max_new_tokens)
    lc_s = time.monotonic() - t0
    hf_total, lc_total = hf_s * prompts_left, lc_s * prompts_left  # the export is already paid
    measured = (
        f"on the first prompt, {n} answers took {hf_s:.2f} s in transformers and {lc_s:.2f} s in llama.cpp "
        f"(after a {export_s:.1f} s export); projected for {prompts_left} prompts: {hf_total:.0f} s vs {lc_total:.0f} s"
    )
    if lc_total < hf_total:
        return lc, f"llama.cpp on an {gguf_type} GGUF of the policy: {measured}"
    lc.close()
    return hf, f"transformers: {measured}"


def local_checkpoint_missing(model_path: str) -> bool:

    return local_checkpoint(model_path) is None
