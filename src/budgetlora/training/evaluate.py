"""Logits for a list of texts (no grad, length-sorted big batches) and the metrics we report."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from budgetlora.data.tokens import Tokens, encode, sorted_batches
from budgetlora.progress import progress as progress_bar


def eval_batch_size(requested: int, device) -> int:
    """train.eval_batch_size, or with 0 (auto) 64 on a CPU (cache-sized, least padding) and 512 on a GPU."""
    return requested or (512 if torch.device(device).type == "cuda" else 64)


@torch.inference_mode()
def logits_for_ids(model, ids, batch_size: int, pad_id: int, device=None, rows=None, progress: bool = False,
                   dtype: torch.dtype | None = None, padding: str = "buckets", features: bool = False,
                   adapter_names: list[str] | None = None):
    """Logits in input order, as fp32 numbers; `dtype` (hardware.inference_dtype) runs the forward under that
    autocast for speed, None in plain fp32. `ids` is a list of token id
    lists or a `Tokens`; batch_size 0 picks one for the device; `rows` restricts to those batch indices (used to
    shard across processes). With `features`, returns (logits, mean-pooled last hidden states) from the same pass.
    adapter_names: per row, the peft adapter that reads it, for a model holding several (peft's mixed batches)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = eval_batch_size(batch_size, device)
    tokens = ids if isinstance(ids, Tokens) else Tokens(ids, pad_id)
    was_training = model.training
    model.eval()
    batches = sorted_batches(tokens.lengths, batch_size)
    if rows is not None:
        batches = [batches[i] for i in rows]
    out = np.zeros((len(tokens), model.config.num_labels), dtype=np.float32)
    pooled = np.zeros((len(tokens), 0), dtype=np.float32)  # sized by the first batch: the encoder's width
    for b in progress_bar(batches, desc="eval", leave=False, disable=not progress):
        batch = {k: v.to(device) for k, v in tokens.batch(b, padding).items()}
        extra = {"output_hidden_states": True} if features else {}
        if adapter_names is not None:
            extra["adapter_names"] = [adapter_names[i] for i in b]
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            result = model(**batch, **extra)
        out[b] = result.logits.float().cpu().numpy()
        if features:
            mean = _mean_pooled(result.hidden_states[-1], batch["attention_mask"])
            if pooled.shape[1] != mean.shape[1]:
                pooled = np.zeros((len(tokens), mean.shape[1]), dtype=np.float32)
            pooled[b] = mean
    model.train(was_training)
    return (out, pooled) if features else out


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The mean of each row's hidden states over its real tokens (padding excluded), in fp32."""
    mask = mask.unsqueeze(-1).float()
    return ((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu().numpy()


@contextlib.contextmanager
def exact_fp32():
    """Plain fp32 matmuls (no TF32) while logits are computed that another machine must reproduce."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 0,
                   progress: bool = False, dtype: torch.dtype | None = None, features: bool = False):
    """`logits_for_ids` of the texts (and with `features` the pooled hidden states as well)."""
    return logits_for_ids(model, encode(tokenizer, texts, max_length), batch_size, tokenizer.pad_token_id,
                          progress=progress, dtype=dtype, features=features)
