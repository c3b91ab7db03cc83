"""The CUDA path: drafters compute on the GPU what they compute on CPU, and WhiFlash stays lossless there.

A small random target built on the spot, so these run on a GPU machine without model downloads
(scripts/gpu_check.py runs them). They skip, saying so, where torch sees no CUDA device.
"""

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_whiflash import DFlashDrafter, Eagle3Drafter, WhiFlashAssistant
from helpers import RoutePattern

pytestmark = pytest.mark.cuda

# Runs of each route, so that both drafters sit idle and then catch up on the GPU.
PATTERN = ["eagle3", "eagle3", "dflash", "lookup", "dflash", "eagle3", "dflash", "lookup"]


@pytest.fixture(scope="module")
def cpu_target():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(2, 512, (1, 24), generator=torch.Generator().manual_seed(3))  # [1, 24]


def test_drafters_on_cuda_match_cpu(cpu_target, prompt):
    eagle, dflash = Eagle3Drafter.for_target(cpu_target, seed=0), DFlashDrafter.for_target(cpu_target, num_layers=2, seed=1)
    gpu_target = copy.deepcopy(cpu_target).cuda()
    gpu_eagle, gpu_dflash = copy.deepcopy(eagle).attach(gpu_target), copy.deepcopy(dflash).attach(gpu_target)
    layers = sorted(set(eagle.feature_layers + dflash.feature_layers))
    with torch.no_grad():
        hs = cpu_target(prompt, output_hidden_states=layers).hidden_states
        cpu_logits, _ = eagle(prompt[:, 1:], eagle.project(eagle.features(hs)[:, :-1]))
        cpu_block = dflash(dflash.block_ids(prompt[:, -1:]), dflash.features(hs))
        gpu_hs = gpu_target(prompt.cuda(), output_hidden_states=layers).hidden_states
        gpu_logits, _ = gpu_eagle(prompt[:, 1:].cuda(), gpu_eagle.project(gpu_eagle.features(gpu_hs)[:, :-1]),
                                  DynamicCache())
        gpu_cache = DynamicCache()
        gpu_block = gpu_dflash(gpu_dflash.block_ids(prompt[:, -1:].cuda()), gpu_dflash.features(gpu_hs), gpu_cache)
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gpu_block.cpu(), cpu_block, atol=1e-3, rtol=1e-3)
    assert gpu_cache.layers[0].keys.is_cuda


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_whiflash_on_cuda_is_lossless(cpu_target, prompt, catch_up):
    gpu_target = copy.deepcopy(cpu_target).cuda()
    eagle = Eagle3Drafter.for_target(gpu_target, seed=0)
    dflash = DFlashDrafter.for_target(gpu_target, block_size=8, seed=1)
    ids = prompt.cuda()
    expected = gpu_target.generate(ids, max_new_tokens=64, do_sample=False)
    assistant = WhiFlashAssistant(gpu_target, eagle, dflash, RoutePattern(PATTERN), catch_up=catch_up, eagle_steps=4)
    out = gpu_target.generate(ids, max_new_tokens=64, do_sample=False, assistant_model=assistant)
    assert torch.equal(out, expected)
    assert assistant.eagle3.fc.weight.is_cuda
    assert {"eagle3", "dflash"} <= set(assistant.stats.routes)
