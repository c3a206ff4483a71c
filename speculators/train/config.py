"""Training configuration: the typed schema in `speculators.config.train` (re-exported here)."""

from speculators.config.train import ONLINE_FIELDS, TrainConfig

__all__ = ["ONLINE_FIELDS", "TrainConfig"]
