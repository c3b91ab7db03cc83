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

from hf_whiflash import DFlashDrafter, Eagle3Drafter, WhiFlashAssistant
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


def exact_distribution(model, temperature: float) -> dict[tuple, float]:
    """P(t1..t4 | prompt) by enumeration: one forward per prefix."""
    probs = {(): 1.0}
    for _ in range(NEW_TOKENS):
        grown = {}
        for prefix, p in probs.items():
            with torch.no_grad():
                logits = model(torch.cat([PROMPT, torch.tensor([prefix], dtype=torch.long)], dim=1)).logits[0, -1]
            for token, q in enumerate((logits / temperature).softmax(-1).tolist()):
                grown[prefix + (token,)] = p * q
        probs = grown
    return probs


def chi_square_p_value(counts: Counter, expected_probs: dict, draws: int) -> float:
    """Pool cells expected below 5 draws into one, then a chi-square goodness-of-fit p-value."""
    big = [cell for cell, p in expected_probs.items() if p * draws >= 5]
    observed = [counts[c] for c in big] + [draws - sum(counts[c] for c in big)]
    expected = [expected_probs[c] * draws for c in big] + [draws * (1 - sum(expected_probs[c] for c in big))]
    return chisquare(observed, expected).pvalue


def sample_counts(model, assistant, draws: int, temperature: float) -> Counter:
    torch.manual_seed(1234)
    counts = Counter()
    for _ in range(draws):
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=temperature,
                             top_k=None, assistant_model=assistant)
        counts[tuple(out[0, PROMPT.shape[1]:].tolist())] += 1
    return counts


def assistant_for(model, mode: str) -> WhiFlashAssistant:
    eagle = Eagle3Drafter.for_target(model, seed=2) if mode != "dflash" else None
    dflash = DFlashDrafter.for_target(model, seed=3) if mode != "eagle3" else None
    policy = RoutePattern(["dflash", "eagle3"]) if mode == "whiflash" else None
    return WhiFlashAssistant(model, eagle, dflash, policy, eagle_steps=3, dflash_block_size=4)


def check_lossless(model, mode: str, draws: int):
    temperature = 0.9
    assistant = assistant_for(model, mode)
    counts = sample_counts(model, assistant, draws, temperature)
    stats = assistant.stats  # of the last draw: drafts were proposed and some were rejected overall
    assert stats.rounds and stats.rounds[0].drafted > 0
    exact = exact_distribution(model, temperature)
    assert chi_square_p_value(counts, exact, draws) > 1e-3, f"{mode}: samples do not follow the target"
    # Power: the same draws are clearly distinguishable from the target at a slightly different temperature.
    assert chi_square_p_value(counts, exact_distribution(model, 1.1), draws) < 1e-6


@pytest.mark.parametrize("mode", ["eagle3", "dflash", "whiflash"])
def test_sampling_is_lossless_sample(tiny, mode):
    check_lossless(tiny, mode, draws=2500)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eagle3", "dflash", "whiflash"])
def test_sampling_is_lossless_20k_draws(tiny, mode):
    check_lossless(tiny, mode, draws=20000)
