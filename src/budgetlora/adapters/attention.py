"""Fused attention where transformers has none: MPNet.

transformers runs MPNet's self-attention eagerly (its relative position bias kept it off the SDPA path), so every
layer's attention probabilities, batch x heads x length x length, are kept for the backward pass: at 32 rows of 128
tokens that is most of a training step's memory, and the softmax, the bias and the two products run as separate
kernels. torch's `scaled_dot_product_attention` takes any additive mask, so the position bias and the padding mask
go in as one, and the fused kernel keeps only what its backward needs. Same arithmetic up to float rounding (tested
against the eager path, outputs and gradients); `output_attentions` still runs the eager code, the only one that
materialises the probabilities it returns.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Route each MPNet self-attention module of `model` (if any) through SDPA; other architectures are returned as
    they are (transformers already gives BERT-likes SDPA)."""
    from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

    for module in model.modules():
        if isinstance(module, MPNetSelfAttention):
            module.forward = types.MethodType(_mpnet_sdpa_forward, module)
    return model


def _mpnet_sdpa_forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False,
                        **kwargs):
    if output_attentions:
        return type(self).forward(self, hidden_states, attention_mask, position_bias, output_attentions, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
    mask = position_bias
    if attention_mask is not None:
        mask = attention_mask if mask is None else mask + attention_mask
    if mask is not None:
        mask = mask.to(q.dtype)  # under autocast q is bf16/fp16, and SDPA wants the mask in the query's dtype
    c = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0)
    return (self.o(c.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)),)
