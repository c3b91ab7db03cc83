"""WhiFlash inside `target.generate(assistant_model=WhiFlashAssistant(...))`.

One round, in data-flow order:
  target verify forward (transformers) -> features of the newly verified positions, queued in every
  drafter's LazyCatchUpCache -> router picks a drafter -> it absorbs its queue (K/V-only prefill)
  and drafts (EAGLE-3: a chain of k steps; DFlash: one block) -> candidates (+ draft logits when
  sampling) -> transformers verifies them (exact match, or speculative rejection sampling) ->
  `update_candidate_strategy` records the outcome for the statistics and the router.

transformers picks the candidate generator in the private `GenerationMixin._get_candidate_generator`
(there is no public registry), so we wrap that method once: it returns our generator when the
assistant is a WhiFlashAssistant and defers to transformers otherwise. `check_transformers_internals`
verifies everything we rely on and fails with a clear message if transformers changes it.
"""

import functools
import inspect
import json
import time
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import PreTrainedConfig
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.stopping_criteria import StopStringCriteria
from transformers.generation.utils import GenerationMixin

from .cache import LazyCatchUpCache
from .dflash import DFlashDrafter
from .eagle3 import Eagle3Drafter
from .routing import DFLASH, EAGLE, EntropyPolicy, NeuralPolicy, RoundFeatures, RoutingState, entropy_and_top1
from .stats import GenerationStats, Round
from .targets import text_config

TESTED_TRANSFORMERS = ("5.23.0", "5.24")  # [low, high)


def write_settings(folder: Path, eagle_steps: int, dflash_block_size: int | None, policy) -> None:
    """whiflash_config.json: the draft lengths and the routing policy of a WhiFlash folder."""
    settings = {"eagle_steps": eagle_steps, "dflash_block_size": dflash_block_size, "policy": policy.to_dict()}
    (Path(folder) / "whiflash_config.json").write_text(json.dumps(settings, indent=2) + "\n")


class WhiFlashAssistant(nn.Module):
    """EAGLE-3 and/or DFlash drafters bound to one target, plus the routing policy between them.

    With one drafter it runs that paradigm alone (our EAGLE-3-only and DFlash-only baselines).
    `eagle_steps` is the EAGLE-3 chain length, `dflash_block_size` the DFlash block (last verified
    token + block_size-1 drafts). `catch_up="eager"` absorbs every verified position into both
    drafters every round instead of lazily: a baseline for measuring what lazy catch-up saves.
    After each generate(), `stats` holds that generation's GenerationStats.
    """

    def __init__(self, target, eagle3: Eagle3Drafter | None = None, dflash: DFlashDrafter | None = None,
                 policy=None, *, eagle_steps: int = 6, dflash_block_size: int | None = None,
                 catch_up: str = "lazy"):
        super().__init__()
        if eagle3 is None and dflash is None:
            raise ValueError("WhiFlashAssistant needs at least one drafter: pass eagle3=..., dflash=... or both.")
        if catch_up not in ("lazy", "eager"):
            raise ValueError(f"catch_up must be 'lazy' or 'eager', got {catch_up!r}")
        if eagle_steps < 1 or (dflash_block_size is not None and dflash_block_size < 2):
            raise ValueError("eagle_steps must be >= 1 and dflash_block_size >= 2")
        check_transformers_internals()
        object.__setattr__(self, "target", target)  # not a submodule: the assistant never saves or moves it
        self.eagle3 = eagle3.attach(target) if eagle3 is not None else None
        self.dflash = dflash.attach(target) if dflash is not None else None
        self.policy = policy if policy is not None else EntropyPolicy()
        self.eagle_steps = eagle_steps
        self.dflash_block_size = dflash_block_size or (dflash.block_size if dflash is not None else None)
        self.catch_up = catch_up
        # generate() validates an assistant through its config: same vocabulary as the target.
        self.config = PreTrainedConfig(vocab_size=text_config(target).vocab_size, architectures=["WhiFlashAssistant"])
        self.stats = GenerationStats()
        install_generator_hook()

    @property
    def drafters(self) -> dict[str, nn.Module]:
        return {route: d for route, d in ((EAGLE, self.eagle3), (DFLASH, self.dflash)) if d is not None}

    @property
    def device(self) -> torch.device:
        return self.target.device

    # --- persistence: one folder with a Hub-format subfolder per drafter ----------------------------

    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        for route, drafter in self.drafters.items():
            drafter.save_pretrained(folder / route)
        if hasattr(self.policy, "save_pretrained"):
            self.policy.save_pretrained(folder / self.policy.to_dict()["folder"])
        write_settings(folder, self.eagle_steps, self.dflash_block_size, self.policy)
        return folder

    @classmethod
    def from_pretrained(cls, target, folder, *, routes: tuple[str, ...] | None = None, policy=None,
                        **overrides) -> "WhiFlashAssistant":
        """Load a WhiFlash folder: `eagle3/` and/or `dflash/` (Hub-format drafters) and `whiflash_config.json`
        (draft lengths and the routing policy). `routes` picks drafters (default: every one the folder has)."""
        folder = Path(folder)
        present = tuple(route for route in (EAGLE, DFLASH) if (folder / route).is_dir())
        missing = [route for route in routes or () if route not in present]
        if not present or missing:
            raise FileNotFoundError(f"{folder} has no {'/ or '.join(missing or (EAGLE, DFLASH))}/ drafter folder: "
                                    "a WhiFlash folder holds eagle3/ and/or dflash/ (see save_pretrained).")
        routes = routes or present
        settings_path = folder / "whiflash_config.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        eagle3 = Eagle3Drafter.from_pretrained(folder / EAGLE) if EAGLE in routes else None
        dflash = DFlashDrafter.from_pretrained(folder / DFLASH) if DFLASH in routes else None
        if policy is None:
            policy = policy_from_dict(settings.get("policy", {"type": "entropy"}), folder)
        kwargs = {k: settings[k] for k in ("eagle_steps", "dflash_block_size") if settings.get(k)} | overrides
        return cls(target, eagle3, dflash, policy, **kwargs)

    # --- the transformers hook calls this -----------------------------------------------------------

    def candidate_generator(self, model, generation_config, logits_processor,
                            tokenizer=None) -> "WhiFlashCandidateGenerator":
        if model is not self.target:
            raise ValueError(
                f"This WhiFlashAssistant is bound to {self.target.config.name_or_path!r}, not to the model whose "
                "generate() was called; build one for this model: WhiFlashAssistant(model, eagle3=..., dflash=...)."
            )
        return WhiFlashCandidateGenerator(self, generation_config, logits_processor, tokenizer)


def policy_from_dict(settings: dict, folder: Path):
    kind = settings.get("type", "entropy")
    if kind == "entropy":
        return EntropyPolicy(**{k: v for k, v in settings.items() if k != "type"})
    if kind == "neural":
        return NeuralPolicy.from_pretrained(folder / settings["folder"])
    raise ValueError(f"unknown routing policy type {kind!r} in {folder}/whiflash_config.json "
                     "(known: 'entropy', 'neural')")


class WhiFlashCandidateGenerator(CandidateGenerator):
    """One generate() call's drafting state: caches, routing statistics and timers."""

    requires_model_outputs = True

    def __init__(self, assistant: WhiFlashAssistant, generation_config, logits_processor, tokenizer=None):
        self.assistant = assistant
        self.drafters = assistant.drafters
        self.routes = tuple(self.drafters)
        self.caches = {route: LazyCatchUpCache() for route in self.routes}
        layers = sorted({i for d in self.drafters.values() for i in d.feature_layers})
        # Capture only the layers the drafters read, unless the user asked for all hidden states anyway.
        self.model_kwargs_overrides = {"output_hidden_states": True if generation_config.output_hidden_states else layers}
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor if logits_processor is not None and len(logits_processor) else None
        self.max_length = generation_config.max_length
        # transformers checks stop strings only at the end of each round; drafts that never complete one
        # make the round end exactly where plain generate() would stop.
        stop_strings = generation_config.stop_strings
        self.stop_strings = StopStringCriteria(tokenizer, stop_strings) if stop_strings and tokenizer else None
        self.policy = assistant.policy
        if hasattr(self.policy, "reset"):
            self.policy.reset()
        self.stats = assistant.stats = GenerationStats()
        device = assistant.device
        self.clock = functools.partial(_synchronized_clock, device) if device.type == "cuda" else time.perf_counter

        self.num_verified = 0  # positions whose target features have been queued
        self.prompt_length = None
        self.entropy, self.top1 = float("nan"), float("nan")
        self.routing = RoutingState(self.routes)
        self.round: Round | None = None
        self.round_features: RoundFeatures | None = None
        self.started = self.clock()

    # --- transformers calls these two, alternately ---------------------------------------------------

    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False,
                       n_last_matches=0, **kwargs):
        if input_ids.shape[0] != 1:
            raise ValueError("WhiFlash drafts for one sequence at a time (batch size 1), as transformers' "
                             "assisted generation does; call generate() once per prompt.")
        if is_first_iteration:  # no target features yet: let the target prefill the prompt
            self.prompt_length = input_ids.shape[1]
            return input_ids, None
        start = self.clock()
        self._queue_verified(input_ids, model_outputs)
        budget = self.max_length - input_ids.shape[1] - 1  # candidates beyond max_length would be wasted
        routing_started = self.clock()
        features = self.routing.features(self.entropy, self.top1, input_ids.shape[1] - self.prompt_length,
                                         {route: cache.pending_length for route, cache in self.caches.items()})
        route = self.policy.choose(features, self.routes) if budget > 0 else "target"
        if route != "target" and route not in self.routes:
            raise ValueError(f"routing policy chose {route!r}, but this assistant only has {self.routes}")
        self.round, self.round_features = Round(route, 0, 0, 0.0, 0.0, 0.0), features
        self.round.route_s = self.clock() - routing_started
        draft_ids, draft_logits = input_ids[:, :0], None
        if route == EAGLE:
            draft_ids, draft_logits = self._draft_eagle(input_ids, min(budget, self.assistant.eagle_steps))
        elif route == DFLASH:
            draft_ids, draft_logits = self._draft_dflash(input_ids, min(budget, self.assistant.dflash_block_size - 1))
        if self.stop_strings is not None:
            draft_ids, draft_logits = self._stop_before_stop_strings(input_ids, draft_ids, draft_logits)
        if self.assistant.catch_up == "eager":  # baseline: keep every idle drafter up to date too
            for other in self.routes:
                if other != route:
                    self._catch_up(other)
        self.round.drafted, self.round.draft_ids = draft_ids.shape[1], draft_ids[0].tolist()
        self.stats.in_flight = self.round
        self.verify_started = self.clock()
        self.round.draft_s = self.verify_started - start
        return torch.cat([input_ids, draft_ids], dim=1), draft_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        now = self.clock()
        # The distribution that produced the newest verified token: the router's entropy signal.
        self.entropy, self.top1 = entropy_and_top1(scores[0, int(num_matches)])
        if self.round is None:  # the prompt prefill
            self.stats.prefill_s = now - self.started
            return
        record, self.round, self.stats.in_flight = self.round, None, None
        record.accepted, record.verify_s = int(num_matches), now - self.verify_started
        self.stats.rounds.append(record)
        self.routing.record(record.route, record.accepted, record.seconds)
        if record.route != "target" and hasattr(self.policy, "observe"):
            self.policy.observe(self.round_features, record.route, record.accepted, record.seconds)

    # --- target features -> catch-up queues -----------------------------------------------------------

    def _queue_verified(self, input_ids, model_outputs) -> None:
        """Queue the positions verified since the last round: the first `new` of the verify window."""
        new = input_ids.shape[1] - 1 - self.num_verified
        hidden_states = model_outputs.hidden_states
        window = next(h for h in hidden_states if h is not None).shape[1]
        if new > window:
            raise ValueError(
                f"WhiFlash needs the target's hidden states for every position, but the first forward covered "
                f"{window} of {new} prompt tokens: a pre-filled past_key_values is not supported."
            )
        # Token t+1 goes with the feature of position t (EAGLE-3 pairs); DFlash reads the features only.
        next_ids = input_ids[:, self.num_verified + 1: self.num_verified + 1 + new]
        for route, drafter in self.drafters.items():
            self.caches[route].enqueue(next_ids, drafter.features(hidden_states, new))
        self.num_verified += new

    def _catch_up(self, route: str) -> None:
        """Absorb `route`'s queue with one batched K/V-only pass. EAGLE-3 keeps its newest pair queued:
        that pair goes through the full forward that drafts the first token."""
        start, cache, drafter = self.clock(), self.caches[route], self.drafters[route]
        keep = 1 if route == EAGLE else 0
        if cache.pending_length > keep:
            ids, features = cache.take_pending(keep_last=keep)
            if route == EAGLE:
                drafter.absorb(ids, drafter.project(features), cache)
            else:
                drafter.absorb(features, cache)
            self.round.caught_up += ids.shape[1]
        self.round.catch_up_s += self.clock() - start

    # --- drafting -----------------------------------------------------------------------------------

    def _draft_eagle(self, input_ids, steps: int):
        eagle, cache = self.drafters[EAGLE], self.caches[EAGLE]
        self._catch_up(EAGLE)
        next_ids, features = cache.take_pending()  # the newest verified pair: (feature m-1, token m)
        context = cache.get_seq_length() + 1  # its K/V are verified context and stay cached
        hidden = eagle.project(features)
        tokens, rows = [], []
        for _ in range(steps):
            draft_logits, h = eagle(next_ids, hidden, cache)  # [1, 1, draft_vocab], [1, 1, H]
            if self.logits_processor is None and not self.do_sample:
                token = eagle.to_target_ids(draft_logits[:, -1].argmax(-1, keepdim=True))
            else:
                token, row = self._pick(eagle.target_logits(draft_logits[:, -1]), input_ids, tokens)
                rows.append(row)
            tokens.append(token)
            next_ids, hidden = token, h
        cache.truncate(context)  # drafted positions' K/V: recomputed from target features once verified
        return torch.cat(tokens, dim=1), self._candidate_logits(rows)

    def _draft_dflash(self, input_ids, length: int):
        dflash, cache = self.drafters[DFLASH], self.caches[DFLASH]
        self._catch_up(DFLASH)
        hidden = dflash(dflash.block_ids(input_ids[:, -1:], length + 1), cache=cache)  # [1, length+1, H]
        logits = dflash.logits(hidden[:, 1:])  # [1, length, V]
        if self.logits_processor is None and not self.do_sample:
            return logits.argmax(-1), None
        tokens, rows = [], []
        for j in range(length):  # processors (penalties, top-p, ...) depend on the drafted prefix
            token, row = self._pick(logits[:, j], input_ids, tokens)
            tokens.append(token)
            rows.append(row)
        return torch.cat(tokens, dim=1), self._candidate_logits(rows)

    def _pick(self, logits, input_ids, drafted: list):
        """Process one draft distribution like the target's and pick from it -> token [1, 1], logits [1, V]."""
        logits = logits.float()
        if self.logits_processor is not None:
            prefix = torch.cat([input_ids, *drafted], dim=1) if drafted else input_ids
            logits = self.logits_processor(prefix, logits)
        if self.do_sample:
            return torch.multinomial(logits.softmax(-1), 1), logits
        return logits.argmax(-1, keepdim=True), logits

    def _stop_before_stop_strings(self, input_ids, draft_ids, draft_logits):
        """Cut the draft before its first token that completes a stop string."""
        k, window = draft_ids.shape[1], self.stop_strings.maximum_token_len
        if k == 0:
            return draft_ids, draft_logits
        sequence = torch.cat([input_ids[0, -window:], draft_ids[0]])
        # Left-pad short prompts with an out-of-vocabulary id, which StopStringCriteria matches to nothing.
        pad = sequence.new_full((max(0, window + k - sequence.shape[0]),), torch.iinfo(torch.long).max)
        tails = torch.cat([pad, sequence]).unfold(0, window, 1)[-k:]  # [k, window]: ending at each draft token
        completes = self.stop_strings(tails, None).nonzero()
        if completes.numel() == 0:
            return draft_ids, draft_logits
        keep = int(completes[0])
        return draft_ids[:, :keep], None if draft_logits is None else draft_logits[:, :keep]

    def _candidate_logits(self, rows: list):
        """Draft distributions [1, k, V] for speculative rejection sampling; greedy verification needs none."""
        return torch.stack(rows, dim=1) if self.do_sample else None


def _synchronized_clock(device) -> float:
    torch.cuda.synchronize(device)
    return time.perf_counter()


# --- the transformers hook ---------------------------------------------------------------------------

def install_generator_hook() -> None:
    """Wrap GenerationMixin._get_candidate_generator once: WhiFlash assistants get our generator."""
    original = GenerationMixin._get_candidate_generator
    if getattr(original, "_whiflash_original", None) is not None:
        return

    @functools.wraps(original)
    def _get_candidate_generator(self, *args, **kwargs):
        assistant = kwargs.get("assistant_model")
        if isinstance(assistant, WhiFlashAssistant):
            return assistant.candidate_generator(self, kwargs["generation_config"], kwargs["logits_processor"],
                                                 kwargs.get("target_tokenizer"))
        return original(self, *args, **kwargs)

    _get_candidate_generator._whiflash_original = original
    GenerationMixin._get_candidate_generator = _get_candidate_generator


# What `_assisted_decoding` must still do for WhiFlash to work unchanged (transformers 5.23).
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
    source = inspect.getsource(GenerationMixin._assisted_decoding)
    missing = [why for needle, why in ASSISTED_DECODING_NEEDS.items() if needle not in source]
    params = inspect.signature(original).parameters
    missing += [f"_get_candidate_generator takes {p!r}" for p in ("assistant_model", "generation_config",
                                                                   "logits_processor") if p not in params]
    if missing:
        low, high = TESTED_TRANSFORMERS
        raise RuntimeError(
            f"transformers {transformers.__version__} changed the generation internals WhiFlash relies on "
            f"({'; '.join(missing)}). Install a tested release (transformers>={low},<{high}) or update "
            "hf_whiflash/assistant.py."
        )


def transformers_is_tested() -> bool:
    low, high = TESTED_TRANSFORMERS
    return Version(low) <= Version(transformers.__version__) < Version(high)
