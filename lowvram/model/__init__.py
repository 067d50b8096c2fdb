"""The model: loading it on each backend, its adapter, its turn tokens, and where it comes from.

hf_backend.py       transformers + PEFT (+ bitsandbytes 4-bit): CPU, Mac, any GPU
unsloth_backend.py  Unsloth on a CUDA GPU (the one module that imports unsloth)
turn_tokens.py      the chat template's untrained turn tokens, fixed and trained
adapters.py         saved adapters: reading them, checking them
tiny.py             the built-in tiny model for tests, and model names to paths
"""

from lowvram._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "ensure_tiny_model": "tiny",
        "resolve_model_path": "tiny",
        "load_base": "hf_backend",
        "add_adapter": "hf_backend",
        "load_4bit": "hf_backend",
        "lora_config": "hf_backend",
    },
)
