"""A drafter's KV cache with Lazy Catch-up: verified positions queue up while the drafter is idle.

Each round the target verifies some positions; both drafters need their K/V eventually, but only
the chosen drafter needs them now. So every verified position is queued (token ids + target
features) in each drafter's cache, and a drafter absorbs its whole queue in one batched
K/V-only pass (the drafters' `catch_up`) the next time it is chosen. Keys and values of
positions a drafter only drafted are dropped after the round: accepted positions come back
through the queue with the target's own features, which is what the drafters were trained on.
"""

import torch
from transformers import DynamicCache


class LazyCatchUpCache(DynamicCache):
    """K/V of absorbed context ([B, kv_heads, S, D] per layer) plus the queue of positions not absorbed yet."""

    def __init__(self):
        super().__init__()
        self.pending_ids: list[torch.Tensor] = []  # each [B, t]
        self.pending_features: list[torch.Tensor] = []  # each [B, t, F]
        self.newest_ids: torch.Tensor | None = None  # [B, 1]: the newest verified token, where drafting starts

    @property
    def pending_length(self) -> int:
        return sum(ids.shape[1] for ids in self.pending_ids)

    def enqueue(self, ids: torch.Tensor, features: torch.Tensor) -> None:
        """Queue verified positions: ids [B, t] and the target features [B, t, F] that go with them."""
        self.pending_ids.append(ids)
        self.pending_features.append(features)
        self.newest_ids = ids[:, -1:]

    def take_pending(self, keep_last: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the queued positions ([B, n], [B, n, F]), leaving the last `keep_last` queued."""
        ids, features = torch.cat(self.pending_ids, dim=1), torch.cat(self.pending_features, dim=1)
        split = ids.shape[1] - keep_last
        self.pending_ids, self.pending_features = ([ids[:, split:]], [features[:, split:]]) if keep_last else ([], [])
        return ids[:, :split], features[:, :split]

    def snapshot(self):
        """What a draft changes (the cached length and the queue), for `restore`: calibration drafts repeatedly from
        one state."""
        return self.get_seq_length(), list(self.pending_ids), list(self.pending_features)

    def restore(self, snapshot) -> None:
        length, self.pending_ids, self.pending_features = snapshot[0], list(snapshot[1]), list(snapshot[2])
        self.truncate(length)

    def truncate(self, length: int) -> None:
        """Drop K/V beyond the first `length` positions (the positions a drafter only drafted)."""
        extra = self.get_seq_length() - length
        if extra > 0:
            self.crop(-extra)
