"""The trainer layer: `ASFTConfig` (every option, checked), `ASFTTrainer` (wires the reference, the loss and the
metrics into TRL's `SFTTrainer`), lambda by step (`kl_control`) and the callbacks the trainer installs.

It imports `losses`, `reference`, `data.checks`, `diagnostics.preflight` and `utils`; never `scripts`,
`evaluation` or `quickstart`.
"""

from .config import ASFTConfig
from .trainer import ASFTTrainer

__all__ = ["ASFTConfig", "ASFTTrainer"]
