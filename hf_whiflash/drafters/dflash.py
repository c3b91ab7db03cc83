"""DFlash drafter (arXiv 2602.06036): a small block-diffusion model that drafts a whole block in one pass.

The block is [last verified token, MASK x (B-1)], embedded with the target's embedding. Target
features of the context enter every layer only as extra keys/values (`k_proj`/`v_proj` of
`ctx = hidden_norm(fc(features))`); they never enter the residual stream, so absorbing context
needs K/V projections only. Attention inside the block is non-causal and sees all cached context;
block positions 1..B-1 go through `norm` and the target's LM head.

Published layout (z-lab, `DFlashDraftModel`, Qwen3-style config): fc [H, n*H], hidden_norm, norm,
layers.{i}.{input_layernorm, post_attention_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
mlp.*}; `block_size`, `num_target_layers`, `dflash_config.{mask_token_id, target_layer_ids}`.
No embedding and no LM head: both are the target's.

Variants (z-lab's long-context drafters, MiMo's): sliding-window layers (`layer_types`, `sliding_window`,
`dflash_config.{use_swa, swa_window_size}`), causal layers (`dflash_config.causal`, `is_causal`) and a learned
attention sink per head (`dflash_config.attention_sink_bias`, weights `layers.{i}.self_attn.attention_sink_bias`).
Which keys a query may see is a rule over absolute positions (`visible`), so the K/V cache keeps every context
position and the same rule holds whether context arrived in one pass or in many catch-ups.
"""

import torch
from torch import nn

from ..cache import LazyCatchUpCache
from ..checkpoint import CheckpointError, DrafterConfig, HubMixin
from ..settings import boolean, integer, integers
from ..targets import IncompatibleDrafterError, drafter_fields, text_config
from .layers import GatedMLP, RMSNorm, Rotary, apply_rope, attend, bind, init_weights, positions_from


def default_target_layers(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """One target layer per draft layer, evenly spaced from 1 to L-3 (36 layers, 5 drafts -> 1, 9, 17, 25, 33)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


FULL, SLIDING = "full_attention", "sliding_attention"


class DFlashConfig(DrafterConfig):
    required = DrafterConfig.required + ("num_hidden_layers",)
    # A block of 1 would never draft; layer ids and the mask id are read at the top level or in dflash_config.
    ids = {"block_size": integer(2), "target_layer_ids": integers(0), "mask_token_id": integer(0)}
    rules = DrafterConfig.rules | ids | {
        "num_hidden_layers": integer(1), "num_target_layers": integer(1), "sliding_window": integer(1, unset=True),
        "use_sliding_window": boolean(), "max_window_layers": integer(0), "is_causal": boolean(unset=True),
        "add_swa_attention_sink_bias": boolean()}
    nested_rules = {"dflash_config": ids | {"use_swa": boolean(), "swa_window_size": integer(1, unset=True),
                                            "causal": boolean(unset=True), "attention_sink_bias": boolean()}}

    @property
    def dflash(self) -> dict:
        return self.raw.get("dflash_config") or {}

    @property
    def block_size(self) -> int:
        return int(self.raw.get("block_size", self.dflash.get("block_size", 16)))

    @property
    def mask_token_id(self) -> int:
        value = self.dflash.get("mask_token_id", self.raw.get("mask_token_id"))
        if value is None:
            raise CheckpointError(f"{self.source}: dflash_config.mask_token_id is missing; set it to the id the "
                                  "drafter was trained with.")
        return int(value)

    @property
    def target_layer_ids(self) -> list[int]:
        ids = self.dflash.get("target_layer_ids", self.raw.get("target_layer_ids"))
        if ids is None:
            if "num_target_layers" not in self.raw:
                raise CheckpointError(f"{self.source}: needs dflash_config.target_layer_ids or num_target_layers.")
            ids = default_target_layers(self.num_target_layers, self.num_hidden_layers)
        return list(ids)

    @property
    def layer_attention(self) -> list[tuple[int | None, bool]]:
        """Per draft layer: (sliding window or None, causal), resolved from the published keys as vLLM's
        qwen3_dflash does (`_resolve_layer_attention`): `use_swa` makes every layer sliding when `layer_types` names
        none; the window is dflash_config.swa_window_size, else sliding_window; `is_causal`, then dflash_config.causal,
        set the causality of all layers, and without them sliding layers are causal and full ones are not.

        That last default is where the references part: z-lab's model.py runs every layer non-causal (and applies the
        window only under flash-attention-2; SDPA and eager drop it). We follow vLLM, as SGLang does (its sliding
        layers run as causal DECODER attention): z-lab's transformers code serves only its full-attention Qwen3 and
        Llama drafters, while its sliding-window drafters are served by those engines, which measured their
        acceptance with causal sliding layers.
        """
        n = self.num_hidden_layers
        # transformers' Qwen3Config, which both engines parse this file with, drops sliding_window unless
        # use_sliding_window is set, and derives missing layer_types from it and max_window_layers.
        window = self.raw.get("sliding_window", 4096) if self.raw.get("use_sliding_window") else None
        types = self.raw.get("layer_types") or [
            SLIDING if window is not None and i >= self.raw.get("max_window_layers", 28) else FULL for i in range(n)]
        if len(types) != n or not set(types) <= {FULL, SLIDING}:
            raise CheckpointError(f"{self.source}: layer_types {types} must name {n} layers, each {FULL!r} or "
                                  f"{SLIDING!r}.")
        use_swa = self.dflash.get("use_swa", False)
        sliding = [use_swa] * n if use_swa and SLIDING not in types else [t == SLIDING for t in types]
        window = self.dflash.get("swa_window_size", window)
        if any(sliding) and window is None:
            raise CheckpointError(f"{self.source}: sliding-window layers need a window: set "
                                  "dflash_config.swa_window_size, or sliding_window with use_sliding_window: true.")
        causal = self.raw.get("is_causal")
        causal = self.dflash.get("causal") if causal is None else causal
        return [(window if s else None, t == SLIDING if causal is None else causal) for s, t in zip(sliding, types)]

    @property
    def unsupported(self) -> list[str]:
        """What this config asks for that the drafter does not compute (each would silently change its drafts)."""
        rope = self.raw.get("rope_parameters") or self.raw.get("rope_scaling") or {}
        checks = [
            ((self.raw.get("target_hidden_size") or self.hidden_size) != self.hidden_size,  # null: unset, as vLLM
             f"target_hidden_size {self.raw.get('target_hidden_size')} differs from hidden_size {self.hidden_size} "
             "(a DFlash drafter embeds with the target's own embedding)"),
            ((self.raw.get("draft_vocab_size") or self.vocab_size) != self.vocab_size,
             f"draft_vocab_size {self.raw.get('draft_vocab_size')} differs from vocab_size {self.vocab_size} "
             "(a reduced draft vocabulary)"),
            ("attention_value_scale" in self.dflash, "dflash_config.attention_value_scale (a scale on values)"),
            (False in (self.raw.get("is_neox_style"), self.raw.get("rope_is_neox_style")),
             "is_neox_style: false (interleaved rotary embedding)"),
            (self.raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1)) != 1,
             "partial_rotary_factor (rotary embedding on part of each head)"),
        ]
        return [problem for refused, problem in checks if refused]

    @property
    def attention_sink(self) -> bool:
        """A learned sink logit per head in every layer (vLLM: dflash_config.attention_sink_bias, else MiMo's
        add_swa_attention_sink_bias)."""
        return self.dflash.get("attention_sink_bias", self.raw.get("add_swa_attention_sink_bias", False))


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None, causal: bool) -> torch.Tensor | None:
    """Which keys each query may attend to, by absolute position: bool [B, Tq, Tk], or None for every key.

    query_pos [B, Tq], key_pos [B, Tk]. A window W keeps keys fewer than W positions away on either side: the
    symmetric window (W-1, W-1) vLLM gives flash-attention for non-causal sliding layers (a block of at most W
    lies inside it whole). Causal keeps keys at or before the query; with a window, the W positions ending at it
    (transformers' sliding_window, SGLang's window_left = W-1).
    """
    if window is None and not causal:
        return None
    behind = query_pos[:, :, None] - key_pos[:, None, :]  # [B, Tq, Tk]: how far each key lies before its query
    mask = behind.abs() < window if window is not None else torch.ones_like(behind, dtype=torch.bool)
    return mask & (behind >= 0) if causal else mask


def attend_with_sink(q, k, v, mask, sink) -> torch.Tensor:
    """layers.attend with a learned sink per head, in the GPT-OSS form vLLM runs (`sinks`): one more logit in every
    softmax, standing for no key, whose share is dropped, so a head may put weight nowhere.
    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (grouped-query), mask bool broadcastable to [B, Hq, Tq, Tk] or None,
    sink [Hq] -> [B, Tq, Hq*D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [B, Hq, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sinks = sink.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1]
    out = weights.to(v.dtype) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class DFlashAttention(nn.Module):
    """Queries from the block; keys/values from [context K/V, block], per-head q/k RMSNorm (Qwen3 style).
    `window` and `causal` say which keys a query may see (`visible`; the drafter builds the masks, as it knows the
    positions); with a sink, each head has a learned `attention_sink_bias` (attend_with_sink)."""

    def __init__(self, config: DFlashConfig, window: int | None = None, causal: bool = False):
        super().__init__()
        H, bias = config.hidden_size, config.get("attention_bias", False)
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.window, self.causal = window, causal
        self.q_proj = nn.Linear(H, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, H, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attention_sink_bias = nn.Parameter(torch.zeros(self.heads)) if config.attention_sink else None

    def key_values(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> k, v [B, kv_heads, T, D]; k normed then rotated."""
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, context_kv, mask=None) -> torch.Tensor:
        """x [B, Tb, H] block; context_kv: (k, v) [B, kv_heads, Tc, D] or None. Every key is seen unless a boolean
        `mask` [B, 1, Tb, Tc+Tb] (True: seen) says otherwise."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim)).transpose(1, 2), cos, sin)
        k, v = self.key_values(x, cos, sin)
        if context_kv is not None:
            k, v = torch.cat([context_kv[0], k], dim=2), torch.cat([context_kv[1], v], dim=2)
        if self.attention_sink_bias is None:
            return self.o_proj(attend(q, k, v, mask))
        return self.o_proj(attend_with_sink(q, k, v, mask, self.attention_sink_bias))


class DFlashLayer(nn.Module):
    def __init__(self, config: DFlashConfig, window: int | None = None, causal: bool = False):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = DFlashAttention(config, window, causal)
        self.mlp = GatedMLP(H, config.intermediate_size, config.get("hidden_act", "silu"), config.get("mlp_bias", False))

    def forward(self, x, cos, sin, context_kv, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context_kv, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(HubMixin, nn.Module):
    config_class = DFlashConfig

    def __init__(self, config: DFlashConfig):
        super().__init__()
        if config.unsupported:
            raise CheckpointError(f"{config.source}: " + "; ".join(config.unsupported) + ". This DFlash variant "
                                  "cannot be computed exactly here, so it is refused rather than drafted differently.")
        self.config = config
        H = config.hidden_size
        self.target_layer_ids = config.target_layer_ids
        self.mask_token_id = config.mask_token_id
        self.block_size = config.block_size
        self.fc = nn.Linear(len(self.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(config, *attention) for attention in config.layer_attention)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.rotary = Rotary(config.head_dim, config.get("max_position_embeddings", 4096),
                             config.rope_theta, config.rope_scaling)

    @property
    def feature_layers(self) -> list[int]:
        """hidden_states indices this drafter reads: the outputs of its target layers."""
        return [i + 1 for i in self.target_layer_ids]

    # --- construction for a target -------------------------------------------------------------

    @classmethod
    def for_target(cls, target, *, num_layers: int = 1, block_size: int = 16, mask_token_id: int | None = None,
                   target_layer_ids: list[int] | None = None, intermediate_size: int | None = None,
                   tokenizer=None, seed: int | None = None) -> "DFlashDrafter":
        """A freshly initialised DFlash drafter shaped for `target` (any HF causal LM), attached to it.

        `mask_token_id` defaults to the target's mask, then pad, then eos token: any fixed in-vocabulary id
        works, as the drafter learns its embedding's role; pass a rarely used special token when training.
        With the target's `tokenizer`, the mask token's text is saved too (SGLang checks it against the id).

        The config carries what vLLM and SGLang read to serve the folder (besides z-lab's own keys): full,
        non-causal attention without sinks in every layer, the target's width for `fc`, the full vocabulary.
        """
        tc = text_config(target)
        if mask_token_id is None:
            mask_token_id = next(i for i in (getattr(tc, "mask_token_id", None), tc.pad_token_id,
                                             _first(tc.eos_token_id)) if i is not None)
        shapes = drafter_fields(tc, intermediate_size)
        dflash = {
            "mask_token_id": int(mask_token_id),
            "target_layer_ids": target_layer_ids or default_target_layers(tc.num_hidden_layers, num_layers),
            # vLLM's layout keys, explicit: its default causality depends on the layer types.
            "use_swa": False, "causal": False, "attention_sink_bias": False,
        }
        mask_token = tokenizer.convert_ids_to_tokens(int(mask_token_id)) if tokenizer is not None else None
        if mask_token:  # else SGLang's default "<|MASK|>" stands, which it only checks when the vocabulary has it
            dflash["mask_token"] = mask_token
        raw = {
            "architectures": ["DFlashDraftModel"],  # no auto_map: we ship no remote-code module for it
            "model_type": "qwen3",
            **shapes,
            "num_hidden_layers": num_layers,
            "layer_types": [FULL] * num_layers,
            "use_sliding_window": False,  # no window, as z-lab's full-attention configs say it
            "sliding_window": None,
            "block_size": block_size,  # top level: z-lab reads it there, SGLang after dflash_config
            "num_target_layers": tc.num_hidden_layers,
            "target_hidden_size": shapes["hidden_size"],  # vLLM sizes fc from it
            "draft_vocab_size": shapes["vocab_size"],  # vLLM: the full vocabulary, no draft-to-target id map
            "dflash_config": dflash,
        }
        if seed is not None:
            torch.manual_seed(seed)
        drafter = cls(DFlashConfig(raw))
        init_weights(drafter, getattr(tc, "initializer_range", 0.02))
        return drafter.attach(target)

    # --- binding to a target ---------------------------------------------------------------------

    def attach(self, target) -> "DFlashDrafter":
        """Check this drafter fits `target`, share its embedding and LM head, move to its device and dtype.
        Returns the bound drafter: this one, or a copy when this one is bound to another target (layers.bind)."""
        tc = text_config(target)
        embedding, head = target.get_input_embeddings(), target.get_output_embeddings()
        problems = []
        if self.config.hidden_size != tc.hidden_size:
            problems.append(f"hidden size {self.config.hidden_size} != target hidden size {tc.hidden_size} "
                            "(the drafter shares the target's embedding and LM head)")
        if self.config.vocab_size != tc.vocab_size:
            problems.append(f"vocab size {self.config.vocab_size} != target vocab size {tc.vocab_size}")
        if not 0 <= self.mask_token_id < tc.vocab_size:
            problems.append(f"mask_token_id {self.mask_token_id} is outside the target vocabulary [0, {tc.vocab_size})")
        if not all(0 <= i < tc.num_hidden_layers for i in self.target_layer_ids):
            problems.append(f"target_layer_ids {self.target_layer_ids} exceed the target's depth "
                            f"({tc.num_hidden_layers} layers, ids 0..{tc.num_hidden_layers - 1})")
        trained_for = self.config.get("num_target_layers")
        if trained_for is not None and trained_for != tc.num_hidden_layers:
            problems.append(f"the drafter was trained for a {trained_for}-layer target, this one has "
                            f"{tc.num_hidden_layers} layers")
        if problems:
            raise IncompatibleDrafterError(
                f"DFlash drafter does not fit target {target.config.name_or_path!r}: " + "; ".join(problems)
                + ". Use a DFlash drafter trained for this target, or build one with DFlashDrafter.for_target(target)."
            )
        return bind(self, target_embedding=embedding, target_head=head)

    # --- forward passes --------------------------------------------------------------------------

    def features(self, hidden_states: tuple, length: int | None = None) -> torch.Tensor:
        """Target hidden_states tuple -> concatenated features [B, T, n*H], for the first `length` positions (all by default)."""
        return torch.cat([hidden_states[i][:, :length] for i in self.feature_layers], dim=-1)

    def _context_kv(self, features: torch.Tensor, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k, v) [B, kv_heads, T, D] of context positions start..start+T-1."""
        ctx = self.hidden_norm(self.fc(features))
        cos, sin = self.rotary(positions_from(start, ctx.shape[1], ctx.shape[0], ctx.device), ctx)
        return [layer.self_attn.key_values(ctx, cos, sin) for layer in self.layers]

    def absorb(self, features: torch.Tensor, cache) -> None:
        """K/V-only prefill of context positions (features [B, T, n*H]) after those already in `cache`."""
        for i, (k, v) in enumerate(self._context_kv(features, cache.get_seq_length())):
            cache.update(k, v, i)

    # --- the inference protocol: catch up, then draft (the candidate generator and LatencyModel) -----

    def new_cache(self) -> LazyCatchUpCache:
        return LazyCatchUpCache()

    def catch_up(self, cache) -> int:
        """Absorb every position queued in `cache` with one K/V-only pass (context enters the drafter only as
        keys and values). Returns the number of positions absorbed."""
        if not cache.pending_length:
            return 0
        _, features = cache.take_pending()
        self.absorb(features, cache)
        return features.shape[1]

    def draft(self, cache, length: int, pick=None, cut=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block [newest verified token, MASK x length] in one pass -> draft ids [1, n], and with `pick` the
        processed logits they were picked from [1, n, V] (see Eagle3Drafter.draft). n = length, or with a `cut`
        (calibration.DraftCut) the prefix of the block that its confidences say is worth verifying."""
        self.catch_up(cache)
        hidden = self(self.block_ids(cache.newest_ids, length + 1), cache=cache)  # [1, length+1, H]
        logits = self.logits(hidden[:, 1:])  # [1, length, V]
        rows = None
        if pick is None:
            tokens = logits.argmax(-1)  # [1, length]
        else:
            picked, processed = [], []
            for j in range(length):  # processors (penalties, top-p, ...) depend on the drafted prefix
                token, row = pick(logits[:, j], picked)
                picked.append(token)
                processed.append(row)
            tokens, rows = torch.cat(picked, dim=1), torch.stack(processed, dim=1)  # [1, length], [1, length, V]
            logits = rows  # confidences below: of the distributions the drafts were picked from
        if cut is None:
            return tokens, rows
        confidences = logits.float().softmax(-1).gather(-1, tokens[..., None])[0, :, 0].tolist()
        keep = cut.keep(confidences)
        return tokens[:, :keep], rows[:, :keep] if rows is not None else None

    def forward(self, block_ids: torch.Tensor, features: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Draft one block. block_ids [B, Tb] = [last verified token, MASK...]; context = `cache` (if given)
        followed by `features` [B, Tc, n*H] (if given; absorbed into `cache` when there is one).
        Returns normed hidden states [B, Tb, H]; the block's own K/V never enter the cache."""
        cached = cache.get_seq_length() if cache is not None else 0
        if features is not None and cache is not None:
            self.absorb(features, cache)
        if cache is not None:
            context = [(layer.keys, layer.values) for layer in cache.layers] if cache.get_seq_length() else None
        elif features is not None:
            context = self._context_kv(features, 0)
        else:
            context = None
        start = cached + (features.shape[1] if features is not None else 0)
        x = nn.functional.embedding(block_ids, self.target_embedding.weight)
        key_pos = positions_from(0, start + block_ids.shape[1], block_ids.shape[0], x.device)  # context, then block
        cos, sin = self.rotary(key_pos[:, start:], x)
        masks = self._masks(key_pos[:, start:], key_pos)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, context[i] if context else None, masks[i])
        return self.norm(x)

    def forward_blocks(self, block_ids: torch.Tensor, anchors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Training: many blocks per sequence in one pass, each seeing only the context before its anchor.

        block_ids [B, A*Bk]: A blocks [token at anchor, MASK...] back to back; anchors [B, A]: their
        positions; features [B, T, n*H] for the whole sequence. Returns normed hidden [B, A*Bk, H].
        """
        B, A = anchors.shape
        size = block_ids.shape[1] // A
        offsets = torch.arange(size, device=anchors.device)
        positions = (anchors[:, :, None] + offsets).reshape(B, A * size)
        T = features.shape[1]
        sees_context = torch.arange(T, device=anchors.device) < anchors[:, :, None, None]  # [B, A, 1, T]
        same_block = torch.eye(A, dtype=torch.bool, device=anchors.device)[None, :, None, :, None]
        sees_blocks = same_block.expand(B, A, size, A, size).reshape(B, A * size, A * size)
        blocks = torch.cat([sees_context.expand(B, A, size, T).reshape(B, A * size, T), sees_blocks], dim=-1)
        key_pos = torch.cat([positions_from(0, T, B, anchors.device), positions], dim=1)  # [B, T + A*Bk]
        masks = self._masks(positions, key_pos, blocks)
        context = self._context_kv(features, 0)
        x = nn.functional.embedding(block_ids, self.target_embedding.weight)
        cos, sin = self.rotary(positions, x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, context[i], masks[i])
        return self.norm(x)

    def _masks(self, query_pos, key_pos, allowed=None) -> list[torch.Tensor | None]:
        """Per layer: bool [B, 1, Tq, Tk] of the keys its queries see (None: all), from the layer's window and
        causality over absolute positions (`visible`), within what `allowed` [B, Tq, Tk] permits (training blocks)."""
        kinds = [(layer.self_attn.window, layer.self_attn.causal) for layer in self.layers]
        masks = {}
        for kind in set(kinds):
            mask = visible(query_pos, key_pos, *kind)
            if allowed is not None:
                mask = allowed if mask is None else mask & allowed
            masks[kind] = None if mask is None else mask[:, None]
        return [masks[kind] for kind in kinds]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed block hidden states -> target-vocab logits through the target's LM head."""
        return self.target_head(hidden)

    def block_ids(self, last_token: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """last_token [B, 1] -> [B, length]: the verified token followed by MASK tokens."""
        length = length or self.block_size
        masks = last_token.new_full((last_token.shape[0], length - 1), self.mask_token_id)
        return torch.cat([last_token, masks], dim=1)


def _first(token_ids):
    return token_ids[0] if isinstance(token_ids, (list, tuple)) else token_ids
