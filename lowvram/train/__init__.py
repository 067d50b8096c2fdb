"""Training stages: SFT, the preference stage (DPO, IPO, KTO, ORPO...), and the reward model.

stage.py        run_stage: load the model, train one stage, save its adapter
common.py       what every stage shares: context, trainer arguments, save, resume point
callbacks.py    progress, metrics, KL during training, Ctrl-C
reward.py       the reward model stage, and scoring with it
checkpoints.py  complete checkpoints only          oom.py     out of memory: what to change
guards.py       checks before and after a stage (finite weights, what loaded)
"""

from lowvram._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "run_stage": "stage",
        "release_memory": "stage",
        "load_model": "stage",
        "load_tokenizer": "stage",
        "StageContext": "common",
        "train_and_save": "common",
        "run_rm": "reward",
    },
)
