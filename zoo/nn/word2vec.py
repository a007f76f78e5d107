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
    ) -> torch.Tensor:
        """One plain SGD step on the summed negative-sampling loss of a batch, gradients written out by hand; the
        per-example losses before the step.

        Why: it is the step that autograd and torch.optim.SGD take on the sparse gradients (the same numbers, see
        the tests), without building the sparse gradient tensors, coalescing them and adding them in a second pass;
        the rows are gathered with index_select and the updates scattered with index_add_, which on a CPU makes it
        about twice as fast. Noise words equal to the target count for nothing, as in `Word2VecTask._loss`.
        """
        weight_in, weight_out = self.input.weight, self.output.weight
        if self.mode == "skipgram":
            hidden = weight_in.index_select(0, inputs)
        else:
            if mask is None:
                mask = torch.ones_like(inputs, dtype=torch.bool)
            rows = weight_in.index_select(0, inputs.reshape(-1)).view(*inputs.shape, -1) * mask.unsqueeze(-1)
            hidden = rows.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        candidates = torch.cat([targets.unsqueeze(1), negatives], 1)
        flat = candidates.reshape(-1)
        out = weight_out.index_select(0, flat).view(*candidates.shape, -1)
        scores = torch.linalg.vecdot(out, hidden.unsqueeze(1))
        valid = torch.ones_like(scores, dtype=torch.bool)
        valid[:, 1:] = negatives != targets.unsqueeze(1)
        signs = torch.ones_like(scores)
        signs[:, 1:] = -1.0
        losses = -(F.logsigmoid(signs * scores) * valid).sum(1)
        # d loss / d score: sigmoid(s) - 1 for the target, sigmoid(s) for a noise word; the step is -lr times it
        step = (torch.sigmoid(scores) - (signs > 0).to(scores.dtype)) * valid * -lr
        hidden_step = torch.bmm(step.unsqueeze(1), out).squeeze(1)
        weight_out.index_add_(0, flat, (step.unsqueeze(-1) * hidden.unsqueeze(1)).reshape(len(flat), -1))
        if self.mode == "skipgram":
            weight_in.index_add_(0, inputs, hidden_step)
        else:  # each context word takes the whole step of the mean (see `hidden`)
            slots = mask.nonzero(as_tuple=True)
            weight_in.index_add_(0, inputs[slots], hidden_step[slots[0]])
        return losses

    def vectors(self) -> torch.Tensor:
        """The word vectors (the input table), as word2vec.c writes them out."""
        return self.input.weight


def negative_sampling_loss(scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(s_target) - sum_k log sigmoid(-s_k) per example, from scores (B, 1 + K) with the target first
    (Mikolov et al., 2013, eq. 4)."""
    return -F.logsigmoid(scores[:, 0]) - F.logsigmoid(-scores[:, 1:]).sum(1)


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
