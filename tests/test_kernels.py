"""Packed Linear weights (kernels.py): same outputs as torch's own linear, never stale, and greedy WhiFlash
output with them stays token-identical to plain generate()."""

import pytest
import torch
from torch import nn

from hf_whiflash import kernels
from hf_whiflash.kernels import PackedLinears, packing_supported

from helpers import chat_ids, make_assistant

pytestmark = pytest.mark.skipif(not packing_supported(torch.float32), reason="this torch/CPU cannot pack weights")


def layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False))


@torch.no_grad()
def test_packed_outputs_match_and_forward_is_restored():
    model, x = layers(), torch.randn(3, 5, 64)
    stock = model(x)
    packed = PackedLinears([model], enabled=True)
    with packed.active():
        assert all("forward" in vars(m) for m in packed.linears)
        torch.testing.assert_close(model(x), stock, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in packed.linears)
    assert torch.equal(model(x), stock)


@torch.no_grad()
def test_changed_weights_are_repacked():
    model, x = layers(), torch.randn(4, 64)
    packed = PackedLinears([model], enabled=True)
    with packed.active():
        model(x)
    model[0].weight.mul_(2.0)  # in place: version counter moves
    model[2].weight = nn.Parameter(torch.randn(32, 96))  # replaced
    expected = model[2](model[1](x @ model[0].weight.T + model[0].bias))
    with packed.active():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_autograd_falls_back_to_linear():
    model, x = layers(), torch.randn(2, 64)
    with PackedLinears([model], enabled=True).active():
        model(x).sum().backward()
    assert model[0].weight.grad is not None


@torch.no_grad()
def test_nested_and_disabled_contexts():
    model, x = layers(), torch.randn(2, 64)
    packed = PackedLinears([model], enabled=True)
    with packed.active():
        with packed.active():  # e.g. a second thread's generation
            model(x)
        assert all("forward" in vars(m) for m in packed.linears)  # the outer generation still runs packed
    assert not any("forward" in vars(m) for m in packed.linears)
    other = PackedLinears([model], enabled=True)  # e.g. a second assistant on the same target, in another thread
    with packed.active():
        with other.active():
            torch.testing.assert_close(model(x), layers()(x), rtol=1e-5, atol=1e-5)
        assert all("forward" in vars(m) for m in packed.linears)
    assert not any("forward" in vars(m) for m in packed.linears)
    assert packed.packed_mb == other.packed_mb > 0  # one shared copy per layer
    off = PackedLinears([model], enabled=False)
    with off.active():
        assert not any("forward" in vars(m) for m in off.linears)


@torch.no_grad()
def test_each_layer_runs_packed_from_its_own_row_count(monkeypatch):
    """With pack_weights=None a layer computes packed only from the row count its shape's probe chose
    (fewer rows run torch's linear), and a layer whose shape never pays is not packed at all."""
    model = layers()
    chosen = {(64, 96): 4, (96, 32): None}  # (in, out) -> fewest rows packed
    monkeypatch.setattr(kernels, "packed_from_rows", lambda n_in, n_out, dtype, threads: chosen[n_in, n_out])
    packed_rows, packed_linear = [], kernels._packed_linear
    monkeypatch.setattr(kernels, "_packed_linear",
                        lambda x, weight, bias: packed_rows.append(x.shape[0]) or packed_linear(x, weight, bias))
    packed = PackedLinears([model])
    assert packed.linears == [model[0]] and packed.from_rows == {model[0]: 4}
    with packed.active():
        for rows in (1, 3, 4, 16):
            torch.testing.assert_close(model(torch.ones(rows, 64)), layers()(torch.ones(rows, 64)), rtol=1e-5, atol=1e-5)
    assert packed_rows == [4, 16]
    chosen[64, 96] = None
    assert not PackedLinears([model]).enabled


def test_whiflash_with_packed_weights_matches_plain_greedy(target, tokenizer):
    ids = chat_ids(tokenizer, "Write a Python function that reverses a string.")
    plain = target.generate(ids, max_new_tokens=40, do_sample=False)
    for packed in (True, False):
        assistant = make_assistant(target, "whiflash", "trained", pack_weights=packed)
        assert assistant.kernels.enabled is packed
        out = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=assistant)
        assert torch.equal(out, plain), f"pack_weights={packed}"
        assert assistant.stats.rounds and any(r.drafted for r in assistant.stats.rounds)
    assert not any("forward" in vars(m) for m in target.modules())  # the target is left as it was
