"""How drafters pick tokens when generation samples or processes logits: like the target's own sampler.

The generator builds one picker per round (`draft_picker`); calibration times drafting with it under the
processors generate() builds for the default sampling settings (`default_processors`), so the draft lengths
chosen for sampling pay what sampling costs.
"""

import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from .names import SAMPLING

# Processors that read only the row they process and treat a -inf column as absent, so processing a drafter's
# sub-vocabulary gives the row the whole vocabulary would (with -inf outside it) at a fraction of the cost:
# top-p sorts the row, 6.6 ms for SmolLM2's 49152 columns on an AMD EPYC, against a ~5 ms EAGLE-3 step.
SUB_VOCABULARY_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)


# What generate() falls back to for a setting neither the call nor the model's generation_config sets: top-k 50
# is on by default, and it decides what sampling costs (top-p then sorts a row that is -inf past its 50 best:
# 1.2 ms a row inside generate() against 4.2 ms for a whole 49k row, AMD EPYC with AVX512-BF16).
GENERATE_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None}


def default_processors(target) -> LogitsProcessorList:
    """The warpers `target.generate(do_sample=True, **SAMPLING)` builds, in its order: each setting from SAMPLING,
    else the model's generation_config, else generate()'s default (GENERATE_DEFAULTS)."""
    model_config = target.generation_config
    value = {name: SAMPLING.get(name, getattr(model_config, name, None)) for name in GENERATE_DEFAULTS}
    value = {name: default if value[name] is None else value[name] for name, default in GENERATE_DEFAULTS.items()}
    processors = LogitsProcessorList()
    if value["temperature"] != 1.0:
        processors.append(TemperatureLogitsWarper(value["temperature"]))
    if value["top_k"]:
        processors.append(TopKLogitsWarper(value["top_k"]))
    if value["top_p"] < 1.0:
        processors.append(TopPLogitsWarper(value["top_p"]))
    if value["min_p"] is not None:
        processors.append(MinPLogitsWarper(value["min_p"]))
    return processors


def draft_picker(input_ids, logits_processor, do_sample: bool, vocab_size: int):
    """How drafters pick tokens: None (argmax) for plain greedy; otherwise a function that processes one
    draft distribution like the target's and picks from it -> target token id [1, 1] and the processed
    logits over the target vocabulary [1, vocab_size] that the verifier compares with the target's.

    A drafter with a smaller vocabulary passes its logits [1, n] with their target ids `vocab` [n]; the row
    is processed and sampled at that size when every processor allows it, and widened (-inf elsewhere)
    only for the verifier."""
    processors = logits_processor if logits_processor is not None and len(logits_processor) else None
    if processors is None and not do_sample:
        return None
    sub_vocabulary = all(isinstance(p, SUB_VOCABULARY_PROCESSORS) for p in processors or ())

    def widened(logits, vocab):
        """Logits [1, n] over the target ids `vocab` [n] -> [1, vocab_size], -inf elsewhere."""
        return logits.new_full((1, vocab_size), float("-inf")).index_copy_(-1, vocab, logits)

    def pick(logits, drafted: list, vocab: torch.Tensor | None = None):
        logits = logits.float()
        if vocab is not None and not sub_vocabulary:
            logits, vocab = widened(logits, vocab), None
        if processors is not None:
            prefix = torch.cat([input_ids, *drafted], dim=1) if drafted else input_ids
            logits = processors(prefix, logits)
        if do_sample:
            probs = logits.softmax(-1)
            if not torch.isfinite(probs).all():
                raise FloatingPointError("a drafter produced non-finite draft probabilities (NaN/inf logits): "
                                         "its weights are likely corrupt; reload or retrain the drafter.")
            token = torch.multinomial(probs, 1)
        else:
            token = logits.argmax(-1, keepdim=True)
        if vocab is None:
            return token, logits
        return vocab[token], widened(logits, vocab)

    return pick
