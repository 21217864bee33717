"""tune.sft, align.reward and align.dpo end to end on a tiny pre-trained model: assistant-only loss,
malformed rows counted and skipped, exact SFT resume, reward accuracy, DPO's log 2 start with a live and
a precomputed reference, and the built-in preference pairs."""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from lmloom.align.pairs import COMPLIANT_STUBS, instruction_pairs, safety_pairs
from lmloom.artifacts.store import ArtifactStore
from lmloom.config import load_recipe
from lmloom.context import RunContext
from lmloom.models.io import model_from_files
from lmloom.pipeline import plan, run_recipe
from lmloom.stages import get_stage
from lmloom.tokenizers.loading import load_tokenizer
from lmloom.tune.builtin import Instruction
from lmloom.tune.chat import END_MARKER
from lmloom.tune.packing import pack, window_tensors
from lmloom.tune.safety import refusal_detector
from lmloom.tune.stage import PackedBatches, encode_all

LOOP = "precision: fp32, compile: false, eval_every: 1000, eval_windows: 8, final_eval_windows: 32"
RECIPE = """
name: tune-test
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: text-dir, path: {code}, patterns: ["*.py", "*.txt"]}}]
      val_fraction: 0.2
      executor: {{workers: 1}}
  tokenizer: {{stage: tokenizer.train, inputs: {{corpus: corpus}}, config: {{vocab_size: 400}}}}
  shards: {{stage: tokenizer.encode, inputs: {{corpus: corpus, tokenizer: tokenizer}}}}
  pretrain:
    stage: train.pretrain
    inputs: {{shards: shards, tokenizer: tokenizer}}
    config:
      model: {{seq_len: 128, d_model: 32, n_layers: 1, n_heads: 2}}
      batch_size: 8
      max_steps: 20
      {loop_block}
      optim: {{lr: 0.01, warmup_steps: 2}}
  sft:
    stage: tune.sft
    inputs: {{checkpoint: pretrain}}
    config: {{data: {sft_data}, safety_mix: 0.2, batch_size: 4, max_steps: 8, checkpoint_every: 2,
             log_every: 1, safety_max_new_tokens: 6, {loop}, optim: {{lr: 0.003, warmup_steps: 2}}}}
"""
ALIGN = """
  reward:
    stage: align.reward
    inputs: {{checkpoint: sft}}
    config: {{data: {pref_data}, batch_size: 4, max_steps: 6, log_every: 1, {loop}}}
  reward_full:
    stage: align.reward
    inputs: {{checkpoint: sft}}
    config: {{data: {pref_data}, pooling: last, train_trunk: true, batch_size: 4, max_steps: 3, log_every: 1,
             optim: {{lr: 0.001, warmup_steps: 0, weight_decay: 0.0}}, {loop}}}
  dpo:
    stage: align.dpo
    inputs: {{checkpoint: sft}}
    config: {{data: {pref_data}, batch_size: 4, max_steps: 3, log_every: 1, safety_max_new_tokens: 6, {loop}}}
  dpo_pre:
    stage: align.dpo
    inputs: {{checkpoint: sft}}
    config: {{data: {pref_data}, reference: precomputed, batch_size: 4, max_steps: 3, log_every: 1,
             safety_eval: false, {loop}}}
"""

TOPICS = ["lists", "dicts", "files", "loops", "strings", "sets", "tuples", "classes", "modules", "errors"]
MALFORMED = [
    "{not json",
    json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # no_assistant_turn
    json.dumps(
        {"messages": [{"role": "user", "content": "a <|end|> b"}, {"role": "assistant", "content": "x"}]}
    ),
    json.dumps({"text": "no messages field"}),
    json.dumps(["not", "an", "object"]),
]


def write_sft_data(path: Path) -> Path:
    rows = []
    for i in range(60):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Tell me about Python {topic}, number {i}."},
                        {"role": "assistant", "content": f"Python {topic} are useful. Example {i}."},
                    ]
                }
            )
        )
    rows[10:10] = MALFORMED
    path.write_text("\n".join(rows) + "\n")
    return path


def write_pref_data(path: Path) -> Path:
    rows = []
    for i in range(40):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            json.dumps(
                {
                    "prompt": f"How do I use {topic} ({i})?",
                    "chosen": f"Use {topic} like this: example {i}.",
                    "rejected": "Sure, here is how." if i % 2 else f"The weather is nice {i}.",
                }
            )
        )
    rows.append("{broken")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_recipe(tmp: Path, code: Path, sft_data: Path, pref_data: Path | None = None) -> str:
    loop_block = "\n      ".join(
        f"{part.split(':')[0].strip()}: {part.split(':')[1].strip()}" for part in LOOP.split(",")
    )
    text = RECIPE.format(code=code, sft_data=sft_data, loop=LOOP, loop_block=loop_block)
    if pref_data is not None:
        text += ALIGN.format(pref_data=pref_data, loop=LOOP)
    path = tmp / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    code = tmp_path_factory.mktemp("code")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "fnmatch.py", "bisect.py"):
        (code / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    (code / "chat.txt").write_text(
        "\n".join(
            f"<|user|>\nTell me about Python {t}.\n<|end|>\n<|assistant|>\nPython {t} are useful."
            for t in TOPICS
        )
        * 5
    )
    data = tmp_path_factory.mktemp("data")
    sft_data = write_sft_data(data / "sft.jsonl")
    pref_data = write_pref_data(data / "pref.jsonl")
    recipe = tiny_recipe(tmp_path_factory.mktemp("recipe"), code, sft_data, pref_data)
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    runs = {r.name: r.artifact for r in run_recipe(load_recipe(recipe), RunContext(store))}
    return {"runs": runs, "code": code, "sft_data": sft_data, "store": store}


def records(artifact) -> list[dict]:
    return [json.loads(line) for line in artifact.read_text("metrics.jsonl").splitlines() if line.strip()]


def test_stages_are_registered_with_the_train_permission():
    for name, kind in (
        ("tune.sft", "checkpoint"),
        ("align.reward", "reward-model"),
        ("align.dpo", "checkpoint"),
    ):
        stage = get_stage(name)
        assert (
            stage.kind == kind
            and stage.permissions == ("train",)
            and stage.inputs == {"checkpoint": "checkpoint"}
        )


def test_the_default_recipe_goes_on_to_sft_and_dpo():
    steps = [step.name for step in plan(load_recipe("quickstart"))]
    assert steps[-2:] == ["sft", "dpo"] or {"sft", "dpo"} <= set(steps)


def test_sft_output_loads_like_a_pretrained_checkpoint_and_reports_everything(setup):
    art = setup["runs"]["sft"]
    m = art.manifest.metadata
    model = model_from_files(art.read_bytes)
    assert model.config.seq_len == 128 and load_tokenizer(art).vocab_size > 0
    assert m["steps"] == 8 and math.isfinite(m["val_loss"]) and math.isfinite(m["val_loss_before"])
    assert m["safety_conversations"] > 0  # the safety mix is in
    for figures in (m["safety_before"], m["safety_after"]):
        assert figures["harmful"] == 14 and figures["benign"] == 14
        assert 0 <= figures["refusal_rate"] <= 1 and 0 <= figures["over_refusal_rate"] <= 1
    replies = art.read_json("safety_replies.json")
    assert len(replies["before"]) == len(replies["after"]) == 28
    labels = dict(get_stage("tune.sft").summarize(art.manifest))
    assert "refusal rate, held-out harmful" in labels and "held-out SFT loss" in labels


def test_malformed_rows_are_counted_and_skipped(setup):
    report = setup["runs"]["sft"].manifest.metadata["load_report"]
    assert report["rows"] == 65
    skipped = report["skipped"]
    for reason in (
        "invalid_json",
        "no_assistant_turn",
        "marker_in_content",
        "missing_field",
        "not_an_object",
    ):
        assert skipped.get(reason) == 1, (reason, skipped)
    pref = setup["runs"]["reward"].manifest.metadata["load_report"]
    assert pref["skipped"].get("invalid_json") == 1 and pref["rows"] == 41


def test_only_assistant_tokens_carry_loss(setup):
    tokenizer = load_tokenizer(setup["runs"]["pretrain"])
    turns = [
        {"role": "user", "content": "What are sets?"},
        {"role": "assistant", "content": "Unordered collections."},
    ]
    other = [{"role": "user", "content": "And lists?"}, {"role": "assistant", "content": "Ordered ones."}]
    encoded = encode_all(tokenizer, [turns, other], 127)
    windows, _ = pack(encoded, 128)
    assert len(windows) == 1  # both conversations in one window
    source = PackedBatches(window_tensors(windows), seed=0)
    inputs, targets = source.batch(0, 1)
    assert inputs.shape == targets.shape == (1, 127)
    learned = targets[targets != -100].tolist()
    assert tokenizer.decode(learned) == f"Unordered collections.\n{END_MARKER}Ordered ones.\n{END_MARKER}"
    # every other target (user turns, headers, EOS, padding) is ignored
    assert int((targets != -100).sum()) == sum(sum(mask) for _, mask in encoded)


def test_sft_resume_is_exact(setup, tmp_path, monkeypatch):
    """Interrupt right after the step-4 checkpoint, rerun, and match the uninterrupted run exactly."""
    import lmloom.train.runners as trainer  # the single-process runner saves the checkpoints

    recipe = tiny_recipe(tmp_path, setup["code"], setup["sft_data"])
    store = ArtifactStore(tmp_path / "store")
    save = trainer.save_checkpoint

    def save_then_crash(directory, model, optimizer, state, **kw):
        save(directory, model, optimizer, state, **kw)
        if state.step == 4 and "sft" not in getattr(save_then_crash, "done", ()):
            save_then_crash.done = ("sft",)
            raise KeyboardInterrupt("simulated interruption after the step-4 checkpoint")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(recipe), RunContext(store))
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    resumed = run_recipe(load_recipe(recipe), RunContext(store))[-1].artifact
    clean = setup["runs"]["sft"]
    assert resumed.manifest.metadata["resumed_from_step"] == 4
    timing = ("tokens_per_s", "elapsed_s")

    def logged(art):
        return [{k: v for k, v in r.items() if k not in timing} for r in records(art)]

    assert logged(resumed) == logged(clean)
    digest = [hashlib.sha256(a.read_bytes("model.safetensors")).hexdigest() for a in (resumed, clean)]
    assert digest[0] == digest[1]


def test_reward_model_reports_pairwise_accuracy(setup):
    art = setup["runs"]["reward"]
    m = art.manifest.metadata
    assert art.kind == "reward-model"
    assert 0 <= m["val_accuracy"] <= 1 and 0 <= m["val_accuracy_before"] <= 1 and m["held_out_pairs"] > 0
    assert all("accuracy" in r for r in records(art))
    assert m["pooling"] == "relevance" and m["train_trunk"] is False and m["trainable_parameters"] == 64
    from lmloom.align.stage import reward_model_from_files

    reward = reward_model_from_files(art.read_bytes)
    assert reward.pooling == "relevance"
    ids, answer = torch.tensor([[1, 5, 6, 7]]), torch.tensor([[0, 0, 1, 1]])
    assert reward(ids, torch.ones_like(ids), answer).shape == (1,)
    # The head learnt on the frozen trunk's features; the trunk is the SFT checkpoint's, unchanged.
    sft = model_from_files(setup["runs"]["sft"].read_bytes)
    assert all(torch.equal(v, sft.state_dict()[k]) for k, v in reward.trunk.state_dict().items())


def test_reward_model_can_train_the_whole_model_with_last_token_pooling(setup):
    from lmloom.align.stage import RewardConfig, reward_model_from_files

    art = setup["runs"]["reward_full"]
    m = art.manifest.metadata
    assert (
        m["pooling"] == "last" and m["train_trunk"] is True and m["trainable_parameters"] == m["parameters"]
    )
    reward = reward_model_from_files(art.read_bytes)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert reward.pooling == "last" and reward(ids).shape == (1,)
    sft = model_from_files(setup["runs"]["sft"].read_bytes)
    assert not all(torch.equal(v, sft.state_dict()[k]) for k, v in reward.trunk.state_dict().items())
    with pytest.raises(ValueError, match="wreck"):  # the head-only learning rate on the whole model
        RewardConfig(train_trunk=True)


def test_pair_source_buckets_pairs_of_similar_length():
    from lmloom.align.stage import EncodedPair, PairSource

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 200, (300,), generator=generator).tolist()
    pairs = [EncodedPair(([1] * n, [0] * n), ([1] * 3, [0] * 3)) for n in lengths]
    plain, bucketed = PairSource(pairs, 7, 256), PairSource(pairs, 7, 256, bucket=8)
    for epoch in (0, 1):
        order = bucketed._order(epoch)
        assert sorted(order) == list(range(300)) and order == PairSource(pairs, 7, 256, bucket=8)._order(
            epoch
        )
    assert bucketed._order(0) != bucketed._order(1)

    def padded(source):  # tokens in the first epoch's batches of 8, padding included
        return sum(source.batch(s, 8)[0].input_ids.numel() for s in range(0, 296, 8))

    assert padded(bucketed) < 0.7 * padded(plain)


@pytest.mark.parametrize("step", ["dpo", "dpo_pre"])
def test_dpo_starts_at_log_2_with_either_reference(setup, step):
    art = setup["runs"][step]
    m = art.manifest.metadata
    first = records(art)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert m["initial_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in first and key in m["val_metrics"]
    assert m["reference"] == ("precomputed" if step == "dpo_pre" else "model")
    model_from_files(art.read_bytes)  # a plain checkpoint
    if step == "dpo":
        assert m["safety_before"]["harmful"] == 14 and m["safety_after"] is not None


def test_builtin_pairs_prefer_refusals_for_harm_and_help_for_benign():
    pairs = safety_pairs("held_out")
    assert len(pairs) == 28
    harmful, benign = pairs[:14], pairs[14:]
    assert all(refusal_detector(p.chosen[0].content) for p in harmful)
    assert not any(refusal_detector(p.rejected[0].content) for p in harmful)
    assert any(p.rejected[0].content in COMPLIANT_STUBS for p in harmful)
    assert all(refusal_detector(p.rejected[0].content) for p in benign)
    assert not any(refusal_detector(p.chosen[0].content) for p in benign)
    items = [
        Instruction(f"k:{i}", "explain_function", f"m{i}", f"What does f{i} do?", f"It does {i}.")
        for i in range(6)
    ]
    answers = instruction_pairs(items, None, seed=1)
    assert len(answers) == 6
    by_prompt = {item.prompt: item.response for item in items}
    for pair in answers:
        assert pair.chosen[0].content == by_prompt[pair.prompt[0].content] != pair.rejected[0].content


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_adapter_methods_train_only_the_adapter_and_finish_as_a_plain_checkpoint(method):
    from lmloom.models.decoder import Decoder, DecoderConfig
    from lmloom.models.io import model_files
    from lmloom.tune.stage import SFTConfig, adapt_model

    torch.manual_seed(0)
    base = Decoder(DecoderConfig(vocab_size=50, seq_len=32, d_model=16, n_layers=1, n_heads=2))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = SFTConfig(method=method, lora={"rank": 2}, prefix={"n_prefix": 2, "init": "random"})
    model, finish = adapt_model(config, base, "sft")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        ("lora_" in n) if method == "lora" else not n.startswith("model.") for n in trainable
    )
    x = torch.randint(0, 50, (2, 16))
    loss = model(x, x)
    loss.backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    plain, adapter = finish()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter)
    reloaded = model_from_files(model_files(plain).__getitem__)
    assert set(reloaded.state_dict()) == set(before)
    if method == "prefix":  # the base is untouched; the prefix lives in the adapter files
        assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in before.items())
