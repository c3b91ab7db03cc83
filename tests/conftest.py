import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_whiflash import DFlashDrafter, Eagle3Drafter, WhiFlashAssistant, calibration, load_target
from hf_whiflash.latency import LatencyModel
from hf_whiflash.routing import NeuralPolicy
from helpers import WORDS, word_tokenizer


@pytest.fixture(scope="session", autouse=True)
def own_calibration_cache(tmp_path_factory):
    """Round costs the tests measure stay with the tests: measured while the suite loads the machine, they would
    otherwise be what later generations and benchmarks of the same target and drafters reuse."""
    folder = tmp_path_factory.mktemp("calibration")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(calibration, "cache_dir", lambda: folder)
        yield folder


@pytest.fixture(scope="session")
def smollm2():
    """The real default target (SmolLM2-135M-Instruct, fp32, CPU) and its tokenizer."""
    # WHIFLASH_TEST_THREADS=1 lets the long `make test-slow` share the machine with another job.
    torch.set_num_threads(int(os.environ.get("WHIFLASH_TEST_THREADS", 2)))
    return load_target()


@pytest.fixture(scope="session")
def target(smollm2):
    return smollm2[0]


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Llama target folder with a word-level chat tokenizer, and random drafters for it."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=1, bos_token_id=None, eos_token_id=None, initializer_range=0.2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "target")
    word_tokenizer().save_pretrained(root / "target")
    # seeds whose random drafters get some drafts accepted on this target (a 26-word vocabulary)
    assistant = WhiFlashAssistant(model, Eagle3Drafter.for_target(model, seed=11),
                                  DFlashDrafter.for_target(model, seed=2), eagle_steps=3, dflash_block_size=4)
    assistant.policy = NeuralPolicy(LatencyModel.measure(assistant, context=16, repeats=2).to_dict(), hidden=8)  # untrained: a router to load and run
    assistant.save_pretrained(root / "drafters")
    prompts = [{"id": f"{c}-0", "category": c, "messages": [{"role": "user", "content": text}]}
               for c, text in (("code", "write a function that adds two numbers"), ("tool", "call the tool with json"),
                               ("math", "what is one plus one"), ("chat", "tell me a story"))]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
