"""Transformer blocks and the three networks built from them: encoder classifier, decoder-only LM, encoder-decoder.

All three share `Block` (pre-norm, as in GPT-2 and Xiong et al. 2020: x + Attn(LN(x)), x + MLP(LN(x)), which
trains without the warmup-sensitivity of post-norm) and the position encodings below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zoo.nn.attention import KVCache, MultiHeadAttention

POSITIONS = ("sinusoidal", "learned")
POOLS = ("cls", "mean")


def _check(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: unknown '{value}'; allowed: {', '.join(allowed)}")


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos encodings of Vaswani et al. (2017); nothing to learn, so they are not saved."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, offset: int, length: int) -> torch.Tensor:
        return self.table[offset : offset + length]


class LearnedPositions(nn.Module):
    """One learned vector per position (BERT, GPT-2), initialized small."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, offset: int, length: int) -> torch.Tensor:
        return self.table[offset : offset + length]


def make_positions(kind: str, max_len: int, d_model: int) -> nn.Module:
    _check("model.net.positions", kind, POSITIONS)
    return SinusoidalPositions(max_len, d_model) if kind == "sinusoidal" else LearnedPositions(max_len, d_model)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to an encoder's output, MLP."""

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, cross: bool = False, bias: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout, bias)
        self.cross = cross
        if cross:
            self.norm_cross = nn.LayerNorm(d_model)
            self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout, bias)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff, bias=bias), nn.GELU(), nn.Linear(d_ff, d_model, bias=bias))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        window: int | None = None,
        padding: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        attended = self.attn(self.norm1(x), causal=causal, window=window, key_padding_mask=padding, cache=cache)
        x = x + self.dropout(attended)
        if self.cross:
            x = x + self.dropout(self.cross_attn(self.norm_cross(x), memory, key_padding_mask=memory_padding))
        return x + self.dropout(self.mlp(self.norm2(x)))


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialization: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class TransformerClassifier(nn.Module):
    """Encoder classifier for signals (C, L) (ViT-style, Dosovitskiy et al. 2021, on 1-D patches).

    The signal is cut into patches of patch_size steps, one every patch_stride steps (default patch_size: no
    overlap; patch_size=1 embeds every step), each linearly embedded (a strided 1-D convolution); positions are
    added; a class token (pool=cls) or the mean of the outputs (pool=mean) feeds the head.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 1,
        patch_stride: int | None = None,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.1,
        positions: str = "learned",
        pool: str = "cls",
        window: int | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"TransformerClassifier needs signals (C, L), got input_shape {list(input_shape)}")
        channels, length = input_shape
        stride = patch_stride or patch_size
        if not 1 <= patch_size <= length or stride < 1 or (length - patch_size) % stride:
            raise ValueError(
                f"model.net.patch_size: patches of {patch_size} every {stride} steps do not tile the signal length "
                f"{length}; allowed: (length - patch_size) divisible by patch_stride"
            )
        _check("model.net.pool", pool, POOLS)
        self.pool, self.window = pool, window
        tokens = (length - patch_size) // stride + 1 + (pool == "cls")
        self.embed = nn.Conv1d(channels, d_model, patch_size, stride)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        self.positions = make_positions(positions, tokens, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = self.embed(x).transpose(1, 2)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(batch, -1, -1), h], dim=1)
        h = self.dropout(h + self.positions(0, h.shape[1]))
        for block in self.blocks:
            h = block(h, window=self.window)
        h = self.norm(h)
        return self.head(h[:, 0] if self.cls is not None else h.mean(dim=1))


class DecoderLM(nn.Module):
    """Decoder-only language model (GPT, Radford et al. 2018): causal blocks, the output head tied to the embedding.

    `block_size` is the context; `window` makes every layer see only the last `window` tokens.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 128,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.1,
        positions: str = "learned",
        window: int | None = None,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.vocab_size, self.block_size, self.window = vocab_size, block_size, window
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = make_positions(positions, block_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(_init_weights)
        for name, param in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * layers)
            if name.endswith(("attn.out.weight", "mlp.2.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * n_layers))
        if tie_weights:
            self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (batch, length, vocab) of the next token at every position of `idx`."""
        offset = caches[0].length if caches else 0
        if offset + idx.shape[1] > self.block_size:
            raise ValueError(f"sequence of {offset + idx.shape[1]} tokens exceeds the context of {self.block_size}")
        h = self.dropout(self.embed(idx) + self.positions(offset, idx.shape[1]))
        for n, block in enumerate(self.blocks):
            h = block(h, causal=True, window=self.window, cache=caches[n] if caches else None)
        return self.head(self.norm(h))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` tokens sampled from the model (temperature 0: the most likely one).

        The model sees the last `block_size` tokens. With the cache, each step feeds only the newest token;
        once the context is full the window slides and the cache is rebuilt from the last block_size tokens,
        which is exactly what the uncached path computes.
        """
        caches: list[KVCache] | None = None
        for _ in range(max_new_tokens):
            if use_cache and caches is not None and caches[0].length < self.block_size:
                logits = self(idx[:, -1:], caches)
            else:
                caches = [KVCache() for _ in self.blocks] if use_cache else None
                logits = self(idx[:, -self.block_size :], caches)
            idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
        return idx


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class Decoding:
    """`greedy` and `beam_search` for an encoder-decoder that has `pad_id` and the decoding protocol of
    `greedy_decode` (begin_decoding, decode_step, reorder_decoding): its KV caches or recurrent state per beam."""

    pad_id: int

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int) -> torch.Tensor:
        """The most likely token at each step; rows that ended are padded with pad_id."""
        return greedy_decode(self, src, bos_id, eos_id, max_len, self.pad_id)

    @torch.no_grad()
    def beam_search(
        self,
        src: torch.Tensor,
        bos_id: int,
        eos_id: int,
        max_len: int,
        beam_size: int = 4,
        length_penalty: float = 0.0,
    ) -> torch.Tensor:
        """Beam search (`beam_decode`): the best finished prefix per row."""
        return beam_decode(self, src, bos_id, eos_id, max_len, self.pad_id, beam_size, length_penalty)


class Seq2SeqTransformer(Decoding, nn.Module):
    """Encoder-decoder transformer (Vaswani et al. 2017) with pre-norm blocks and a shared, tied embedding.

    Source and target use one vocabulary; `pad_id` marks padding, masked out of encoder self-attention,
    cross-attention and the decoder's self-attention. Decoding runs until every row has produced `eos_id`.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 64,
        d_model: int = 128,
        n_heads: int = 4,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        d_ff: int | None = None,
        dropout: float = 0.1,
        positions: str = "sinusoidal",
        pad_id: int = 0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.pad_id, self.max_len, self.d_model = pad_id, max_len, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = make_positions(positions, max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        ff = d_ff or 4 * d_model
        self.encoder = nn.ModuleList(Block(d_model, n_heads, ff, dropout) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(Block(d_model, n_heads, ff, dropout, cross=True) for _ in range(decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(_init_weights)
        if tie_weights:
            self.head.weight = self.embed.weight

    def _embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if offset + tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of {offset + tokens.shape[1]} tokens exceeds model.net.max_len={self.max_len}")
        return self.dropout(self.embed(tokens) * math.sqrt(self.d_model) + self.positions(offset, tokens.shape[1]))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padding = src == self.pad_id
        h = self._embed(src)
        for block in self.encoder:
            h = block(h, padding=padding)
        return self.encoder_norm(h), padding

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_padding: torch.Tensor,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        offset = caches[0].length if caches else 0
        padding = None if caches else tgt == self.pad_id
        h = self._embed(tgt, offset)
        for n, block in enumerate(self.decoder):
            h = block(
                h,
                causal=True,
                padding=padding,
                memory=memory,
                memory_padding=memory_padding,
                cache=caches[n] if caches else None,
            )
        return self.head(self.decoder_norm(h))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits of each next target token given the source and the target so far."""
        memory, memory_padding = self.encode(src)
        return self.decode(tgt_in, memory, memory_padding)

    def begin_decoding(self, src: torch.Tensor, beams: int = 1) -> tuple[Any, ...]:
        """The decoding state of `greedy_decode` / `beam_decode`: the encoded source (one copy per beam), KV caches."""
        memory, memory_padding = self.encode(src)
        if beams > 1:
            memory = memory.repeat_interleave(beams, dim=0)
            memory_padding = memory_padding.repeat_interleave(beams, dim=0)
        return memory, memory_padding, [KVCache() for _ in self.decoder]

    def decode_step(self, tokens: torch.Tensor, state: tuple[Any, ...]) -> tuple[torch.Tensor, tuple[Any, ...]]:
        """Logits (N, vocab) of the token after `tokens` (N,), feeding only the newest token through the caches."""
        memory, memory_padding, caches = state
        return self.decode(tokens[:, None], memory, memory_padding, caches)[:, -1], state

    def reorder_decoding(self, state: tuple[Any, ...], index: torch.Tensor) -> tuple[Any, ...]:
        """The state of the beams `index` (the encoded source is the same within a row, so only the caches move)."""
        for cache in state[2]:
            cache.reorder(index)
        return state


@torch.no_grad()
def greedy_decode(net: Any, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int, pad_id: int) -> torch.Tensor:
    """The most likely token at each step; rows that ended are padded with pad_id.

    Shared by every encoder-decoder: `net` provides begin_decoding(src, beams), decode_step(tokens, state) and
    reorder_decoding(state, index), so that each step feeds only the newest token (KV cache or recurrent state).
    """
    state = net.begin_decoding(src)
    out = torch.full((len(src), 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    for _ in range(max_len - 1):
        logits, state = net.decode_step(out[:, -1], state)
        token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == eos_id
        if done.all():
            break
    return out


@torch.no_grad()
def beam_decode(
    net: Any,
    src: torch.Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int,
    pad_id: int,
    beam_size: int = 4,
    length_penalty: float = 0.0,
) -> torch.Tensor:
    """Keep the `beam_size` most likely prefixes; return the best finished one per row.

    Scores are summed log-probabilities divided by length ** length_penalty (0: none; Wu et al. 2016 use
    0.6-1.0 for translation). A finished beam keeps its score and only extends with padding. `net` provides the
    same three methods as for `greedy_decode`.
    """
    batch, device = len(src), src.device
    state = net.begin_decoding(src, beam_size)
    out = torch.full((batch * beam_size, 1), bos_id, dtype=torch.long, device=device)
    # only the first beam of each row is live at the start, so the k beams do not all copy one prefix
    scores = torch.full((batch, beam_size), -math.inf, device=device)
    scores[:, 0] = 0.0
    scores = scores.view(-1)
    done = torch.zeros(batch * beam_size, dtype=torch.bool, device=device)
    lengths = torch.ones(batch * beam_size, device=device)
    for _ in range(max_len - 1):
        logits, state = net.decode_step(out[:, -1], state)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        vocab = logprobs.shape[-1]
        # a finished beam continues only with pad, at no cost
        finished = torch.full_like(logprobs, -math.inf)
        finished[:, pad_id] = 0.0
        logprobs = torch.where(done[:, None], finished, logprobs)
        candidates = (scores[:, None] + logprobs).view(batch, beam_size * vocab)
        new_lengths = (lengths[:, None] + (~done[:, None]).float()).expand(-1, vocab).reshape(batch, -1)
        ranked = candidates / new_lengths**length_penalty if length_penalty else candidates
        top = ranked.topk(beam_size, dim=-1).indices
        beam, token = top // vocab, top % vocab
        origin = (beam + torch.arange(batch, device=device)[:, None] * beam_size).view(-1)
        scores = candidates.gather(1, top).view(-1)
        lengths = new_lengths.gather(1, top).view(-1)
        state = net.reorder_decoding(state, origin)
        out = torch.cat([out[origin], token.view(-1, 1)], dim=1)
        done = done[origin] | (token.view(-1) == eos_id)
        if done.all():
            break
    final = scores / lengths**length_penalty if length_penalty else scores
    final = torch.where(done, final, final - 1e9)  # prefer beams that reached the end token
    best = final.view(batch, beam_size).argmax(dim=-1) + torch.arange(batch, device=device) * beam_size
    return out[best]
