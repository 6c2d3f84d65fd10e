"""Instruction finetuning: mixtures, templates, packing, and a loss on the targets only."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from scaling_jax.config import ObjectiveConfig, load_config
from scaling_jax.data.instructions import (
    Example,
    InstructionData,
    MixtureEntry,
    PackedExamples,
    encode,
    generate,
    mixed_order,
    mixture_from_config,
    read_jsonl,
    render,
    write_jsonl,
)
from scaling_jax.data.tokenizer import ByteTokenizer
from scaling_jax.errors import ConfigError, DataError
from scaling_jax.model.transformer import Decoder
from scaling_jax.objectives.finetune import InstructionFinetune

TOK = ByteTokenizer()


def _reference_masks(examples, length):
    """Slow layout: example by example, slot i predicts token i+1; prompt slots are bidirectional."""
    bidir, loss = np.zeros(length - 1, int), np.zeros(length - 1, int)
    at = 0
    for seq, prompt in examples:
        for i in range(seq.size - 1):
            bidir[at + i] = i < prompt  # the slot's input token is a prompt token
            loss[at + i] = i + 1 >= prompt  # the slot's target token is a target token (or eos)
        at += seq.size - 1
    return bidir, loss


def test_batches_train_on_targets_only_with_a_bidirectional_prompt():
    length = 48
    texts = [("What is 2 + 2?\n", "4"), ("Reverse: a b\n", "b a"), ("Say hi\n", "hi")]
    examples = [encode(p, t, TOK, length) for p, t in texts]
    rows = PackedExamples(examples, length, TOK.pad_id)
    assert len(rows) == 1  # three short examples share one row
    batch = InstructionFinetune(ObjectiveConfig(name="finetune"), TOK).prepare(
        {k: v[None] for k, v in rows[0].items()})
    bidir, loss = _reference_masks(examples, length)
    np.testing.assert_array_equal(batch["bidirectional"][0], bidir)
    np.testing.assert_array_equal(batch["loss_mask"][0], loss)
    predicted = batch["targets"][0][batch["loss_mask"][0] == 1]
    expected = np.concatenate([np.append(TOK.encode(t), TOK.eos_id) for _, t in texts])
    np.testing.assert_array_equal(predicted, expected)  # exactly the targets and their eos
    assert list(np.unique(batch["segment_ids"][0])) == [0, 1, 2, 3]


def test_loss_is_the_mean_target_cross_entropy_and_ignores_prompt_predictions():
    length = 40
    examples = [encode("Copy: abc\n", "abc", TOK, length), encode("Copy: xy\n", "xy", TOK, length)]
    rows = PackedExamples(examples, length, TOK.pad_id)
    objective = InstructionFinetune(ObjectiveConfig(name="finetune"), TOK)
    batch = {k: jnp.asarray(v) for k, v in objective.prepare({k: v[None] for k, v in rows[0].items()}).items()}
    cfg = load_config(None, ["model.layers=1", "model.d_model=32", "model.heads=2", "model.head_dim=16",
                             "model.d_ff=64"]).model
    model = Decoder(cfg, nnx.Rngs(0))
    loss, metrics = objective.loss(model, batch)
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"], bidirectional=batch["bidirectional"] > 0)
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), batch["targets"]))[0]
    on = np.asarray(batch["loss_mask"][0]) == 1
    assert int(metrics["tokens"]) == 3 + 1 + 2 + 1
    np.testing.assert_allclose(float(loss), nll[on].mean(), rtol=1e-6)
    assert nll[~on].mean() != pytest.approx(nll[on].mean())  # masked positions would change the number


def test_mixture_follows_the_rates_and_walks_each_dataset_without_repeats():
    order = mixed_order([300, 100], [3.0, 1.0], seed=0)
    share = np.mean([d == 0 for d, _ in order])
    assert len(order) == 400 and abs(share - 0.75) < 0.05
    for dataset, size in ((0, 300), (1, 100)):
        walk = [i for d, i in order if d == dataset]
        assert len(set(walk[:size])) == min(size, len(walk))  # no repeat before the dataset is exhausted
        assert set(walk) <= set(range(size))
    assert len({i for d, i in order if d == 1}) == 100  # the oversampled dataset was covered in full


def test_templates_zero_few_shot_and_chain_of_thought():
    x = Example("What is 12 + 30?", "42", "2 + 0 = 2, 1 + 3 = 4.")
    pool = [Example(f"What is {i} + 1?", str(i + 1)) for i in range(5)]
    assert render(x, MixtureEntry("s"), []) == ("What is 12 + 30?\n", "42")
    prompt, target = render(x, MixtureEntry("s", template="few_shot", shots=2), pool[:2])
    assert prompt == "What is 0 + 1?\n1\n\nWhat is 1 + 1?\n2\n\nWhat is 12 + 30?\n" and target == "42"
    prompt, target = render(x, MixtureEntry("s", template="cot"), [])
    assert prompt.endswith("Let's think step by step.\n") and target == "2 + 0 = 2, 1 + 3 = 4. So the answer is 42."
    with pytest.raises(DataError, match="rationale"):
        render(Example("q", "a"), MixtureEntry("s", template="cot"), [])


def test_long_prompts_lose_their_beginning_not_the_question():
    seq, prompt = encode("x" * 100 + "QUESTION\n", "ANSWER", TOK, 32)
    assert seq.size == 32 and TOK.decode(seq).endswith("QUESTION\nANSWER") and seq[-1] == TOK.eos_id
    assert prompt == 32 - len("ANSWER") - 1
    assert seq[0] == TOK.bos_id and TOK.decode(seq[1:prompt]) == ("x" * 100 + "QUESTION\n")[-(prompt - 1):]


def test_generated_tasks_are_correct_and_deterministic():
    examples = generate("arithmetic", 200)
    for x in examples:
        a, b = map(int, re.findall(r"\d+", x.inputs))
        assert x.targets == str(a + b)
    assert generate("arithmetic", 200) == examples
    words = generate("reverse_words", 50)
    assert all(x.targets.split() == x.inputs.split(": ")[1].split()[::-1] for x in words)
    signature = generate("function_arguments", 20)
    assert all(x.inputs.endswith("(") and x.targets.endswith(")") for x in signature)


def test_user_jsonl_round_trips_and_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    examples = [Example("q1", "a1"), Example("q2", "a2", "because")]
    write_jsonl(examples, str(path))
    assert read_jsonl(str(path)) == examples
    path.write_text(json.dumps({"inputs": "q"}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:1 .*'targets'"):
        read_jsonl(str(path))
    # a null rationale is no rationale (the cot template then refuses it), not the text "None"
    path.write_text(json.dumps({"inputs": "q", "targets": "a", "rationale": None}) + "\n")
    assert read_jsonl(str(path)) == [Example("q", "a")]
    path.write_text(json.dumps({"inputs": "q", "targets": "a", "rationale": 3}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:1 field 'rationale' must be a string"):
        read_jsonl(str(path))
    with pytest.raises(ConfigError, match=r"data.instructions\[0\].rate"):
        mixture_from_config([{"source": str(path), "rate": 0}])
    with pytest.raises(ConfigError, match="unknown generated task"):
        mixture_from_config(["generated:nope"])


def test_instruction_data_mixes_user_files_with_generated_tasks(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_jsonl([Example(f"Echo {i}", str(i)) for i in range(200)], str(path))
    config = load_config(None, ["data.seq_len=64", "data.val_fraction=0.1", "objective=finetune",
                                f"data.instructions=[{{source: {path}, rate: 1}}, "
                                "{source: 'generated:arithmetic', rate: 1, template: cot}]"])
    data = InstructionData(config, TOK)
    assert data.num_train_docs + data.num_val_docs == 200 + 4000
    row = data.train_rows[0]
    assert row["tokens"].shape == (65,) and row["target_mask"].any()
    texts = [TOK.decode(data.train_rows[i]["tokens"]) for i in range(len(data.train_rows))]
    assert any("Echo" in t for t in texts) and any("So the answer is" in t for t in texts)
    assert jax.tree.all(jax.tree.map(lambda a: a.shape == (65,), data.val_rows[0]))
