"""Lossless sampling: speculative rejection sampling with the drafters' own probabilities keeps the
target's distribution exactly. Checked with a chi-square test of the first four generated tokens
against their exact distribution under the target, on a tiny random Llama (vocabulary 6) where that
distribution can be enumerated. The same test rejects a slightly wrong distribution (power check).
"""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from hf_whiflash import DFlashDrafter, Eagle3Drafter, LookupDrafter, WhiFlashAssistant
from hf_whiflash.names import SAMPLING
from hf_whiflash.sampling import default_processors, draft_picker
from helpers import RoutePattern

VOCAB, NEW_TOKENS, PROMPT = 6, 4, torch.tensor([[1, 3, 4, 2, 5]])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def exact_distribution(model, temperature: float, top_p: float = 1.0) -> dict[tuple, float]:
    """P(t1..t4 | prompt) by enumeration: one forward per prefix."""
    probs = {(): 1.0}
    for _ in range(NEW_TOKENS):
        grown = {}
        for prefix, p in probs.items():
            with torch.no_grad():
                logits = model(torch.cat([PROMPT, torch.tensor([prefix], dtype=torch.long)], dim=1)).logits[0, -1]
            logits = TopPLogitsWarper(top_p)(None, logits[None] / temperature)[0] if top_p < 1 else logits / temperature
            for token, q in enumerate(logits.softmax(-1).tolist()):
                grown[prefix + (token,)] = p * q
        probs = grown
    return probs


def chi_square_p_value(counts: Counter, expected_probs: dict, draws: int) -> float:
    """Pool cells expected below 5 draws into one, then a chi-square goodness-of-fit p-value."""
    big = [cell for cell, p in expected_probs.items() if p * draws >= 5]
    observed = [counts[c] for c in big] + [draws - sum(counts[c] for c in big)]
    expected = [expected_probs[c] * draws for c in big] + [draws * (1 - sum(expected_probs[c] for c in big))]
    return chisquare(observed, expected).pvalue


def sample_counts(model, assistant, draws: int, temperature: float, top_p: float = 1.0) -> tuple[Counter, Counter]:
    """The generated continuations' counts, and per route the drafts proposed and rejected over all draws."""
    torch.manual_seed(1234)
    counts, drafts = Counter(), Counter()
    for _ in range(draws):
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=temperature,
                             top_k=None, top_p=top_p, assistant_model=assistant)
        counts[tuple(out[0, PROMPT.shape[1]:].tolist())] += 1
        for r in assistant.stats.rounds:
            drafts[r.route, "drafted"] += r.drafted
            drafts[r.route, "rejected"] += r.drafted > r.accepted
    return counts, drafts


def assistant_for(model, mode: str) -> WhiFlashAssistant:
    eagle = Eagle3Drafter.for_target(model, seed=2) if mode != "dflash" else None
    if mode == "eagle3-sub-vocabulary":  # drafts 4 of the 6 tokens, as trained heads draft 8k of 49k
        eagle = Eagle3Drafter.for_target(model, draft_vocab_size=4, seed=2)
        eagle.set_draft_vocab(torch.tensor([0, 2, 3, 5]))
    dflash = DFlashDrafter.for_target(model, seed=3) if mode not in ("eagle3", "lookup") else None
    eagle = eagle if mode != "lookup" else None
    policy = RoutePattern(["lookup", "dflash", "eagle3"]) if mode == "whiflash" else None
    # Lookup on single tokens, so that in a 6-token vocabulary it proposes in most rounds (one-hot drafts).
    lookup = LookupDrafter(min_match=1, max_match=2, max_drafts=3) if mode in ("whiflash", "lookup") else False
    return WhiFlashAssistant(model, eagle, dflash, policy, lookup=lookup, eagle_steps=3, dflash_block_size=4)


def check_lossless(model, mode: str, draws: int, top_p: float = 1.0):
    temperature = 0.9
    assistant = assistant_for(model, mode)
    counts, drafts = sample_counts(model, assistant, draws, temperature, top_p)
    routes = {"whiflash": ("eagle3", "dflash", "lookup"), "eagle3-sub-vocabulary": ("eagle3",)}.get(mode, (mode,))
    for route in routes:  # every route drafted, and saw rejections
        assert drafts[route, "drafted"] > 0 and drafts[route, "rejected"] > 0, (route, drafts)
    exact = exact_distribution(model, temperature, top_p)
    assert chi_square_p_value(counts, exact, draws) > 1e-3, f"{mode}: samples do not follow the target"
    # Power: the same draws are clearly distinguishable from the target at a slightly different temperature
    # (with top-p, whose few outcomes barely move with temperature: from the target without top-p).
    alternative = exact_distribution(model, 1.1) if top_p == 1 else exact_distribution(model, temperature)
    assert chi_square_p_value(counts, alternative, draws) < 1e-6


# A head drafting a sub-vocabulary processes (top-p) and samples its rows at that size: the target's top-p
# distribution, tokens the head cannot draft included, must come out exactly (the 20k-draw test: whole vocabulary).
@pytest.mark.parametrize("mode, top_p", [("eagle3-sub-vocabulary", 0.8), ("dflash", 1.0), ("lookup", 0.8),
                                         ("whiflash", 1.0)])
def test_sampling_is_lossless_sample(tiny, mode, top_p):
    check_lossless(tiny, mode, draws=2500, top_p=top_p)


class WidthRecordingTopP(TopPLogitsWarper):
    """Top-p that notes the width of every row it processes."""

    def __init__(self, top_p: float):
        super().__init__(top_p)
        self.widths = []

    def __call__(self, input_ids, scores):
        self.widths.append(scores.shape[-1])
        return super().__call__(input_ids, scores)


@pytest.mark.parametrize("processors, sub_vocabulary", [
    ([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), MinPLogitsWarper(0.05)], True),
    ([RepetitionPenaltyLogitsProcessor(1.3)], False),  # reads token ids: whole vocabulary
])
def test_a_sub_vocabulary_row_is_processed_as_the_whole_vocabulary_would_be(processors, sub_vocabulary):
    """The draft distribution the verifier gets from a sub-vocabulary pick is the one processing the widened row
    gives (-inf outside the sub-vocabulary); it is processed at the smaller size only when every processor
    reads nothing but the row."""
    top_p = WidthRecordingTopP(0.9)
    processors = LogitsProcessorList([*processors, top_p])
    vocab = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:120]
    pick = draft_picker(PROMPT, processors, do_sample=True, vocab_size=300)
    for seed in range(5):
        logits = torch.randn(1, 120, generator=torch.Generator().manual_seed(seed)) * 3
        widened = torch.full((1, 300), float("-inf")).index_copy_(-1, vocab, logits)
        expected = processors(PROMPT, widened.clone())
        token, row = pick(logits, [], vocab)
        torch.testing.assert_close(row, expected)
        assert int(token) in vocab.tolist() and torch.isfinite(row[0, token]).all()
    picked_widths = top_p.widths[1::2]  # each seed: the expected row, then the pick's
    assert set(picked_widths) == {120 if sub_vocabulary else 300}


def describe(processors) -> list[tuple]:
    return [(type(p).__name__, {k: v for k, v in vars(p).items() if not isinstance(v, torch.Tensor)})
            for p in processors]


@pytest.mark.parametrize("model_settings", [{}, {"top_k": 0, "min_p": 0.05}, {"top_k": 7, "temperature": 0.5}])
def test_calibration_samples_with_the_processors_generate_builds(tiny, model_settings, monkeypatch):
    """Calibration and the sampling profiles time and replay the warpers a `generate(do_sample=True, **SAMPLING)`
    call really applies: the model's generation_config over generate()'s defaults (top-k 50 among them)."""
    monkeypatch.setattr(tiny, "generation_config", tiny.generation_config.__class__(**{
        **tiny.generation_config.to_dict(), **model_settings}))
    assistant = assistant_for(tiny, "eagle3")
    seen = []
    build = assistant.whiflash_candidate_generator
    monkeypatch.setattr(assistant, "whiflash_candidate_generator",
                        lambda model, config, processors, tokenizer=None: seen.append(processors) or
                        build(model, config, processors, tokenizer))
    tiny.generate(PROMPT, max_new_tokens=2, do_sample=True, **SAMPLING, assistant_model=assistant)
    assert describe(default_processors(tiny)) == describe(seen[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eagle3", "dflash", "lookup", "whiflash"])
def test_sampling_is_lossless_20k_draws(tiny, mode):
    check_lossless(tiny, mode, draws=20000)
