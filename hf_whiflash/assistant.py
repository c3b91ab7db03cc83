"""WhiFlashAssistant: what a user passes as `target.generate(assistant_model=...)`.

It binds EAGLE-3 and/or DFlash drafters to one target, holds the draft lengths and the routing policy
(one source for every part that reads them: the generator, bench, the recipes), loads and saves a
WhiFlash folder, and builds one WhiFlashCandidateGenerator per generate() call (see generator.py;
hook.py is how transformers gets to it).
"""

import json
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedConfig

from .calibration import best_length, calibrated_latency
from .checkpoint import (push_folder, read_json_object, replace_folder_atomically, resolve_folder,
                         write_text_atomically, writer_lock)
from .drafters import DFlashDrafter, Eagle3Drafter, LookupDrafter
from .generator import WhiFlashCandidateGenerator
from .hook import check_transformers_internals, install_generator_hook
from .kernels import PackedLinears
from .names import DFLASH, EAGLE, GREEDY, LOOKUP, MODE_ROUTES, NEURAL_ROUTES, SAMPLED, SETTINGS_FILE
from .routing import EntropyPolicy, NeuralPolicy, Policy
from .settings import Rule, SettingsError, check, integer, json_object
from .stats import GenerationStats
from .targets import shipped_drafters, text_config


# The draft lengths a user or whiflash_config.json may set (None: calibrated, or the default).
LENGTH_RULES = {"eagle_steps": integer(1, unset=True), "dflash_block_size": integer(2, unset=True)}


def write_settings(folder: Path, eagle_steps: int, dflash_block_size: int | None, policy: Policy) -> None:
    """whiflash_config.json: the draft lengths and the routing policy of a WhiFlash folder."""
    settings = {"eagle_steps": eagle_steps, "dflash_block_size": dflash_block_size, "policy": policy.to_dict()}
    write_text_atomically(Path(folder) / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")


class WhiFlashAssistant(nn.Module):
    """EAGLE-3, DFlash and lookup drafters bound to one target, plus the routing policy between them.

    `lookup`: True (default) adds a lookup drafter with default settings (drafters/lookup.py: it proposes
    what followed an earlier occurrence of the text's last few tokens; no weights), a LookupDrafter uses that
    one, False none. With one drafter it runs that paradigm alone (our EAGLE-3-only, DFlash-only and
    lookup-only baselines: `WhiFlashAssistant(target, eagle3=..., lookup=False)`).
    `eagle_steps` is the EAGLE-3 chain length, `dflash_block_size` the DFlash block (last verified
    token + block_size-1 drafts). Left unset, each is chosen for this machine when the drafter ships an
    acceptance profile: the length with the most expected tokens per second of round cost measured here
    (calibration.py; under a minute once, then cached), or no drafting with that drafter at all when
    plain decoding is faster; without a profile, a chain of 6 and the drafter's own block size. Greedy and
    sampling generations get their own choice (`draft_lengths[mode]`): sampling accepts fewer drafts and
    pays for the target's processors on every verified row.
    `catch_up="eager"` absorbs every verified position into both
    drafters every round instead of lazily: a baseline for measuring what lazy catch-up saves.
    `pack_weights`: on CPU, WhiFlash generations compute the Linear layers of the target and the drafters
    from weight copies packed for oneDNN (kernels.py: verifying several tokens then costs little more than
    one); None packs where a probe on this machine says it is faster, False saves the copies' memory.
    `dynamic_lengths`: whether each round's draft is cut where the drafter's own confidence says verifying
    more would lower the expected tokens per second of this machine's round costs (calibration.DraftCut).
    None (default): for every drafter whose length is calibrated (a calibrated EAGLE-3 chain then runs up to
    its longest profiled length; a length you set stays fixed); True: for every drafter, the lengths you set
    being caps; False: never (calibrated lengths: the one best fixed length).
    After a generate(), `stats` holds that generation's GenerationStats (per thread: generations in
    other threads, even with this same assistant, keep their own).
    Beam search (num_beams > 1) is not speculative: transformers then runs its own beam search without the
    assistant (logging a warning), so the output is plain beam search's, at plain speed.
    """

    def __init__(self, target, eagle3: Eagle3Drafter | None = None, dflash: DFlashDrafter | None = None,
                 policy: Policy | None = None, *, lookup: LookupDrafter | bool = True, eagle_steps: int | None = None,
                 dflash_block_size: int | None = None, catch_up: str = "lazy", pack_weights: bool | None = None,
                 dynamic_lengths: bool | None = None):
        super().__init__()
        if not isinstance(lookup, (bool, LookupDrafter)):
            raise TypeError(f"lookup must be True, False or a hf_whiflash.LookupDrafter, got {type(lookup).__name__}")
        if eagle3 is None and dflash is None and not lookup:
            raise ValueError("WhiFlashAssistant needs at least one drafter: pass eagle3=..., dflash=... or lookup=True.")
        if catch_up not in ("lazy", "eager"):
            raise ValueError(f"catch_up must be 'lazy' or 'eager', got {catch_up!r}")
        check({"eagle_steps": eagle_steps, "dflash_block_size": dflash_block_size}, LENGTH_RULES, "WhiFlashAssistant")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a hf_whiflash.Policy (choose(features, lengths), optionally observe and "
                            f"for_generation), got {type(policy).__name__}: subclass Policy")
        check_transformers_internals()
        object.__setattr__(self, "target", target)  # not a submodule: the assistant never saves or moves it
        self.eagle3 = eagle3.attach(target) if eagle3 is not None else None
        self.dflash = dflash.attach(target) if dflash is not None else None
        self.lookup = (LookupDrafter() if lookup is True else lookup).attach(target) if lookup else None
        self.policy = policy if policy is not None else EntropyPolicy()
        self.catch_up = catch_up
        self.kernels = PackedLinears([target, *(d for d in self.drafters.values() if isinstance(d, nn.Module))],
                                     pack_weights)
        self.latency = None  # this machine's round costs, when the lengths or the policy need them
        self.calibrated: dict[str, dict[str, int]] = {}  # mode -> route -> fixed draft length chosen by calibration
        self._set_draft_lengths(eagle_steps, dflash_block_size, dynamic_lengths)
        # generate() validates an assistant through its config: same vocabulary as the target.
        self.config = PreTrainedConfig(vocab_size=text_config(target).vocab_size, architectures=["WhiFlashAssistant"])
        self._per_thread = threading.local()  # each thread's newest GenerationStats
        install_generator_hook()

    def _set_draft_lengths(self, eagle_steps: int | None, dflash_block_size: int | None,
                           dynamic_lengths: bool | None) -> None:
        """Lengths given win; unset ones are calibrated per decoding mode for drafters with an acceptance profile,
        else defaulted (a chain of 6, the drafter's own block). See the class docstring for `dynamic_lengths`."""
        unset = {EAGLE: eagle_steps is None, DFLASH: dflash_block_size is None, LOOKUP: True}
        profiles = {route: d.tokens_per_round for route, d in self.drafters.items()
                    if unset[route] and d.tokens_per_round}
        # The drafters whose draft is cut per round by confidence; the others draft their length every round.
        if dynamic_lengths is None:
            self.dynamic_routes = frozenset(profiles)  # the calibrated ones
        else:
            self.dynamic_routes = frozenset(self.drafters if dynamic_lengths else ())
        if profiles or self.policy.needs_costs or self.dynamic_routes:  # the per-round cut weighs costs too
            self.latency = calibrated_latency(self)
            self.policy.use_costs(self.latency)
        self.calibrated = {mode: {route: best_length(self.latency, route, profile[mode], mode == SAMPLED)
                                  for route, profile in profiles.items()} for mode in (GREEDY, SAMPLED)}
        # The fixed settings (None: calibrated), which save_pretrained writes.
        self.eagle_steps = None if EAGLE in profiles else eagle_steps or 6
        block = self.dflash.block_size if self.dflash is not None else None
        self.dflash_block_size = None if DFLASH in profiles else dflash_block_size or block
        fixed = {EAGLE: self.eagle_steps, DFLASH: (self.dflash_block_size or 0) - 1,
                 LOOKUP: self.lookup.max_drafts if self.lookup is not None else 0}
        # Mode -> route -> tokens drafted per round at a fixed length (0: it never drafts): what the router weighs
        # each route's round at.
        self.fixed_lengths = {mode: {route: chosen.get(route, fixed[route]) for route in self.drafters}
                              for mode, chosen in self.calibrated.items()}
        # Mode -> route -> the most tokens a round drafts, before the length budget cuts it: the one source of truth
        # for the generator, bench and recipes. A calibrated chain cut per round may run to its longest profiled
        # length, and lookup to its longest proposal; a DFlash block, drafted whole whatever the cut keeps, stays at
        # its fixed size.
        stretched = self.dynamic_routes & {EAGLE, LOOKUP} & profiles.keys()
        self.draft_lengths = {mode: {route: max(profiles[route][mode]) if k and route in stretched else k
                                     for route, k in lengths.items()} for mode, lengths in self.fixed_lengths.items()}

    @property
    def drafters(self) -> dict:
        """Route -> drafter: the neural ones (nn.Module) and the LookupDrafter, each with new_cache/catch_up/draft."""
        return {route: d for route, d in ((EAGLE, self.eagle3), (DFLASH, self.dflash), (LOOKUP, self.lookup))
                if d is not None}

    @property
    def feature_layers(self) -> list[int]:
        """The target hidden_states indices the drafters read: the only ones the target's forward captures."""
        return sorted({i for d in self.drafters.values() for i in d.feature_layers})

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def stats(self) -> GenerationStats:
        """The newest generate() of the calling thread with this assistant (empty before the first)."""
        return getattr(self._per_thread, "stats", None) or GenerationStats()

    # --- persistence: one folder with a Hub-format subfolder per drafter ----------------------------

    def save_pretrained(self, folder) -> Path:
        """Write `folder` as one unit: built in a temporary sibling, then put in place of an existing folder whole
        (replace_folder_atomically), so that a reader, or a save killed at any point, sees the old folder or the
        new one, never a mix. An existing folder is replaced only if it is empty or a WhiFlash folder."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with writer_lock(folder.parent):
            check_replaceable(folder)
            replace_folder_atomically(folder, self._write_parts)
        return folder

    def _write_parts(self, folder: Path) -> None:
        for route, drafter in self.drafters.items():
            drafter.save_pretrained(folder / route)
        if hasattr(self.policy, "save_pretrained"):
            self.policy.save_pretrained(folder / self.policy.to_dict()["folder"])
        # Calibrated lengths belong to this machine: the folder leaves them (None) to be calibrated where it is used.
        write_settings(folder, self.eagle_steps, self.dflash_block_size, self.policy)

    def push_to_hub(self, repo_id: str, *, token=None, private: bool | None = None, model_card: str | None = None,
                    commit_message: str = "Upload WhiFlash assistant") -> str:
        """Upload the folder save_pretrained writes; `from_pretrained(target, repo_id)` loads it back."""
        return push_folder(self.save_pretrained, repo_id, token=token, private=private, model_card=model_card,
                           commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, target, folder_or_hub_id, *, routes: tuple[str, ...] | None = None,
                        policy: Policy | None = None, revision: str | None = None, token=None,
                        **overrides) -> "WhiFlashAssistant":
        """Load a WhiFlash folder, local or a Hub repo: `eagle3/` and/or `dflash/` (Hub-format drafters), optionally
        `lookup/` (the lookup drafter's settings and acceptance profile; without it, lookup's defaults) and
        `whiflash_config.json` (draft lengths and the routing policy). `routes` picks drafters (default: every
        one the folder has, and lookup). Every setting is checked here, with the constructor's rules (LENGTH_RULES,
        EntropyPolicy.rules): errors name the file, the key, the value and what is allowed."""
        folder = resolve_folder(folder_or_hub_id, revision, token)
        present = tuple(route for route in NEURAL_ROUTES if (folder / route).is_dir())
        missing = [route for route in routes or () if route not in (*present, LOOKUP)]
        if not present or missing:
            raise FileNotFoundError(f"{folder} has no {'/ or '.join(missing or NEURAL_ROUTES)}/ drafter folder: "
                                    "a WhiFlash folder holds eagle3/ and/or dflash/ (see save_pretrained).")
        routes = routes or (*present, LOOKUP)
        settings = read_settings(folder)
        eagle3 = Eagle3Drafter.from_pretrained(folder / EAGLE) if EAGLE in routes else None
        dflash = DFlashDrafter.from_pretrained(folder / DFLASH) if DFLASH in routes else None
        lookup = False if LOOKUP not in routes else True  # True: lookup with its default settings
        if lookup and (folder / LOOKUP).is_dir():
            lookup = LookupDrafter.from_pretrained(folder / LOOKUP)
        if policy is None:
            policy = policy_from_dict(settings.get("policy", {"type": "entropy"}), folder)
        kwargs = {k: settings[k] for k in LENGTH_RULES if settings.get(k) is not None} | overrides
        return cls(target, eagle3, dflash, policy, lookup=lookup, **kwargs)

    # --- the transformers hook (hook.py) calls these once per generate() ----------------------------

    def whiflash_kernels(self):
        """The context the whole assisted generation runs in: packed Linear weights where they pay."""
        return self.kernels.active()

    def whiflash_candidate_generator(self, model, generation_config, logits_processor,
                                     tokenizer=None) -> WhiFlashCandidateGenerator:
        if model is not self.target:
            raise ValueError(
                f"This WhiFlashAssistant is bound to {self.target.config.name_or_path!r}, not to the model whose "
                "generate() was called; build one for this model: WhiFlashAssistant(model, eagle3=..., dflash=...)."
            )
        self._per_thread.stats = stats = GenerationStats()
        return WhiFlashCandidateGenerator(self, stats, generation_config, logits_processor, tokenizer)


def check_replaceable(folder: Path) -> None:
    """save_pretrained replaces a folder whole: refuse one that holds anything but a WhiFlash folder."""
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / SETTINGS_FILE).is_file())):
        raise FileExistsError(f"{folder} exists and is not a WhiFlash folder (no {SETTINGS_FILE}); save_pretrained "
                              "replaces the folder whole: choose a new or empty folder, or remove this one.")


def read_settings(folder: Path) -> dict:
    """whiflash_config.json, its draft lengths checked ({} without one: lengths unset, the entropy policy)."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return {}
    settings = read_json_object(path)
    check({k: settings[k] for k in LENGTH_RULES if k in settings}, LENGTH_RULES, str(path))
    return settings


# whiflash_config.json's "policy" of type "neural": the subfolder that holds the trained router.
NEURAL_RULES = {"folder": Rule("the name of the subfolder that holds the trained router",
                               lambda v: isinstance(v, str) and bool(v))}


def policy_from_dict(settings: dict, folder: Path) -> Policy:
    """The routing policy whiflash_config.json's "policy" describes, checked with the constructor's rules."""
    where = f"{folder / SETTINGS_FILE}: policy"
    settings = dict(json_object(settings, where))
    kind = settings.pop("type", "entropy")
    if kind == "entropy":
        return EntropyPolicy(**check(settings, EntropyPolicy.rules, where))
    if kind == "neural":
        if "folder" not in settings:
            raise SettingsError(f"{where}: folder is missing; expected {NEURAL_RULES['folder'].allowed}")
        return NeuralPolicy.from_pretrained(folder / check(settings, NEURAL_RULES, where)["folder"])
    raise SettingsError(f"{where}: type = {kind!r} is not allowed; expected 'entropy' or 'neural'")


def build_assistant(target, target_name: str, mode: str = "whiflash", drafters: str | None = None,
                    policy: Policy | None = None, **overrides) -> WhiFlashAssistant:
    """WhiFlashAssistant from the `drafters` folder or Hub repo, else the drafters shipped for the target, else an
    error saying how to train them. `mode` picks the drafters (MODE_ROUTES); `policy` the router
    (default: the folder's own, or the entropy policy); `overrides`: eagle_steps, dflash_block_size."""
    routes = MODE_ROUTES[mode]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    folder = drafters or shipped_drafters(target_name)
    if folder is None:
        raise FileNotFoundError(
            f"no trained drafters for {target_name!r}: pass --drafters FOLDER (a WhiFlash folder or Hub repo), or "
            "train them for this target with the recipes: recipes/README.md walks through data, both drafters and "
            "the router (a few hours on a 2-core CPU for a 135M target).")
    return WhiFlashAssistant.from_pretrained(target, folder, routes=routes, policy=policy, **overrides)
