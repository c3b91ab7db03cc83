"""Lazy Catch-up is exact: drafts after a lazy catch-up equal those of drafters kept up to date every round."""

import pytest
import torch

from hf_whiflash import LazyCatchUpCache, WhiFlashAssistant
from helpers import RoutePattern, chat_ids, random_drafters

# Runs of each route, so that both drafters sit idle for 1..3 rounds and then catch up.
PATTERN = ["eagle3", "eagle3", "dflash", "dflash", "dflash", "eagle3", "dflash", "eagle3", "eagle3", "eagle3", "dflash"]


def generate(target, tokenizer, catch_up, prompt, max_new_tokens=40):
    eagle, dflash = random_drafters(target)
    assistant = WhiFlashAssistant(target, eagle, dflash, RoutePattern(PATTERN), catch_up=catch_up)
    out = target.generate(chat_ids(tokenizer, prompt), max_new_tokens=max_new_tokens, do_sample=False,
                          assistant_model=assistant)
    return out, assistant.stats


@pytest.mark.parametrize("prompt", ["Write a Python function that merges two sorted lists.",
                                    "Give me three tips for sleeping better."])
def test_lazy_drafts_equal_drafts_of_drafters_kept_up_to_date(target, tokenizer, prompt):
    lazy_out, lazy = generate(target, tokenizer, "lazy", prompt)
    eager_out, eager = generate(target, tokenizer, "eager", prompt)
    assert torch.equal(lazy_out, eager_out)
    assert lazy.routes == eager.routes and len(lazy.rounds) > len(PATTERN)
    for a, b in zip(lazy.rounds, eager.rounds):
        assert a.draft_ids == b.draft_ids, (a.route, a.draft_ids, b.draft_ids)
    # Lazily, only the chosen drafter catches up, absorbing several idle rounds' positions in one pass;
    # eagerly, both drafters absorb every round.
    assert max(r.caught_up for r in lazy.rounds[2:]) >= 3  # a drafter idle for 3 rounds absorbs them at once
    assert sum(r.caught_up for r in lazy.rounds) < sum(r.caught_up for r in eager.rounds)


def test_queue_holds_every_verified_position_until_absorbed():
    cache = LazyCatchUpCache()
    cache.enqueue(torch.tensor([[1, 2, 3]]), torch.arange(6.0).view(1, 3, 2))
    cache.enqueue(torch.tensor([[4]]), torch.tensor([[[6.0, 7.0]]]))
    assert cache.pending_length == 4
    ids, features = cache.take_pending(keep_last=1)
    assert ids.tolist() == [[1, 2, 3]] and features.shape == (1, 3, 2)
    assert cache.pending_length == 1
    ids, features = cache.take_pending()
    assert ids.tolist() == [[4]] and features.tolist() == [[[6.0, 7.0]]]
    assert cache.pending_length == 0


def test_truncate_drops_drafted_positions_only():
    cache = LazyCatchUpCache()
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    cache.truncate(3)
    assert cache.get_seq_length() == 3
    cache.truncate(7)  # nothing beyond: no-op
    assert cache.get_seq_length() == 3
