"""generate() features keep working with a WhiFlashAssistant on the real SmolLM2 target."""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_whiflash import WhiFlashAssistant
from hf_whiflash.hook import check_transformers_internals, transformers_is_tested
from helpers import RoutePattern, chat_ids, make_assistant, random_drafters

CODE = "Write a Python function that returns the n-th Fibonacci number iteratively."


def plain(target, ids, **kwargs):
    return target.generate(ids, do_sample=False, **kwargs)


def test_statistics_are_readable_after_generate(target, tokenizer):
    ids = chat_ids(tokenizer, CODE)
    reference = plain(target, ids, max_new_tokens=48)
    assistant = make_assistant(target, "whiflash", "scripted", reference=reference)
    target.generate(ids, max_new_tokens=48, do_sample=False, assistant_model=assistant)
    stats = assistant.stats
    assert stats.rounds and set(stats.routes) <= {"eagle3", "dflash", "lookup", "target"}
    assert sum(r.accepted + 1 for r in stats.rounds) == 48 - 1  # the prefill produced the first token
    assert all(0 <= r.accepted <= r.drafted == len(r.draft_ids) for r in stats.rounds)
    summary = stats.summary()
    assert summary["rounds"] == len(stats.rounds)
    for route, length in summary["acceptance_length_per_route"].items():
        rounds = [r for r in stats.rounds if r.route == route]
        assert length == pytest.approx(sum(r.accepted + 1 for r in rounds) / len(rounds))
    assert summary["draft_s"] > 0 and summary["verify_s"] > 0 and summary["prefill_s"] > 0
    assert 0 <= summary["catch_up_s"] <= summary["draft_s"]
    assert stats.to_dict()["rounds"][0]["route"] == stats.routes[0]


def test_eos_inside_an_accepted_run(target, tokenizer):
    ids = chat_ids(tokenizer, "What is 2 + 2? Reply with only the number.")
    reference = plain(target, ids, max_new_tokens=40)
    eos = target.generation_config.eos_token_id
    assert reference[0, -1] == eos and reference.shape[1] - ids.shape[1] < 15  # short answer, then EOS
    for mode in ("eagle3", "dflash"):
        # drafts of 15 tokens reach past the short answer, so EOS sits inside the accepted run
        assistant = make_assistant(target, mode, "scripted", reference=reference, perfect=True, eagle_steps=15)
        out = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=assistant)
        assert torch.equal(out, reference)
        last = assistant.stats.rounds[-1]
        assert eos in last.draft_ids[:-1], "EOS was drafted before the end of the run and cut there"


def test_stop_strings_stop_exactly_where_plain_generate_stops(target, tokenizer):
    ids = chat_ids(tokenizer, CODE)
    full = plain(target, ids, max_new_tokens=64)
    for stop in (["return"], ["\n"], [":\n"]):
        expected = plain(target, ids, max_new_tokens=64, stop_strings=stop, tokenizer=tokenizer)
        assert expected.shape[1] < full.shape[1]  # the stop string occurs
        for mode in ("eagle3", "dflash", "whiflash"):
            assistant = make_assistant(target, mode, "scripted", reference=full, perfect=True)
            out = target.generate(ids, max_new_tokens=64, do_sample=False, stop_strings=stop, tokenizer=tokenizer,
                                  assistant_model=assistant)
            assert torch.equal(out, expected), (stop, mode)


class StopAfterWord(StoppingCriteria):
    def __init__(self, tokenizer, word, prompt_length):
        self.tokenizer, self.word, self.prompt_length = tokenizer, word, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        text = self.tokenizer.decode(input_ids[0, self.prompt_length:])
        return torch.tensor([self.word in text])


def test_custom_stopping_criteria_are_honoured_every_round(target, tokenizer):
    ids = chat_ids(tokenizer, CODE)
    full = plain(target, ids, max_new_tokens=64)
    criteria = StoppingCriteriaList([StopAfterWord(tokenizer, "def", ids.shape[1])])
    expected = plain(target, ids, max_new_tokens=64, stopping_criteria=criteria)
    assistant = make_assistant(target, "dflash", "scripted", reference=full, perfect=True)
    out = target.generate(ids, max_new_tokens=64, do_sample=False, stopping_criteria=criteria,
                          assistant_model=assistant)
    # Like all of transformers' assisted generation, custom criteria see each round's end: the stop
    # happens in the same round, after the same tokens, at most one round's worth later.
    assert torch.equal(out[:, :expected.shape[1]], expected)
    assert out.shape[1] < full.shape[1]
    assert out.shape[1] - expected.shape[1] <= assistant.stats.rounds[-1].accepted


class Recorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], 0

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


def test_streamer_gets_tokens_in_order_none_twice(target, tokenizer):
    ids = chat_ids(tokenizer, CODE)
    reference = plain(target, ids, max_new_tokens=40)
    streamer = Recorder()
    assistant = make_assistant(target, "whiflash", "scripted", reference=reference)
    out = target.generate(ids, max_new_tokens=40, do_sample=False, streamer=streamer, assistant_model=assistant)
    assert streamer.chunks[0] == ids[0].tolist()  # the prompt first
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]
    assert streamed == out[0, ids.shape[1]:].tolist()
    assert max(len(c) for c in streamer.chunks[1:]) > 1  # whole accepted runs arrive at once
    assert streamer.ended == 1


def test_return_dict_in_generate_with_scores_logits_and_hidden_states(target, tokenizer):
    ids = chat_ids(tokenizer, CODE)
    kwargs = dict(max_new_tokens=24, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, output_hidden_states=True)
    expected = target.generate(ids, **kwargs)
    assistant = make_assistant(target, "whiflash", "scripted", reference=expected.sequences)
    out = target.generate(ids, assistant_model=assistant, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == 24
    new_tokens = out.sequences[0, ids.shape[1]:]
    assert torch.equal(torch.stack(out.scores).argmax(-1).flatten(), new_tokens)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-3, rtol=1e-4)
    assert len(out.hidden_states[0]) == target.config.num_hidden_layers + 1  # all layers, as asked


def test_greedy_with_logits_processors_is_lossless(target, tokenizer):
    ids = chat_ids(tokenizer, "Write a short poem about the sea.")
    kwargs = dict(max_new_tokens=48, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3,
                  min_new_tokens=40)
    expected = target.generate(ids, **kwargs)
    for mode in ("eagle3", "dflash", "whiflash"):
        for kind in ("random", "scripted"):
            assistant = make_assistant(target, mode, kind, reference=expected)
            assert torch.equal(target.generate(ids, assistant_model=assistant, **kwargs), expected), (mode, kind)


def test_sampling_with_top_k_1_reproduces_greedy(target, tokenizer):
    """Top-k 1 makes the target distribution a point mass: rejection sampling must then follow greedy."""
    ids = chat_ids(tokenizer, CODE)
    expected = plain(target, ids, max_new_tokens=32)
    for mode in ("eagle3", "dflash", "whiflash"):
        assistant = make_assistant(target, mode, "scripted", reference=expected)
        torch.manual_seed(0)
        out = target.generate(ids, max_new_tokens=32, do_sample=True, top_k=1, temperature=0.7,
                              assistant_model=assistant)
        assert torch.equal(out, expected), mode
        assert sum(r.accepted for r in assistant.stats.rounds) > 0


@pytest.mark.parametrize("mode", ["eagle3", "dflash", "whiflash"])
def test_sampling_parameters_run_through_drafts(target, tokenizer, mode):
    ids = chat_ids(tokenizer, "Tell me a story about a dragon.")
    assistant = make_assistant(target, mode, "random")
    torch.manual_seed(0)
    out = target.generate(ids, max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9, top_k=40,
                          repetition_penalty=1.2, assistant_model=assistant)
    assert out.shape == (1, ids.shape[1] + 24) and int(out.max()) < target.config.vocab_size
    assert sum(r.drafted for r in assistant.stats.rounds) > 0


def test_batch_size_above_one_raises_a_clear_error(target, tokenizer):
    ids = chat_ids(tokenizer, CODE).repeat(2, 1)
    with pytest.raises(ValueError, match="batch_size = 1"):
        target.generate(ids, max_new_tokens=4, assistant_model=make_assistant(target, "dflash", "random"))


def test_assistant_bound_to_another_model_raises(target, tokenizer):
    import copy

    other = copy.deepcopy(target)
    assistant = WhiFlashAssistant(target, dflash=random_drafters(target)[1])
    with pytest.raises(ValueError, match="bound to .* not to the model whose generate"):
        other.generate(chat_ids(tokenizer, CODE), max_new_tokens=4, assistant_model=assistant)


def test_constructor_rejects_bad_options(target):
    eagle, dflash = random_drafters(target)
    with pytest.raises(ValueError, match="at least one drafter"):
        WhiFlashAssistant(target, lookup=False)
    with pytest.raises(ValueError, match="catch_up"):
        WhiFlashAssistant(target, eagle, catch_up="sometimes")
    with pytest.raises(ValueError, match="eagle_steps"):
        WhiFlashAssistant(target, eagle, eagle_steps=0)
    with pytest.raises(TypeError, match="policy must be a hf_whiflash.Policy.*subclass Policy"):
        WhiFlashAssistant(target, eagle, policy=object())


def test_transformers_internals_are_pinned(monkeypatch):
    assert transformers_is_tested(), "transformers is outside the range pyproject.toml declares"
    check_transformers_internals()
    from transformers.generation.utils import GenerationMixin

    def changed_assisted_decoding(self, *args, **kwargs):  # a release that no longer passes model outputs
        return candidate_generator.get_candidates(input_ids)  # noqa: F821

    monkeypatch.setattr(GenerationMixin, "_assisted_decoding", changed_assisted_decoding)
    with pytest.raises(RuntimeError, match="changed the generation internals.*verify forward's outputs"):
        check_transformers_internals.__wrapped__()


def test_provenance_streamer_labels_every_token(target, tokenizer):
    from hf_whiflash.streaming import ProvenanceStreamer

    ids = chat_ids(tokenizer, CODE)
    reference = plain(target, ids, max_new_tokens=40)
    # A fixed route pattern: the entropy policy's choice depends on measured round times.
    assistant = make_assistant(target, "whiflash", "scripted", reference=reference,
                               policy=RoutePattern(["eagle3", "dflash"]))
    seen = []
    streamer = ProvenanceStreamer(assistant, lambda tokens, sources: seen.append((tokens, sources)))
    out = target.generate(ids, max_new_tokens=40, do_sample=False, streamer=streamer, assistant_model=assistant)
    assert [t for tokens, _ in seen for t in tokens] == out[0, ids.shape[1]:].tolist()
    assert seen[0][1] == ["target"]  # the prefill's token
    for (tokens, sources), round_ in zip(seen[1:], assistant.stats.rounds):
        assert sources[:round_.accepted] == [round_.route] * round_.accepted
        if len(tokens) > round_.accepted:
            assert sources[-1] == ("correction" if round_.accepted < round_.drafted else "target")
    assert {"eagle3", "dflash", "correction"} <= {s for _, sources in seen for s in sources}


def test_whiflash_folder_round_trip_and_errors(target, tmp_path):
    eagle, dflash = random_drafters(target)
    WhiFlashAssistant(target, eagle, dflash, eagle_steps=4, dflash_block_size=8).save_pretrained(tmp_path / "both")
    loaded = WhiFlashAssistant.from_pretrained(target, tmp_path / "both")
    assert (loaded.eagle_steps, loaded.dflash_block_size, set(loaded.drafters)) == (4, 8, {"eagle3", "dflash", "lookup"})
    only = WhiFlashAssistant.from_pretrained(target, tmp_path / "both", routes=("dflash",))
    assert set(only.drafters) == {"dflash"}
    WhiFlashAssistant(target, dflash=dflash).save_pretrained(tmp_path / "dflash-only")
    with pytest.raises(FileNotFoundError, match="has no eagle3/ drafter folder"):
        WhiFlashAssistant.from_pretrained(target, tmp_path / "dflash-only", routes=("eagle3",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a WhiFlash folder holds eagle3/ and/or dflash/"):
        WhiFlashAssistant.from_pretrained(target, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing does not exist .*no Hub repo id"):
        WhiFlashAssistant.from_pretrained(target, tmp_path / "missing")


# --- one assistant, several callers ------------------------------------------------------------------

def test_one_assistant_generates_in_two_threads_at_once(tiny):
    """Per-call state is per call: each thread's tokens, provenance stream and stats are its own."""
    import threading

    from transformers import AutoModelForCausalLM

    from hf_whiflash.streaming import ProvenanceStreamer

    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    assistant = WhiFlashAssistant.from_pretrained(target, tiny / "drafters", policy=RoutePattern(["eagle3", "dflash"]))
    prompts = [torch.tensor([[3, 8, 4, 9, 12, 5, 7]]), torch.tensor([[20, 6, 11, 3, 15]])]
    references = [plain(target, ids, max_new_tokens=32) for ids in prompts]
    results = {}

    def run(i):
        for _ in range(3):  # several generations each, so the two threads' rounds interleave
            streamed = []
            streamer = ProvenanceStreamer(assistant, lambda tokens, sources: streamed.append((tokens, sources)))
            out = target.generate(prompts[i], max_new_tokens=32, do_sample=False, assistant_model=assistant,
                                  streamer=streamer)
        results[i] = out, streamed, assistant.stats, streamer.stats

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, (out, streamed, stats, streamer_stats) in results.items():
        assert torch.equal(out, references[i])
        assert [t for tokens, _ in streamed for t in tokens] == out[0, prompts[i].shape[1]:].tolist()
        assert all(len(tokens) == len(sources) for tokens, sources in streamed)
        assert stats is streamer_stats and sum(r.accepted + 1 for r in stats.rounds) == 32 - 1
        assert [r.route for r in stats.rounds][:2] == ["eagle3", "dflash"]  # each call routes from its own start
    assert results[0][2] is not results[1][2]


def test_a_drafter_given_to_a_second_target_leaves_the_first_assistant_working(tiny):
    """attach() binds a copy when the drafter already serves another target: the first assistant keeps its
    dtype and embedding."""
    from transformers import AutoModelForCausalLM

    from hf_whiflash import DFlashDrafter, Eagle3Drafter

    first = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    second = AutoModelForCausalLM.from_pretrained(tiny / "target", dtype=torch.bfloat16).eval()
    eagle = Eagle3Drafter.from_pretrained(tiny / "drafters" / "eagle3")
    dflash = DFlashDrafter.from_pretrained(tiny / "drafters" / "dflash")
    assistant = WhiFlashAssistant(first, eagle, dflash, policy=RoutePattern(["eagle3", "dflash"]), eagle_steps=3)
    ids = torch.tensor([[3, 8, 4, 9, 12, 5, 7]])
    before = first.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=assistant)
    rounds_before = [(r.route, r.accepted) for r in assistant.stats.rounds]
    other = WhiFlashAssistant(second, assistant.eagle3, assistant.dflash)
    assert other.eagle3 is not assistant.eagle3 and other.dflash is not assistant.dflash
    assert other.eagle3.fc.weight.dtype == torch.bfloat16 and assistant.eagle3.fc.weight.dtype == torch.float32
    assert other.dflash.target_embedding is second.get_input_embeddings()
    assert assistant.dflash.target_embedding is first.get_input_embeddings()
    again = WhiFlashAssistant(first, assistant.eagle3, assistant.dflash)  # the same target: no copy needed
    assert again.eagle3 is assistant.eagle3
    after = first.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=assistant)
    assert torch.equal(after, before) and [(r.route, r.accepted) for r in assistant.stats.rounds] == rounds_before


def test_non_finite_draft_probabilities_name_the_drafter(tiny):
    from transformers import AutoModelForCausalLM

    from hf_whiflash import Eagle3Drafter

    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    eagle = Eagle3Drafter.from_pretrained(tiny / "drafters" / "eagle3")
    with torch.no_grad():
        eagle.lm_head.weight.fill_(float("nan"))
    assistant = WhiFlashAssistant(target, eagle)
    with pytest.raises(FloatingPointError, match="drafter produced non-finite draft probabilities"):
        target.generate(torch.tensor([[3, 8, 4]]), max_new_tokens=8, do_sample=True, assistant_model=assistant)


def test_the_readme_snippet_runs_as_written(target, capsys):
    """The first Python block of README.md, executed unchanged: a new user's first step must work."""
    from readme_quickstart import quickstart

    namespace = {}
    exec(compile(quickstart(), "README.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert "acceptance_length" in capsys.readouterr().out
