"""Multi-head attention on `F.scaled_dot_product_attention`, with the masks and the KV cache transformers need.

Masks are boolean, True where a query may attend to a key (the convention of scaled_dot_product_attention):
- causal: query i sees keys j <= i;
- window w: query i sees only the w most recent positions, i - w < j (the truncated attention of long-sequence
  models); without `causal` the window is symmetric, |i - j| < w;
- key padding: a (batch, keys) mask, True at padded keys, which no query may see.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class KVCache:
    """Keys and values of the positions already processed, so that generation feeds one new token per step.

    Each attention layer holds one; `length` is the number of cached positions (the offset of the next query).
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` (beam search keeps the histories of the surviving beams)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]


def attention_mask(
    query_length: int,
    key_length: int,
    *,
    offset: int = 0,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """A boolean mask broadcastable to (batch, heads, queries, keys); None when every query sees every key.

    Query q sits at position `offset + q` (with a KV cache the queries are the newest positions), key k at k.
    """
    mask = None
    if causal or window is not None:
        queries = torch.arange(offset, offset + query_length, device=device)[:, None]
        keys = torch.arange(key_length, device=device)[None, :]
        mask = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
        if causal:
            mask &= keys <= queries
        if window is not None:
            mask &= keys > queries - window
            if not causal:
                mask &= keys < queries + window
        mask = mask[None, None]
    if key_padding_mask is not None:
        visible = ~key_padding_mask[:, None, None, :]
        mask = visible if mask is None else mask & visible
    return mask


class MultiHeadAttention(nn.Module):
    """Vaswani et al. (2017): h heads of scaled dot-product attention over learned projections of d_model / h.

    Self-attention when `context` is None, cross-attention (queries from x, keys and values from context)
    otherwise. With a `cache`, new keys and values are appended to it and the queries attend to all of them.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"model.net.d_model: {d_model} is not divisible by model.net.n_heads={n_heads}; "
                "allowed: a d_model that is a multiple of n_heads"
            )
        self.d_model, self.n_heads, self.head_dim, self.dropout = d_model, n_heads, d_model // n_heads, dropout
        self.query = nn.Linear(d_model, d_model, bias=bias)
        self.key = nn.Linear(d_model, d_model, bias=bias)
        self.value = nn.Linear(d_model, d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        window: int | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        source = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(source)), self._heads(self.value(source))
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.append(k, v)
        mask = attention_mask(
            q.shape[2],
            k.shape[2],
            offset=offset,
            causal=causal,
            window=window,
            key_padding_mask=key_padding_mask,
            device=x.device,
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.d_model))
