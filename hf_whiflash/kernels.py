"""Packed CPU matmuls for the few-token forwards that speculative decoding runs on.

On CPU, torch's float32 `linear` runs 2 or 3 input rows as that many matrix-vector products and more
rows through a GEMM that re-packs the weight on every call. On a 2-core AMD EPYC that made SmolLM2-135M
verify 2 tokens for 1.7x the cost of one and 16 tokens for 2.1x (59 / 102 / 123 ms), which is the whole
gap speculation has to pay for. With each weight packed once into oneDNN's blocked layout the same
forwards cost 59 / 65 / 92 ms. So while a WhiFlash generation runs, every plain `nn.Linear` of the
target and the drafters computes from a packed copy of its weight for the row counts where a probe on
this machine says the packed call is faster (on an Intel Xeon with AMX not for one row: there the
unpacked matrix-vector product is faster, and a draftless round would cost more than a plain step). The copies cost the weights' memory once more; they live as long as the
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


ROW_COUNTS = (1, 2, 3, 4, 8, 16)  # input rows of decoding (1) and of verifying drafts


@functools.cache
def packed_from_rows(in_features: int, out_features: int, dtype: torch.dtype, threads: int) -> int | None:
    """The fewest input rows from which packed calls beat torch's own `linear` for a weight of this shape on
    this CPU, or None where packing never pays: a fraction of a second per shape. The threshold is the one
    that saves the most time summed over ROW_COUNTS, where packed calls take at most 90% of the unpacked
    time from it on (less is noise). Why per row count: on an Intel Xeon with AMX SmolLM2's one-token
    forward costs 33 ms unpacked and 42 ms packed, its 8-token forward 62 ms unpacked and 54 ms packed;
    on a 2-core AMD EPYC one row costs the same either way and 2+ rows pay."""
    if not packing_supported(dtype):
        return None
    # As in a model, the weights come from memory, not from a warm cache: each timing runs over enough
    # copies of the weight to pass ~64 MB (a model's layers each run once per forward), at most 64 copies
    # (smaller weights stay in cache in a model too).
    copies = min(64, max(1, 2**26 // (in_features * out_features * torch.finfo(dtype).bits // 8)))
    weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(copies)]
    packed = [_pack(weight) for weight in weights]
    calls = {"stock": lambda x: [nn.functional.linear(x, weight) for weight in weights],
             "packed": lambda x: [_packed_linear(x, weight, None) for weight in packed]}
    inputs = {rows: torch.randn(rows, in_features, dtype=dtype) for rows in ROW_COUNTS}
    for call in calls.values():  # warm-up: kernel selection for every shape
        for x in inputs.values():
            call(x)
    seconds = {(name, rows): [] for name in calls for rows in ROW_COUNTS}
    for _ in range(5):  # interleaved, median of 5: a burst of load hits both kinds of call alike
        for rows, x in inputs.items():
            for name, call in calls.items():
                start = time.perf_counter()
                call(x)
                seconds[name, rows].append(time.perf_counter() - start)
    median = {key: sorted(times)[2] for key, times in seconds.items()}

    def saved(start: int) -> float:  # seconds packing saves over the row counts from `start` on, or 0 if noise
        stock, packed = (sum(median[name, rows] for rows in ROW_COUNTS if rows >= start) for name in calls)
        return stock - packed if packed < 0.9 * stock else 0.0

    best = max(ROW_COUNTS, key=saved)
    return best if saved(best) > 0 else None


class PackedLinears:
    """Packed weight copies for every plain float32/bfloat16 `nn.Linear` on CPU of some modules, used by
    their forward inside `active()` for inputs of at least `from_rows[layer]` rows (with autograd on, for
    inputs on another device or of fewer rows, `linear` runs as usual). Copies are shared by everything that
    packs the same layer (several assistants on one target hold one copy) and live as long as the layer does.

    `enabled`: True packs every such layer for every row count, False none, None (default) each layer from
    the row count where a probe of its shape on this CPU says packed calls are faster (`packed_from_rows`),
    and not at all where they never are."""

    def __init__(self, modules: list[nn.Module], enabled: bool | None = None):
        linears = [m for module in modules for m in module.modules()
                   if type(m) is nn.Linear and m.weight.device.type == "cpu"
                   and m.weight.dtype in (torch.float32, torch.bfloat16)]
        if enabled and not all(packing_supported(m.weight.dtype) for m in linears):
            raise ValueError("pack_weights=True: this torch build or CPU cannot pack these weights for oneDNN "
                             "(bfloat16 needs AVX512-BW/VL/DQ); pass pack_weights=None to pack only where it works")
        threads = torch.get_num_threads()
        if enabled is None:
            from_rows = {m: packed_from_rows(m.in_features, m.out_features, m.weight.dtype, threads) for m in linears}
        else:
            from_rows = dict.fromkeys(linears if enabled else [], 1)
        self.from_rows = {m: rows for m, rows in from_rows.items() if rows is not None}  # layer -> fewest rows packed
        self.probed = enabled is None  # from_rows come from this CPU's probes (else every row count packs)
        self.linears = list(self.from_rows)
        self.enabled = bool(self.linears)

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
                _use(linear, self.from_rows[linear])
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


def _use(linear: nn.Linear, from_rows: int) -> None:
    if linear in _USERS:
        _USERS[linear][0] += 1
        return
    weight, held = linear.weight, _PACKED.get(linear)
    if held is None or held[0] is not weight or held[1] != weight._version:  # new, replaced or changed in place
        held = _PACKED[linear] = (weight, weight._version, _pack(weight))
    _USERS[linear] = [1, vars(linear).get("forward")]
    linear.forward = _forward_with(linear, held[2], from_rows)


def _release(linear: nn.Linear) -> None:
    users = _USERS[linear]
    users[0] -= 1
    if users[0] == 0:
        del _USERS[linear]
        if users[1] is None:
            del linear.forward  # back to nn.Linear.forward
        else:
            linear.forward = users[1]


def _forward_with(linear: nn.Linear, packed: torch.Tensor, from_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        stock = (torch.is_grad_enabled() and linear.weight.requires_grad) or x.dtype != packed.dtype
        if stock or x.device.type != "cpu" or x.numel() < from_rows * x.shape[-1]:  # autograd, elsewhere, few rows
            return nn.functional.linear(x, linear.weight, linear.bias)
        return _packed_linear(x, packed, linear.bias)

    return forward
