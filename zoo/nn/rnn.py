"""Recurrent networks on nn.RNN / nn.LSTM / nn.GRU: a sequence classifier, a character LM, an encoder-decoder.

They plug into the same tasks as the transformers (classification, char_lm, seq2seq) by `model.net` alone.
Padded batches with known lengths run as packed sequences, so padding never enters the recurrence: the outputs
of the real steps and the final state are those of the unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zoo.errors import UserError
from zoo.nn.transformer import Decoding, sample_next

CELLS = ("rnn", "lstm", "gru")
ATTENTIONS = ("additive", "dot")
POOLS = ("last", "mean", "max")

# an nn.LSTM's state is (h, c); nn.RNN's and nn.GRU's is h alone: (layers * directions, batch, hidden) each
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    """A config value outside its allowed set is the user's error: one line naming the key and the choices."""
    if value not in allowed:
        raise UserError(f"{key}: unknown '{value}'; allowed: {', '.join(allowed)}")


def make_rnn(
    cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0, bidirectional: bool = False
) -> nn.RNNBase:
    """A batch-first nn.RNN (tanh), nn.LSTM or nn.GRU; `dropout` applies between stacked layers only."""
    check_choice("model.net.cell", cell, CELLS)
    if num_layers < 1 or hidden_size < 1:
        raise UserError(f"model.net: num_layers {num_layers} and hidden_size {hidden_size}; allowed: integers >= 1")
    kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
    rnn = kind(
        input_size,
        hidden_size,
        num_layers,
        batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0,
        bidirectional=bidirectional,
    )
    if cell == "lstm":  # forget-gate bias 1 (Jozefowicz et al. 2015): gradients survive the first updates
        for name, param in rnn.named_parameters():
            if name.startswith("bias_ih"):
                with torch.no_grad():
                    param[hidden_size : 2 * hidden_size].fill_(1.0)
    return rnn


def run_rnn(
    rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None = None, state: State | None = None
) -> tuple[torch.Tensor, State]:
    """Outputs (batch, time, directions * hidden) and the final state; with `lengths`, a packed run.

    Packed, each row stops at its own length: its final state is that of its last real step, the backward
    direction starts there, and the outputs at padded steps are zero.
    """
    if lengths is None:
        return rnn(x, state)
    packed = nn.utils.rnn.pack_padded_sequence(
        x, lengths.detach().to("cpu", torch.int64).clamp(min=1), batch_first=True, enforce_sorted=False
    )
    out, state = rnn(packed, state)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, state


def top_hidden(state: State, directions: int) -> torch.Tensor:
    """The last layer's final hidden state, directions side by side: (batch, directions * hidden)."""
    h = state[0] if isinstance(state, tuple) else state
    return h[-directions:].transpose(0, 1).reshape(h.shape[1], -1)


def padding_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """True at the padded steps of each row (those at or past its length)."""
    return torch.arange(length, device=lengths.device)[None, :] >= lengths[:, None]


class RNNClassifier(nn.Module):
    """Recurrent classifier for signals (C, L): the L steps of C channels each run through a stacked RNN.

    `pool=last` classifies from the last layer's final state (both directions' ends when bidirectional), `mean`
    and `max` from the outputs pooled over the real steps. `lengths` marks right-padding in a padded batch.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        cell: str = "gru",
        hidden_size: int = 128,
        num_layers: int = 2,
        bidirectional: bool = True,
        dropout: float = 0.0,
        pool: str = "last",
    ) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise UserError(f"model.net: RNNClassifier needs signals (C, L), got input_shape {list(input_shape)}")
        check_choice("model.net.pool", pool, POOLS)
        self.pool, self.directions = pool, 2 if bidirectional else 1
        self.rnn = make_rnn(cell, input_shape[0], hidden_size, num_layers, dropout, bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.directions * hidden_size, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, classes) of signals x (batch, C, L), right-padded past `lengths` when given."""
        steps = x.transpose(1, 2)
        out, state = run_rnn(self.rnn, steps, lengths)
        if self.pool == "last":
            features = top_hidden(state, self.directions)
        else:
            real = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
            if lengths is not None:
                real = ~padding_mask(lengths.to(out.device), out.shape[1])
            if self.pool == "mean":
                features = (out * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
            else:
                features = out.masked_fill(~real[..., None], float("-inf")).amax(dim=1)
        return self.head(self.dropout(features))


class RNNLanguageModel(nn.Module):
    """Character LM: embedding, stacked LSTM/GRU/RNN, a linear head (Zaremba et al. 2014; Karpathy's char-rnn).

    Dropout acts on the non-recurrent connections (embedding, between layers, before the head), as in Zaremba
    et al. `tie_weights` shares the head with the embedding (Press & Wolf 2017; a projection bridges
    hidden_size and embed_size when they differ). The state carries across calls: `forward_state`, `generate`.
    There is no context limit, so there is no `block_size` (the data's block_size only sets training windows).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int | None = None,
        cell: str = "lstm",
        hidden_size: int = 256,
        num_layers: int = 2,
        embed_size: int | None = None,
        dropout: float = 0.1,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        del block_size  # the data's window length, passed to every LM; a recurrence has no context limit
        embed_size = embed_size or hidden_size
        self.vocab_size, self.cell = vocab_size, cell
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.dropout = nn.Dropout(dropout)
        self.rnn = make_rnn(cell, embed_size, hidden_size, num_layers, dropout)
        self.proj: nn.Module = nn.Identity()
        if tie_weights and embed_size != hidden_size:
            self.proj = nn.Linear(hidden_size, embed_size)
        self.head = nn.Linear(embed_size if tie_weights else hidden_size, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight

    def forward_state(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits (batch, length, vocab) of the next token at each position, and the state after the last one."""
        out, state = self.rnn(self.dropout(self.embed(idx)), state)
        return self.head(self.dropout(self.proj(out))), state

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.forward_state(idx)[0]

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
        """Append `max_new_tokens` sampled tokens (temperature 0: the most likely one).

        The prompt runs once; then each step feeds only the newest token with the carried state.
        `use_cache=False` re-runs the whole sequence every step instead (the reference the tests compare to).
        """
        logits, state = self.forward_state(idx)
        for n in range(max_new_tokens):
            token = sample_next(logits[:, -1], temperature, top_k, generator)
            idx = torch.cat([idx, token], dim=1)
            if n + 1 == max_new_tokens:
                break
            if use_cache:
                logits, state = self.forward_state(token, state)
            else:
                logits, state = self.forward_state(idx)
        return idx


class Attention(nn.Module):
    """Attention of one decoder query over the encoder outputs, padding masked out.

    additive (Bahdanau et al. 2015): score = v . tanh(W q + U m); dot (Luong et al. 2015): score = q . (W m),
    Luong's "general" score, which is his plain "dot" when the encoder outputs already have the query's width
    (then W is left out).
    """

    def __init__(self, kind: str, query_size: int, memory_size: int) -> None:
        super().__init__()
        check_choice("model.net.attention", kind, ATTENTIONS)
        self.kind = kind
        if kind == "additive":
            self.query = nn.Linear(query_size, query_size, bias=False)
            self.key: nn.Module = nn.Linear(memory_size, query_size)
            self.score = nn.Linear(query_size, 1, bias=False)
        else:
            self.key = nn.Identity() if memory_size == query_size else nn.Linear(memory_size, query_size, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory's side of the score, computed once per source rather than once per decoding step."""
        return self.key(memory)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (batch, memory_size) and weights (batch, source length); padded steps get weight 0."""
        if self.kind == "additive":
            scores = self.score(torch.tanh(self.query(query)[:, None, :] + keys)).squeeze(-1)
        else:
            scores = torch.bmm(keys, query[:, :, None]).squeeze(-1)
        weights = F.softmax(scores.float().masked_fill(padding, float("-inf")), dim=-1).to(memory.dtype)
        return torch.bmm(weights[:, None, :], memory).squeeze(1), weights


class Seq2SeqRNN(Decoding, nn.Module):
    """Encoder-decoder RNN with attention (Bahdanau et al. 2015 with attention=additive, Luong et al. 2015 with dot).

    The encoder (bidirectional by default) reads the source as a packed sequence; a tanh bridge maps each layer's
    final state to the decoder's initial state. additive: the previous decoder state attends, the context joins
    the next input; dot: the new decoder state attends and the attentional state tanh(W [state; context]) feeds
    the next step (Luong's input feeding). Either way the output is a linear head on tanh(W [state; context]).
    Greedy and beam decoding are the transformer's (`greedy_decode`, `beam_decode`), fed one token per step.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 64,
        cell: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 1,
        embed_size: int | None = None,
        dropout: float = 0.0,
        bidirectional: bool = True,
        attention: str = "additive",
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        del max_len  # the transformer's position table size; a recurrence has none
        check_choice("model.net.attention", attention, ATTENTIONS)
        embed_size = embed_size or hidden_size
        self.pad_id, self.attention_kind, self.cell = pad_id, attention, cell
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.directions = 2 if bidirectional else 1
        memory_size = self.directions * hidden_size
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.dropout = nn.Dropout(dropout)
        self.encoder = make_rnn(cell, embed_size, hidden_size, num_layers, dropout, bidirectional)
        self.bridge = nn.Linear(memory_size, hidden_size)
        self.bridge_cell = nn.Linear(memory_size, hidden_size) if cell == "lstm" else None
        feed = memory_size if attention == "additive" else hidden_size
        self.decoder = make_rnn(cell, embed_size + feed, hidden_size, num_layers, dropout)
        self.attention = Attention(attention, hidden_size, memory_size)
        self.combine = nn.Linear(hidden_size + memory_size, hidden_size, bias=False)
        self.head = nn.Linear(hidden_size, vocab_size)

    def _bridge(self, final: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """(layers * directions, N, H) -> (layers, N, H): each layer's directions side by side, mapped to H."""
        layers = final.view(self.num_layers, self.directions, final.shape[1], self.hidden_size)
        return layer(layers.permute(0, 2, 1, 3).reshape(self.num_layers, final.shape[1], -1))

    def encode(self, src: torch.Tensor) -> dict[str, Any]:
        """Encoder outputs, their attention keys, the padding mask and the decoder's first state."""
        lengths = (src != self.pad_id).sum(dim=1)
        memory, final = run_rnn(self.encoder, self.dropout(self.embed(src)), lengths)
        if isinstance(final, tuple):
            assert self.bridge_cell is not None
            state: State = (torch.tanh(self._bridge(final[0], self.bridge)), self._bridge(final[1], self.bridge_cell))
        else:
            state = torch.tanh(self._bridge(final, self.bridge))
        feed = memory.new_zeros(len(src), self.hidden_size)  # Luong's input feeding starts from zeros
        padding = padding_mask(lengths.clamp(min=1), src.shape[1])
        return {"memory": memory, "keys": self.attention.keys(memory), "padding": padding, "rnn": state, "feed": feed}

    def _step(self, embedded: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """One decoder step from the embedded previous token (N, E): logits (N, vocab), new state, weights."""
        memory, keys, padding = state["memory"], state["keys"], state["padding"]
        if self.attention_kind == "additive":
            previous = state["rnn"][0] if isinstance(state["rnn"], tuple) else state["rnn"]
            context, weights = self.attention(previous[-1], keys, memory, padding)
            out, rnn = self.decoder(torch.cat([embedded, context], dim=-1)[:, None], state["rnn"])
            out = out[:, 0]
        else:
            out, rnn = self.decoder(torch.cat([embedded, state["feed"]], dim=-1)[:, None], state["rnn"])
            out = out[:, 0]
            context, weights = self.attention(out, keys, memory, padding)
        attentional = torch.tanh(self.combine(torch.cat([out, context], dim=-1)))
        logits = self.head(self.dropout(attentional))
        return logits, {**state, "rnn": rnn, "feed": attentional}, weights

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: logits (batch, target length, vocab); with return_attention also the weights (B, T, S)."""
        state = self.encode(src)
        embedded = self.dropout(self.embed(tgt_in))
        logits, weights = [], []
        for t in range(tgt_in.shape[1]):
            step_logits, state, step_weights = self._step(embedded[:, t], state)
            logits.append(step_logits)
            weights.append(step_weights)
        out = torch.stack(logits, dim=1)
        return (out, torch.stack(weights, dim=1)) if return_attention else out

    # the decoding protocol of zoo.nn.transformer.greedy_decode / beam_decode

    def begin_decoding(self, src: torch.Tensor, beams: int = 1) -> dict[str, Any]:
        state = self.encode(src)
        return state if beams == 1 else self.reorder_decoding(state, torch.arange(len(src)).repeat_interleave(beams))

    def decode_step(self, tokens: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits, state, _ = self._step(self.dropout(self.embed(tokens)), state)
        return logits, state

    def reorder_decoding(self, state: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        index = index.to(state["memory"].device)
        out = {key: state[key].index_select(0, index) for key in ("memory", "keys", "padding", "feed")}
        rnn = state["rnn"]
        out["rnn"] = (
            tuple(s.index_select(1, index) for s in rnn) if isinstance(rnn, tuple) else rnn.index_select(1, index)
        )
        return out
