"""Eager attention without the key/value head copies, for grouped-query attention models.

transformers' eager attention expands the key and value heads to the query heads
(``repeat_kv``: a copy of the whole key/value sequence per layer and per call, and a sum in
the backward). The v* optimisation runs short suffixes over a long cached prefix, so those
copies dominated its attention: profiled on SmolLM2 (3 key/value heads, 9 query heads),
32 facts, the copies took 2.4 s of a 27 s optimisation. Folding each group's query heads
into the query length instead lets one batched matmul serve the whole group from the
shared key/value head, with the same dot products and the same fp32 softmax. SDPA avoids
the copy too, but its CPU backward in bf16 was the slowest option measured (docs/history.md).

Only for architectures whose own eager attention is exactly scores·scaling + mask, fp32
softmax, weights·values (``GROUPED_EAGER_TYPES``); anything else keeps the model's own.
"""

from __future__ import annotations

import torch

NAME = "pmsolve_grouped_eager"
# model_type values whose eager attention is the plain formula this file reproduces.
GROUPED_EAGER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def grouped_eager_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs):
    """Same contract as transformers' ``eager_attention_forward`` (query b × hq × q × hd,
    key/value b × hkv × k × hd, additive mask b × 1 × q × k); returns (b × q × hq × hd, weights)."""
    b, hq, q, hd = query.shape
    hkv, k = key.shape[1], key.shape[2]
    g = hq // hkv  # query head h reads key/value head h // g (repeat_kv's order)
    scores = torch.matmul(query.reshape(b, hkv, g * q, hd), key.transpose(2, 3)) * scaling
    scores = scores.view(b, hkv, g, q, k)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :k]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights.view(b, hkv, g * q, k), value)
    return out.view(b, hq, q, hd).transpose(1, 2).contiguous(), weights.view(b, hq, q, k)


def register() -> str:
    """Make NAME a valid ``attn_implementation`` (with the eager additive mask); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, grouped_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return NAME
