"""Preference pairs a user does not have: sample the policy's answers, judge them, keep real gaps; iterated DPO.

build.py    `lowvram pairs` and the rounds of `lowvram run` (pairs.enabled, rounds: N), resumable
judges.py   one interface: rules, a Python callable, a reward model, a local LLM asked in both orders
sampler.py  transformers' generate or llama.cpp on a GGUF of the policy, chosen by measuring both
memory.py   the generate -> judge -> train phases planned for one card, refused before loading
"""

from lowvram._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "run_rounds": "build",
        "make_judge": "judges",
        "choose_sampler": "sampler",
        "check_phases": "memory",
    },
)
