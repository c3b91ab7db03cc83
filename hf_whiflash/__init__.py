"""hf_whiflash: WhiFlash speculative decoding (EAGLE-3 + DFlash drafters, token-level routing) for transformers."""

from .checkpoint import CheckpointError
from .dflash import DFlashConfig, DFlashDrafter
from .eagle3 import Eagle3Config, Eagle3Drafter
from .targets import DEFAULT_TARGET, IncompatibleDrafterError, load_target

__all__ = [
    "CheckpointError",
    "DEFAULT_TARGET",
    "DFlashConfig",
    "DFlashDrafter",
    "Eagle3Config",
    "Eagle3Drafter",
    "IncompatibleDrafterError",
    "load_target",
]
