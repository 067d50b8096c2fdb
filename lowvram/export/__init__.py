"""Merge and export: the adapter folded into 16-bit weights, GGUF files, Ollama Modelfiles, verified.

run.py          export_run: decide everything, then merge, convert, quantize, verify
merge.py        the streaming merge, shard by shard
llamacpp.py     the one module that talks to llama.cpp (converter, quantizer, runtime)
gguf_checks.py  what a GGUF says: tokenizer, template, metadata
verify.py       does the GGUF answer like the trained model?
ollama.py       the Modelfile: TEMPLATE, stops, system prompt
"""

from lowvram._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "ExportOptions": "run",
        "ExportResult": "run",
        "export_run": "run",
        "inspect_run": "run",
        "find_gguf": "run",
        "merge_lora": "merge",
        "export_tools": "llamacpp",
        "verify_ggufs": "verify",
        "modelfile": "ollama",
    },
)
