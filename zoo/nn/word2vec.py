"""word2vec (Mikolov et al., 2013): skip-gram and CBOW with negative sampling, and the vector arithmetic on top.

Two tables as in word2vec.c: `input` (the word vectors one keeps, `syn0`) and `output` (the context vectors of
negative sampling, `syn1neg`). Both are `nn.Embedding(sparse=True)`, so a step touches only the rows of its batch:
the dense gradient of a 100k x 300 table per step would cost more than the whole forward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MODES = ("skipgram", "cbow")


class Word2Vec(nn.Module):
    """Skip-gram or CBOW scored by negative sampling.

    The input table starts uniform in [-0.5/dim, 0.5/dim] and the output table at zero, as word2vec.c and gensim
    initialise them: the first updates then move the input vectors only through the (zero) output rows' gradients,
    which keeps early steps small at the large learning rate (0.025) that plain SGD uses.
    """

    def __init__(self, vocab_size: int, dim: int = 100, mode: str = "skipgram", sparse: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.mode: unknown '{mode}'; allowed: {', '.join(MODES)}")
        if vocab_size < 1 or dim < 1:
            raise ValueError(f"Word2Vec needs vocab_size and dim >= 1, got {vocab_size}, {dim}")
        self.mode, self.dim, self.sparse = mode, dim, sparse
        self.input = nn.Embedding(vocab_size, dim, sparse=sparse)
        self.output = nn.Embedding(vocab_size, dim, sparse=sparse)
        with torch.no_grad():
            self.input.weight.uniform_(-0.5 / dim, 0.5 / dim)
            self.output.weight.zero_()

    def hidden(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The vector that predicts: the input row of the centre word (skip-gram, `inputs` (B,)), or the mean of
        the context rows (CBOW, `inputs` (B, C) with `mask` (B, C) marking real context words).

        CBOW's backward pass gives every context row the whole gradient of the mean, not 1/C of it: that is what
        word2vec.c and gensim (cbow_mean=1) do, and what their learning rate of 0.05 for CBOW is tuned for.
        """
        if self.mode == "skipgram":
            return self.input(inputs)
        if mask is None:
            mask = torch.ones_like(inputs, dtype=torch.bool)
        rows = self.input(inputs) * mask.unsqueeze(-1)
        summed = rows.sum(1)
        count = mask.sum(1, keepdim=True).clamp_min(1)
        return summed + (summed / count - summed).detach()  # the mean forward, the sum's gradient backward

    def scores(self, hidden: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Dot products of `hidden` (B, d) with the output rows of the target (B,) and of the negatives (B, K):
        (B, 1 + K), the target first."""
        candidates = torch.cat([targets.unsqueeze(1), negatives], 1)
        return torch.bmm(self.output(candidates), hidden.unsqueeze(2)).squeeze(2)

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        negatives: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The negative-sampling loss of each example (B,), see `negative_sampling_loss`."""
        return negative_sampling_loss(self.scores(self.hidden(inputs, mask), targets, negatives))

    @torch.no_grad()
    def sgd_step(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None,
        targets: torch.Tensor,
        negatives: torch.Tensor,
        lr: float,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Plain SGD on the summed negative-sampling loss of a batch, gradients written out by hand; the per-example
        losses before their step.

        Why by hand: it is the step that autograd and torch.optim.SGD take on the sparse gradients (the same numbers,
        see the tests), without building the sparse gradient tensors, coalescing them and adding them in a second
        pass: rows are gathered with index_select (or summed as they are gathered, with embedding_bag), the gradient
        is a few products of the gathered rows, and the updates are scattered back with one index_add_ per table.
        Noise words equal to the target count for nothing, as in `Word2VecTask._loss`.

        `chunk`: the batch is taken as successive steps of `chunk` examples at the same rate (None: one step). Why:
        word2vec.c updates after every example, so smaller steps are the closer to it, and the rows a step gathers
        (chunk x (1 + K) x dim floats) then stay in the CPU's cache between the gather and the scatter, which is
        what a step's time goes to; 1,024 examples of 100 dimensions are 2.4 MB.
        """
        candidates = torch.cat([targets.unsqueeze(1), negatives], 1)
        counted = torch.ones(candidates.shape, dtype=self.output.weight.dtype, device=candidates.device)
        counted[:, 1:].masked_fill_(negatives == targets.unsqueeze(1), 0.0)  # word2vec.c skips such a noise word
        rate = counted * -lr
        words, owner, starts = inputs, None, None
        if self.mode == "cbow":  # the context words of all examples in one flat list, each one's example and start
            if mask is None:
                mask = torch.ones_like(inputs, dtype=torch.bool)
            words, owner = inputs[mask], mask.nonzero()[:, 0]
            starts = torch.cat([owner.new_zeros(1), mask.sum(1).cumsum(0)])
        bounds = [] if starts is None else starts.tolist()
        size = max(1, len(targets) if chunk is None else int(chunk))
        losses = []
        for begin in range(0, len(targets), size):
            end = min(begin + size, len(targets))
            part = (words[begin:end], None, None)
            if owner is not None and starts is not None:
                first, last = bounds[begin], bounds[end]
                part = (words[first:last], owner[first:last] - begin, starts[begin:end] - first)
            losses.append(self._sgd_chunk(*part, candidates[begin:end], counted[begin:end], rate[begin:end]))
        return torch.cat(losses) if losses else counted.new_zeros(0)

    def _sgd_chunk(
        self,
        words: torch.Tensor,
        owner: torch.Tensor | None,
        offsets: torch.Tensor | None,
        candidates: torch.Tensor,
        counted: torch.Tensor,
        rate: torch.Tensor,
    ) -> torch.Tensor:
        """One SGD step (see `sgd_step`) of B examples, every gradient computed at the same weights, then applied.

        `words`: the input word of each example (skip-gram, (B,)), or the context words of all examples, in order
        (CBOW), with `owner` the example each belongs to and `offsets` (B,) where each example's words start;
        `candidates` (B, 1 + K): the target, then the noise words;
        `counted` (B, 1 + K): 1, or 0 where a noise word is skipped; `rate`: counted times -lr.
        """
        weight_in, weight_out = self.input.weight, self.output.weight
        batch, width = candidates.shape
        if offsets is None:
            hidden = weight_in.index_select(0, words)
        else:  # the mean of each example's context rows, in one fused gather (an empty context gives zeros)
            hidden = F.embedding_bag(words, weight_in, offsets, mode="mean")
        flat = candidates.reshape(-1)
        rows = weight_out.index_select(0, flat).view(batch, width, -1)
        scores = torch.linalg.vecdot(rows, hidden.unsqueeze(1))
        flip = torch.ones(width, dtype=scores.dtype, device=scores.device)
        flip[0] = -1.0
        losses = (_softplus(scores * flip) * counted).sum(1)  # -log sigmoid(s_target) - sum log sigmoid(-s_noise)
        # d loss / d score: sigmoid(s) - 1 for the target, sigmoid(s) for a noise word; the step is -lr times it
        step = torch.sigmoid(scores)
        step[:, 0] -= 1.0
        step.mul_(rate)
        # the input side's step, sum_k step_k * output row_k, gathered and summed in one call, before the rows move
        bags = torch.arange(0, len(flat), width, device=flat.device)
        hidden_step = F.embedding_bag(flat, weight_out, bags, mode="sum", per_sample_weights=step.reshape(-1))
        # the output rows' steps, written into the gathered rows' buffer: no second buffer of that size
        torch.mul(step.unsqueeze(2), hidden.unsqueeze(1), out=rows)
        weight_out.index_add_(0, flat, rows.flatten(0, 1))
        if owner is None:
            weight_in.index_add_(0, words, hidden_step)
        else:  # each context word takes the whole step of the mean (see `hidden`)
            weight_in.index_add_(0, words, hidden_step.index_select(0, owner))
        return losses

    def vectors(self) -> torch.Tensor:
        """The word vectors (the input table), as word2vec.c writes them out."""
        return self.input.weight


def negative_sampling_loss(scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(s_target) - sum_k log sigmoid(-s_k) per example, from scores (B, 1 + K) with the target first
    (Mikolov et al., 2013, eq. 4)."""
    return -F.logsigmoid(scores[:, 0]) - F.logsigmoid(-scores[:, 1:]).sum(1)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) without overflow, from the vectorised exp and log (within 1.2e-7 of the exact value): on a CPU
    about four times faster than F.logsigmoid, F.softplus or log1p, which took a tenth of a fused step."""
    return x.clamp_min(0.0) + torch.exp(-x.abs()).add_(1.0).log_()


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (zero rows stay zero), so that dot products are cosine similarities."""
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest(
    unit: torch.Tensor, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of `unit` most cosine-similar to each query vector (Q, d): (indices, similarities), each (Q, k).

    `exclude` (Q, E) holds row indices that may not be answers (the query words themselves, as gensim's
    most_similar leaves them out); -1 pads it.
    """
    similarity = unit_rows(queries) @ unit.T
    if exclude is not None:
        rows = torch.arange(len(queries), device=queries.device).unsqueeze(1).expand_as(exclude)
        valid = exclude >= 0
        similarity[rows[valid], exclude[valid]] = -torch.inf
    top = torch.topk(similarity, min(k, unit.shape[0]), dim=1)
    return top.indices, top.values


def analogy(unit: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, k: int = 1) -> torch.Tensor:
    """a : b :: c : ?, answered by the words closest in cosine to b - a + c of the unit vectors, leaving out a, b
    and c (gensim's most_similar(positive=[b, c], negative=[a])). Indices (Q,) each; returns (Q, k) indices."""
    query = unit[b] - unit[a] + unit[c]
    return nearest(unit, query, k, torch.stack([a, b, c], 1))[0]
