"""asft-trl: Anchored Supervised Fine-Tuning (ASFT) on Hugging Face TRL.

    from asft_trl import ASFTConfig, ASFTTrainer

ASFT = DFT's probability-weighted SFT loss + kl_coef x KL(reference || policy), the reference being the frozen
starting model (arXiv 2509.23753).
"""

from .losses import asft_loss, asft_token_terms, kl_per_token
from .trainer.config import ASFTConfig
from .trainer.trainer import ASFTTrainer

__version__ = "0.1.0"

__all__ = ["ASFTConfig", "ASFTTrainer", "asft_loss", "asft_token_terms", "kl_per_token", "__version__"]
