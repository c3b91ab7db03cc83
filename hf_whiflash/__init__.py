"""hf_whiflash: WhiFlash speculative decoding (EAGLE-3 + DFlash drafters, token-level routing) for transformers.

The names below are imported from their modules on first use, so that `import hf_whiflash` (and `whiflash --help`,
whose module lives in this package) does not load torch and transformers before anything needs them.
"""

import importlib

# public name -> the module that defines it
_MODULE_OF = {
    "CheckpointError": "checkpoint",
    "DEFAULT_TARGET": "names",
    "DFlashConfig": "drafters",
    "DFlashDrafter": "drafters",
    "Eagle3Config": "drafters",
    "Eagle3Drafter": "drafters",
    "EntropyPolicy": "routing",
    "GenerationStats": "stats",
    "IncompatibleDrafterError": "targets",
    "LazyCatchUpCache": "cache",
    "LookupDrafter": "drafters",
    "MissingExtraError": "extras",
    "NeuralPolicy": "routing",
    "Policy": "routing",
    "RoundFeatures": "routing",
    "SettingsError": "settings",
    "WhiFlashAssistant": "assistant",
    "load_target": "targets",
    "shipped_drafters": "targets",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hf_whiflash' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
