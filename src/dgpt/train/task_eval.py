"""Fine-tuning evaluation: a task model's outputs on a labeled split, and its metrics.

accuracy (classification and multiple choice), F1 of label index 1 (two-label classification tasks),
macro-F1 (the mean of every class's F1, over the classes that occur as a label or a prediction: more than
two labels), Pearson and Spearman correlation (regression), and the mean L2 loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dgpt.data.tasks import TaskExamples, TaskSpec
from dgpt.objectives import task_loss
from dgpt.train.local import autocast

METRICS = ("loss", "accuracy", "f1", "macro_f1", "pearson", "spearman")  # every key any task may report


@torch.no_grad()
def task_outputs(model: torch.nn.Module, examples: TaskExamples, batch_size: int, device: torch.device, dtype: str = "float32") -> torch.Tensor:
    """Head outputs for every example, in order (eval mode; padding does not change them)."""
    was_training = model.training
    model.eval()
    out = []
    for batch in examples.batches(batch_size):
        with autocast(device, dtype):
            outputs, _ = model(batch.ids.to(device), batch.lengths.to(device))
        out.append(outputs.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def task_metrics(outputs: torch.Tensor, labels: torch.Tensor, spec: TaskSpec) -> dict[str, float]:
    if not len(labels):
        return {}
    metrics = {"loss": task_loss(outputs, labels).item()}
    if spec.regression:
        x, y = outputs.double().numpy(), labels.double().numpy()
        metrics["pearson"] = _correlation(x, y)
        metrics["spearman"] = _correlation(_ranks(x), _ranks(y))
        return metrics
    predicted = outputs.argmax(dim=-1)
    metrics["accuracy"] = (predicted == labels).double().mean().item()
    if spec.type == "multiple_choice":
        return metrics
    f1, occurs = _class_f1(predicted, labels, len(spec.labels))
    if len(spec.labels) == 2:
        metrics["f1"] = f1[1].item()
    elif len(spec.labels) > 2:
        metrics["macro_f1"] = f1[occurs].mean().item()
    return metrics


def _class_f1(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's F1 = 2 TP / (2 TP + FP + FN) (0 where it never occurs), and whether it occurs as a label or a prediction."""
    tp = torch.bincount(labels[predicted == labels], minlength=classes).double()
    either = (torch.bincount(predicted, minlength=classes) + torch.bincount(labels, minlength=classes)).double()
    occurs = either > 0
    return torch.where(occurs, 2 * tp / either.clamp(min=1), 0.0), occurs


def evaluate_task(model, examples: TaskExamples, spec: TaskSpec, batch_size: int, device, dtype: str = "float32") -> dict[str, float]:
    return task_metrics(task_outputs(model, examples, batch_size, device, dtype), examples.labels, spec)


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing their mean rank (Spearman's convention)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def task_gradient(model: torch.nn.Module, examples: TaskExamples, params: list[torch.Tensor], batch_size: int,
                  device: torch.device, dtype: str = "float32") -> torch.Tensor:
    """The gradient of the mean validation task loss (L2) with respect to `params`, flattened (eval mode)."""
    was_training = model.training
    model.eval()
    total = [torch.zeros_like(p) for p in params]
    for batch in examples.batches(batch_size):
        with autocast(device, dtype):
            outputs, _ = model(batch.ids.to(device), batch.lengths.to(device))
        loss = task_loss(outputs.float(), batch.labels.to(device)) * (len(batch.labels) / len(examples))
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
    model.train(was_training)
    return torch.cat([t.flatten() for t in total])
