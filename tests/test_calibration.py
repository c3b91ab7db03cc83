"""Calibration: round costs measured once per machine and cached, and the draft lengths they make best."""

import json
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_whiflash import CheckpointError, DFlashDrafter, Eagle3Drafter, WhiFlashAssistant
from hf_whiflash import calibration
from hf_whiflash.calibration import DraftCut, best_length, calibrated_latency, describe
from hf_whiflash.latency import LatencyModel, _by_length, _interleaved_times
from hf_whiflash.names import DFLASH, EAGLE, GREEDY, SAMPLED, TARGET

from helpers import chat_ids, make_assistant

PROMPT = torch.tensor([[3, 8, 4, 9, 12, 5, 7]])


@pytest.fixture
def parts(tiny, tmp_path, monkeypatch):
    """The tiny target, its drafters with acceptance profiles, a fresh calibration cache, and a count of
    the measurements taken."""
    monkeypatch.setattr(calibration, "cache_dir", lambda: tmp_path / "cache" / "calibration")
    measured = []
    real_measure = LatencyModel.measure.__func__
    monkeypatch.setattr(LatencyModel, "measure", classmethod(
        lambda cls, *a, **kw: measured.append(1) or real_measure(cls, *a, **kw)))
    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    eagle = Eagle3Drafter.from_pretrained(tiny / "drafters" / "eagle3")
    dflash = DFlashDrafter.from_pretrained(tiny / "drafters" / "dflash")
    eagle.tokens_per_round = {GREEDY: {1: 1.6, 2: 1.9, 3: 2.0}, SAMPLED: {1: 1.5, 2: 1.7, 3: 1.8}}
    dflash.tokens_per_round = {GREEDY: {3: 1.5, 7: 1.6}, SAMPLED: {3: 1.4, 7: 1.45}}
    return target, eagle, dflash, measured, tmp_path / "cache" / "calibration"


def test_costs_are_measured_once_then_reused_and_remeasured_when_the_key_changes(parts):
    target, eagle, dflash, measured, cache = parts
    first = WhiFlashAssistant(target, eagle, dflash, lookup=False)
    assert len(measured) == 1 and len(list(cache.glob("*.json"))) == 1
    costs = first.latency
    assert set(costs.sampled_draft_s) == set(costs.draft_s) == {EAGLE, DFLASH} and costs.sample_row_s > 0
    assert costs.sample_draw_s > 0
    second = WhiFlashAssistant(target, eagle, dflash, lookup=False)
    assert len(measured) == 1 and second.latency == first.latency  # from the cache
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        WhiFlashAssistant(target, eagle, dflash, lookup=False)  # another thread count: other costs
    finally:
        torch.set_num_threads(threads)
    assert len(measured) == 2
    with torch.no_grad():
        eagle.fc.weight.mul_(1.5)  # other drafter weights: measured again
    WhiFlashAssistant(target, eagle, dflash, lookup=False)
    assert len(measured) == 3 and len(list(cache.glob("*.json"))) == 3


def test_a_torn_cache_file_is_measured_again_and_a_killed_write_keeps_the_old_one(parts, monkeypatch):
    target, eagle, dflash, measured, cache = parts
    assistant = WhiFlashAssistant(target, eagle, dflash, lookup=False)
    (path,) = cache.glob("*.json")
    path.write_text(path.read_text()[:40])  # what a non-atomic writer killed midway would leave
    with pytest.warns(UserWarning, match="damaged calibration cache entry"):
        calibrated_latency(assistant)
    assert len(measured) == 2 and json.loads(path.read_text())["latency"]
    good = path.read_text()

    def killed(self, text, *args, **kwargs):  # dies halfway through writing the replacement
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(type(path), "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        calibrated_latency(assistant, refresh=True)
    monkeypatch.undo()
    assert path.read_text() == good and [p.name for p in cache.iterdir()] == [path.name]


def test_costs_are_medians_of_shuffled_rounds_that_leave_out_first_calls_and_bursts():
    """A fake clock: each run's first call costs 3x (one-off kernel selection), and a burst slows the whole second
    timed round 5x. Only the untimed first round absorbs the first calls, so every median is the run's own cost."""
    now, calls, resets = [0.0], [], []

    def run(key):
        def call():
            burst = 5.0 if 16 <= len(calls) < 24 else 1.0  # calls 0-7: untimed round; 16-23: second timed round
            now[0] += 0.01 * (key + 1) * (3.0 if key not in calls else 1.0) * burst
            calls.append(key)
        return call

    times = _interleaved_times({k: run(k) for k in range(8)}, 3, lambda: now[0], reset=lambda: resets.append(1))
    assert {k: statistics.median(t) for k, t in times.items()} == pytest.approx({k: 0.01 * (k + 1) for k in range(8)})
    rounds = [tuple(calls[i:i + 8]) for i in range(0, 32, 8)]
    assert len(resets) == 32 and all(sorted(r) == list(range(8)) for r in rounds) and len(set(rounds)) > 1


def timings(median: float, spread: float) -> list[float]:
    return [median + spread * (i - 5.5) / 5.5 for i in range(12)]  # 12 timings evenly over median +- spread


def test_costs_follow_their_neighbours_trend_within_their_noise_and_keep_steps_beyond_it():
    """Medians that zigzag around a line by less than their timings' noise are pulled onto the line (both sides of
    a length choice then see the same slope); a step far beyond its noise, and the 1-token forward, keep theirs."""
    line = {k: 0.030 + 0.001 * k for k in range(9)}
    zigzag = {k: line[k] + (0.002 if k % 2 else -0.002) for k in range(1, 9)} | {0: 0.020}
    costs = _by_length({k: timings(m, 0.01) for k, m in zigzag.items()})
    assert costs[0] == pytest.approx(0.020)
    error = {k: abs(costs[k] - line[k]) for k in range(1, 9)}
    assert max(error.values()) < 0.0012 and sum(error.values()) < 0.25 * 0.002 * 8, error
    step = line | {3: 0.6 * line[3]}  # a 4-token verify far cheaper than 3 or 5 tokens: a kernel, not noise
    costs = _by_length({k: timings(m, 0.0005) for k, m in step.items()})
    assert costs[3] == pytest.approx(step[3])


def test_the_length_with_most_tokens_per_second_wins_and_none_when_plain_is_faster():
    costs = {"verify_s": {0: 0.050, 1: 0.100, 2: 0.105, 3: 0.060}, "draft_s": {EAGLE: {1: 0.01, 2: 0.02, 3: 0.03}}}
    latency = LatencyModel.from_dict(costs)
    profile = {1: 1.5, 2: 1.8, 3: 2.2}
    assert best_length(latency, EAGLE, profile) == 3  # a 4-token verify cheaper than 2 or 3 tokens (seen on CPUs)
    assert best_length(latency, EAGLE, {1: 1.5, 2: 1.8}) == 0  # 1.8 / 0.125 s < 1 / 0.05 s: plain is faster
    round_s, plain_rate = 0.06 + 0.03, 1 / 0.05
    assert best_length(latency, EAGLE, {3: round_s * plain_rate * 1.05}) == 0  # +5% promised: within the margin
    assert best_length(latency, EAGLE, {3: round_s * plain_rate * 1.15}) == 3


def test_a_sampled_round_processes_every_verified_row_and_draws_once():
    """transformers runs the processors on each of the k+1 verified rows, then speculative sampling draws one token
    for the round, as plain sampling draws one per token. Tables from before the draw was timed apart keep
    charging their row cost (which held it) on every row."""
    latency = LatencyModel({0: 0.030, 2: 0.040}, {EAGLE: {2: 0.004}}, {EAGLE: {2: 0.006}}, sample_row_s=0.001,
                           sample_draw_s=0.002)
    assert latency.verify_seconds(0, sampling=True) == pytest.approx(0.030 + 0.001 + 0.002)
    assert latency.verify_seconds(2, sampling=True) == pytest.approx(0.040 + 3 * 0.001 + 0.002)
    assert latency.round_seconds(EAGLE, 2, sampling=True) == pytest.approx(0.006 + 0.040 + 3 * 0.001 + 0.002)
    old = LatencyModel.from_dict({k: v for k, v in latency.to_dict().items() if k != "sample_draw_s"})
    assert old.verify_seconds(2, sampling=True) == pytest.approx(0.040 + 3 * 0.001)
    assert LatencyModel.from_dict(latency.to_dict()) == latency


def test_sampling_gets_its_own_length_where_processing_every_verified_row_costs_more():
    """Same acceptance, but sampling pays 10 ms a verified row (top-p sorts each) and more per draft step: a
    2-token chain pays in greedy, only 1 token in sampling."""
    latency = LatencyModel({k: 0.050 + 0.005 * k for k in range(4)}, {EAGLE: {k: 0.005 * k for k in (1, 2, 3)}},
                           {EAGLE: {k: 0.008 * k for k in (1, 2, 3)}}, sample_row_s=0.010)
    profile = {1: 1.6, 2: 1.9, 3: 2.0}
    assert best_length(latency, EAGLE, profile) == 2  # 1.9 / 70 ms
    assert best_length(latency, EAGLE, profile, sampling=True) == 1  # 1.6 / 83 ms > 1.9 / 106 ms > 1 / 60 ms * 1.1
    with pytest.raises(ValueError, match="no sampling costs"):  # a table from before sampling costs were measured
        best_length(LatencyModel(latency.verify_s, latency.draft_s), EAGLE, profile, sampling=True)


def test_calibrated_lengths_are_chosen_per_mode_and_saved_for_the_next_machine_to_choose(parts, tmp_path):
    target, eagle, dflash, _, _ = parts
    assistant = WhiFlashAssistant(target, eagle, dflash, lookup=False, dynamic_lengths=False)
    latency = assistant.latency
    expected = {mode: {route: best_length(latency, route, d.tokens_per_round[mode], mode == SAMPLED)
                       for route, d in assistant.drafters.items()} for mode in (GREEDY, SAMPLED)}
    assert assistant.calibrated == expected == assistant.draft_lengths and not assistant.dynamic_routes
    pinned = WhiFlashAssistant(target, eagle, dflash, lookup=False, eagle_steps=2, dynamic_lengths=False)
    assert pinned.draft_lengths[GREEDY][EAGLE] == pinned.draft_lengths[SAMPLED][EAGLE] == 2
    assert EAGLE not in pinned.calibrated[GREEDY] and EAGLE not in pinned.calibrated[SAMPLED]
    settings = json.loads((assistant.save_pretrained(tmp_path / "folder") / "whiflash_config.json").read_text())
    assert settings["eagle_steps"] is None and settings["dflash_block_size"] is None
    loaded = WhiFlashAssistant.from_pretrained(target, tmp_path / "folder", routes=(EAGLE, DFLASH),
                                              dynamic_lengths=False)
    assert loaded.drafters[EAGLE].tokens_per_round == eagle.tokens_per_round
    assert loaded.draft_lengths == assistant.draft_lengths


def test_by_default_calibrated_lengths_are_cut_per_round_and_set_ones_stay_fixed(parts, monkeypatch):
    """Where a drafter pays, the default drafts up to its longest profiled length and cuts each round by
    confidence; a length the user sets is drafted every round; a drafter that does not pay stays off."""
    target, eagle, dflash, _, _ = parts
    costs = LatencyModel({k: 0.050 + 0.001 * k for k in range(16)},
                         {EAGLE: {k: 0.003 * k for k in range(1, 16)}, DFLASH: {k: 0.5 for k in range(1, 16)}},
                         {EAGLE: {k: 0.004 * k for k in range(1, 16)}, DFLASH: {k: 0.5 for k in range(1, 16)}},
                         sample_row_s=0.001)
    monkeypatch.setattr("hf_whiflash.assistant.calibrated_latency", lambda *a, **kw: costs)
    adaptive = WhiFlashAssistant(target, eagle, dflash, lookup=False)  # DFlash's 0.5 s block never pays
    assert adaptive.dynamic_routes == {EAGLE, DFLASH}
    assert adaptive.draft_lengths == {GREEDY: {EAGLE: 3, DFLASH: 0}, SAMPLED: {EAGLE: 3, DFLASH: 0}}
    # The best fixed lengths, which the router weighs routes at: 1.9 tokens / 58 ms beats 2.0 / 62 ms and 1.6 / 54 ms.
    assert adaptive.fixed_lengths == {GREEDY: {EAGLE: 2, DFLASH: 0}, SAMPLED: {EAGLE: 2, DFLASH: 0}}
    assert describe(adaptive).startswith("greedy: EAGLE-3 chain 3 at most, cut per round by confidence (best fixed: "
                                         "EAGLE-3 chain 2, 1.90 tokens/round, 32.8 tok/s expected); dflash: no drafting")
    pinned = WhiFlashAssistant(target, eagle, dflash, lookup=False, eagle_steps=2)
    assert pinned.dynamic_routes == {DFLASH} and pinned.draft_lengths[GREEDY][EAGLE] == 2
    rounds = []
    for assistant in (adaptive, pinned):
        target.generate(PROMPT, max_new_tokens=40, do_sample=False, assistant_model=assistant)
        rounds.append({r.drafted for r in assistant.stats.rounds[:-2] if r.route == EAGLE})  # before the budget cuts
    assert rounds[0] <= {1, 2, 3} and rounds[0] != {3} and rounds[1] == {2}  # cut below the cap, or fixed


def test_greedy_and_sampled_generations_draft_their_own_mode_s_length(parts, monkeypatch):
    target, eagle, _, _, _ = parts
    costs = LatencyModel({k: 0.050 + 0.005 * k for k in range(16)}, {EAGLE: {k: 0.005 * k for k in range(1, 16)}},
                         {EAGLE: {k: 0.008 * k for k in range(1, 16)}}, sample_row_s=0.010)
    monkeypatch.setattr("hf_whiflash.assistant.calibrated_latency", lambda *a, **kw: costs)
    eagle.tokens_per_round = {GREEDY: {1: 1.6, 2: 1.9, 3: 2.0}, SAMPLED: {1: 1.6, 2: 1.9, 3: 2.0}}
    assistant = WhiFlashAssistant(target, eagle, lookup=False, dynamic_lengths=False)
    assert assistant.draft_lengths == {GREEDY: {EAGLE: 2}, SAMPLED: {EAGLE: 1}}
    drafted = {}
    for do_sample in (False, True):
        target.generate(PROMPT, max_new_tokens=12, do_sample=do_sample, assistant_model=assistant)
        # Before the last rounds, which the length budget may cut short.
        drafted[do_sample] = {r.drafted for r in assistant.stats.rounds[:-2] if r.route == EAGLE}
    assert drafted == {False: {2}, True: {1}}


def test_acceptance_by_confidence_is_saved_loaded_and_checked(parts, tmp_path):
    _, eagle, _, _, _ = parts
    eagle.acceptance_by_confidence = {GREEDY: [0.05 * i for i in range(10)], SAMPLED: [0.03 * i for i in range(10)]}
    folder = eagle.save_pretrained(tmp_path / "eagle3")
    loaded = Eagle3Drafter.from_pretrained(folder)
    assert all(loaded.acceptance_by_confidence[m] == pytest.approx(eagle.acceptance_by_confidence[m], abs=1e-4)
               for m in (GREEDY, SAMPLED))
    assert loaded.tokens_per_round == eagle.tokens_per_round
    data = json.loads((folder / "acceptance.json").read_text())
    data["acceptance_by_confidence"][SAMPLED] = [0.5] * 4  # not one chance per bin
    (folder / "acceptance.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="10 bins"):
        Eagle3Drafter.from_pretrained(folder)


def test_a_torn_acceptance_profile_or_one_without_sampling_is_a_clear_error(parts, tmp_path):
    _, eagle, _, _, _ = parts
    folder = eagle.save_pretrained(tmp_path / "eagle3")
    (folder / "acceptance.json").write_text(json.dumps({"tokens_per_round": {"1": 1.5, "2": 1.7}}))  # greedy only
    with pytest.raises(CheckpointError, match="rerun recipes/profile_acceptance.py"):
        Eagle3Drafter.from_pretrained(folder)


def test_a_machine_where_no_draft_pays_generates_plainly_and_identically(parts, monkeypatch):
    """Drafting lengths of 0 everywhere: every round is the target's own, output unchanged."""
    target, eagle, dflash, _, _ = parts
    slow = LatencyModel({0: 0.01, 15: 1.0}, {EAGLE: {1: 1.0}, DFLASH: {1: 1.0}}, {EAGLE: {1: 1.0}, DFLASH: {1: 1.0}},
                        sample_row_s=0.001)
    monkeypatch.setattr("hf_whiflash.assistant.calibrated_latency", lambda *a, **kw: slow)
    assistant = WhiFlashAssistant(target, eagle, dflash, lookup=False)
    assert assistant.draft_lengths == {GREEDY: {EAGLE: 0, DFLASH: 0}, SAMPLED: {EAGLE: 0, DFLASH: 0}}
    out = target.generate(PROMPT, max_new_tokens=20, do_sample=False, assistant_model=assistant)
    assert torch.equal(out, target.generate(PROMPT, max_new_tokens=20, do_sample=False))
    assert {r.route for r in assistant.stats.rounds} == {TARGET} and len(assistant.stats.rounds) == 19


def flat_costs() -> LatencyModel:
    """Verify 10 ms + 1 ms per extra token, EAGLE-3 steps 2 ms each, a DFlash block 5 ms whatever its size."""
    return LatencyModel({k: 0.010 + 0.001 * k for k in range(16)},
                        {EAGLE: {k: 0.002 * k for k in range(1, 16)}, DFLASH: {k: 0.005 for k in range(1, 16)}})


def test_a_confident_chain_goes_on_and_a_doubtful_one_stops():
    cut = DraftCut(flat_costs(), EAGLE, max_length=8)
    assert cut.more([0.95]) and cut.more([0.95, 0.9])
    assert not cut.more([0.2])  # one more step would cost more than the 4% chance it adds
    assert not cut.more([0.99] * 8)  # the cap
    assert cut.more([0.9, 0.9, 0.9]) and not cut.more([0.9, 0.9, 0.05])


def test_confidences_are_read_through_the_drafter_s_measured_acceptance():
    """A confident sampled draft that the dev set says is accepted 20% of the time stops the chain."""
    overconfident = [0.02, 0.05, 0.1, 0.1, 0.15, 0.15, 0.2, 0.2, 0.2, 0.2]  # by bin of confidence
    assert DraftCut(flat_costs(), EAGLE, max_length=8).more([0.95])
    cut = DraftCut(flat_costs(), EAGLE, max_length=8, by_confidence=overconfident)
    assert not cut.more([0.95])
    assert DraftCut(flat_costs(), DFLASH, 15, by_confidence=overconfident).keep([0.95] * 15) == 1
    assert DraftCut(flat_costs(), DFLASH, 15, by_confidence=[0.9] * 10).keep([0.01] * 15) == 12  # as 0.9 each


def test_a_block_is_cut_where_expected_tokens_per_second_peak():
    cut = DraftCut(flat_costs(), DFLASH, max_length=15)
    assert cut.keep([0.9] * 15) == 12  # a 13th adds 0.9^13 = 0.25 tokens for 1 ms: 7.71 / 28 ms < 7.46 / 27 ms
    assert cut.keep([0.9, 0.9, 0.1, 0.9, 0.9]) == 2  # after a doubtful third, the rest is almost surely rejected
    assert cut.keep([0.01] * 5) == 1  # at least one draft


@pytest.mark.parametrize("mode", ["eagle3", "whiflash"])
def test_dynamic_lengths_never_change_greedy_output(target, tokenizer, mode):
    assistant = make_assistant(target, mode, "trained", dynamic_lengths=True, eagle_steps=8)
    assert assistant.dynamic_routes == set(assistant.drafters)
    drafted = set()
    for prompt in ("Write a Python function that checks whether a number is prime.",
                   "What is the capital of France? Answer in one sentence."):
        ids = chat_ids(tokenizer, prompt)
        plain = target.generate(ids, max_new_tokens=48, do_sample=False)
        assert torch.equal(target.generate(ids, max_new_tokens=48, do_sample=False, assistant_model=assistant), plain)
        drafted |= {r.drafted for r in assistant.stats.rounds if r.drafted}  # EAGLE-3's and lookup's rounds
    assert len(drafted) > 1 and max(drafted) <= 8  # lengths vary per round, within the cap
