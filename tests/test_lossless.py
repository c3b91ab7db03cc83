"""Lossless greedy: WhiFlash output is token-identical to plain generate() on the real SmolLM2 target.

CI runs a sample (12 prompts per mode, spread over the categories); the whole matrix
(52 prompts x 3 modes x 3 drafter kinds x 3 lengths) runs with `make test-slow`. Drafter kinds:
untrained (random), the trained ones shipped in the package, and scripted ones that are partly right
on purpose so that every acceptance length from 0 to the full draft occurs.
"""

from functools import cache

import pytest
import torch

from helpers import PROMPTS, RoutePattern, chat_ids, make_assistant

MODES = ("eagle3", "dflash", "whiflash")
KINDS = ("random", "trained", "scripted")
LENGTHS = (8, 33, 64)
SAMPLE = PROMPTS[::4][:13]  # 13 prompts, every category


@pytest.fixture(scope="module")
def reference(target, tokenizer):
    @cache
    def plain(prompt: str, max_new_tokens: int) -> torch.Tensor:
        return target.generate(chat_ids(tokenizer, prompt), max_new_tokens=max_new_tokens, do_sample=False)
    return plain


def run_matrix(target, tokenizer, reference, prompts, lengths_for, mode, kind):
    """Generate every prompt with the assistant; return the accepted counts of all drafting rounds."""
    accepted = []
    for i, row in enumerate(prompts):
        for max_new in lengths_for(i):
            expected = reference(row["prompt"], max_new)
            assistant = make_assistant(target, mode, kind, reference=reference(row["prompt"], max(LENGTHS)),
                                       policy=scripted_routes() if (mode, kind) == ("whiflash", "scripted") else None)
            out = target.generate(chat_ids(tokenizer, row["prompt"]), max_new_tokens=max_new, do_sample=False,
                                  assistant_model=assistant)
            assert torch.equal(out, expected), (mode, kind, max_new, row["prompt"])
            accepted += [(r.route, r.drafted, r.accepted) for r in assistant.stats.rounds if r.route != "target"]
    return accepted


def scripted_routes() -> RoutePattern:
    """Partly-right drafters are equally good, so the entropy policy rightly keeps to the cheaper EAGLE-3 and
    DFlash would never draft. A fixed pattern switches every round and, being 3 rounds long (coprime with
    the script's 16-round error cycle), meets every error offset with both drafters."""
    return RoutePattern(["eagle3", "dflash", "dflash"])


def assert_every_acceptance_length(accepted, route, length):
    full_drafts = {a for r, d, a in accepted if r == route and d == length}
    assert full_drafts == set(range(length + 1)), f"{route}: acceptance lengths seen {sorted(full_drafts)}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_lossless_sample(target, tokenizer, reference, mode, kind):
    accepted = run_matrix(target, tokenizer, reference, SAMPLE, lambda i: [LENGTHS[i % 3]], mode, kind)
    if kind == "scripted" and mode != "whiflash":
        route, length = (mode, 6) if mode == "eagle3" else (mode, 15)
        assert_every_acceptance_length(accepted, route, length)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_lossless_full_matrix(target, tokenizer, reference, mode, kind):
    accepted = run_matrix(target, tokenizer, reference, PROMPTS, lambda i: LENGTHS, mode, kind)
    if kind == "scripted":
        for route, length in (("eagle3", 6), ("dflash", 15)):
            if mode in (route, "whiflash"):
                assert_every_acceptance_length(accepted, route, length)
