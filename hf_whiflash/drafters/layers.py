"""Building blocks both drafters share: RMSNorm, gated MLP, rotary embedding, attention over cached K/V."""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half


class RMSNorm(nn.Module):
    """Llama/Qwen RMSNorm: normalise in fp32, scale in the input dtype (same numerics as transformers)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Rotary(nn.Module):
    """RoPE tables for any rope type transformers knows (default, llama3, yarn, ...).

    We hand transformers a Llama config carrying only the rope fields, so scaled variants
    (e.g. Llama-3.1's `llama3` rope) match the target exactly.
    """

    def __init__(self, head_dim: int, max_positions: int, rope_theta: float, rope_scaling: dict | None):
        super().__init__()
        config = LlamaConfig(
            hidden_size=head_dim,
            num_attention_heads=1,
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            rope_theta=rope_theta,
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
        )
        self.inner = LlamaRotaryEmbedding(config)

    def forward(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim] in `like`'s dtype, ready to broadcast over heads."""
        cos, sin = self.inner(like, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


def positions_from(start: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """[B, T] absolute positions start..start+length-1."""
    return torch.arange(start, start + length, device=device).expand(batch, length)


def causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [Tq, Tk] mask for queries that are the last `query_len` of `key_len` positions."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    return torch.arange(key_len, device=device)[None, :] <= query_pos


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (grouped-query) -> [B, Tq, Hq*D]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def init_weights(module: nn.Module, std: float) -> None:
    """Fresh drafter initialisation: N(0, std) linears/embeddings, unit norms (as transformers' Llama init)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)


def bind(drafter: nn.Module, **borrowed: nn.Module) -> nn.Module:
    """`drafter` reading the target modules `borrowed` (e.g. target_embedding=...), in the target's device and dtype.

    Borrowed modules are plain attributes, not submodules: never saved, moved or trained with the drafter.
    A drafter already bound to another target's modules is copied first (without what it borrowed), so the
    assistant using it keeps working: moving it would change its dtype under that assistant, and rebinding it
    would silently swap that assistant's embedding for another target's.
    """
    bound = {name: drafter.__dict__[name] for name in borrowed if name in drafter.__dict__}
    if any(bound[name] is not borrowed[name] for name in bound):
        for name in bound:
            del drafter.__dict__[name]
        try:
            copied = copy.deepcopy(drafter)
        finally:
            drafter.__dict__.update(bound)
        drafter = copied
    for name, module in borrowed.items():
        object.__setattr__(drafter, name, module)
    weight = borrowed["target_embedding"].weight
    return drafter.to(device=weight.device, dtype=weight.dtype)
