"""A local folder with the properties of a real base model that the demo's tiny model lacks:
no chat template, a tokenizer.json only (no SentencePiece tokenizer.model), chat turn tokens
in the vocabulary whose rows were never trained (near zero, as in Llama 3 base checkpoints), and
an EOS that ends documents, not turns (</s>; SmolLM2's base has <|endoftext|>, Llama 3's
<|end_of_text|>), which its generation config stops on."""

from __future__ import annotations

import json
from pathlib import Path

TURN_TOKENS = ("<|im_start|>", "<|im_end|>")
DOC_END = "</s>"


def build_untrained_base(tiny_dir: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            for t in TURN_TOKENS:
                i = tok.convert_tokens_to_ids(t)
                weight[i] = torch.randn(weight.shape[1], generator=gen) * 1e-4
    doc_end = tok.convert_tokens_to_ids(DOC_END)
    tok.eos_token = DOC_END
    model.config.eos_token_id = model.generation_config.eos_token_id = doc_end
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "tokenizer.model").unlink(missing_ok=True)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out
