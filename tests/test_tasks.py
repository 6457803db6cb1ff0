"""Labeled tasks: GPT-1's input transformations (exact token layout), truncation, labels, padding
invariance, and the L3 = L2 + lambda * L1 objective."""

import pytest
import torch
from conftest import SHARED_DATA
from taskdata import write_jsonl

from dgpt.config import TaskConfig, config_from_dict, dump_config, load_config
from dgpt.data.tasks import TaskExamples, TaskSpec, encode_examples, load_split, read_rows, task_spec, transform
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError
from dgpt.model.config import GPTConfig
from dgpt.model.gpt import GPT
from dgpt.model.heads import TaskHead, TaskModel
from dgpt.objectives import IGNORE_INDEX, finetune_loss, lm_loss, lm_targets, task_loss
from dgpt.train.task_eval import task_metrics

TEXTS = ["the king rode a horse", "a queen held the crown", "hello friend", "music and games", "so", "because"]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(TEXTS * 20, vocab_size=300)


def encode(tmp_path, tok, type_, rows, max_len=64, **spec):
    path = write_jsonl(tmp_path / f"{type_}.jsonl", rows)
    task = TaskConfig(type=type_, train=[str(path)], **spec)
    rows = read_rows(task.train, TaskSpec(type_, columns=task.columns, num_choices=task.num_choices), "o")
    return encode_examples(rows, task_spec(task, rows, max_len, "o"), tok, "o")


def test_classification_layout(tmp_path, tok):
    ex = encode(tmp_path, tok, "classification", [{"text": "the king", "label": 1}])
    assert ex.sequences == [[[tok.start_id, *tok.encode("the king"), tok.extract_id]]]


def test_entailment_layout(tmp_path, tok):
    ex = encode(tmp_path, tok, "entailment", [{"premise": "a queen", "hypothesis": "the crown", "label": 0}])
    assert ex.sequences == [[[tok.start_id, *tok.encode("a queen"), tok.delim_id, *tok.encode("the crown"), tok.extract_id]]]


def test_similarity_layout_has_both_orders(tmp_path, tok):
    ex = encode(tmp_path, tok, "similarity", [{"text_a": "hello", "text_b": "music", "label": 1}])
    a, b = tok.encode("hello"), tok.encode("music")
    assert ex.sequences == [[
        [tok.start_id, *a, tok.delim_id, *b, tok.extract_id],
        [tok.start_id, *b, tok.delim_id, *a, tok.extract_id],
    ]]


def test_multiple_choice_layout_one_sequence_per_choice(tmp_path, tok):
    row = {"context": "the king", "question": "so", "choices": ["a horse", "the crown", "games"], "label": 2}
    ex = encode(tmp_path, tok, "multiple_choice", [row])
    ctx = tok.encode("the king so")
    assert ex.sequences == [[[tok.start_id, *ctx, tok.delim_id, *tok.encode(c), tok.extract_id] for c in row["choices"]]]
    assert ex.labels.tolist() == [2]


def test_column_mapping(tmp_path, tok):
    ex = encode(tmp_path, tok, "entailment", [{"s1": "a queen", "s2": "hello", "y": "yes"}],
                columns={"premise": "s1", "hypothesis": "s2", "label": "y"})
    assert ex.sequences[0][0][1:-1] == [*tok.encode("a queen"), tok.delim_id, *tok.encode("hello")]


def test_truncation_cuts_the_left_of_the_first_segment_and_keeps_special_tokens(tok):
    first, second = list(range(100, 110)), [7, 8, 9]
    ids, cut = transform(first, second, tok, 10)
    assert cut and ids == [tok.start_id, 106, 107, 108, 109, tok.delim_id, 7, 8, 9, tok.extract_id]
    ids, cut = transform(first, second, tok, 5)  # first segment gone: the second loses from its left
    assert cut and ids == [tok.start_id, tok.delim_id, 8, 9, tok.extract_id]
    ids, cut = transform(first, None, tok, 4)
    assert cut and ids == [tok.start_id, 108, 109, tok.extract_id]
    assert transform([1, 2], [3], tok, 6) == ([tok.start_id, 1, 2, tok.delim_id, 3, tok.extract_id], False)


def test_truncated_examples_are_counted(tmp_path, tok):
    rows = [{"text": "the king rode a horse " * 5, "label": 0}, {"text": "so", "label": 1}]
    ex = encode(tmp_path, tok, "classification", rows, max_len=8)
    assert ex.truncated == 1
    assert max(len(s) for seqs in ex.sequences for s in seqs) == 8
    assert ex.sequences[0][0][0] == tok.start_id and ex.sequences[0][0][-1] == tok.extract_id


def test_labels_inferred_sorted_or_configured(tmp_path, tok):
    rows = [{"text": "so", "label": "pos"}, {"text": "so", "label": "neg"}]
    assert encode(tmp_path, tok, "classification", rows).labels.tolist() == [1, 0]  # sorted: neg, pos
    ex = encode(tmp_path, tok, "classification", rows, labels=["pos", "neg"])
    assert ex.labels.tolist() == [0, 1]


def test_label_outside_the_label_set_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "v.jsonl", [{"text": "so", "label": 0}, {"text": "so", "label": 5}])
    spec = TaskSpec("classification", labels=[0, 1], max_len=16)
    with pytest.raises(DgptError, match=rf"^{path}:2: label 5 is not in the label set of oracle 'o' \(0, 1\)$"):
        load_split([str(path)], spec, tok, "o")


def test_missing_field_names_file_line_and_oracle(tmp_path, tok):
    path = write_jsonl(tmp_path / "e.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}, {"premise": "a", "label": 1}])
    with pytest.raises(DgptError, match=rf"^{path}:2: no 'hypothesis' field \(oracle 'o', task type entailment\)$"):
        read_rows([str(path)], TaskSpec("entailment"), "o")


def test_multiple_choice_rows_must_have_the_same_number_of_choices(tmp_path, tok):
    rows = [{"context": "a", "choices": ["x", "y"], "label": 0}, {"context": "a", "choices": ["x", "y", "z"], "label": 0}]
    with pytest.raises(DgptError, match=r":2: 3 choices, but oracle 'o' has a head for 2"):
        encode(tmp_path, tok, "multiple_choice", rows)


def test_task_config_roundtrip_and_unknown_keys(tmp_path):
    data = {"oracles": [{"name": "a", "task": {"type": "entailment", "train": ["t.jsonl"], "columns": {"premise": "s1"}, "labels": ["x", "y"]}}],
            "finetune": {"lambda_lm": 0.0, "init_from": "runs/pre"}}
    config = config_from_dict(data)
    path = tmp_path / "c.toml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    with pytest.raises(DgptError, match=r"unknown config key 'oracles\[0\].task.colums'"):
        config_from_dict({"oracles": [{"name": "a", "task": {"colums": {}}}]})
    with pytest.raises(DgptError, match="'oracles\\[0\\].task.type' is 'ranking'; expected one of classification, entailment"):
        config_from_dict({"oracles": [{"name": "a", "task": {"type": "ranking"}}]})


def tiny_task_model(type_, outputs, regression=False, dropout=0.0):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=300, n_ctx=32, n_layer=2, n_head=2, d_model=32, d_ff=64,
                        embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0))
    return TaskModel(gpt, TaskHead(32, type_, outputs, dropout, regression)).eval()


@pytest.mark.parametrize("type_, sequences, outputs", [("classification", 1, 3), ("similarity", 2, 1), ("multiple_choice", 4, 1)])
def test_padding_never_changes_a_prediction(type_, sequences, outputs):
    model = tiny_task_model(type_, outputs, regression=type_ == "similarity")
    seqs = [[[2] + [10 + i + j for j in range(3 + i + s)] + [4] for s in range(sequences)] for i in range(3)]
    ex = TaskExamples(seqs, torch.zeros(3, dtype=torch.long), 0, pad_id=1)
    tight = ex.batch([0, 1, 2])
    padded = tight._replace(ids=torch.nn.functional.pad(tight.ids, (0, 9), value=1))
    with torch.no_grad():
        a, _ = model(*tight[:2])
        b, _ = model(*padded[:2])
        alone, _ = model(*ex.batch([0])[:2])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[:1], alone, rtol=1e-5, atol=1e-6)


def test_l3_is_l2_plus_lambda_l1_and_lambda_zero_is_l2():
    model = tiny_task_model("classification", 2)
    ids = torch.tensor([[[2, 20, 21, 22, 4, 1, 1]], [[2, 30, 31, 32, 33, 34, 4]]])
    lengths = torch.tensor([[5], [7]])
    labels = torch.tensor([0, 1])
    outputs, lm_logits = model(ids, lengths, with_lm=True)
    flat, flat_len = ids.flatten(0, 1), lengths.flatten()
    l3, l2, l1 = finetune_loss(outputs, labels, lm_logits, flat, flat_len, 0.5)
    assert l2.item() == pytest.approx(task_loss(outputs, labels).item())
    assert l1.item() == pytest.approx(lm_loss(lm_logits[:, :-1], lm_targets(flat, flat_len)).item())
    assert (l3 - l2).item() == pytest.approx(0.5 * l1.item(), rel=1e-6)
    assert lm_targets(flat, flat_len)[0].tolist() == [20, 21, 22, 4, IGNORE_INDEX, IGNORE_INDEX]  # padding ignored
    l3_0, l2_0, l1_0 = finetune_loss(outputs, labels, None, flat, flat_len, 0.0)
    assert l1_0 is None and torch.equal(l3_0, l2_0)


@pytest.mark.skipif(not (SHARED_DATA / "tasks").is_dir(), reason=f"shared task data not found at {SHARED_DATA / 'tasks'}")
@pytest.mark.parametrize("name, type_", [("sst2", "classification"), ("rte", "entailment"), ("mrpc", "similarity"), ("copa", "multiple_choice")])
def test_shared_task_files_read_with_the_standard_field_names(tok, name, type_):
    path = SHARED_DATA / "tasks" / name / "validation.jsonl"
    rows = read_rows([str(path)], TaskSpec(type_), name)
    spec = task_spec(TaskConfig(type=type_), rows, 64, name)
    ex = encode_examples(rows[:50], spec, tok, name)
    assert len(ex) == 50 and spec.sequences == {"similarity": 2, "multiple_choice": 2}.get(type_, 1)


def test_f1_for_two_labels_and_macro_f1_for_more():
    def scores(predicted, labels, n):
        outputs = torch.nn.functional.one_hot(torch.tensor(predicted), n).float()
        return task_metrics(outputs, torch.tensor(labels), TaskSpec("classification", labels=list(range(n))))

    # label 1 (positive): TP 2, FP 1, FN 1 -> F1 2*2 / (2*2 + 2)
    binary = scores([1, 1, 0, 1, 0], [1, 0, 1, 1, 0], 2)
    assert binary["f1"] == pytest.approx(4 / 6) and binary["accuracy"] == pytest.approx(3 / 5) and "macro_f1" not in binary
    # class 0: TP 2, FP 0, FN 1 -> 0.8; class 1: TP 1, FP 2, FN 0 -> 0.5; class 2: TP 0, FP 0, FN 1 -> 0; class 3 never
    # occurs (neither label nor prediction) and is left out of the mean, as scikit-learn's f1_score(average="macro") does
    multi = scores([0, 0, 1, 1, 1], [0, 0, 0, 1, 2], 4)
    assert multi["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3) and "f1" not in multi
    assert scores([2, 2], [2, 2], 3)["macro_f1"] == 1.0
