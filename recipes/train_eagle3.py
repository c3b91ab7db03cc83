"""Train an EAGLE-3 head for any HF causal LM, with training-time test (TTT).

    python recipes/train_eagle3.py recipes/configs/eagle3_smollm2.yaml              # this CPU
    accelerate launch recipes/train_eagle3.py recipes/configs/eagle3_smollm2.yaml   # several GPUs

Each batch unrolls `ttt_steps` drafting steps (7), every step fed the head's own previous output,
loss weights `ttt_decay`**step (0.8): soft cross-entropy against the target's distribution p
renormalised over the draft vocabulary, on response tokens only. `acceptance_loss: w` (LK-style) moves
weight w of it onto -log alpha, alpha = sum_x min(p(x), q(x)): the chance that a draft sampled from the
head's q is accepted, which is what speculative sampling pays for (cross-entropy only reaches it at
q = p). The draft vocabulary is the `draft_vocab_size` most frequent response tokens (d2t/t2d). An
`intermediate_size` wider than the `init_from` head's grows its MLP without changing what it computes
(grow_mlp), so a wider head starts from the trained one's accuracy. Output:
`out`/final in the EAGLE-3 Hub layout (Eagle3Drafter.from_pretrained loads it; `--push-to-hub REPO`
publishes it).
"""

from pathlib import Path

import torch
from torch import nn

from cards import drafter_card
from features import evaluation_batches, frequent_tokens, training_features
from trainer import recipe_config, starting_drafter, train

from hf_whiflash import Eagle3Drafter, load_target
from hf_whiflash.drafters.layers import GatedMLP, init_weights


class TTTObjective(nn.Module):
    """Loss of one batch: the TTT unroll of `drafter` against the target's own next-token distributions."""

    def __init__(self, drafter: Eagle3Drafter, target_head: torch.Tensor, final_layer: int, steps: int,
                 decay: float, anchors_per_sequence: int | None = None, acceptance_loss: float = 0.0):
        super().__init__()
        if not 0.0 <= acceptance_loss <= 1.0:
            raise ValueError(f"acceptance_loss: {acceptance_loss}; a weight in [0, 1] (0: cross-entropy only)")
        self.drafter, self.final_layer, self.steps, self.decay = drafter, final_layer, steps, decay
        self.acceptance_loss = acceptance_loss
        self.anchors_per_sequence = anchors_per_sequence  # None: every learnable position drafts
        draft_ids = drafter.to_target_ids(torch.arange(drafter.config.draft_vocab_size))
        self.register_buffer("draft_head", target_head[draft_ids].clone())  # [Vd, H]: target logits, draft vocab

    def forward(self, batch: dict):
        loss, metrics, _ = self._unroll(batch)
        return loss, metrics

    def position_hits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: whether each TTT step's greedy draft is the target's greedy token, and whether it counts
        (bool [B*R, steps]), at every anchor (anchors_per_sequence applies to training only)."""
        _, _, (hits, counted) = self._unroll(batch)
        return hits, counted

    def _unroll(self, batch: dict):
        ids = batch["input_ids"]  # [B, T]
        T = ids.shape[1]
        # Loss on response tokens the draft vocabulary can express (the data is the target's greedy output).
        learnable = batch["response"] & self.drafter.t2d[ids]
        with torch.no_grad():  # P[:, s]: the target's distribution of token s+1 over the draft vocabulary,
            needed = nn.functional.pad(learnable[:, 1:], (0, 1))  # only where token s+1 earns loss
            target_p = ids.new_zeros(*ids.shape, self.draft_head.shape[0], dtype=torch.float)  # [B, T, Vd]
            target_p[needed] = (batch["hidden"][self.final_layer][needed] @ self.draft_head.T).float().softmax(-1)
        features = torch.cat([batch["hidden"][i] for i in self.drafter.feature_layers], dim=-1)
        hidden = self.drafter.project(features[:, :T - 1])  # pairs (feature t, token t+1), t < T-1
        # Anchors t whose first draft (token t+2) is learnable draft all steps; every other position only
        # contributes its context K/V (as the K/V-only prefill does at inference).
        anchors, valid = self._anchors(learnable)  # [B, R]
        ttt = self.drafter.start_ttt(ids[:, 1:], hidden, anchors)
        hidden = hidden.gather(1, anchors[..., None].expand(-1, -1, hidden.shape[-1]))
        take = lambda x, offset: x.gather(1, (anchors + offset).clamp(max=T - 1))  # noqa: E731
        loss, metrics, hits, counted = 0.0, {}, [], []
        for j in range(self.steps):
            logits, hidden = self.drafter(take(ids, 1 + j), hidden, ttt=ttt)  # predicts token t+2+j
            p = target_p.gather(1, (anchors + 1 + j).clamp(max=T - 1)[..., None].expand(-1, -1, target_p.shape[-1]))
            mask = valid & (anchors + 2 + j < T) & take(learnable, 2 + j)
            loss = loss + self.decay**j * self._step_loss(logits, p, mask, metrics, j)
            hits.append((logits.argmax(-1) == p.argmax(-1)).flatten())
            counted.append(mask.flatten())
        return loss, metrics, (torch.stack(hits, 1), torch.stack(counted, 1))

    def _anchors(self, learnable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, R] anchors t whose token t+2 is learnable (padded with 0), and which of them are real. With
        `anchors_per_sequence`, R random ones per sequence: the unroll costs ~7 head passes per anchor, and
        on a small compute budget more sequences teach more than every position of a few."""
        wanted = nn.functional.pad(learnable[:, 2:], (0, 2))  # [B, T]: anchor t -> token t+2
        count = int(wanted.sum(1).max().clamp(min=1))
        if self.anchors_per_sequence is None or not self.training:
            order = (~wanted).long().argsort(dim=1, stable=True)[:, :count]  # wanted anchors first, in order
        else:
            count = min(count, self.anchors_per_sequence)
            score = wanted[:, :-2] + torch.rand(wanted[:, :-2].shape, device=wanted.device)  # wanted first, random
            order = score.topk(count, dim=1).indices.sort(dim=1).values
        return order, wanted.gather(1, order)

    def _step_loss(self, logits, p, mask, metrics: dict, step: int) -> torch.Tensor:
        mask = mask.float()
        mean = lambda x: (x * mask).sum() / mask.sum().clamp(min=1)  # noqa: E731 (over drafts that earn loss)
        log_q = logits.float().log_softmax(-1)  # [B, R, Vd]
        cross_entropy = -(p * log_q).sum(-1)
        alpha = torch.minimum(p, log_q.exp()).sum(-1)  # [B, R]: a sampled draft's chance of acceptance
        metrics[f"acc_{step}"] = mean((logits.argmax(-1) == p.argmax(-1)).float())  # a greedy draft's
        metrics[f"alpha_{step}"] = mean(alpha.detach())
        w = self.acceptance_loss
        return mean((1 - w) * cross_entropy - w * alpha.clamp(min=1e-6).log())


def init_lm_head(drafter: Eagle3Drafter, target, how: str) -> None:
    """`random` (as initialised) or `target`: the target's own LM-head rows of the draft vocabulary, so the head
    starts out reading its hidden state the way the target reads its last one."""
    if how not in ("random", "target"):
        raise ValueError(f"lm_head_init: {how!r}; use random or target")
    if how == "target":
        rows = drafter.to_target_ids(torch.arange(drafter.config.draft_vocab_size))
        with torch.no_grad():
            drafter.lm_head.weight.copy_(target.get_output_embeddings().weight[rows])


def init_midlayer(drafter: Eagle3Drafter, target, how: str) -> None:
    """`random` (as initialised) or `target`: the decoder layer starts as the target's top one where shapes agree
    (the hidden half of q/k/v, o_proj, the MLP, the norms of hidden and residual); the embedding half of q/k/v
    stays random, so the token still reaches attention."""
    if how not in ("random", "target"):
        raise ValueError(f"midlayer_init: {how!r}; use random or target")
    if how == "random":
        return
    top, mid = target.get_decoder().layers[-1], drafter.midlayer
    if mid.mlp.up_proj.weight.shape != top.mlp.up_proj.weight.shape:
        raise ValueError(f"midlayer_init: target needs the target's MLP width: set intermediate_size to "
                         f"{top.mlp.up_proj.weight.shape[0]} (it is {mid.mlp.up_proj.weight.shape[0]})")
    H = drafter.config.hidden_size
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):  # [out, 2H]: [embedding | hidden] columns
            ours, theirs = getattr(mid.self_attn, name), getattr(top.self_attn, name)
            ours.weight[:, H:].copy_(theirs.weight)
            if ours.bias is not None and theirs.bias is not None:
                ours.bias.copy_(theirs.bias)
        mid.self_attn.o_proj.weight.copy_(top.self_attn.o_proj.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mid.mlp, name).weight.copy_(getattr(top.mlp, name).weight)
        mid.hidden_norm.weight.copy_(top.input_layernorm.weight)
        mid.post_attention_layernorm.weight.copy_(top.post_attention_layernorm.weight)


def grow_mlp(drafter: Eagle3Drafter, width: int | None, std: float = 0.02) -> None:
    """Widen a trained head's MLP to `width` units, computing the same function: the old units keep their weights,
    the new ones get fresh N(0, std) gate/up rows and zero down_proj columns (their output starts at exactly 0,
    and the gradient reaches them through down_proj from the first step)."""
    old = drafter.midlayer.mlp
    if width is None or width == old.up_proj.out_features:
        return
    units, bias = old.up_proj.out_features, old.up_proj.bias is not None
    new = GatedMLP(drafter.config.hidden_size, width, drafter.config.get("hidden_act", "silu"), bias)
    init_weights(new, std)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):  # [units, H] -> [width, H]
            getattr(new, name).weight[:units].copy_(getattr(old, name).weight)
            if bias:
                getattr(new, name).bias[:units].copy_(getattr(old, name).bias)
        new.down_proj.weight.zero_()[:, :units].copy_(old.down_proj.weight)  # [H, units] -> [H, width]
        if bias:
            new.down_proj.bias.copy_(old.down_proj.bias)
    drafter.midlayer.mlp = new.to(old.up_proj.weight.dtype)
    drafter.config.intermediate_size = width
    print(f"grew the MLP from {units} to {width} units")


def main() -> None:
    args, config = recipe_config(__doc__, "recipes/configs/eagle3_smollm2.yaml")
    torch.manual_seed(config.get("seed", 0))
    target, tokenizer = load_target(config["target"])
    target.requires_grad_(False)
    drafter = starting_drafter(
        config, Eagle3Drafter, target,
        lambda: Eagle3Drafter.for_target(target, draft_vocab_size=config["draft_vocab_size"],
                                         intermediate_size=config.get("intermediate_size"), seed=config.get("seed", 0)),
        # A wider intermediate_size than the head's fits (grow_mlp); a narrower one would drop trained units.
        lambda d: {"draft_vocab_size": d.config.draft_vocab_size,
                   "intermediate_size": max(d.config.intermediate_size, config.get("intermediate_size") or 0)})
    final_layer = target.config.num_hidden_layers  # hidden_states[L]: normed output, the LM head's input
    read = sorted(set(drafter.feature_layers) | {final_layer})
    store = training_features(config, target, read)
    for key in ("lm_head_init", "midlayer_init"):
        if config.get("init_from") and config.get(key, "random") != "random":
            raise ValueError(f"{key} initialises a head trained from scratch: set init_from to null, or "
                             f"{key} to random to train the init_from head further")
    if config.get("init_from"):
        grow_mlp(drafter, config.get("intermediate_size"), getattr(target.config, "initializer_range", 0.02))
    else:  # a trained drafter keeps the vocabulary its head was trained for
        drafter.set_draft_vocab(frequent_tokens(store, config["draft_vocab_size"], target.config.eos_token_id))
        init_lm_head(drafter, target, config.get("lm_head_init", "random"))
        init_midlayer(drafter, target, config.get("midlayer_init", "random"))
    objective = TTTObjective(drafter, target.get_output_embeddings().weight, final_layer, config["ttt_steps"],
                             config["ttt_decay"], config.get("anchors_per_sequence"),
                             config.get("acceptance_loss", 0.0))
    final = train(config, objective, drafter, store, evaluation_batches(config, target, tokenizer, store, read))
    print(f"saved EAGLE-3 head to {final}")
    if args.push_to_hub:
        card = drafter_card(Path(config["out"]), repo_id=args.push_to_hub)  # from this run's own figures
        print(drafter.push_to_hub(args.push_to_hub, model_card=str(card)))


if __name__ == "__main__":
    main()
