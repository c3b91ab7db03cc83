"""The drafters a round can be routed to, each with the same protocol: `new_cache()`, `features(hidden_states)`,
`catch_up(cache)` and `draft(cache, length, pick, cut)`. EAGLE-3 and DFlash read the target's hidden states and
load from their published Hub layouts; lookup holds no weights and reads only the tokens."""

from .dflash import DFlashConfig, DFlashDrafter
from .eagle3 import Eagle3Config, Eagle3Drafter
from .lookup import LookupDrafter

__all__ = ["DFlashConfig", "DFlashDrafter", "Eagle3Config", "Eagle3Drafter", "LookupDrafter"]
