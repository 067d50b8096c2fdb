"""After training: answers on held-out prompts, KL to the reference, rewards, the report.

kl.py           generation, log-probabilities, KL(policy || reference)
run.py          evaluate_run: base vs SFT vs final, best-of-N
report.py       metrics, plots, the run summary
report_html.py  report.html
"""

from lowvram._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "kl_to_reference": "kl",
        "generate": "kl",
        "evaluate_run": "run",
        "summary_lines": "run",
        "write_report": "report",
        "write_html": "report_html",
    },
)
