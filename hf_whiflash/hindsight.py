"""Hindsight acceptance: on a sequence the target generated greedily, how many drafts each drafter
would get accepted at every possible round start, computed teacher-forced in one pass per drafter.

Until its first wrong token, a drafter's own drafts equal the true tokens, so teacher forcing gives
exactly the acceptance greedy generation would see. Walking the round trajectory over these tables
gives the acceptance length of a single-drafter run without generating; the router recipe uses
the tables as labels and the benchmark's oracle routes with them. For sampling, `acceptance_chances`
gives each draft's chance of acceptance instead (recipes/profile_acceptance.py walks draws of them).
"""

from dataclasses import dataclass

import torch

from .names import DFLASH, EAGLE, GREEDY, LOOKUP, SAMPLED, TARGET
from .routing import RoutingState, offered


@dataclass
class Hindsight:
    """Per round start m = start..T-2 (x_m the newest verified token): what the router would see and
    how each paradigm would fare."""

    tables: dict[str, torch.Tensor]  # route -> accepted drafts [T-1-start]
    entropy: torch.Tensor  # [T-1-start] target entropy of the distribution that produced x_m
    top1: torch.Tensor  # [T-1-start] its top-1 probability
    lookup_match: torch.Tensor | None = None  # [T-1-start] the lookup drafter's match length (0: none)
    lookup_drafts: torch.Tensor | None = None  # [T-1-start] its proposal's length
    lookup_corpus: torch.Tensor | None = None  # [T-1-start] bool: the match is in its corpus, not the text
    lookup_expected: torch.Tensor | None = None  # [T-1-start] the proposal's expected accepted drafts (greedy)


@torch.no_grad()
def acceptance_tables(target, sequence: torch.Tensor, start: int, eagle=None, dflash=None, eagle_steps: int = 6,
                      block_size: int | None = None, lookup=None) -> Hindsight:
    """sequence [1, T] (prompt + greedy continuation); the first round starts at m = `start` (the prompt
    length). One target pass, then one teacher-forced pass per neural drafter; lookup replays its index."""
    layers = sorted({i for d in (eagle, dflash) if d is not None for i in d.feature_layers})
    out = target(sequence, output_hidden_states=layers)
    T = sequence.shape[1]
    logp = out.logits[0, start - 1:T - 2].float().log_softmax(-1)  # produced x_m for m = start..T-2
    tables = {}
    if eagle is not None:
        tables[EAGLE] = _eagle_table(eagle, sequence, out.hidden_states, start, eagle_steps)
    if dflash is not None:
        tables[DFLASH] = _dflash_table(dflash, sequence, out.hidden_states, start, block_size or dflash.block_size)
    hindsight = Hindsight(tables, -(logp.exp() * logp).sum(-1), logp.exp().max(-1).values)
    if lookup is not None:
        proposals = lookup_proposals(lookup, sequence, start)
        hindsight.tables[LOOKUP] = torch.tensor([lookup_accepted(p, sequence, start + i)
                                                 for i, p in enumerate(proposals)])
        hindsight.lookup_match = torch.tensor([p.match for p in proposals])
        hindsight.lookup_drafts = torch.tensor([len(p.tokens) for p in proposals])
        hindsight.lookup_corpus = torch.tensor([p.from_corpus for p in proposals])
        hindsight.lookup_expected = torch.tensor([lookup.expected(GREEDY, p) for p in proposals])
    return hindsight


def lookup_proposals(lookup, sequence: torch.Tensor, start: int) -> list:
    """The lookup drafter's Proposal at every round start m = start..T-2, its index fed as the generator feeds it
    (tokens 1..m verified)."""
    index = lookup.new_cache()
    index.enqueue(sequence[:, 1:start + 1])
    proposals = []
    for m in range(start, sequence.shape[1] - 1):
        proposals.append(lookup.propose(index))
        index.enqueue(sequence[:, m + 1:m + 2])
    return proposals


def lookup_accepted(proposal, sequence: torch.Tensor, m: int) -> int:
    """Drafts of `proposal` (made at round start m) that match the sequence, before the first miss."""
    truth = sequence[0, m + 1:m + 1 + len(proposal.tokens)].tolist()
    return next((j for j, (draft, true) in enumerate(zip(proposal.tokens, truth)) if draft != true), len(truth))


def leading_matches(predicted: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, k] predictions vs true tokens -> [N]: how many match before the first miss (or invalid slot)."""
    return ((predicted == truth) & valid).long().cumprod(-1).sum(-1)


@torch.no_grad()
def acceptance_chances(target, sequence: torch.Tensor, start: int, processors, eagle=None, dflash=None,
                       eagle_steps: int = 6, block_size: int | None = None,
                       argmax: bool = False) -> dict[str, torch.Tensor]:
    """Sampling's counterpart of the tables: route -> [R, k], for every round start m (as acceptance_tables)
    and draft j, the chance that speculative sampling accepts draft j, sum_x min(p(x), q(x)) with p and q the
    target's and the drafter's distributions after `processors` (a LogitsProcessorList; temperature, top-p).
    `argmax`: for drafts that are q's most likely token instead of a draw from q (one-hot drafts, lossless too):
    p(argmax q).

    Drafter and target are teacher-forced on `sequence`: draft j's context holds the true tokens where real
    sampling would hold the accepted drafts, which are the true tokens only mostly, so the chances describe
    sampling on text like `sequence` approximately (recipes/profile_acceptance.py checks them against real
    sampled generation)."""
    layers = sorted({i for d in (eagle, dflash) if d is not None for i in d.feature_layers})
    out = target(sequence, output_hidden_states=layers)
    T = sequence.shape[1]
    chances = {}
    if eagle is not None:
        logits, positions = _eagle_chains(eagle, sequence, out.hidden_states, start, eagle_steps)
        vocab = eagle.to_target_ids(torch.arange(logits.shape[-1], device=sequence.device))  # [Vd]: target ids
        chances[EAGLE] = _chance(logits, out.logits[0], positions, T, processors, sequence, vocab, argmax)
    if dflash is not None:
        chances[DFLASH] = torch.cat([
            _chance(logits, out.logits[0], positions, T, processors, sequence, argmax=argmax)
            for logits, positions in _dflash_blocks(dflash, sequence, out.hidden_states, start,
                                                    block_size or dflash.block_size)])
    return chances


@torch.no_grad()
def confidence_outcomes(target, sequence: torch.Tensor, start: int, processors, eagle=None, dflash=None,
                        eagle_steps: int = 6, block_size: int | None = None,
                        generator: torch.Generator | None = None) -> dict[str, dict[str, tuple]]:
    """What dynamic lengths read confidences through (calibration.DraftCut): for every draft of every round start
    (as acceptance_chances, teacher-forced, so each draft's context holds accepted drafts), the drafter's confidence
    in it and its acceptance. Route -> mode -> (confidences [N], acceptances [N]). Greedy: the draft is the
    drafter's argmax, its confidence that token's probability, its acceptance 1 where it is the true token, else 0.
    Sampling: one draw x from the processed draft distribution q; confidence q(x), acceptance its chance under
    speculative sampling, min(1, p(x) / q(x))."""
    layers = sorted({i for d in (eagle, dflash) if d is not None for i in d.feature_layers})
    out = target(sequence, output_hidden_states=layers)
    T = sequence.shape[1]
    parts = {}  # route -> [(draft logits [R, k, V'], positions [R, k], target ids of the V' columns or None)]
    if eagle is not None:
        logits, positions = _eagle_chains(eagle, sequence, out.hidden_states, start, eagle_steps)
        parts[EAGLE] = [(logits, positions, eagle.to_target_ids(torch.arange(logits.shape[-1], device=logits.device)))]
    if dflash is not None:
        parts[DFLASH] = [(logits, positions, None) for logits, positions in
                         _dflash_blocks(dflash, sequence, out.hidden_states, start, block_size or dflash.block_size)]
    outcomes = {}
    for route, chunks in parts.items():
        greedy, sampled = [], []
        for logits, positions, vocab in chunks:
            valid = (positions < T).flatten()
            truth = sequence[0, positions.flatten().clamp(max=T - 1)]
            confidence, best = logits.flatten(0, 1).float().softmax(-1).max(-1)  # [N]
            drafted = vocab[best] if vocab is not None else best
            greedy.append((confidence[valid], (drafted == truth).float()[valid]))
            p, q = _processed(logits, out.logits[0], positions, T, processors, sequence, vocab)
            x = torch.multinomial(q, 1, generator=generator)  # [N, 1]: one sampled draft per position
            q_x, p_x = q.gather(-1, x)[:, 0], p.gather(-1, x)[:, 0]
            sampled.append((q_x[valid], (p_x / q_x).clamp(max=1)[valid]))
        outcomes[route] = {mode: tuple(torch.cat(column) for column in zip(*pairs))
                           for mode, pairs in ((GREEDY, greedy), (SAMPLED, sampled))}
    return outcomes


@torch.no_grad()
def lookup_outcomes(target, sequence: torch.Tensor, start: int, processors, lookup) -> list[tuple]:
    """The lookup drafter's counterpart of the tables and chances: per round start m (as acceptance_tables) where
    it matched, (its Proposal, greedy acceptances, sampling chances), the last two lists over its drafts j = 1, 2, ...
    while the drafts before j equal the sequence (past that the teacher-forced context is not the drafted one):
    greedy 1 where draft j is the true token, else 0; sampling p(draft j), the target's probability after
    `processors`, which is the chance speculative sampling accepts a one-hot draft."""
    T = sequence.shape[1]
    rows = target(sequence).logits[0].float()  # [T, V]: row i predicts token i+1
    p = processors(sequence, rows).softmax(-1)
    outcomes = []
    for m, proposal in enumerate(lookup_proposals(lookup, sequence, start), start):
        if not proposal.match:
            continue
        accepted = lookup_accepted(proposal, sequence, m)
        reachable = min(accepted + 1, len(proposal.tokens), T - 1 - m)  # drafts whose prefix held
        greedy = [float(j < accepted) for j in range(reachable)]
        chances = [float(p[m + j, proposal.tokens[j]]) for j in range(reachable)]
        outcomes.append((proposal, greedy, chances))
    return outcomes


def _chance(draft_logits, target_logits, positions, T, processors, sequence, vocab=None,
            argmax: bool = False) -> torch.Tensor:
    """Draft logits [R, k, Vd] for the tokens at `positions` [R, k] -> acceptance chances [R, k] (0 past T) of a
    draft sampled from them, or with `argmax` of their most likely token."""
    R, k, _ = draft_logits.shape
    p, q = _processed(draft_logits, target_logits, positions, T, processors, sequence, vocab)
    chance = p.gather(-1, q.argmax(-1, keepdim=True))[:, 0] if argmax else torch.minimum(p, q).sum(-1)
    return chance.view(R, k) * (positions < T)


def _processed(draft_logits, target_logits, positions, T, processors, sequence, vocab=None):
    """The target's and the drafter's distributions after `processors` for the tokens at `positions` [R, k]:
    p, q [R*k, Vd]. `vocab` [Vd]: the target ids of a drafter's sub-vocabulary (processed at its size, as
    generation does)."""
    rows = target_logits[(positions - 1).clamp(max=T - 1)].flatten(0, 1).float()  # [R*k, V]: predicted each token
    p = processors(sequence, rows).softmax(-1)
    q = processors(sequence, draft_logits.flatten(0, 1).float()).softmax(-1)  # [R*k, Vd]
    return (p[:, vocab] if vocab is not None else p), q


def _eagle_chains(eagle, sequence, hidden_states, start, steps) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's chains from every round start m (anchor m-1), fed the true tokens: draft-vocabulary logits
    [R, steps, Vd] and the positions [R, steps] of the tokens they draft (T and beyond: past the sequence)."""
    T = sequence.shape[1]
    n = T - 1  # context pairs (feature t, token t+1); round start m drafts from anchor m-1
    hidden = eagle.project(eagle.features(hidden_states)[:, :n])
    anchors = torch.arange(start - 1, T - 2, device=sequence.device)[None]  # [1, R]
    ttt = eagle.start_ttt(sequence[:, 1:], hidden, anchors)
    padded = torch.nn.functional.pad(sequence, (0, steps + 1))
    state, logits = hidden[:, anchors[0]], []
    for j in range(steps):
        step_logits, state = eagle(padded[:, anchors[0] + 1 + j], state, ttt=ttt)  # step j predicts token t+2+j
        logits.append(step_logits[0])
    positions = anchors[0][:, None] + 2 + torch.arange(steps, device=sequence.device)
    return torch.stack(logits, dim=1), positions


def _eagle_table(eagle, sequence, hidden_states, start, steps) -> torch.Tensor:
    logits, positions = _eagle_chains(eagle, sequence, hidden_states, start, steps)
    padded = torch.nn.functional.pad(sequence, (0, steps + 1))
    return leading_matches(eagle.to_target_ids(logits.argmax(-1)), padded[0, positions], positions < sequence.shape[1])


def _dflash_blocks(dflash, sequence, hidden_states, start, block_size, chunk: int = 32):
    """The blocks from every round start m, in chunks of `chunk` starts: logits [A, block_size-1, V] and the
    positions [A, block_size-1] of the tokens they draft."""
    T = sequence.shape[1]
    features = dflash.features(hidden_states)
    anchors = torch.arange(start, T - 1, device=sequence.device)
    offsets = torch.arange(1, block_size, device=sequence.device)
    for group in anchors.split(chunk):
        blocks = torch.cat([dflash.block_ids(sequence[:, a:a + 1], block_size) for a in group.tolist()], dim=1)
        hidden = dflash.forward_blocks(blocks, group[None], features).view(len(group), block_size, -1)
        yield dflash.logits(hidden[:, 1:]), group[:, None] + offsets


def _dflash_table(dflash, sequence, hidden_states, start, block_size) -> torch.Tensor:
    T = sequence.shape[1]
    padded = torch.nn.functional.pad(sequence, (0, block_size))
    return torch.cat([leading_matches(logits.argmax(-1), padded[0, positions], positions < T)
                      for logits, positions in _dflash_blocks(dflash, sequence, hidden_states, start, block_size)])


def walk(table: torch.Tensor, budget: int) -> list[int]:
    """Accepted drafts per round when one drafter drafts every round, from the first round start on."""
    accepted, m = [], 0
    while m < min(len(table), budget):
        accepted.append(int(table[m]))
        m += accepted[-1] + 1
    return accepted


def simulate_routing(hindsight: Hindsight, policy, latency, lengths: dict[str, int], epsilon: float = 0.0,
                     rng=None, routes: tuple[str, ...] | None = None):
    """Walk one greedy generation routed by `policy` (with probability `epsilon` a random route instead) over
    `routes` (default: every route in the tables), drafting `lengths` (route -> draft length, as
    WhiFlashAssistant.draft_lengths[mode]; lookup drafts its proposal up to that cap, and is offered only where
    it matched, as in generation; a round with no route offered is a plain target step), with the latency model
    standing in for measured round times. Returns one record per round: (RoundFeatures, chosen route,
    accepted drafts of every route at that round start, modelled seconds)."""
    routes = routes or tuple(hindsight.tables)
    state, records, m = RoutingState(routes), [], 0
    policy = policy.for_generation()
    while m < len(hindsight.entropy):
        match, proposed, corpus, expected = 0, 0, False, 0.0
        if LOOKUP in routes:
            match, proposed = int(hindsight.lookup_match[m]), int(hindsight.lookup_drafts[m])
            corpus, expected = bool(hindsight.lookup_corpus[m]), float(hindsight.lookup_expected[m])
        offer = offered({r: lengths[r] for r in routes}, proposed)
        features = state.features(float(hindsight.entropy[m]), float(hindsight.top1[m]), m + 1, match,
                                  offer.get(LOOKUP, 0), corpus, expected)
        # A shorter draft accepts min(a, k): its drafts are a prefix of the longer one's.
        accepted = {r: min(int(hindsight.tables[r][m]), offer.get(r, 0)) for r in routes}
        if not offer:  # nothing to draft: the target decodes one token
            records.append((features, TARGET, accepted, latency.verify_seconds(0)))
            state.record(TARGET, 0, records[-1][3])
            m += 1
            continue
        route = rng.choice(tuple(offer)) if epsilon and rng.random() < epsilon else policy.choose(features, offer)
        seconds = latency.round_seconds(route, offer[route])
        records.append((features, route, accepted, seconds))
        state.record(route, accepted[route], seconds)
        policy.observe(features, route, accepted[route], seconds)
        m += accepted[route] + 1
    return records
