"""Train a DFlash block-diffusion drafter for any HF causal LM.

    python recipes/train_dflash.py recipes/configs/dflash_smollm2.yaml              # this CPU
    accelerate launch recipes/train_dflash.py recipes/configs/dflash_smollm2.yaml   # several GPUs

Per sequence, `anchors_per_sequence` random anchors a in the response; each block is [token at a, MASK x (B-1)],
sees the target's features of positions strictly before a (and its own block, non-causally), and its position k
predicts the token at a+k with loss weight exp(-(k-1)/gamma). B is `block_size`, or with
`train_block_sizes: [4, 8, 16]` one of those drawn per step: a drafter run at a smaller block than it was trained
at sees fewer MASK positions and drafts worse, and the calibration picks the block size per machine, so one
drafter should serve each size it may pick. With `soft_targets: true` the loss is the cross-entropy against the
target's whole next-token distribution at a+k (its LM head over hidden_states[L], a feature like the others), not
just its greedy token. The target's embedding and LM head are shared and frozen; with `loss_vocab: N` the loss
normalises over the N most frequent response tokens and each batch's labels instead of every token (the LM head
over all 49152 of SmolLM2's tokens is the largest matmul of a step). With `eval_prompts`, the accuracy of every
block position on those prompts' greedy references and on as many training sequences is logged every `eval_every`
steps (`recipes/training_curves.py` plots it). Output: `out`/final in the DFlash Hub layout
(DFlashDrafter.from_pretrained loads it; `--push-to-hub REPO` publishes it).

`mask_token_id: auto` picks the MASK id (see mask_token): the tokenizer's own mask token, else a special token
the training data never contains (for SmolLM2: 16, <empty_output>), else the highest id it never contains.
"""

import math
from pathlib import Path

import torch
from torch import nn

from cards import drafter_card
from features import evaluation_batches, frequent_tokens, read_samples, training_features
from trainer import recipe_config, starting_drafter, train

from hf_whiflash import DFlashDrafter, load_target


# Anchors per sequence an evaluation drafts from (eligible ones, a fixed random choice where there are more):
# 80 sequences give ~2,500 blocks, and one pass's logits stay at 0.4 GB (4 sequences, block 16, SmolLM2's
# vocabulary); every anchor of 80 training sequences took minutes per evaluation on 2 CPU cores.
EVAL_ANCHORS = 32


class BlockObjective(nn.Module):
    """Loss of one batch: position-weighted cross-entropy of many anchored blocks per sequence, normalised over
    the whole vocabulary or, with `loss_vocab` ([Vl] ascending token ids), over those ids and the batch's labels
    (the frozen LM head over Vl rows instead of all V: the largest matmul of a step, 49152 x H for SmolLM2)."""

    def __init__(self, drafter: DFlashDrafter, anchors: int, gamma: float, final_layer: int | None = None,
                 loss_vocab: torch.Tensor | None = None, block_sizes: list[int] | None = None):
        super().__init__()
        self.drafter, self.anchors = drafter, anchors
        self.block_sizes = block_sizes or [drafter.block_size]  # one drawn per step
        self.final_layer = final_layer  # hidden_states index of the LM head's input: soft targets; None: hard labels
        weights = torch.tensor([math.exp(-(k - 1) / gamma) for k in range(1, max(self.block_sizes))])
        self.register_buffer("weights", weights)  # [max B - 1]: block position k = 1..B-1
        self.register_buffer("loss_vocab", loss_vocab)

    @staticmethod
    def eligible(response: torch.Tensor) -> torch.Tensor:
        """[B, T] anchors a >= 1 (some context) whose next token is a response token."""
        T = response.shape[1]
        eligible = response.roll(-1, dims=1) & (torch.arange(T, device=response.device) >= 1)[None, :]
        eligible[:, -1] = False
        return eligible

    def sample_anchors(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, A] random eligible anchors, and whether each is eligible (short sequences have fewer than A; the
        extra ones are masked out)."""
        eligible = self.eligible(response)
        scores = torch.rand(response.shape, device=response.device).masked_fill(~eligible, -1.0)
        anchors = scores.topk(min(self.anchors, response.shape[1]), dim=1).indices.sort(dim=1).values
        return anchors, eligible.gather(1, anchors)

    def forward(self, batch: dict):
        anchors, eligible = self.sample_anchors(batch["response"])  # [B, A]
        size = self.block_sizes[torch.randint(len(self.block_sizes), ()).item()]
        hidden, labels, mask = self._blocks(batch, anchors, eligible, size)  # [B, A, size-1, H], [B, A, size-1] x2
        vocab = self.loss_vocab
        if vocab is not None:  # the loss vocabulary and this batch's labels; labels become indices into it
            vocab = torch.unique(torch.cat([vocab, labels[mask]]))
            labels = torch.searchsorted(vocab, labels).clamp(max=len(vocab) - 1)  # off-mask labels: any index
        logits = self._logits(hidden, vocab)  # [B, A, size-1, V or Vl]
        if self.final_layer is None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none")
        else:
            predicted_from = anchors[..., None] + torch.arange(labels.shape[-1], device=anchors.device)  # a+k-1
            loss = self._soft_ce(logits, batch["hidden"][self.final_layer], predicted_from, mask, vocab)
        loss = loss.view_as(labels)
        weighted = self.weights[:size - 1] * mask
        hits = (logits.argmax(-1) == labels) & mask
        accepted = hits.long().cumprod(-1).sum(-1).float()  # leading correct drafts per block (teacher-forced)
        valid_blocks = mask[..., 0].float()
        metrics = {"accept_len": (accepted * valid_blocks).sum() / valid_blocks.sum().clamp(min=1),
                   "acc_first": (hits[..., 0].float() * valid_blocks).sum() / valid_blocks.sum().clamp(min=1)}
        return (loss * weighted).sum() / weighted.sum().clamp(min=1e-6), metrics

    def position_hits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: at up to EVAL_ANCHORS eligible anchors per sequence, the same ones every time, whether
        each block position's greedy draft over the whole vocabulary is the data's token, and whether it counts
        (bool [blocks, size-1])."""
        eligible = self.eligible(batch["response"])
        fixed = torch.rand(eligible.shape, generator=torch.Generator().manual_seed(0)).to(eligible.device)
        anchors = (fixed + eligible).topk(min(EVAL_ANCHORS, eligible.shape[1]), dim=1).indices.sort(dim=1).values
        hidden, labels, mask = self._blocks(batch, anchors, eligible.gather(1, anchors), self.drafter.block_size)
        return (self._logits(hidden, None).argmax(-1) == labels).flatten(0, 1), mask.flatten(0, 1)

    def _blocks(self, batch: dict, anchors: torch.Tensor, eligible: torch.Tensor, size: int):
        """The drafter's normed hidden states at block positions 1..size-1 [B, A, size-1, H], the tokens they
        predict (the data's token at a+k) and which of them count [B, A, size-1]."""
        ids, response = batch["input_ids"], batch["response"]  # [B, T]
        B, T = ids.shape
        A = anchors.shape[1]
        blocks = torch.cat([ids.gather(1, anchors)[..., None],
                            torch.full((B, A, size - 1), self.drafter.mask_token_id, device=ids.device)],
                           dim=-1)  # [B, A, size]
        features = torch.cat([batch["hidden"][i] for i in self.drafter.feature_layers], dim=-1)
        hidden = self.drafter.forward_blocks(blocks.view(B, -1), anchors, features).view(B, A, size, -1)
        targets = anchors[..., None] + torch.arange(1, size, device=ids.device)  # [B, A, size-1]: a+k
        at = targets.clamp(max=T - 1).view(B, -1)
        labels = ids.gather(1, at).view_as(targets)
        mask = (targets < T) & response.gather(1, at).view_as(targets) & eligible[..., None]
        return hidden[:, :, 1:], labels, mask

    def _logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
        """Float logits of the frozen LM head over every token (vocab None) or over `vocab`'s ids only."""
        if vocab is None:
            return self.drafter.logits(hidden).float()
        head = self.drafter.target_head
        bias = head.bias[vocab] if head.bias is not None else None
        return nn.functional.linear(hidden, head.weight[vocab], bias).float()

    def _soft_ce(self, logits, final_hidden, predicted_from, mask, vocab) -> torch.Tensor:
        """Cross-entropy of the block's logits [B, A, k, V] against the target's distribution of the same
        tokens (over the same vocabulary): its LM head over final_hidden [B, T, H] at positions predicted_from
        [B, A, k] (a+k-1). Only rows under `mask` get a distribution (the LM head over every row would double the
        step's cost)."""
        B, A, k, V = logits.shape
        rows = logits.flatten(0, 2)[mask.flatten()]  # [N, V]
        with torch.no_grad():
            at = predicted_from.clamp(max=final_hidden.shape[1] - 1).view(B, -1)
            hidden = final_hidden.gather(1, at[..., None].expand(-1, -1, final_hidden.shape[-1]))  # [B, A*k, H]
            p = self._logits(hidden.flatten(0, 1)[mask.flatten()], vocab).softmax(-1)  # [N, V]
        loss = logits.new_zeros(B * A * k)
        loss[mask.flatten()] = -(p * rows.log_softmax(-1)).sum(-1)
        return loss


def mask_token(tokenizer, vocab_size: int, samples: list[dict]) -> int:
    """An id for the MASK positions of a block that never stands for real text: a MASK that also occurs in the
    context would be ambiguous to the drafter (it reads both through the target's one embedding)."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    used = set().union(*(s["input_ids"] for s in samples))
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    unused_specials = sorted(i for i in specials if i not in used and i < vocab_size)
    if unused_specials:
        return unused_specials[-1]
    unused = sorted(set(range(vocab_size)) - used)
    if not unused:
        raise ValueError("mask_token_id: auto found no token id the training data leaves unused; set mask_token_id "
                         "to a rarely used special token of this tokenizer")
    return unused[-1]


def train_block_sizes(config: dict) -> list[int] | None:
    """The config's `train_block_sizes`, checked: block sizes from 2 to `block_size` (the largest block the saved
    drafter announces), or None (train at `block_size` only)."""
    sizes, largest = config.get("train_block_sizes"), config["block_size"]
    if sizes is not None and not (isinstance(sizes, list) and sizes
                                  and all(isinstance(n, int) and 2 <= n <= largest for n in sizes)):
        raise ValueError(f"train_block_sizes: {sizes!r}; expected a list of block sizes from 2 to block_size "
                         f"({largest}), e.g. [4, 8, {largest}], or null")
    return sizes


def main() -> None:
    args, config = recipe_config(__doc__, "recipes/configs/dflash_smollm2.yaml")
    block_sizes = train_block_sizes(config)  # before any loading: a bad list fails at once
    target, tokenizer = load_target(config["target"])
    target.requires_grad_(False)  # embedding and LM head are shared with the drafter, frozen
    mask_token_id = config["mask_token_id"]
    if mask_token_id == "auto" and not config.get("init_from"):
        vocab_size = target.config.get_text_config().vocab_size
        mask_token_id = mask_token(tokenizer, vocab_size, read_samples(config["data"], config["max_len"]))
        print(f"mask_token_id: auto -> {mask_token_id} ({tokenizer.convert_ids_to_tokens(mask_token_id)!r})")
    drafter = starting_drafter(
        config, DFlashDrafter, target,
        lambda: DFlashDrafter.for_target(target, num_layers=config["num_layers"], block_size=config["block_size"],
                                         mask_token_id=mask_token_id, intermediate_size=config.get("intermediate_size"),
                                         tokenizer=tokenizer, seed=config.get("seed", 0)),
        lambda d: {"num_layers": d.config.num_hidden_layers, "intermediate_size": d.config.intermediate_size})
    if drafter.block_size != config["block_size"]:  # no weight depends on the block size: train at the config's
        print(f"block size {drafter.block_size} -> {config['block_size']}")
        drafter.config.raw["block_size"] = drafter.block_size = config["block_size"]
    final_layer = target.config.num_hidden_layers if config.get("soft_targets") else None  # the LM head's input
    read = sorted(set(drafter.feature_layers) | ({final_layer} if final_layer is not None else set()))
    store = training_features(config, target, read)
    loss_vocab = config.get("loss_vocab")
    if loss_vocab is not None:
        loss_vocab = frequent_tokens(store, loss_vocab, target.config.eos_token_id)
        covered = torch.isin(torch.from_numpy(store.response_tokens()), loss_vocab).float().mean()
        print(f"loss over the {len(loss_vocab)} most frequent response tokens (and each batch's labels): "
              f"{covered:.1%} of the response tokens")
    objective = BlockObjective(drafter, config["anchors_per_sequence"], config["gamma"], final_layer, loss_vocab,
                               block_sizes)
    final = train(config, objective, drafter, store, evaluation_batches(config, target, tokenizer, store, read))
    print(f"saved DFlash drafter to {final}")
    if args.push_to_hub:
        card = drafter_card(Path(config["out"]), repo_id=args.push_to_hub)  # from this run's own figures
        print(drafter.push_to_hub(args.push_to_hub, model_card=str(card)))


if __name__ == "__main__":
    main()
