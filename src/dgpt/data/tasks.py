"""Labeled tasks for fine-tuning: rows from JSONL or Hugging Face, the label set, GPT-1's input
transformations, left truncation, and padded batches.

Input transformations (special tokens of `dgpt.data.tokenizer`):
    classification   <|start|> text <|extract|>
    entailment       <|start|> premise <|delim|> hypothesis <|extract|>
    similarity       <|start|> text_a <|delim|> text_b <|extract|>  and  <|start|> text_b <|delim|> text_a <|extract|>
    multiple_choice  <|start|> context [question] <|delim|> choice_k <|extract|>   for every k
A sequence longer than max_len loses tokens from the left of its first segment (then, only if that is
empty, from the left of its second); the special tokens always stay. Batches are right-padded: with
causal attention, padding after a sequence's extract token cannot change its activation there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple

import torch

from dgpt.config import TaskConfig
from dgpt.data.sources import input_files, iter_hf_rows, iter_jsonl_rows
from dgpt.data.tokenizer import TextTokenizer
from dgpt.errors import DgptError

# the fields each task type reads (after the column mapping), besides "label"
FIELDS = {
    "classification": ("text",),
    "entailment": ("premise", "hypothesis"),
    "similarity": ("text_a", "text_b"),
    "multiple_choice": ("context", "choices"),
}
OPTIONAL_FIELDS = {"multiple_choice": ("question",)}  # used when present: appended to the context
LABEL = "label"


@dataclass
class TaskSpec:
    """What a head needs to know about its task; stored beside the head's weights."""

    type: str
    labels: list = field(default_factory=list)  # label values in output order ([] for regression / multiple choice)
    regression: bool = False
    num_choices: int = 0
    columns: dict[str, str] = field(default_factory=dict)
    max_len: int = 0

    @property
    def num_outputs(self) -> int:
        return 1 if self.regression or self.type == "multiple_choice" else len(self.labels)

    @property
    def sequences(self) -> int:
        """Input sequences per example: 2 for similarity (both orders), one per choice, else 1."""
        return {"similarity": 2, "multiple_choice": self.num_choices}.get(self.type, 1)

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Row:
    where: str  # "file:line" or "hf:... row i"
    fields: dict  # standard field name -> value
    label: object  # raw label value; None where the input has none (prediction)


class TaskBatch(NamedTuple):
    ids: torch.Tensor  # [B, S, T] token ids, right-padded with <|pad|>
    lengths: torch.Tensor  # [B, S] tokens per sequence; the extract token is at lengths - 1
    labels: torch.Tensor  # [B] class / choice index (long) or score (float)


@dataclass
class TaskExamples:
    sequences: list[list[list[int]]]  # per example, its S token sequences
    labels: torch.Tensor
    truncated: int  # examples with at least one sequence cut to max_len
    pad_id: int

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for seqs in self.sequences for s in seqs)

    def batch(self, indices: list[int]) -> TaskBatch:
        rows = [self.sequences[i] for i in indices]
        width = max(len(s) for seqs in rows for s in seqs)
        ids = torch.full((len(rows), len(rows[0]), width), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(rows), len(rows[0]), dtype=torch.long)
        for b, seqs in enumerate(rows):
            for s, seq in enumerate(seqs):
                ids[b, s, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                lengths[b, s] = len(seq)
        return TaskBatch(ids, lengths, self.labels[indices])

    def batches(self, batch_size: int) -> Iterator[TaskBatch]:
        for start in range(0, len(self), batch_size):
            yield self.batch(list(range(start, min(start + batch_size, len(self)))))


# --- reading rows -----------------------------------------------------------------------------------


def _source_rows(spec: str) -> Iterator[tuple[str, object]]:
    if spec.startswith("hf:"):
        yield from iter_hf_rows(spec)
        return
    for path in input_files(spec):
        if path.suffix != ".jsonl":
            raise DgptError(f"{path}: labeled data must be a .jsonl file (one JSON object per line)")
        yield from iter_jsonl_rows(path)


def read_rows(specs: list[str], spec: TaskSpec, owner: str, need_label: bool = True) -> list[Row]:
    """Every row of the sources, its fields checked (a missing field names file:line and the oracle)."""
    rows = []
    wanted = FIELDS[spec.type]
    optional = OPTIONAL_FIELDS.get(spec.type, ())
    for source in specs:
        for where, raw in _source_rows(source):
            if not isinstance(raw, dict):
                raise DgptError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            fields = {}
            for name in wanted + optional + ((LABEL,) if need_label else ()):
                column = spec.column(name)
                if column not in raw:
                    if name in optional:
                        continue
                    raise DgptError(f"{where}: no '{column}' field (oracle '{owner}', task type {spec.type})")
                fields[name] = raw[column]
            _check_texts(fields, spec, where, owner)
            rows.append(Row(where, fields, fields.pop(LABEL, raw.get(spec.column(LABEL)))))
    return rows


def _check_texts(fields: dict, spec: TaskSpec, where: str, owner: str) -> None:
    for name, value in fields.items():
        if name == "choices":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
                raise DgptError(f"{where}: field '{spec.column(name)}' must be a non-empty list of strings")
            if spec.num_choices and len(value) != spec.num_choices:
                raise DgptError(
                    f"{where}: {len(value)} choices, but oracle '{owner}' has a head for {spec.num_choices} "
                    "(every row needs the same number of choices)"
                )
        elif name != LABEL and not isinstance(value, str):
            raise DgptError(f"{where}: field '{spec.column(name)}' is {type(value).__name__}, not a string")


def task_spec(task: TaskConfig, train_rows: list[Row], max_len: int, owner: str) -> TaskSpec:
    """The spec of an oracle's head: its label set (configured or the sorted labels of the training set)."""
    spec = TaskSpec(task.type, list(task.labels), task.regression, task.num_choices, dict(task.columns), max_len)
    if spec.type == "multiple_choice" and not spec.num_choices and train_rows:
        spec.num_choices = len(train_rows[0].fields["choices"])
        if spec.num_choices < 2:
            raise DgptError(f"{train_rows[0].where}: a multiple-choice row needs at least 2 choices")
        for row in train_rows:
            _check_texts({"choices": row.fields["choices"]}, spec, row.where, owner)
    if not spec.regression and spec.type != "multiple_choice" and not spec.labels:
        values = {str(r.label): r.label for r in train_rows if _is_label(r.label)}
        spec.labels = sorted(values.values(), key=lambda v: (isinstance(v, str), v))
    return spec


def _is_label(value: object) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def label_tensor(rows: list[Row], spec: TaskSpec, owner: str) -> torch.Tensor:
    """Labels as indices (or floats for regression); a label outside the label set names file:line."""
    if spec.regression:
        for r in rows:
            if isinstance(r.label, bool) or not isinstance(r.label, (int, float)):
                raise DgptError(f"{r.where}: label {r.label!r} is not a number (oracle '{owner}' is a regression task)")
        return torch.tensor([float(r.label) for r in rows], dtype=torch.float32)
    if spec.type == "multiple_choice":
        index = {str(k): k for k in range(spec.num_choices)}
        shown = f"choice indices 0..{spec.num_choices - 1}"
    else:
        index = {str(v): i for i, v in enumerate(spec.labels)}
        shown = ", ".join(map(str, spec.labels))
    out = []
    for r in rows:
        key = str(r.label) if _is_label(r.label) else None
        if key not in index:
            raise DgptError(f"{r.where}: label {r.label!r} is not in the label set of oracle '{owner}' ({shown})")
        out.append(index[key])
    return torch.tensor(out, dtype=torch.long)


# --- the input transformations ----------------------------------------------------------------------


def segments(row: Row, spec: TaskSpec) -> list[tuple[str, str | None]]:
    """(first, second) text segments of each of the row's input sequences."""
    f = row.fields
    if spec.type == "classification":
        return [(f["text"], None)]
    if spec.type == "entailment":
        return [(f["premise"], f["hypothesis"])]
    if spec.type == "similarity":
        return [(f["text_a"], f["text_b"]), (f["text_b"], f["text_a"])]
    context = f["context"] + (" " + f["question"] if isinstance(f.get("question"), str) else "")
    return [(context, choice) for choice in f["choices"]]


def transform(first: list[int], second: list[int] | None, tok: TextTokenizer, max_len: int) -> tuple[list[int], bool]:
    """One input sequence with its special tokens, cut from the left of `first` to fit max_len."""
    over = len(first) + (len(second) + 3 if second is not None else 2) - max_len
    cut = over > 0
    if over > 0:
        drop = min(over, len(first))
        first, over = first[drop:], over - drop
        second = second[over:] if second is not None and over > 0 else second
    tail = [tok.delim_id, *second] if second is not None else []
    return [tok.start_id, *first, *tail, tok.extract_id], cut


def encode_examples(rows: list[Row], spec: TaskSpec, tokenizer: TextTokenizer, owner: str, with_labels: bool = True) -> TaskExamples:
    pieces = [segments(r, spec) for r in rows]
    texts = sorted({t for p in pieces for pair in p for t in pair if t is not None})
    ids = dict(zip(texts, tokenizer.encode_batch(texts))) if texts else {}
    sequences, truncated = [], 0
    for pairs in pieces:
        seqs = [transform(ids[a], ids[b] if b is not None else None, tokenizer, spec.max_len) for a, b in pairs]
        sequences.append([s for s, _ in seqs])
        truncated += any(cut for _, cut in seqs)
    labels = label_tensor(rows, spec, owner) if with_labels else torch.zeros(len(rows), dtype=torch.long)
    return TaskExamples(sequences, labels, truncated, tokenizer.pad_id)


def load_split(specs: list[str], spec: TaskSpec, tokenizer: TextTokenizer, owner: str) -> TaskExamples:
    return encode_examples(read_rows(specs, spec, owner), spec, tokenizer, owner)


class ExampleSampler:
    """Batches in shuffled epochs; the state (generator, order, position) resumes the exact sequence."""

    def __init__(self, examples: TaskExamples, seed: int, name: str = "data"):
        if not len(examples):
            raise DgptError(f"oracle '{name}': no labeled training examples")
        self.examples = examples
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(examples), generator=self.generator)
        self.pos = 0

    @property
    def num_tokens(self) -> int:
        return self.examples.num_tokens

    def sample(self, batch_size: int) -> TaskBatch:
        picked: list[int] = []
        while len(picked) < batch_size:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(len(self.examples), generator=self.generator), 0
            take = min(batch_size - len(picked), len(self.order) - self.pos)
            picked += self.order[self.pos : self.pos + take].tolist()
            self.pos += take
        return self.examples.batch(picked)

    @property
    def num_examples(self) -> int:
        """The examples a differentially private loop samples from (one labeled example each)."""
        return len(self.examples)

    def poisson(self, rate: float) -> TaskBatch | None:
        """Each example independently with probability `rate` (Poisson sampling, as DP-SGD's accounting assumes);
        None when none was drawn. The shuffled epoch order is left as it is."""
        picked = (torch.rand(len(self.examples), generator=self.generator, dtype=torch.float64) < rate).nonzero()[:, 0]
        return self.examples.batch(picked.tolist()) if len(picked) else None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"], int(state["pos"])
