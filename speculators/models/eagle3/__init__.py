"""EAGLE-3 draft model: config (speculators config.json) and the PyTorch module."""

from speculators.models.eagle3.config import Eagle3Config, default_aux_layer_ids
from speculators.models.eagle3.model import DraftCache, DraftOutput, Eagle3DraftModel, logits_to_target_vocab

__all__ = [
    "DraftCache",
    "DraftOutput",
    "Eagle3Config",
    "Eagle3DraftModel",
    "default_aux_layer_ids",
    "logits_to_target_vocab",
]
