"""Hindsight acceptance tables predict exactly what greedy generation accepts; the oracle routes with them."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from hf_whiflash import WhiFlashAssistant
from hf_whiflash.hindsight import acceptance_chances, acceptance_tables, confidence_outcomes, walk
from hf_whiflash.latency import LatencyModel
from hf_whiflash.names import DFLASH, EAGLE, GREEDY, SAMPLED, TARGET
from hf_whiflash.routing import OracleRouter

PROMPT = torch.tensor([[3, 8, 4, 9, 12, 5, 7]])
NEW = 40


@pytest.fixture(scope="module")
def setup(tiny):
    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    assistant = WhiFlashAssistant.from_pretrained(target, tiny / "drafters")
    reference = target.generate(PROMPT, max_new_tokens=NEW, do_sample=False)
    hindsight = acceptance_tables(target, reference, PROMPT.shape[1], assistant.eagle3, assistant.dflash,
                                  assistant.eagle_steps, assistant.dflash_block_size)
    return target, assistant, reference, hindsight


@pytest.mark.parametrize("route", [EAGLE, DFLASH])
def test_walked_tables_equal_the_acceptance_of_generation(tiny, setup, route):
    target, _, reference, hindsight = setup
    assistant = WhiFlashAssistant.from_pretrained(target, tiny / "drafters", routes=(route,))
    out = target.generate(PROMPT, max_new_tokens=NEW, do_sample=False, assistant_model=assistant)
    assert torch.equal(out, reference)
    engine = [r.accepted for r in assistant.stats.rounds if r.route == route]
    # rounds near max_length draft fewer tokens, so compare the rounds that drafted a full length
    full = [i for i, r in enumerate(assistant.stats.rounds) if r.drafted == assistant.stats.rounds[0].drafted]
    walked = walk(hindsight.tables[route], NEW - 1)
    assert [engine[i] for i in full] == [walked[i] for i in full]
    assert sum(engine) > 0  # tiny vocabulary: even random drafters get drafts accepted


def test_shorter_eagle_chains_replay_from_the_same_table(tiny, setup):
    """A chain of k accepts min(a, k) where the chain of 6 accepted a: what tune_entropy.py relies on."""
    target, _, reference, hindsight = setup
    assistant = WhiFlashAssistant.from_pretrained(target, tiny / "drafters", routes=(EAGLE,), eagle_steps=3)
    target.generate(PROMPT, max_new_tokens=NEW, do_sample=False, assistant_model=assistant)
    engine = [r.accepted for r in assistant.stats.rounds if r.route == EAGLE and r.drafted == 3]
    walked = walk(hindsight.tables[EAGLE].clamp(max=3), NEW - 1)
    assert engine == walked[:len(engine)] and len(engine) >= len(walked) - 2


def test_sampling_chances_of_a_top1_only_sampler_are_the_greedy_tables(setup):
    """Top-p small enough to keep only each row's top token makes sampling greedy: every draft is accepted
    with chance 1 where it is the target's argmax and 0 elsewhere, so the chances' leading run is the table."""
    target, assistant, reference, hindsight = setup
    top1 = LogitsProcessorList([TopPLogitsWarper(1e-6)])
    chances = acceptance_chances(target, reference, PROMPT.shape[1], top1, assistant.eagle3, assistant.dflash,
                                 assistant.eagle_steps, assistant.dflash_block_size)
    for route, table in hindsight.tables.items():
        assert chances[route].shape == (len(table), hindsight_length(route, assistant))
        assert set(chances[route].flatten().tolist()) <= {0.0, 1.0}
        assert torch.equal(chances[route].long().cumprod(-1).sum(-1), table)
    temperate = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)])
    soft = acceptance_chances(target, reference, PROMPT.shape[1], temperate, assistant.eagle3, assistant.dflash,
                              assistant.eagle_steps, assistant.dflash_block_size)
    assert all(((c >= 0) & (c <= 1 + 1e-6)).all() and 0 < c.mean() < 1 for c in soft.values())


def test_confidence_outcomes_are_the_drafts_own_acceptance(setup):
    """Greedy: a draft is accepted where it is the true token, so within each chain the leading run of accepted
    drafts is the table's entry. Sampling with a top-1 sampler is greedy, so its outcomes are the same."""
    target, assistant, reference, hindsight = setup
    top1 = LogitsProcessorList([TopPLogitsWarper(1e-6)])
    outcomes = confidence_outcomes(target, reference, PROMPT.shape[1], top1, assistant.eagle3, assistant.dflash,
                                   assistant.eagle_steps, assistant.dflash_block_size)
    for route, table in hindsight.tables.items():
        k = hindsight_length(route, assistant)
        confidence, accepted = outcomes[route][GREEDY]
        assert ((confidence > 0) & (confidence <= 1)).all() and set(accepted.tolist()) <= {0.0, 1.0}
        T = reference.shape[1]  # drafts past the sequence are left out: chains near the end are shorter
        runs, i = [], 0
        for m in range(len(table)):
            n = min(k, T - (PROMPT.shape[1] + m + 1))
            runs.append(int(accepted[i:i + n].long().cumprod(0).sum()))
            i += n
        assert i == len(accepted) and runs == table.tolist()
        sampled_confidence, sampled_accepted = outcomes[route][SAMPLED]
        assert torch.equal(sampled_accepted, accepted) and torch.allclose(sampled_confidence, torch.ones_like(accepted))


def hindsight_length(route: str, assistant) -> int:
    return assistant.eagle_steps if route == EAGLE else assistant.dflash_block_size - 1


def test_oracle_realises_the_hindsight_best_route(setup):
    target, assistant, reference, hindsight = setup
    latency = LatencyModel.from_dict({"verify_s": {1: 1.0}, "draft_s": {EAGLE: {1: 0.0}, DFLASH: {1: 0.0}}})
    oracle = OracleRouter(hindsight.tables, latency)
    routed = WhiFlashAssistant(target, assistant.eagle3, assistant.dflash, oracle, lookup=False,
                               eagle_steps=assistant.eagle_steps, dflash_block_size=assistant.dflash_block_size)
    out = target.generate(PROMPT, max_new_tokens=NEW, do_sample=False, assistant_model=routed)
    assert torch.equal(out, reference)
    m = 0
    for r in routed.stats.rounds:  # equal costs: the oracle takes the longer acceptance every round
        if r.route == TARGET:
            break
        best = max(int(hindsight.tables[EAGLE][m]), int(hindsight.tables[DFLASH][m]))
        assert r.accepted == min(best, r.drafted)
        m += r.accepted + 1


@pytest.mark.parametrize("route", [EAGLE, DFLASH])
def test_hindsight_predicts_the_trained_drafters_on_the_real_target(target, tokenizer, route):
    """On SmolLM2 with the shipped drafters: the walked tables are the acceptance generation sees."""
    from hf_whiflash import DEFAULT_TARGET
    from hf_whiflash.targets import shipped_drafters
    from helpers import chat_ids

    assistant = WhiFlashAssistant.from_pretrained(target, shipped_drafters(DEFAULT_TARGET), routes=(route,),
                                                  eagle_steps=2, dflash_block_size=16)  # fixed: drafting must happen
    for prompt in ("Write a Python function that merges two sorted lists.", "What is 15% of 240?"):
        ids = chat_ids(tokenizer, prompt)
        out = target.generate(ids, max_new_tokens=48, do_sample=False, assistant_model=assistant)
        hindsight = acceptance_tables(target, out, ids.shape[1], assistant.eagle3, assistant.dflash,
                                      assistant.eagle_steps, assistant.dflash_block_size)
        rounds = [r for r in assistant.stats.rounds if r.route == route]
        walked = walk(hindsight.tables[route], 48 - 1)
        full = [i for i, r in enumerate(rounds) if r.drafted == rounds[0].drafted]
        assert [rounds[i].accepted for i in full] == [walked[i] for i in full]
        assert sum(r.accepted for r in rounds) > 0
