"""DFlash draft model: config (speculators ``dflash`` config.json) and the PyTorch module."""

from speculators.models.dflash.config import DFlashConfig, speculators_model_type
from speculators.models.dflash.model import DFlashDraftModel, block_mask

__all__ = ["DFlashConfig", "DFlashDraftModel", "block_mask", "speculators_model_type"]
