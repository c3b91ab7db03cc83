"""EAGLE-3 drafter (arXiv 2503.01840): one decoder layer over fused target features, in the published Hub layout.

One step at position t reads the pair (hidden state of token t, embedding of token t+1) and predicts
token t+2. The hidden state is either the target's fused features `fc(low|mid|high)` (positions the
target has verified) or the drafter's own pre-norm output of the previous step (drafted positions).

Weights (no prefix): fc [H, 3*Ht]; midlayer.{hidden_norm,input_layernorm,post_attention_layernorm};
midlayer.self_attn.{q,k,v}_proj [*, 2H] and o_proj; midlayer.mlp.*; norm; lm_head [draft_vocab, H];
buffers d2t [draft_vocab] int64 (target id = draft id + d2t[draft id]) and t2d [vocab] bool, absent from
heads whose draft vocabulary is the whole vocabulary; optional embed_tokens (otherwise the target's
embedding is used); with `fc_norm` (SpecForge's EAGLE 3.1) fc_norm.{0,1,2} [Ht].
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from ..cache import LazyCatchUpCache
from ..checkpoint import CheckpointError, DrafterConfig, HubMixin
from ..settings import boolean, integer, integers
from ..targets import IncompatibleDrafterError, drafter_fields, text_config
from .layers import GatedMLP, RMSNorm, Rotary, apply_rope, attend, bind, causal_mask, init_weights, positions_from

LAYER_IDS = "eagle_aux_hidden_state_layer_ids"


def default_feature_layers(num_target_layers: int) -> list[int]:
    """hidden_states indices (inputs of decoder layers 2, L/2, L-3): low, mid and high features."""
    return [2, num_target_layers // 2, num_target_layers - 3]


class Eagle3Config(DrafterConfig):
    """Llama config.json of an EAGLE-3 head (`LlamaForCausalLM` or `LlamaForCausalLMEagle3`; we never dispatch on it).

    Published variants it reads: SpecForge's `fc_norm` (EAGLE 3.1: an RMSNorm on each captured layer's features
    before `fc`) and `norm_output: false` (logits from the pre-norm state, no final norm); vLLM's
    `norm_before_residual` (the residual stream starts from hidden_norm(hidden) instead of hidden).
    """

    rules = DrafterConfig.rules | {
        "num_hidden_layers": integer(1), "draft_vocab_size": integer(1, unset=True),
        "target_hidden_size": integer(1, unset=True), LAYER_IDS: integers(0, unset=True),
        "fc_norm": boolean(unset=True), "norm_output": boolean(unset=True),
        "norm_before_residual": boolean(unset=True), "norm_before_fc": boolean(unset=True)}
    nested_rules = {"eagle_config": {LAYER_IDS: integers(0, unset=True), "use_aux_hidden_state": boolean(unset=True),
                                     "norm_before_fc": boolean(unset=True)}}

    def __init__(self, raw: dict, source: str = "config.json"):
        super().__init__(raw, source)
        eagle_config = self.raw.pop("eagle_config", None) or {}
        for where, flags in (("", self.raw), ("eagle_config.", eagle_config)):
            if flags.get("norm_before_fc"):
                raise CheckpointError(f"{source}: {where}norm_before_fc = true (one RMSNorm over the concatenated "
                                      "target features before fc) is not supported; fc_norm (one per layer) is.")
        if eagle_config.get("use_aux_hidden_state") is False:
            raise CheckpointError(f"{source}: eagle_config.use_aux_hidden_state = false is a head over one target "
                                  "hidden state without fc, not an EAGLE-3 head; use an EAGLE-3 head.")
        layers = self._read_feature_layers(self.raw.pop(LAYER_IDS, None), eagle_config.pop(LAYER_IDS, None), source)
        if layers is not None:
            self.raw[LAYER_IDS] = layers  # the one copy: engines' keys are written from it (to_dict)
        if eagle_config:
            self.raw["eagle_config"] = eagle_config

    @staticmethod
    def _read_feature_layers(top: list[int] | None, nested: list[int] | None, source: str) -> list[int] | None:
        """hidden_states indices from either key engines read. The top-level ids are hidden_states indices (vLLM
        captures the stream entering layer i); eagle_config's are decoder layers whose OUTPUT is read (SpecForge
        writes them, SGLang captures the stream entering layer i + 1). Both present must name the same layers."""
        outputs = None if nested is None else [i + 1 for i in nested]
        if top is not None and outputs is not None and top != outputs:
            raise CheckpointError(
                f"{source}: {LAYER_IDS} {top} (read by vLLM as hidden_states indices) and eagle_config.{LAYER_IDS} "
                f"{nested} (read by SGLang and SpecForge as layer outputs, hidden_states {outputs}) name different "
                "target layers, so engines would feed the head different features. Keep the key the head was "
                "trained with and remove the other.")
        return outputs if outputs is not None else top

    @property
    def feature_layers(self) -> list[int] | None:
        """hidden_states indices the head reads (low | mid | high); None: the default for the target's depth."""
        return self.raw.get(LAYER_IDS)

    @property
    def draft_vocab_size(self) -> int:
        return self.raw.get("draft_vocab_size") or self.vocab_size

    @property
    def target_hidden_size(self) -> int:
        return self.raw.get("target_hidden_size") or self.hidden_size

    @property
    def fc_norm(self) -> bool:
        return bool(self.raw.get("fc_norm"))

    @property
    def norm_output(self) -> bool:
        return self.raw.get("norm_output") is not False

    @property
    def norm_before_residual(self) -> bool:
        return bool(self.raw.get("norm_before_residual"))

    def to_dict(self) -> dict:
        """The config.json we save: the fields as read plus every field vLLM's and SGLang's EAGLE-3 loaders read,
        the layer ids under both keys, each in its engine's convention."""
        saved = super().to_dict() | {
            "architectures": ["LlamaForCausalLMEagle3"],  # SGLang dispatches on it; vLLM maps it to its EAGLE-3 head
            "num_hidden_layers": 1, "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size, "norm_before_residual": self.norm_before_residual}
        if self.feature_layers is not None:  # else unknown until attach; engines then pick the same default
            saved["eagle_config"] = saved.get("eagle_config", {}) | {
                "use_aux_hidden_state": True, LAYER_IDS: [i - 1 for i in self.feature_layers]}
        return saved


class Eagle3Attention(nn.Module):
    """Causal attention whose queries, keys and values read the 2H-wide [embedding | hidden] input."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        width, bias = 2 * config.hidden_size, config.get("attention_bias", False)
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def key_values(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, 2H] -> k, v [B, kv_heads, T, D], k rotated."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, cache=None, ttt: "TrainingTimeTest | None" = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k, v = self.key_values(x, cos, sin)
        if ttt is not None:  # step 0 reads the verified context; steps >= 1 add the anchor's own drafted keys
            if ttt.step:
                ttt.drafted.append((k, v))
            return self.o_proj(attend_drafted(q, ttt.context, ttt.drafted, ttt.anchors))
        if cache is not None:
            k, v = cache.update(k, v, 0)
        mask = causal_mask(T, k.shape[2], x.device) if T > 1 else None
        return self.o_proj(attend(q, k, v, mask))


@dataclass
class TrainingTimeTest:
    """One training-time-test unroll: every anchor t in `anchors` [B, R] drafts steps 0, 1, ... at once.

    `context` holds the K/V of every position from the target's features (what the chain sees as
    verified context); step j >= 1 also sees the keys the anchor itself drafted at steps 1..j.
    """

    context: tuple[torch.Tensor, torch.Tensor]  # (k, v) [B, kv_heads, T, D]
    anchors: torch.Tensor  # [B, R]
    drafted: list = field(default_factory=list)  # per step >= 1: (k, v) [B, kv_heads, R, D]
    step: int = 0


def attend_drafted(q, context: tuple, drafted: list[tuple], anchors) -> torch.Tensor:
    """Attention of one TTT step for many anchors at once, as the chain sees it at inference: context keys
    at positions <= t plus the keys of the drafted steps at anchor t only.
    q [B, Hq, R, D] for anchors [B, R]; context (k, v) [B, Hkv, T, D]; drafted: pairs [B, Hkv, R, D]."""
    B, heads, R, D = q.shape
    T = context[0].shape[2]
    groups = heads // context[0].shape[1]
    expand = lambda t: t.repeat_interleave(groups, dim=1)  # noqa: E731
    k0, v0 = expand(context[0]), expand(context[1])
    visible = (torch.arange(T, device=q.device)[None, None, :] <= anchors[:, :, None])[:, None]  # [B, 1, R, T]
    scores = (q @ k0.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    diagonal = [(q * expand(k)).sum(-1, keepdim=True) for k, _ in drafted]  # [B, Hq, R, 1] each
    weights = (torch.cat([scores, *diagonal], dim=-1) * D**-0.5).softmax(-1)
    out = weights[..., :T] @ v0
    for i, (_, v) in enumerate(drafted):
        out = out + weights[..., T + i, None] * expand(v)
    return out.transpose(1, 2).reshape(B, R, heads * D)


class Eagle3Layer(nn.Module):
    """The single decoder layer (`midlayer.*`); the residual stream is the H-wide hidden state."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.hidden_norm = RMSNorm(H, eps)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = Eagle3Attention(config)
        self.mlp = GatedMLP(H, config.intermediate_size, config.get("hidden_act", "silu"), config.get("mlp_bias", False))
        self.norm_before_residual = config.norm_before_residual

    def attention_input(self, embeds, hidden) -> torch.Tensor:
        """[B, T, H] x2 -> [B, T, 2H]: embedding first, then hidden."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def forward(self, embeds, hidden, cos, sin, cache=None, ttt=None) -> torch.Tensor:
        residual = self.hidden_norm(hidden) if self.norm_before_residual else hidden
        h = residual + self.self_attn(self.attention_input(embeds, hidden), cos, sin, cache, ttt)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Drafter(HubMixin, nn.Module):
    config_class = Eagle3Config

    def __init__(self, config: Eagle3Config, own_embedding: bool = False, vocab_mapping: bool = True):
        super().__init__()
        if config.get("num_hidden_layers", 1) != 1:
            raise CheckpointError(f"{config.source}: EAGLE-3 heads have exactly one layer, got num_hidden_layers="
                                  f"{config.num_hidden_layers}.")
        if not vocab_mapping and config.draft_vocab_size != config.vocab_size:
            raise CheckpointError(
                f"{config.source}: draft_vocab_size {config.draft_vocab_size} != vocab_size {config.vocab_size}, but "
                "the weights carry no d2t/t2d mapping draft ids to target ids. Use the checkpoint's complete weights "
                "(with d2t and t2d), or a head whose draft vocabulary is the whole vocabulary.")
        self.config = config
        H, Ht = config.hidden_size, config.target_hidden_size
        n_features = len(config.feature_layers) if config.feature_layers else 3
        # EAGLE 3.1 (SpecForge fc_norm): each captured layer's features get their own RMSNorm before fc.
        self.fc_norm = nn.ModuleList(RMSNorm(Ht, config.rms_norm_eps) for _ in range(n_features)) \
            if config.fc_norm else None
        self.fc = nn.Linear(n_features * Ht, H, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
        # A head published without d2t/t2d drafts over the whole vocabulary: identity mapping, as EAGLE's own
        # loader reads it. Those buffers stay out of the state dict, so the head saves in the layout it came in.
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long), persistent=vocab_mapping)
        self.register_buffer("t2d", torch.full((config.vocab_size,), not vocab_mapping), persistent=vocab_mapping)
        if own_embedding:
            self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.rotary = Rotary(config.head_dim, config.get("max_position_embeddings", 4096),
                             config.rope_theta, config.rope_scaling)

    @classmethod
    def _modules_for(cls, state: dict) -> dict:
        return {"own_embedding": "embed_tokens.weight" in state, "vocab_mapping": "d2t" in state or "t2d" in state}

    @property
    def feature_layers(self) -> list[int] | None:
        """hidden_states indices of the target features the head reads; None until attach fixes the default."""
        return self.config.feature_layers

    # --- construction for a target -------------------------------------------------------------

    @classmethod
    def for_target(cls, target, *, draft_vocab_size: int | None = None, intermediate_size: int | None = None,
                   feature_layers: list[int] | None = None, seed: int | None = None) -> "Eagle3Drafter":
        """A freshly initialised EAGLE-3 head shaped for `target` (any HF causal LM), attached to it.

        With no `draft_vocab_size` the draft vocabulary is the whole target vocabulary (identity d2t);
        training recipes shrink it to the most frequent tokens with `set_draft_vocab`.
        """
        tc = text_config(target)
        raw = {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            **drafter_fields(tc, intermediate_size),
            "target_hidden_size": tc.hidden_size,
            "num_hidden_layers": 1,
            "draft_vocab_size": draft_vocab_size or tc.vocab_size,
            LAYER_IDS: feature_layers or default_feature_layers(tc.num_hidden_layers),
        }
        if seed is not None:
            torch.manual_seed(seed)
        drafter = cls(Eagle3Config(raw))
        init_weights(drafter, getattr(tc, "initializer_range", 0.02))
        drafter.set_draft_vocab(torch.arange(raw["draft_vocab_size"]))
        return drafter.attach(target)

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Use `target_ids` (ascending, draft_vocab_size of them) as the draft vocabulary: fills d2t and t2d."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long).sort().values
        if target_ids.numel() != self.config.draft_vocab_size:
            raise ValueError(f"need {self.config.draft_vocab_size} target ids, got {target_ids.numel()}")
        self.d2t.copy_(target_ids - torch.arange(target_ids.numel()))
        self.t2d.zero_()
        self.t2d[target_ids] = True

    # --- binding to a target ---------------------------------------------------------------------

    def attach(self, target) -> "Eagle3Drafter":
        """Check this head fits `target`, share its embedding, move to its device and dtype. Returns the bound
        head: this one, or a copy when this one is already bound to another target (see layers.bind).
        Only shapes can be checked: a head trained for another target of the same width, depth and vocabulary
        attaches without error and simply gets (almost) no drafts accepted, which GenerationStats shows."""
        tc = text_config(target)
        embedding = target.get_input_embeddings()
        problems = []
        if self.config.target_hidden_size != tc.hidden_size:
            problems.append(f"the head reads target features of width {self.config.target_hidden_size} "
                            f"but the target's hidden size is {tc.hidden_size}")
        if not hasattr(self, "embed_tokens") and embedding.weight.shape[1] != self.config.hidden_size:
            problems.append(f"the head's hidden size {self.config.hidden_size} differs from the target embedding "
                            f"width {embedding.weight.shape[1]} it must share")
        if self.config.vocab_size != tc.vocab_size:
            problems.append(f"vocab size {self.config.vocab_size} != target vocab size {tc.vocab_size}")
        layers = self.feature_layers or default_feature_layers(tc.num_hidden_layers)
        if not all(0 <= i <= tc.num_hidden_layers for i in layers):
            problems.append(f"feature layers (hidden_states indices) {layers} exceed the target's depth "
                            f"({tc.num_hidden_layers} layers)")
        problems += self._draft_vocab_problems(tc.vocab_size)
        if problems:
            raise IncompatibleDrafterError(
                f"EAGLE-3 drafter does not fit target {target.config.name_or_path!r}: " + "; ".join(problems)
                + ". Use an EAGLE-3 head trained for this target, or build one with Eagle3Drafter.for_target(target)."
            )
        drafter = bind(self, target_embedding=embedding)
        drafter.config.eagle_aux_hidden_state_layer_ids = layers  # the default for this target, when unset
        return drafter

    def _draft_vocab_problems(self, vocab_size: int) -> list[str]:
        mapped = torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t
        if mapped.min() < 0 or mapped.max() >= vocab_size:
            return [f"d2t maps draft ids to target ids outside [0, {vocab_size}) "
                    f"(range {int(mapped.min())}..{int(mapped.max())}): the draft vocabulary mapping is corrupted "
                    "or belongs to another tokenizer"]
        if self.t2d.numel() == vocab_size and not bool(self.t2d[mapped].all()):
            return ["t2d does not mark every target id that d2t maps to: d2t and t2d disagree"]
        return []

    # --- forward passes --------------------------------------------------------------------------

    def features(self, hidden_states: tuple, length: int | None = None) -> torch.Tensor:
        """Target hidden_states tuple -> fused features [B, T, 3*Ht] (low | mid | high, un-normed), for the first `length` positions (all by default)."""
        return torch.cat([hidden_states[i][:, :length] for i in self.feature_layers], dim=-1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [B, T, 3*Ht] (low | mid | high) -> the head's hidden width [B, T, H]."""
        if self.fc_norm is not None:
            parts = features.chunk(len(self.fc_norm), dim=-1)  # [B, T, Ht] each
            features = torch.cat([norm(part) for norm, part in zip(self.fc_norm, parts)], dim=-1)
        return self.fc(features)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens if hasattr(self, "embed_tokens") else self.target_embedding
        return nn.functional.embedding(input_ids, table.weight)

    def _rope(self, start: int, batch: int, length: int, like: torch.Tensor):
        return self.rotary(positions_from(start, length, batch, like.device), like)

    def context_kv(self, next_ids: torch.Tensor, hidden: torch.Tensor, start: int = 0):
        """K/V of positions start.. (hidden [B, T, H], next_ids [B, T]): only the K/V projections run,
        no queries, attention output, MLP or logits for these positions."""
        x = self.midlayer.attention_input(self.embed(next_ids), hidden)
        cos, sin = self._rope(start, *next_ids.shape, x)
        return self.midlayer.self_attn.key_values(x, cos, sin)

    def absorb(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache) -> None:
        """K/V-only prefill: append positions (hidden [B, T, H], next_ids [B, T]) to `cache`."""
        cache.update(*self.context_kv(next_ids, hidden, cache.get_seq_length()), 0)

    # --- the inference protocol: catch up, then draft (the candidate generator and LatencyModel) -----

    def new_cache(self) -> LazyCatchUpCache:
        return LazyCatchUpCache()

    def catch_up(self, cache) -> int:
        """Absorb the verified pairs queued in `cache` with one K/V-only pass, except the newest: the first
        drafting step runs it through the whole layer, as its output drafts the first token. Returns the
        number of positions absorbed."""
        if cache.pending_length <= 1:
            return 0
        next_ids, features = cache.take_pending(keep_last=1)
        self.absorb(next_ids, self.project(features), cache)
        return next_ids.shape[1]

    def draft(self, cache, length: int, pick=None, cut=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A chain of up to `length` steps after the verified pairs queued in `cache` (one, after catch_up) ->
        draft ids [1, n], and with `pick` the processed logits they were picked from [1, n, V]. n = length,
        or with a `cut` (calibration.DraftCut) fewer, where the head's own confidence says stopping pays.

        Without `pick` each step takes the draft vocabulary's argmax; `pick(logits [1, Vd], drafted ids,
        their target ids [Vd])` processes the draft distribution and picks a token (sampling, logits
        processors; see sampling.draft_picker). The verified pairs' K/V stay cached. The
        drafted steps' K/V are dropped: once verified, those positions come back through the queue with the
        target's own features, which is what the head was trained on.
        """
        next_ids, features = cache.take_pending()  # [1, n], [1, n, 3*Ht]
        context = cache.get_seq_length() + next_ids.shape[1]
        hidden = self.project(features)
        tokens, rows, confidences = [], [], []
        if pick is not None:  # the target ids of the draft vocabulary, for pick
            vocab = self.to_target_ids(torch.arange(self.config.draft_vocab_size, device=self.d2t.device))  # [Vd]
        for _ in range(length):
            logits, hidden = self(next_ids, hidden, cache)
            logits, hidden = logits[:, -1], hidden[:, -1:]  # [1, draft_vocab], [1, 1, H]: the newest position
            if pick is None:
                draft_id = logits.argmax(-1, keepdim=True)  # [1, 1]
                next_ids = self.to_target_ids(draft_id)
            else:
                next_ids, row = pick(logits, tokens, vocab)
                rows.append(row)
                logits, draft_id = row, next_ids
            tokens.append(next_ids)
            if cut is not None:
                confidences.append(logits.float().softmax(-1).gather(-1, draft_id).item())
                if not cut.more(confidences):
                    break
        cache.truncate(context)
        return torch.cat(tokens, dim=1), torch.stack(rows, dim=1) if rows else None

    # --- training-time test (the training recipe and hindsight tables) ----------------------------

    def start_ttt(self, next_ids: torch.Tensor, hidden: torch.Tensor, anchors: torch.Tensor) -> TrainingTimeTest:
        """Training-time test over a whole sequence: the context K/V of every position (pairs of projected
        target features and next tokens, [B, T, ...]) and the anchors [B, R] that will draft."""
        return TrainingTimeTest(self.context_kv(next_ids, hidden), anchors)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache=None,
                ttt: TrainingTimeTest | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full step over T positions after the cached ones.

        next_ids [B, T]: token t+1 for each position t; hidden [B, T, H]: projected target features or
        the previous step's output. Returns draft-vocab logits [B, T, draft_vocab] and the pre-norm
        hidden [B, T, H] that feeds the next autoregressive step. K/V of these positions join `cache`.

        With `ttt` instead of a cache, rows are the TTT anchors [B, R]: step j drafts, for each anchor t,
        the token at t+j+2 (RoPE position t+j); each call advances the unroll by one step.
        """
        embeds = self.embed(next_ids)
        if ttt is not None:
            cos, sin = self.rotary(ttt.anchors + ttt.step, embeds)
        else:
            cos, sin = self._rope(cache.get_seq_length() if cache is not None else 0, *next_ids.shape, embeds)
        h = self.midlayer(embeds, hidden, cos, sin, cache, ttt)
        if ttt is not None:
            ttt.step += 1
        return self.lm_head(self.norm(h) if self.config.norm_output else h), h

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

