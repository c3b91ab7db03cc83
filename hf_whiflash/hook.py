"""The one place WhiFlash reaches into transformers' private generation internals.

transformers picks the candidate generator in the private `GenerationMixin._get_candidate_generator`
(there is no public registry), so we wrap that method once: an assistant that offers a
`whiflash_candidate_generator` method builds the generator; every other assistant goes to transformers.
`_assisted_decoding` is wrapped too, so that the whole generation (verify forwards included) runs inside
the assistant's `whiflash_kernels()` (packed matmuls, kernels.py).
`check_transformers_internals` verifies everything we rely on and fails with a clear message if a
transformers release changes it.
"""

import functools
import inspect

import transformers
from packaging.specifiers import SpecifierSet
from transformers.generation.utils import GenerationMixin

from .names import tested_transformers


def install_generator_hook() -> None:
    """Wrap GenerationMixin._get_candidate_generator once: WhiFlash assistants get their own generator."""
    original = GenerationMixin._get_candidate_generator
    if getattr(original, "_whiflash_original", None) is not None:
        return

    @functools.wraps(original)
    def _get_candidate_generator(self, *args, **kwargs):
        build = getattr(kwargs.get("assistant_model"), "whiflash_candidate_generator", None)
        if build is not None:
            return build(self, kwargs["generation_config"], kwargs["logits_processor"],
                         kwargs.get("target_tokenizer"))
        return original(self, *args, **kwargs)

    _get_candidate_generator._whiflash_original = original
    GenerationMixin._get_candidate_generator = _get_candidate_generator

    decoding = GenerationMixin._assisted_decoding

    @functools.wraps(decoding)
    def _assisted_decoding(self, *args, **kwargs):
        kernels = getattr(kwargs.get("assistant_model"), "whiflash_kernels", None)
        if kernels is None:
            return decoding(self, *args, **kwargs)
        with kernels():
            return decoding(self, *args, **kwargs)

    _assisted_decoding._whiflash_original = decoding
    GenerationMixin._assisted_decoding = _assisted_decoding


# What `_assisted_decoding` must still do for WhiFlash to work unchanged (transformers 5.23 and 5.24).
ASSISTED_DECODING_NEEDS = {
    "self._get_candidate_generator(": "the candidate generator comes from _get_candidate_generator",
    "assistant_model=assistant_model,": "the assistant is passed as the keyword assistant_model",
    "logits_processor=logits_processor,": "the logits processors are passed as a keyword",
    "candidate_generator.requires_model_outputs": "generators can ask for the verify forward's outputs",
    "model_outputs=outputs,": "the verify forward's outputs reach get_candidates",
    "is_first_iteration=is_first_iteration,": "get_candidates learns about the prefill round",
    "model_inputs |= candidate_generator.model_kwargs_overrides": "generators can request hidden states",
    "_speculative_sampling(": "sampled drafts are verified by speculative rejection sampling",
    "candidate_generator.update_candidate_strategy(input_ids, new_logits, n_matches)": "outcomes are reported",
}


@functools.cache
def check_transformers_internals() -> None:
    """Fail loudly if the private generation internals we hook into have changed."""
    original = getattr(GenerationMixin._get_candidate_generator, "_whiflash_original",
                       GenerationMixin._get_candidate_generator)
    decoding = getattr(GenerationMixin._assisted_decoding, "_whiflash_original", GenerationMixin._assisted_decoding)
    source = inspect.getsource(decoding)
    missing = [why for needle, why in ASSISTED_DECODING_NEEDS.items() if needle not in source]
    params = inspect.signature(original).parameters
    missing += [f"_get_candidate_generator takes {p!r}" for p in ("assistant_model", "generation_config",
                                                                   "logits_processor") if p not in params]
    if "assistant_model" not in inspect.signature(decoding).parameters:
        missing.append("_assisted_decoding takes 'assistant_model'")
    if missing:
        raise RuntimeError(
            f"transformers {transformers.__version__} changed the generation internals WhiFlash relies on "
            f"({'; '.join(missing)}). Install a tested release (transformers{tested_transformers()}) or update "
            "hf_whiflash/hook.py."
        )


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` from transformers 5.24, `past_key_values`
    before (5.24 still accepts the old name, with a deprecation warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def transformers_is_tested() -> bool:
    """Whether the installed transformers is in the range pyproject.toml declares."""
    return SpecifierSet(tested_transformers()).contains(transformers.__version__)
