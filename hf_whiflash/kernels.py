"""Packed CPU matmuls for the few-token forwards that speculative decoding runs on.

On CPU, torch's float32 `linear` runs 2 or 3 input rows as that many matrix-vector products and more
rows through a GEMM that re-packs the weight on every call. On a 2-core AMD EPYC that made SmolLM2-135M
verify 2 tokens for 1.7x the cost of one and 16 tokens for 2.1x (59 / 102 / 123 ms), which is the whole
gap speculation has to pay for. With each weight packed once into oneDNN's blocked layout the same
forwards cost 59 / 65 / 92 ms. So while a WhiFlash generation runs, every plain `nn.Linear` of the
target and the drafters computes from a packed copy of its weight, where a probe on this machine says
the packed call is faster. The copies cost the weights' memory once more; they live as long as the
layers do and are repacked when a weight changes in place (its version counter moves) or is replaced.
"""

import functools
import threading
import time
import weakref
from contextlib import contextmanager

import torch
from torch import nn


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)  # 16: the row count it is tuned for


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can pack `dtype` weights (oneDNN; bf16 needs AVX512-BW/VL/DQ or more)."""
    try:
        _packed_linear(torch.ones(1, 8, dtype=dtype), _pack(torch.ones(8, 8, dtype=dtype)), None)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def packing_pays(in_features: int, out_features: int, dtype: torch.dtype, threads: int) -> bool:
    """Whether packed calls beat torch's own `linear` on this CPU for a weight of this shape, summed over the
    row counts of decoding and verifying (1, 2, 4, 8, 16), a fraction of a second."""
    if not packing_supported(dtype):
        return False
    weight = torch.randn(out_features, in_features).to(dtype)
    packed = _pack(weight)

    def seconds(run) -> float:
        for rows in (1, 2, 4, 8, 16):  # warm-up: kernel selection for every shape
            run(torch.randn(rows, in_features, dtype=dtype))
        start = time.perf_counter()
        for _ in range(5):
            for rows in (1, 2, 4, 8, 16):
                run(torch.randn(rows, in_features, dtype=dtype))
        return time.perf_counter() - start

    stock = seconds(lambda x: nn.functional.linear(x, weight))
    return seconds(lambda x: _packed_linear(x, packed, None)) < 0.9 * stock  # clearly faster, not noise


class PackedLinears:
    """Packed weight copies for every plain float32/bfloat16 `nn.Linear` on CPU of some modules, used by
    their forward inside `active()` (with autograd on, or for inputs on another device, `linear` runs as usual).
    Copies are shared by everything that packs the same layer (several assistants on one target hold one
    copy) and live as long as the layer does.

    `enabled`: True / False, or None to pack where `packing_pays` for the largest such weight."""

    def __init__(self, modules: list[nn.Module], enabled: bool | None = None):
        self.linears = [m for module in modules for m in module.modules()
                        if type(m) is nn.Linear and m.weight.device.type == "cpu"
                        and m.weight.dtype in (torch.float32, torch.bfloat16)]
        if enabled and not all(packing_supported(m.weight.dtype) for m in self.linears):
            raise ValueError("pack_weights=True: this torch build or CPU cannot pack these weights for oneDNN "
                             "(bfloat16 needs AVX512-BW/VL/DQ); pass pack_weights=None to pack only where it works")
        if enabled is None and self.linears:
            largest = max(self.linears, key=lambda m: m.weight.numel()).weight
            enabled = packing_pays(largest.shape[1], largest.shape[0], largest.dtype, torch.get_num_threads())
        self.enabled = bool(enabled and self.linears)

    @property
    def packed_mb(self) -> float:
        """Memory the packed copies of these layers hold (MB)."""
        held = [_PACKED[m][2] for m in self.linears if m in _PACKED]
        return sum(p.numel() * p.element_size() for p in held) / 2**20

    @contextmanager
    def active(self):
        if not self.enabled:
            yield
            return
        with _LOCK:
            swapped = [m for m in self.linears if m.weight.device.type == "cpu"]  # not moved since
            for linear in swapped:
                _use(linear)
        try:
            yield
        finally:
            with _LOCK:
                for linear in swapped:
                    _release(linear)


# Per layer, across every PackedLinears and thread (under _LOCK): its packed copy (weight, version, packed)
# and how many generations are using it with the forward it had before (restored when the last one ends).
_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()
_USERS: "weakref.WeakKeyDictionary[nn.Linear, list]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _use(linear: nn.Linear) -> None:
    if linear in _USERS:
        _USERS[linear][0] += 1
        return
    weight, held = linear.weight, _PACKED.get(linear)
    if held is None or held[0] is not weight or held[1] != weight._version:  # new, replaced or changed in place
        held = _PACKED[linear] = (weight, weight._version, _pack(weight))
    _USERS[linear] = [1, vars(linear).get("forward")]
    linear.forward = _forward_with(linear, held[2])


def _release(linear: nn.Linear) -> None:
    users = _USERS[linear]
    users[0] -= 1
    if users[0] == 0:
        del _USERS[linear]
        if users[1] is None:
            del linear.forward  # back to nn.Linear.forward
        else:
            linear.forward = users[1]


def _forward_with(linear: nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        stock = (torch.is_grad_enabled() and linear.weight.requires_grad) or x.dtype != packed.dtype
        if stock or x.device.type != "cpu":  # autograd, or inputs on another device
            return nn.functional.linear(x, linear.weight, linear.bias)
        return _packed_linear(x, packed, linear.bias)

    return forward
