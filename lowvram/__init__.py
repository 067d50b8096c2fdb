"""lowvram: plan, fine-tune (SFT then DPO) and export GGUF on one consumer GPU.

Run `lowvram --help`. This module stays import-light: nothing here imports torch.
"""

__version__ = "0.1.0"
