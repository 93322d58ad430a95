"""Logits for a list of texts (no grad, length-sorted big batches) and the metrics we report."""
from __future__ import annotations

import numpy as np
import torch

from .data import collate, encode, sorted_batches


@torch.inference_mode()
def logits_for_ids(model, ids: list[list[int]], batch_size: int, pad_id: int, device=None,
                   rows=None, progress: bool = False) -> np.ndarray:
    """Logits in input order. `rows` restricts to those indices (used to shard across processes)."""
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = sorted_batches([len(x) for x in ids], batch_size)
    if rows is not None:
        batches = [batches[i] for i in rows]
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float32)
    for b in tqdm(batches, desc="eval", leave=False, disable=not progress):
        batch = {k: v.to(device) for k, v in collate(ids, b, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out[b] = model(**batch).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 256,
                   progress: bool = False) -> np.ndarray:
    return logits_for_ids(model, encode(tokenizer, texts, max_length), batch_size, tokenizer.pad_token_id,
                          progress=progress)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising validation NLL of softmax(logits / T) (Guo et al. 2017): calibrated posteriors are what
    prior correction by EM assumes. A log-spaced grid, then a finer one around the best point: 1-D and cheap."""
    labels = np.asarray(labels)

    def nll(t):
        logp = np.log(np.clip(softmax(logits / t), 1e-12, 1.0))
        return -logp[np.arange(len(labels)), labels].mean()

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = best * np.exp(np.linspace(-0.12, 0.12, 25))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


def metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """Accuracy, mean cross-entropy, macro-F1, per-class accuracy (recall) and the confusion matrix."""
    labels = np.asarray(labels)
    pred = logits.argmax(axis=1)
    logp = np.log(np.clip(softmax(logits), 1e-12, 1.0))
    conf = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(conf, (labels, pred), 1)
    tp = np.diag(conf).astype(float)
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {
        "accuracy": float((pred == labels).mean()),
        "loss": float(-logp[np.arange(len(labels)), labels].mean()),
        "macro_f1": float(f1.mean()),
        "per_class_accuracy": recall.round(6).tolist(),
        "confusion_matrix": conf.tolist(),
        "n": int(len(labels)),
    }
