"""hf_whiflash: WhiFlash speculative decoding (EAGLE-3 + DFlash drafters, token-level routing) for transformers."""

from .assistant import WhiFlashAssistant
from .cache import LazyCatchUpCache
from .checkpoint import CheckpointError
from .drafters import DFlashConfig, DFlashDrafter, Eagle3Config, Eagle3Drafter, LookupDrafter
from .routing import EntropyPolicy, NeuralPolicy, Policy, RoundFeatures
from .settings import SettingsError
from .stats import GenerationStats
from .targets import DEFAULT_TARGET, IncompatibleDrafterError, load_target, shipped_drafters

__all__ = [
    "CheckpointError",
    "DEFAULT_TARGET",
    "DFlashConfig",
    "DFlashDrafter",
    "Eagle3Config",
    "Eagle3Drafter",
    "EntropyPolicy",
    "GenerationStats",
    "IncompatibleDrafterError",
    "LazyCatchUpCache",
    "LookupDrafter",
    "NeuralPolicy",
    "Policy",
    "RoundFeatures",
    "SettingsError",
    "WhiFlashAssistant",
    "load_target",
    "shipped_drafters",
]
