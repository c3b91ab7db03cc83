"""The recipes end to end on tiny data: data -> features -> a few training steps -> Hub folder that drafts."""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_whiflash import DFlashDrafter, Eagle3Drafter, WhiFlashAssistant
from helpers import chat_ids

REPO = Path(__file__).resolve().parents[1]


def launch(script: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "recipes" / script), str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def run(script: str, config: Path, *args: str) -> str:
    done = launch(script, config, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def config_in(tmp: Path, name: str, **changes) -> Path:
    """A tiny config with every path moved under `tmp`."""
    config = yaml.safe_load((REPO / "recipes" / "configs" / name).read_text())
    for key in ("data", "features", "out"):
        if key in config and config[key] != "online":  # features: online has no folder
            config[key] = str(tmp / config[key].replace("/", "_"))  # same path -> same folder
    config |= changes
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    config = config_in(tmp, "data_tiny.yaml")
    run("data.py", config)
    samples = tmp / "runs_data_tiny" / "samples.0.jsonl"
    rows = [json.loads(line) for line in samples.open()]
    run("data.py", config)  # resumable: a rerun finds every id done and adds nothing
    assert len(samples.read_text().splitlines()) == len(rows)
    return tmp, rows


def test_data_is_archived_and_a_fresh_machine_starts_from_the_archive(tiny_data):
    """runs/ does not survive between machines: `--archive` writes the data to commit, and a run whose out folder
    lacks it restores it and generates nothing again."""
    tmp, rows = tiny_data
    archive = tmp / "archive"
    config = config_in(tmp, "data_tiny.yaml", archive=str(archive))
    run("data.py", config, "--archive")
    assert sorted(p.name for p in archive.iterdir()) == ["prompts.jsonl.gz", "samples.0.jsonl.gz"]
    fresh = config_in(tmp, "data_tiny.yaml", archive=str(archive), out=str(tmp / "fresh_out"))
    log = run("data.py", fresh)
    assert log.count("restored from") == 2
    restored = [json.loads(line) for line in (tmp / "fresh_out" / "samples.0.jsonl").open()]
    assert restored == rows


def test_data_covers_every_source_without_dev_prompts(tiny_data):
    tmp, rows = tiny_data
    assert {r["source"] for r in rows} == {"self", "code", "bfcl_live"}
    dev_ids = {json.loads(line)["id"] for line in (REPO / "hf_whiflash" / "data" / "dev_set.jsonl").open()}
    assert not dev_ids & {r["id"] for r in rows}
    assert all(0 < r["response_start"] < len(r["input_ids"]) for r in rows)


def test_held_out_prompts_are_in_no_training_data_and_not_in_the_dev_set():
    """The held-out set shows whether dev-set acceptance carries over to unseen prompts: no prompt of it may be in the
    committed training data or in the dev set the recipes tune on, and it covers every category."""
    from hf_whiflash.bench import CATEGORIES, load_prompts

    held_out, dev = load_prompts("held-out", None), load_prompts("dev", None)
    assert sorted(r["category"] for r in held_out) == sorted(c for c in CATEGORIES for _ in range(20))
    with gzip.open(REPO / "datasets" / "smollm2-135m-instruct" / "prompts.jsonl.gz", "rt") as f:
        trained = [json.loads(line) for line in f]
    texts = lambda rows: {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}  # noqa: E731
    assert not texts(held_out) & (texts(trained) | texts(dev))
    assert not {r["id"] for r in held_out} & {r["id"] for r in trained + dev}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").open()]


@pytest.mark.parametrize("script,config_name,cls", [("train_eagle3.py", "eagle3_tiny.yaml", Eagle3Drafter),
                                                   ("train_dflash.py", "dflash_tiny.yaml", DFlashDrafter)])
def test_recipe_trains_resumes_and_exports_a_drafter(tiny_data, target, tokenizer, script, config_name, cls,
                                                    monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from features import read_samples

    tmp, _ = tiny_data
    run(script, config_in(tmp, config_name), "--set", "max_steps=6")  # stops at the step-6 checkpoint
    out = Path(yaml.safe_load((tmp / config_name).read_text())["out"])
    assert (out / "checkpoints" / "step-6").is_dir()
    log = run(script, config_in(tmp, config_name))  # same run, longer: resumes at step 6
    assert "resumed from" in log and "step-6" in log
    curve = losses(out)
    assert len(curve) == 12
    run_info = json.loads((out / "run.json").read_text())  # what evaluate.py's data-size curve reads
    samples = read_samples(run_info["config"]["data"], run_info["config"]["max_len"])  # what store or online holds
    assert run_info["config"]["max_steps"] == 12 and run_info["train_samples"] == len(samples)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3  # loss goes down
    drafter = cls.from_pretrained(out / "final")
    kind = "eagle3" if cls is Eagle3Drafter else "dflash"
    assistant = WhiFlashAssistant(target, **{kind: drafter})
    ids = chat_ids(tokenizer, "Write a Python function that adds two numbers.")
    out_ids = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(out_ids, target.generate(ids, max_new_tokens=12, do_sample=False))
    assert sum(r.drafted for r in assistant.stats.rounds) > 0
    check_card(out, kind, tmp)


def check_card(run: Path, kind: str, tmp: Path) -> None:
    """The card cards.py writes for a run (what --push-to-hub uploads) carries that run's own figures."""
    from huggingface_hub import ModelCard

    acceptance = tmp / f"acceptance-{kind}.json"
    measured = {"code": 1.5, "tool": 1.75, "math": 1.25, "chat": 1.125, "overall": 1.4}
    acceptance.write_text(json.dumps({"settings": {"eagle_steps": 3, "block_size": 8},
                                      "results": [{"route": kind, "folder": str(run / "final"),
                                                   "acceptance_length": measured}]}))
    card_path = tmp / f"card-{kind}.md"
    subprocess.run([sys.executable, str(REPO / "recipes" / "cards.py"), str(run), "--acceptance", str(acceptance),
                    "--repo-id", f"me/{kind}-tiny", "--out", str(card_path)], cwd=REPO, check=True, timeout=120)
    card = ModelCard.load(card_path)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and kind in card.data.tags
    assert {r.dataset_config: r.metric_value for r in card.data.eval_results} == {k: round(v, 2) for k, v in
                                                                                  measured.items()}
    last_loss = losses(run)[-1]
    assert f"| training samples | {json.loads((run / 'run.json').read_text())['train_samples']} |" in card.text
    assert f"| last logged loss | {round(last_loss, 4)} |" in card.text and "me/" + kind + "-tiny" in card.text
    if kind == "eagle3":  # engines need to know which target layers the head reads
        aux = json.loads((run / "final" / "config.json").read_text()).get("eagle_aux_hidden_state_layer_ids")
        assert f"`eagle_aux_hidden_state_layer_ids` {aux} (vLLM" in card.text


def test_ttt_anchor_subsampling_keeps_learnable_positions(monkeypatch):
    """With anchors_per_sequence, each row drafts from that many random anchors t whose token t+2 earns loss
    (fewer where fewer exist, the padding marked invalid), in increasing order."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_eagle3 import TTTObjective

    learnable = torch.zeros(2, 40, dtype=torch.bool)
    learnable[0, 10:30], learnable[1, 5:8] = True, True
    anchors, valid = TTTObjective._anchors(SimpleNamespace(anchors_per_sequence=8, training=True), learnable)
    assert anchors.shape == (2, 8) and (anchors < 38).all()
    assert valid[0].all() and learnable[0, anchors[0] + 2].all()
    assert sorted(anchors[1][valid[1]].tolist()) == [3, 4, 5] and valid[1].sum() == 3
    assert (anchors.diff(dim=1) > 0).all()
    everything, _ = TTTObjective._anchors(SimpleNamespace(anchors_per_sequence=None, training=True), learnable)
    assert everything[0].tolist() == list(range(8, 28))  # default: every learnable anchor, in order


@torch.no_grad()
def test_dflash_loss_over_part_of_the_vocabulary_and_evaluation_at_every_anchor(target, monkeypatch):
    """loss_vocab normalises the loss over those ids and the batch's labels (all ids: the full loss exactly);
    position_hits drafts from up to EVAL_ANCHORS eligible anchors per row, the same each time, over the whole
    vocabulary."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    import train_dflash
    from train_dflash import BlockObjective

    monkeypatch.setattr(train_dflash, "EVAL_ANCHORS", 4)
    drafter = DFlashDrafter.for_target(target, num_layers=1, block_size=4, mask_token_id=16, intermediate_size=64,
                                       seed=0)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 24))
    response = torch.arange(24)[None, :] >= torch.tensor([[10], [16]])
    batch = {"input_ids": ids, "response": response,
             "hidden": {i: torch.randn(2, 24, 576) for i in drafter.feature_layers}}
    vocab = target.config.vocab_size

    def loss(loss_vocab):
        torch.manual_seed(1)  # the same random anchors
        return BlockObjective(drafter, 4, 7.0, loss_vocab=loss_vocab)(batch)[0]

    full, everything, frequent = loss(None), loss(torch.arange(vocab)), loss(torch.arange(500))
    torch.testing.assert_close(everything, full)
    assert 0 < frequent < full  # fewer competing tokens: a smaller cross-entropy
    objective = BlockObjective(drafter, 4, 7.0).eval()
    hits, counted = objective.position_hits(batch)
    assert hits.shape == counted.shape == (2 * 4, 3)  # EVAL_ANCHORS (4 here) anchors per row
    assert counted[:, 0].sum() == 8  # rows hold 14 and 8 eligible anchors (9-22, 15-22): 4 of each
    assert torch.equal(objective.position_hits(batch)[1], counted)  # the same anchors every time
    monkeypatch.setattr(train_dflash, "EVAL_ANCHORS", 24)
    hits, counted = objective.position_hits(batch)
    assert counted[:, 0].sum() == 14 + 8  # every eligible anchor
    assert counted[:, 2].sum() == 22 - 2 * 2  # a+3 runs past the end for the last two anchors of each row


@torch.no_grad()
def test_dflash_trains_at_a_mix_of_block_sizes_each_step_one_of_them(target, monkeypatch):
    """train_block_sizes: each step's loss is the loss of one of the sizes, drawn per step, computed exactly as a
    drafter of that block size trains (a block attends only to its own positions, so a smaller block is a
    different computation, not a cut of the larger one); evaluation stays at the drafter's own block size."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_dflash import BlockObjective

    drafter = DFlashDrafter.for_target(target, num_layers=1, block_size=6, mask_token_id=16, intermediate_size=64,
                                       seed=0)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1000, (2, 24)),
             "response": torch.arange(24)[None, :] >= torch.tensor([[6], [12]]),
             "hidden": {i: torch.randn(2, 24, 576) for i in drafter.feature_layers}}
    fixed = BlockObjective(drafter, 4, 7.0).sample_anchors(batch["response"])

    def objective(block_sizes=None):
        objective = BlockObjective(drafter, 4, 7.0, block_sizes=block_sizes)
        objective.sample_anchors = lambda response: fixed  # the same anchors every step
        return objective

    by_size = {}
    for size in (2, 4, 6):  # a drafter announcing that block size, trained at it
        drafter.block_size = size
        by_size[size] = objective()(batch)[0].item()
    drafter.block_size = 6
    assert len({round(loss, 5) for loss in by_size.values()}) == 3
    mixed = objective([2, 4])
    losses = {round(mixed(batch)[0].item(), 5) for _ in range(16)}
    assert losses == {round(by_size[2], 5), round(by_size[4], 5)}  # each step one of the sizes, both drawn
    hits, counted = mixed.eval().position_hits(batch)
    assert hits.shape[1] == counted.shape[1] == 5  # evaluated at the drafter's block 6: positions 1..5


@pytest.mark.parametrize("sizes", [[], [1, 4], [4, 32], 4, ["4"]])
def test_dflash_refuses_train_block_sizes_outside_2_to_its_block_size(monkeypatch, sizes):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_dflash import train_block_sizes

    assert train_block_sizes({"block_size": 16, "train_block_sizes": [4, 8, 16]}) == [4, 8, 16]
    assert train_block_sizes({"block_size": 16, "train_block_sizes": None}) is None
    with pytest.raises(ValueError, match=r"train_block_sizes: .*expected a list of block sizes from 2 to block_size "
                                         r"\(16\)"):
        train_block_sizes({"block_size": 16, "train_block_sizes": sizes})


def test_a_head_from_scratch_can_start_from_the_target_s_lm_head_rows(target, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_eagle3 import init_lm_head

    head = Eagle3Drafter.for_target(target, draft_vocab_size=64, intermediate_size=32, seed=0)
    vocab = torch.arange(0, 640, 10)
    head.set_draft_vocab(vocab)
    init_lm_head(head, target, "random")
    assert not torch.equal(head.lm_head.weight, target.get_output_embeddings().weight[vocab])
    init_lm_head(head, target, "target")
    assert torch.equal(head.lm_head.weight, target.get_output_embeddings().weight[vocab])
    with pytest.raises(ValueError, match="use random or target"):
        init_lm_head(head, target, "embedding")


def test_a_head_from_scratch_can_start_from_the_target_s_top_decoder_layer(target, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_eagle3 import init_midlayer

    top, H = target.get_decoder().layers[-1], target.config.hidden_size
    head = Eagle3Drafter.for_target(target, draft_vocab_size=64, intermediate_size=top.mlp.up_proj.out_features, seed=0)
    embedding_half = head.midlayer.self_attn.q_proj.weight[:, :H].clone()
    init_midlayer(head, target, "target")
    mid = head.midlayer
    assert torch.equal(mid.self_attn.k_proj.weight[:, H:], top.self_attn.k_proj.weight)
    assert torch.equal(mid.self_attn.q_proj.weight[:, :H], embedding_half)  # the token's half stays as initialised
    assert torch.equal(mid.mlp.down_proj.weight, top.mlp.down_proj.weight)
    assert torch.equal(mid.hidden_norm.weight, top.input_layernorm.weight)
    narrow = Eagle3Drafter.for_target(target, draft_vocab_size=64, intermediate_size=32, seed=0)
    with pytest.raises(ValueError, match=f"set intermediate_size to {top.mlp.up_proj.out_features}"):
        init_midlayer(narrow, target, "target")


def test_acceptance_loss_is_minus_log_the_chance_a_sampled_draft_is_accepted(target, monkeypatch):
    """acceptance_loss w moves weight w from cross-entropy to -log sum_x min(p, q); descending it raises that
    chance, and alpha is logged whatever w is."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_eagle3 import TTTObjective

    p = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])  # [B=1, R=1, Vd=4]
    sure = torch.tensor([[[20.0, 0.0, 0.0, 0.0]]]).log_softmax(-1)  # greedy-right, q ~ one-hot: alpha ~ 0.5
    mask = torch.ones(1, 1, dtype=torch.bool)
    metrics = {}
    loss = TTTObjective._step_loss(SimpleNamespace(acceptance_loss=1.0), sure, p, mask, metrics, 0)
    assert metrics["acc_0"] == 1 and metrics["alpha_0"] == pytest.approx(0.5, abs=1e-6)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)
    even = torch.tensor([[[0.0, 0.0, -40.0, -40.0]]])  # q ~ p
    cross_entropy = TTTObjective._step_loss(SimpleNamespace(acceptance_loss=0.0), even, p, mask, {}, 0)
    assert float(cross_entropy) == pytest.approx(math.log(2), abs=1e-5)  # q ~ p: the entropy of p

    logits = torch.randn(1, 1, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    optimizer, alphas = torch.optim.SGD([logits], lr=1.0), []
    for _ in range(50):
        metrics = {}
        optimizer.zero_grad()
        TTTObjective._step_loss(SimpleNamespace(acceptance_loss=1.0), logits, p, mask, metrics, 0).backward()
        optimizer.step()
        alphas.append(float(metrics["alpha_0"]))
    assert alphas[-1] > alphas[0] + 0.3, alphas

    head = Eagle3Drafter.for_target(target, draft_vocab_size=64, intermediate_size=32, seed=0)
    with pytest.raises(ValueError, match="a weight in"):
        TTTObjective(head, target.get_output_embeddings().weight, 30, 3, 0.8, acceptance_loss=1.5)


def test_acceptance_by_confidence_bins_the_drafts_and_fills_empty_bins_with_the_mean(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from profile_acceptance import acceptance_by_confidence

    prompt_a = (torch.tensor([0.05, 0.95]), torch.tensor([0.0, 1.0]))
    prompt_b = (torch.tensor([1.0, 0.91]), torch.tensor([0.0, 1.0]))
    bins = acceptance_by_confidence([prompt_a, prompt_b])  # mean acceptance 0.5, one pseudo-draft per bin
    assert len(bins) == 10
    assert bins[0] == pytest.approx((0 + 0.5) / 2) and bins[9] == pytest.approx((2 + 0.5) / 4)  # 1.0: the top bin
    assert bins[1:9] == pytest.approx([0.5] * 8)


def test_recipe_rejects_an_unknown_override(tmp_path):
    done = launch("train_eagle3.py", config_in(tmp_path, "eagle3_tiny.yaml"), "--set", "max_sample=10")
    assert done.returncode == 2 and "'max_sample=10'" in done.stderr and "max_samples" in done.stderr


def test_feature_store_subsets_are_seeded_and_nested(tmp_path, monkeypatch):
    """max_samples (data-size curves) picks a seeded random subset; smaller subsets lie inside larger ones."""
    import numpy as np

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from features import FeatureStore

    lengths = [3, 5, 4, 6, 2, 7, 3, 4]
    index = {"layers": [0], "hidden_size": 2, "samples": [
        {"id": f"s{i}", "category": "chat", "offset": int(o), "length": n, "response_start": 1}
        for i, (o, n) in enumerate(zip(np.cumsum([0] + lengths), lengths))]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    np.arange(sum(lengths), dtype=np.int32).tofile(tmp_path / "tokens.i32")
    np.zeros((sum(lengths), 2), np.float16).tofile(tmp_path / "layer_0.f16")
    ids = {k: [s["id"] for s in FeatureStore(tmp_path, [0], k, seed=0).samples] for k in (2, 5, 8)}
    assert len(ids[2]) == 2 and set(ids[2]) < set(ids[5]) < set(ids[8]) and len(ids[8]) == 8
    assert ids[5] == [s["id"] for s in FeatureStore(tmp_path, [0], 5, seed=0).samples]
    assert ids[5] != [s["id"] for s in FeatureStore(tmp_path, [0], 5, seed=1).samples]
    by_id = {s["id"]: s for s in index["samples"]}
    subset = FeatureStore(tmp_path, [0], 2)
    first = by_id[subset.samples[0]["id"]]  # items read the subset's own spans
    assert subset[0]["input_ids"].tolist() == list(range(first["offset"], first["offset"] + first["length"]))
    with pytest.raises(ValueError, match="holds 8"):
        FeatureStore(tmp_path, [0], 9)


def test_online_features_are_the_stores_batches_without_the_store(tiny_data, target, monkeypatch):
    """features: online computes, per batch, the hidden states a store holds (the store keeps them in float16),
    with the same token ids, masks and max_samples subset."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from features import FeatureStore, OnlineFeatures, build_store

    tmp, _ = tiny_data
    data, layers = tmp / "runs_data_tiny", [2, 30]
    store = FeatureStore(build_store("SmolLM2-135M-Instruct", data, tmp / "online_check_store", layers, 64), layers, 3)
    online = OnlineFeatures.from_data(target, data, layers, 64, max_samples=3)
    assert len(online) == len(store) == 3
    assert [s["id"] for s in online.samples] == [s["id"] for s in store.samples]
    assert online.response_tokens().tolist() == store.response_tokens().tolist()
    items = [0, 2]
    stored, computed = store.collate([store[i] for i in items]), online.collate([online[i] for i in items])
    for key in ("input_ids", "valid", "response"):
        assert torch.equal(stored[key], computed[key])
    valid = stored["valid"]
    for layer in layers:
        assert torch.allclose(stored["hidden"][layer][valid], computed["hidden"][layer][valid].half().float(),
                              atol=2e-2, rtol=1e-2)


def test_bfloat16_features_track_float32_ones_and_a_store_keeps_its_dtype(tiny_data, target, monkeypatch):
    """feature_dtype: bfloat16 computes hidden states with a bf16 copy of the target (the recipe's own target stays
    float32) that agree with float32 ones up to bf16 rounding and give the same greedy labels almost everywhere;
    a store records its dtype, and asking for another one rebuilds it."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from features import FeatureStore, OnlineFeatures, build_store

    tmp, _ = tiny_data
    data, layers = tmp / "runs_data_tiny", [15, 30]
    exact = OnlineFeatures.from_data(target, data, layers, 64, max_samples=3)
    rounded = OnlineFeatures.from_data(target, data, layers, 64, max_samples=3, dtype=torch.bfloat16)
    assert next(target.parameters()).dtype == torch.float32
    batch = [exact[i] for i in range(3)]
    a, b = exact.collate(batch), rounded.collate(batch)
    valid = a["valid"]
    close = lambda x, y: ((x - y).norm(dim=-1) / x.norm(dim=-1)).median() < 0.05  # noqa: E731: bf16 rounding
    for layer in layers:
        assert close(a["hidden"][layer][valid], b["hidden"][layer][valid])
    head = target.get_output_embeddings().weight
    labels = lambda h: (h[30][valid] @ head.T).argmax(-1)  # noqa: E731: the target's greedy next tokens
    assert (labels(a["hidden"]) == labels(b["hidden"])).float().mean() > 0.9

    folder = tmp / "dtype_store"
    build_store("SmolLM2-135M-Instruct", data, folder, [15], max_len=64)
    assert json.loads((folder / "index.json").read_text())["dtype"] == "float32"
    build_store("SmolLM2-135M-Instruct", data, folder, [15], max_len=64, dtype=torch.bfloat16)
    assert json.loads((folder / "index.json").read_text())["dtype"] == "bfloat16"
    stored = FeatureStore(folder, [15], max_samples=3)  # the same subset as the online ones
    assert close(a["hidden"][15][valid], stored.collate([stored[i] for i in range(3)])["hidden"][15][valid])


def test_resume_skips_torn_checkpoints_and_saves_complete_ones(tmp_path, monkeypatch, capsys):
    """A run killed while saving must never leave a step folder that resuming picks: saves are renamed into
    place when complete, and a torn step folder (from an older trainer) is skipped, with a warning naming it."""
    import shutil

    from accelerate import Accelerator

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from trainer import latest_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for step in (1, 2):
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        save_checkpoint(accelerator, tmp_path, step, keep=3)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]

    real_save = accelerator.save_state

    def killed_while_saving(path):
        real_save(path)
        optimizer_bin = path / "optimizer.bin"
        optimizer_bin.write_bytes(optimizer_bin.read_bytes()[:100])
        raise KeyboardInterrupt

    accelerator.save_state = killed_while_saving
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 3, keep=3)
    del accelerator.save_state
    assert sorted(p.name for p in folder.iterdir()) == [".step-3.partial", "step-1", "step-2"]
    assert latest_checkpoint(tmp_path) == folder / "step-2"
    assert capsys.readouterr().out == ""  # the unfinished save is not a checkpoint at all

    # What an older trainer left when killed: a step folder with a cut-off optimizer.bin, one without a scheduler.
    shutil.copytree(folder / "step-2", folder / "step-4")
    whole = (folder / "step-2" / "optimizer.bin").read_bytes()
    (folder / "step-4" / "optimizer.bin").write_bytes(whole[: len(whole) // 2])
    shutil.copytree(folder / "step-2", folder / "step-5")
    (folder / "step-5" / "scheduler.bin").unlink()
    picked = latest_checkpoint(tmp_path)
    assert picked == folder / "step-2"
    warnings = capsys.readouterr().out
    assert f"skipping checkpoint {folder / 'step-5'}: scheduler.bin missing" in warnings
    assert f"skipping checkpoint {folder / 'step-4'}: optimizer.bin is truncated or corrupted" in warnings
    accelerator.load_state(picked)  # the one picked does resume

    shutil.rmtree(folder / "step-5")
    save_checkpoint(accelerator, tmp_path, 4, keep=2)  # replaces the torn step-4, drops the killed save's leftovers
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4"]
    assert latest_checkpoint(tmp_path) == folder / "step-4"
    assert capsys.readouterr().out == ""


def test_a_sample_line_torn_by_a_kill_is_dropped_and_generated_again(tiny, tmp_path, monkeypatch, capsys):
    """A data run killed mid-append leaves half a line: reading drops it with a note, a rerun cuts it off and
    generates that sample again; a bad line anywhere else is an error naming file and line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from data import generate_responses
    from features import read_samples

    model = AutoModelForCausalLM.from_pretrained(tiny / "target")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "target", padding_side="left")
    prompts = [{**json.loads(line), "source": "tiny"} for line in (tiny / "prompts.jsonl").open()]

    def generate():
        generate_responses({"batch_size": 2, "max_new_tokens": 3}, model, tokenizer, prompts, tmp_path, 0, 1)

    generate()
    path = tmp_path / "samples.0.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(prompts)
    path.write_bytes(b"".join(lines[:3]) + lines[3][:25])  # killed while appending the fourth line
    assert [s["id"] for s in read_samples(tmp_path, max_len=64)] == sorted(json.loads(line)["id"] for line in lines[:3])
    assert f"{path}: dropped the torn last line 4 (25 bytes)" in capsys.readouterr().out

    generate()  # the rerun: cut the torn line off, then generate its sample again
    assert f"{path}: cut off a torn last line (25 bytes)" in capsys.readouterr().out
    again = path.read_bytes().splitlines(keepends=True)
    assert again[:3] == lines[:3] and len(again) == 4
    assert {json.loads(line)["id"] for line in again} == {p["id"] for p in prompts}

    path.write_bytes(again[0] + b'{"id": "chat-0", "sou\n' + b"".join(again[2:]))  # damage that is not a torn tail
    with pytest.raises(ValueError) as err:
        read_samples(tmp_path, max_len=64)
    assert str(err.value).startswith(f"{path}, line 2: not valid JSON") and "delete that line" in str(err.value)


def test_every_recipe_explains_itself_with_help_and_writes_nothing():
    """`--help` on each runnable recipe prints its usage and exits 0, leaving the repository untouched
    (build_dev_set.py --help once rewrote the tracked dev set; data.py --help crashed)."""
    repo = Path(__file__).resolve().parents[1]
    scripts = ["build_dev_set.py", "data.py", "evaluate.py", "learning_curve.py", "profile_acceptance.py", "ship.py",
               "train_dflash.py", "train_eagle3.py", "train_router.py", "tune_entropy.py"]
    prompt_sets = {p: p.stat().st_mtime_ns for p in (repo / "hf_whiflash" / "data").glob("*.jsonl")}
    runs = {s: subprocess.Popen([sys.executable, str(repo / "recipes" / s), "--help"], cwd=repo / "recipes",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in scripts}
    for script, run in runs.items():
        out = run.communicate(timeout=120)[0]
        assert run.returncode == 0 and "usage:" in out, f"{script} --help: {out[-500:]}"
    assert len(prompt_sets) == 2 and all(p.stat().st_mtime_ns == t for p, t in prompt_sets.items())


def test_learning_curve_finds_where_a_log_linear_trend_reaches_each_goal(tmp_path):
    """Points on acceptance = 1.2 + 0.1 * log2(tokens / 1000), each evaluated folder mapped to its steps: the fit
    recovers the trend, so acceptance 2.2 lies 10 doublings past 1000 tokens."""
    samples = [("a", 100, 10), ("b", 300, 10), ("c", 40, 39)]  # cut at max_len 100; "c" has no response to learn
    with gzip.open(tmp_path / "samples.0.jsonl.gz", "wt") as f:  # so the trainers see 100 tokens a sequence
        f.writelines(json.dumps({"id": i, "input_ids": [1] * n, "response_start": r}) + "\n" for i, n, r in samples)
    rows = [{"route": "eagle3", "folder": f"step-{steps}", "acceptance_length": {"overall": 1.2 + 0.1 * math.log2(
        steps * 2 * 100 / 1000), "code": 1.5}} for steps in (5, 10, 40)]  # 2 sequences a step
    (tmp_path / "acceptance.json").write_text(json.dumps({"results": rows}))
    (tmp_path / "throughput.json").write_text(json.dumps({"stages": {
        "generation": {"fp32_tokens_per_s": 1.0, "bf16_tokens_per_s": 2.0}, "features": {"fp32_tokens_per_s": 4.0},
        "train_eagle3": {"fp32_tokens_per_s": 4.0}}}))
    config = {"data": str(tmp_path), "max_len": 100, "throughput": str(tmp_path / "throughput.json"),
              "goals": {"eagle3": {"overall": 2.2, "code": 3.0}},
              "drafters": {"eagle3": {"batch_size": 2, "prompts": {"dev": {str(tmp_path / "acceptance.json"): {
                  f"step-{steps}": steps for steps in (40, 5, 10)}}}}}}
    (tmp_path / "curve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run("learning_curve.py", tmp_path / "curve.yaml", "--out", str(tmp_path / "curve"))
    report = json.loads((tmp_path / "curve.json").read_text())["drafters"]["eagle3"]
    assert [r["tokens"] for r in report["curves"]["dev"]] == [1000, 2000, 8000]
    overall, code = report["goals"]
    assert overall["per_doubling"] == pytest.approx(0.1) and overall["tokens"] == pytest.approx(1000 * 2 ** 10)
    assert overall["training_hours"] == pytest.approx((1000 * 2 ** 10 - 8000) / 2 / 3600)  # train + features
    assert overall["fresh_data_hours"] == pytest.approx(1000 * 2 ** 10 / 2 / 3600)  # the fastest generation
    assert code["tokens"] == math.inf  # a flat curve never gets there
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_ship_assembles_a_folder_with_one_drafter(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_whiflash import WhiFlashAssistant

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "shipped"
    ship = [sys.executable, str(repo / "recipes" / "ship.py")]
    run = subprocess.run(ship + ["--dflash", str(tiny / "drafters" / "dflash"), "--out", str(out)],
                         cwd=repo / "recipes", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["dflash", "whiflash_config.json"]
    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    assistant = WhiFlashAssistant.from_pretrained(target, out)
    assert set(assistant.drafters) == {"dflash", "lookup"} and assistant.dflash.fc.weight.dtype == torch.float32
    assert subprocess.run(ship + ["--out", str(out)], cwd=repo / "recipes", capture_output=True, text=True,
                          timeout=120).returncode == 2
    # --update swaps in one retrained drafter and keeps the rest of the folder (here: the DFlash drafter and the
    # settings someone tuned), dropping only the replaced drafter's stale files
    settings = (out / "whiflash_config.json").read_text().replace('"eagle_steps": null', '"eagle_steps": 3')
    assert '"eagle_steps": 3' in settings
    (out / "whiflash_config.json").write_text(settings)
    (out / "eagle3").mkdir()
    (out / "eagle3" / "acceptance.json").write_text("{}")
    run = subprocess.run(ship + ["--update", "--eagle3", str(tiny / "drafters" / "eagle3"), "--out", str(out)],
                         cwd=repo / "recipes", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "whiflash_config.json").read_text() == settings and not (out / "eagle3" / "acceptance.json").exists()
    assistant = WhiFlashAssistant.from_pretrained(target, out)
    assert set(assistant.drafters) == {"eagle3", "dflash", "lookup"}  # lookup: on by default, with its defaults
    assert sorted(p.name for p in out.parent.iterdir()) == ["shipped"]  # no partial or old folder left behind


def test_extra_feature_layers_beyond_the_target_are_a_clear_error(tiny, monkeypatch):
    """The SmolLM2 configs' extra_feature_layers [2, 15, 27, 28, 30] once made a shallower target fail with an
    IndexError deep in feature extraction."""
    from transformers import AutoModelForCausalLM

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from features import store_layers

    target = AutoModelForCausalLM.from_pretrained(tiny / "target")  # 6 layers: hidden_states 0..6
    assert store_layers(target, [2, 6], [3, 5]) == [2, 3, 5, 6]
    with pytest.raises(ValueError, match=r"extra_feature_layers \[15, 27\] are outside .* hidden_states 0..6"):
        store_layers(target, [2, 6], [2, 15, 27])


def test_feature_store_gains_missing_layers_and_appends_the_samples_the_data_gains(tiny_data, target, monkeypatch):
    """A second recipe reading other layers adds them to the same store (the layers there are not recomputed);
    samples added to the data are computed alone and appended, even after an append killed midway; a store
    holding a sample the data lost is rebuilt whole."""
    import numpy as np

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from features import FeatureStore, build_store, read_samples

    def assert_features_are_the_targets(store, i):
        sample = store[i]
        with torch.no_grad():
            hidden = target(sample["input_ids"][None], output_hidden_states=True).hidden_states
        for layer in (2, 28):
            assert np.allclose(sample["hidden"][layer].float(), hidden[layer][0].half().float(), atol=2e-2, rtol=1e-2)

    tmp, rows = tiny_data
    rows = sorted(rows, key=lambda r: -len(r["input_ids"]))  # the shortest last: max_len keeps it
    data = tmp / "grown_data"
    data.mkdir()
    (data / "samples.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
    folder = tmp / "grown_store"
    build_store("SmolLM2-135M-Instruct", data, folder, [2], max_len=64)
    first = (folder / "layer_2.f16").stat().st_mtime_ns
    build_store("SmolLM2-135M-Instruct", data, folder, [2, 28], max_len=64)
    index = json.loads((folder / "index.json").read_text())
    assert index["layers"] == [2, 28] and (folder / "layer_2.f16").stat().st_mtime_ns == first
    assert not list(folder.glob("*.partial"))
    before = FeatureStore(folder, [2, 28])
    assert_features_are_the_targets(before, 0)
    old_rows = {layer: np.array(store) for layer, store in before.layers.items()}

    (data / "samples.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    for name in ["tokens.i32", "layer_2.f16", "layer_28.f16"]:  # what an append killed midway leaves behind
        with (folder / name).open("ab") as f:
            f.write(b"\xff" * 4096)
    build_store("SmolLM2-135M-Instruct", data, folder, [2], max_len=64)
    grown = FeatureStore(folder, [2, 28])
    assert len(grown) == len(before) + 1 == len(read_samples(data, 64))
    for layer, old in old_rows.items():  # the samples already there were not recomputed
        assert np.array_equal(np.array(grown.layers[layer][: len(old)]), old)
    assert_features_are_the_targets(grown, len(grown) - 1)
    assert (folder / "tokens.i32").stat().st_size == sum(s["length"] for s in grown.samples) * 4

    gone = grown.samples[0]["id"]
    (data / "samples.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1] if r["id"] != gone))
    build_store("SmolLM2-135M-Instruct", data, folder, [2], max_len=64)
    rebuilt = FeatureStore(folder, [2, 28])
    assert [s["id"] for s in rebuilt.samples] == [s["id"] for s in read_samples(data, 64)]
    assert len(rebuilt) == len(grown) - 1
    assert_features_are_the_targets(rebuilt, 0)


def test_dflash_mask_token_auto_picks_an_id_the_data_never_contains(tiny_data, tokenizer, monkeypatch):
    """mask_token_id: auto (the recipes' default): SmolLM2 has no mask token, so the highest special token the
    data leaves unused (16, <empty_output>); without unused special tokens, the highest unused id."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_dflash import mask_token

    _, rows = tiny_data
    assert mask_token(tokenizer, 49152, rows) == 16
    assert mask_token(tokenizer, 49152, rows + [{"input_ids": [15, 16]}]) == 14
    every_special = [{"input_ids": list(range(17))}]
    assert mask_token(tokenizer, 49152, rows + every_special) == max(set(range(49152)) - {t for r in rows for t in
                                                                                         r["input_ids"]})
    with pytest.raises(ValueError, match="no token id the training data leaves unused"):
        mask_token(tokenizer, 20, [{"input_ids": list(range(20))}])


def test_templates_train_drafters_for_another_architecture(tmp_path):
    """data -> both trainers -> drafters for an 8-layer Qwen2 target with its own tokenizer, from the target-neutral
    templates changed only in target, sizes and steps: the layers each drafter reads come from the target's depth,
    the mask token from the data, and part of the prompts from a jsonl file of our own."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from hf_whiflash.drafters.dflash import default_target_layers
    from hf_whiflash.drafters.eagle3 import default_feature_layers
    from helpers import word_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "qwen2-tiny"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 pad_token_id=1, bos_token_id=None, eos_token_id=2)).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    own = tmp_path / "my_prompts.jsonl"
    own.write_text(json.dumps({"prompt": "write a function that adds two numbers"}) + "\n\n" +
                   json.dumps({"messages": [{"role": "user", "content": "tell me a story"}], "category": "chat"}) + "\n")
    run("data.py", config_in(tmp_path, "data_template.yaml", target=str(folder), max_new_tokens=16,
                             sources={"self_synthesis": 2, "code": 2, "jsonl": {"path": str(own)}}))
    rows = [json.loads(line) for line in (tmp_path / "runs_data_my-target" / "samples.0.jsonl").open()]
    assert sorted(r["source"] for r in rows) == ["code", "code", "jsonl", "jsonl", "self", "self"]
    held = tmp_path / "eval_prompts.jsonl"  # in-run evaluation on prompts of our own, every 2 steps
    held.write_text("".join(json.dumps({"id": f"e{i}", "category": "chat", "messages": [
        {"role": "user", "content": text}]}) + "\n" for i, text in enumerate(["add two numbers", "a story"])))
    evaluation = {"eval_prompts": str(held), "eval_every": 2, "eval_new_tokens": 12}
    run("train_eagle3.py", config_in(tmp_path, "eagle3_template.yaml", target=str(folder), draft_vocab_size=32,
                                     max_steps=4, **evaluation))
    log = run("train_dflash.py", config_in(tmp_path, "dflash_template.yaml", target=str(folder), max_steps=4,
                                          loss_vocab=16, **evaluation))
    assert "mask_token_id: auto -> " in log and "loss over the 16 most frequent response tokens" in log
    for run_folder, positions in (("runs_eagle3-my-target", 7), ("runs_dflash-my-target", 15)):
        rows = [json.loads(line) for line in (tmp_path / run_folder / "log.jsonl").open()]
        evaluated = [(r["step"], r["split"]) for r in rows if "split" in r]
        assert evaluated == [(step, split) for step in (0, 2, 4) for split in ("train", "eval_prompts")]
        assert all(len(r["accuracy"]) == positions and r["counted"][0] > 0 for r in rows if "split" in r)
    printed = run("training_curves.py", tmp_path / "runs_eagle3-my-target", str(tmp_path / "runs_dflash-my-target"),
                  "--out", str(tmp_path / "curves"))
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert [len(c["eval_prompts"]) for c in curves.values()] == [3, 3] and "| eval_prompts | 4 |" in printed
    assert (tmp_path / "curves.png").stat().st_size > 1000
    target = AutoModelForCausalLM.from_pretrained(folder).eval()
    eagle3 = Eagle3Drafter.from_pretrained(tmp_path / "runs_eagle3-my-target" / "final").attach(target)
    dflash = DFlashDrafter.from_pretrained(tmp_path / "runs_dflash-my-target" / "final").attach(target)
    assert eagle3.feature_layers == default_feature_layers(8) == [2, 4, 5]  # hidden_states indices
    assert dflash.config.dflash["target_layer_ids"] == default_target_layers(8, 3) == [1, 3, 5]  # layer ids
    assistant = WhiFlashAssistant(target, eagle3=eagle3, dflash=dflash, eagle_steps=3, dflash_block_size=4)
    ids = chat_ids(word_tokenizer(), "write a function that adds two numbers")
    out = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(out, target.generate(ids, max_new_tokens=12, do_sample=False))
    assert sum(r.drafted for r in assistant.stats.rounds) > 0


def test_templates_name_no_target_beyond_their_target_key():
    """A template copied for a new target needs its target and paths changed, nothing else: no layer list, no
    starting drafter, no thread count of one machine."""
    for name in ("data_template.yaml", "eagle3_template.yaml", "dflash_template.yaml", "router_template.yaml"):
        config = yaml.safe_load((REPO / "recipes" / "configs" / name).read_text())
        assert "extra_feature_layers" not in config and not config.get("init_from") and not config.get("threads")
        assert "smollm2" not in (REPO / "recipes" / "configs" / name).read_text().lower()


def write_jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_own_prompts_come_from_a_jsonl_file_as_prompts_or_chats(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from prompts import jsonl_prompts

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 2 and 3."},
            {"role": "assistant", "content": "5, says another model"}]
    path = write_jsonl(tmp_path / "mine.jsonl", json.dumps({"prompt": "Sort a list."}), "",
                       json.dumps({"messages": chat, "category": "math", "prompt": "not this"}),
                       json.dumps({"prompt": "A third."}))
    assert jsonl_prompts(path) == [
        {"source": "jsonl", "category": "chat", "messages": [{"role": "user", "content": "Sort a list."}]},
        {"source": "jsonl", "category": "math", "messages": chat[:2]},  # the target writes its own reply
        {"source": "jsonl", "category": "chat", "messages": [{"role": "user", "content": "A third."}]}]
    assert len(jsonl_prompts(path, count=2)) == 2


@pytest.mark.parametrize("line,error", [
    ('{"prompt": "fine"', "line 2: not valid JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    ('{"text": "hello"}', "line 2: no \"prompt\" or \"messages\" (keys: ['text'])"),
    ('{"prompt": ""}', "line 2: prompt '' should be a non-empty string"),
    ('{"messages": [{"role": "human", "content": "hi"}]}', "line 2: messages[0]"),
    ('{"messages": [{"role": "system", "content": "Be brief."}]}', "line 2: the chat should end in a user"),
    ('{"prompt": "hi", "category": 3}', "line 2: category 3 should be a non-empty string"),
])
def test_a_bad_row_of_own_prompts_is_an_error_naming_its_line(tmp_path, monkeypatch, line, error):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from prompts import jsonl_prompts

    path = write_jsonl(tmp_path / "mine.jsonl", json.dumps({"prompt": "fine"}), line)
    with pytest.raises(ValueError) as raised:
        jsonl_prompts(path)
    assert str(raised.value).startswith(f"{path}, {error}")


def test_own_prompt_files_that_are_missing_or_empty_are_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from prompts import jsonl_prompts

    with pytest.raises(FileNotFoundError, match="sources.jsonl: .*missing.jsonl is no file"):
        jsonl_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="holds no prompts"):
        jsonl_prompts(write_jsonl(tmp_path / "empty.jsonl", ""))


def test_own_prompts_from_a_hub_dataset_are_streamed_and_need_the_datasets_package(monkeypatch):
    """No network here: a stand-in `datasets` module yields the rows a streamed split would."""
    import types

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from prompts import hub_prompts

    asked = []

    def load_dataset(name, config, split, streaming):
        asked.append((name, config, split, streaming))
        return iter([{"prompt": "one"}, {"messages": [{"role": "user", "content": "two"}]}, {"text": "three"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = hub_prompts("me/prompts", count=2, split="train_sft")
    assert [r["messages"][0]["content"] for r in rows] == ["one", "two"] and {r["source"] for r in rows} == {"datasets"}
    assert asked == [("me/prompts", None, "train_sft", True)]  # streamed: only the rows taken are read
    with pytest.raises(ValueError, match=r"^me/prompts \(train\), row 3: no \"prompt\""):
        hub_prompts("me/prompts", count=3)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        hub_prompts("me/prompts", count=2)


def test_data_sources_are_checked_and_own_prompts_skip_the_evaluation_sets(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from data import checked_sources, own_prompts

    from hf_whiflash import SettingsError

    for sources, error in (({"own": 3}, r"unknown key\(s\) \['own'\]; allowed: .*'jsonl'"),
                           ({"code": -1}, "code = -1 is not allowed"),
                           ({"jsonl": {"count": 3}}, r"jsonl = .* expected \{path: FILE"),
                           ({"jsonl": {"path": "a.jsonl", "count": 0}}, r"\.jsonl: count = 0"),
                           ({"datasets": {"name": "me/x"}}, r"datasets = .* expected \{name")):
        with pytest.raises(SettingsError, match=f"cfg.yaml: sources.*{error}"):
            checked_sources(sources, "cfg.yaml")
    with pytest.raises(ValueError, match="sources should map source names to counts"):
        checked_sources(None, "cfg.yaml")
    dev = json.loads((REPO / "hf_whiflash" / "data" / "dev_set.jsonl").open().readline())
    path = write_jsonl(tmp_path / "mine.jsonl", json.dumps({"messages": dev["messages"]}),
                       json.dumps({"prompt": "Something no evaluation set holds."}))
    kept = own_prompts({"jsonl": {"path": str(path)}})
    assert [r["messages"][-1]["content"] for r in kept] == ["Something no evaluation set holds."]


def test_data_stops_at_a_bad_prompt_file_before_generating_anything(tmp_path):
    bad = write_jsonl(tmp_path / "mine.jsonl", json.dumps({"prompt": "fine"}), '{"prompt": 7}')
    config = config_in(tmp_path, "data_template.yaml", sources={"self_synthesis": 2, "jsonl": {"path": str(bad)}})
    done = launch("data.py", config)
    assert done.returncode != 0 and f"{bad}, line 2: prompt 7 should be a non-empty string" in done.stderr
    assert not (tmp_path / "runs_data_my-target").exists()


@pytest.mark.parametrize("script,config_name,kind,shape", [
    ("train_eagle3.py", "eagle3_tiny.yaml", "eagle3", {"draft_vocab_size": 8192, "intermediate_size": 1536}),
    ("train_dflash.py", "dflash_tiny.yaml", "dflash", {"num_layers": 3, "block_size": 8, "intermediate_size": 1536})])
def test_recipe_starts_from_a_trained_drafter(tiny_data, script, config_name, kind, shape):
    """init_from (the SmolLM2 configs: the shipped drafters) continues training a drafter instead of starting from
    scratch; a config that contradicts the drafter's own shape is a clear error, not a silent reshape. A DFlash
    drafter may change its block size (no weight depends on it; the shipped one has 16): it trains at the config's."""
    tmp, _ = tiny_data
    shipped = REPO / "hf_whiflash" / "checkpoints" / "SmolLM2-135M-Instruct" / kind
    done = launch(script, config_in(tmp, config_name, init_from=str(shipped), out=str(tmp / f"init-{kind}")))
    assert done.returncode != 0 and "does not fit this config" in done.stderr
    log = run(script, config_in(tmp, config_name, init_from=str(shipped), out=str(tmp / f"init-{kind}"), max_steps=2,
                                **shape))
    assert f"starting from {shipped}" in log
    start = {"eagle3": Eagle3Drafter, "dflash": DFlashDrafter}[kind].from_pretrained(shipped, dtype=torch.float32)
    trained = {"eagle3": Eagle3Drafter, "dflash": DFlashDrafter}[kind].from_pretrained(tmp / f"init-{kind}" / "final")
    if kind == "dflash":
        assert trained.block_size == 8 and start.block_size == 16
        start.config.raw["block_size"] = 8
    assert trained.config.to_dict() == start.config.to_dict()
    assert trained.tokens_per_round is None  # the shipped profile measured the starting weights, not these
    if kind == "eagle3":
        assert torch.equal(trained.d2t, start.d2t)  # the head keeps the vocabulary it was trained for
    before, after = start.state_dict(), trained.state_dict()
    floats = [k for k, v in after.items() if v.is_floating_point()]
    moved = [k for k in floats if not torch.equal(after[k], before[k])]
    changed = sum((after[k].float() - before[k].float()).abs().max().item() for k in floats)
    assert moved and changed < 1.0  # two small steps away from the shipped weights, not a fresh init


def test_a_trained_head_grows_a_wider_mlp_computing_the_same(tmp_path, monkeypatch):
    """intermediate_size wider than init_from's (train_eagle3.grow_mlp): the grown head drafts exactly what the
    trained one did, its new units can learn (fresh gate/up rows), and it saves and loads at the new width."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from train_eagle3 import grow_mlp

    shipped = REPO / "hf_whiflash" / "checkpoints" / "SmolLM2-135M-Instruct" / "eagle3"
    head = Eagle3Drafter.from_pretrained(shipped, dtype=torch.float32)
    x = torch.randn(3, 5, head.config.hidden_size)  # [batch, positions, H]
    before = head.midlayer.mlp(x)
    grow_mlp(head, 2 * head.config.intermediate_size)
    wide = head.midlayer.mlp
    assert wide.up_proj.out_features == head.config.intermediate_size == 3072
    torch.testing.assert_close(wide(x), before, rtol=0, atol=1e-5)
    assert wide.gate_proj.weight[1536:].abs().sum() > 0 and not wide.down_proj.weight[:, 1536:].any()
    head.save_pretrained(tmp_path / "wide")
    loaded = Eagle3Drafter.from_pretrained(tmp_path / "wide", dtype=torch.float32)
    assert loaded.config.intermediate_size == 3072
    torch.testing.assert_close(loaded.midlayer.mlp(x), before, rtol=0, atol=1e-5)


def test_reference_continuations_are_cached_per_target(tiny, tmp_path, monkeypatch):
    """evaluate.py and profile_acceptance.py cache the target's greedy continuations of the prompts; a cache of
    another target is not read (rows without a name are the default target's, as every cache was before)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_whiflash import DEFAULT_TARGET

    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from evaluate import references

    model = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny / "target")
    prompts = [json.loads(line) for line in (tiny / "prompts.jsonl").open()][:2]
    cache = tmp_path / "dev_references.jsonl"
    cache.write_text("".join(json.dumps({"id": p["id"], "max_new_tokens": 4, "prompt_length": 1, "ids": [0, 0]}) + "\n"
                             for p in prompts))
    refs = references(model, tokenizer, prompts, 4, cache, "tiny")
    assert all(refs[p["id"]]["target"] == "tiny" and len(refs[p["id"]]["ids"]) > 2 for p in prompts)
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: pytest.fail("generated again"))
    assert references(model, tokenizer, prompts, 4, cache, "tiny") == refs
    assert references(model, tokenizer, prompts, 4, cache, DEFAULT_TARGET)[prompts[0]["id"]]["ids"] == [0, 0]


def test_long_prompts_go_in_smaller_batches(monkeypatch):
    """data.py batches by rows and by padded tokens: a batch of 64 BFCL prompts thousands of tokens long once
    spent over 15 minutes copying its growing KV cache."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    from data import token_budget_batches

    prompts = [{"id": str(i)} for i in range(10)]
    length = {str(i): n for i, n in enumerate([10, 10, 10, 10, 10, 100, 100, 100, 1000, 1000])}
    batches = list(token_budget_batches(prompts, length, batch_size=4, budget=600, max_new=50))
    # rows x (longest + 50) <= 600: four short ones (240), then "4" with "5".."7" would need 4 x 150 = 600: fits;
    # a 1000-token prompt needs 1050 alone: it still goes, one per batch
    assert [[p["id"] for p in b] for b in batches] == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8"], ["9"]]
    halves = token_budget_batches(prompts[5:8], length, batch_size=4, budget=400, max_new=50)  # 3 x 150 > 400
    assert [len(b) for b in halves] == [2, 1]
