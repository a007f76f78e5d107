"""Matrix factorization and two-tower networks for recommenders.

User and item indices are dense (0..n-1); an index of -1 or one outside the table means an id the
training data never had. Explicit nets predict ratings, implicit nets score (user, item) pairs for ranking.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _known(index: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A safe index (clamped into the table) and whether the id is real and had training data."""
    inside = (index >= 0) & (index < len(seen))
    safe = index.clamp(0, len(seen) - 1)
    return safe, inside & seen[safe]


class RatingStatistics:
    """The training split's statistics an explicit-rating net predicts with, as buffers: part of the checkpoint, so
    evaluation predicts what training did. `user_known`/`item_known` say which ids had training data."""

    global_mean: torch.Tensor
    item_mean: torch.Tensor
    user_known: torch.Tensor
    item_known: torch.Tensor

    def _register_statistics(self, num_users: int, num_items: int) -> None:
        self.register_buffer("global_mean", torch.zeros(()))
        self.register_buffer("item_mean", torch.zeros(num_items))
        self.register_buffer("user_known", torch.ones(num_users, dtype=torch.bool))
        self.register_buffer("item_known", torch.ones(num_items, dtype=torch.bool))

    @torch.no_grad()
    def set_statistics(
        self,
        global_mean: float,
        item_mean: torch.Tensor | None = None,
        user_known: torch.Tensor | None = None,
        item_known: torch.Tensor | None = None,
    ) -> None:
        self.global_mean.fill_(global_mean)
        self.item_mean.copy_(item_mean if item_mean is not None else torch.full_like(self.item_mean, global_mean))
        if user_known is not None:
            self.user_known.copy_(user_known)
        if item_known is not None:
            self.item_known.copy_(item_known)

    def known(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which users and items of a batch had training data."""
        return _known(users, self.user_known)[1], _known(items, self.item_known)[1]


class BiasedMF(RatingStatistics, nn.Module):
    """Explicit-rating MF (Koren et al., 2009): r(u, i) = offset + b_u + b_i + <p_u, q_i>.

    The offset is the training mean, or with `mean_normalization` the item's training mean, so that a
    user without data gets the item mean. Ids without training data (`user_known`/`item_known` false,
    index -1 or out of range) drop the terms they lack: an unknown user gets offset + b_i, an unknown
    item global mean + b_u. `sparse=True` gives sparse embedding gradients (SparseAdam, SGD, Adagrad).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        rank: int = 32,
        init_std: float = 0.1,
        sparse: bool = False,
        mean_normalization: bool = False,
    ) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1 or rank < 1:
            raise ValueError(f"BiasedMF needs num_users, num_items, rank >= 1, got {num_users}, {num_items}, {rank}")
        self.sparse, self.mean_normalization = sparse, mean_normalization
        self.user_factors = nn.Embedding(num_users, rank, sparse=sparse)
        self.item_factors = nn.Embedding(num_items, rank, sparse=sparse)
        self.user_bias = nn.Embedding(num_users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(num_items, 1, sparse=sparse)
        nn.init.normal_(self.user_factors.weight, std=init_std)
        nn.init.normal_(self.item_factors.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self._register_statistics(num_users, num_items)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """The users' factor rows (SVD++ adds what their rated items say of them)."""
        return self.user_factors(users)

    def _offset(self, items: torch.Tensor, item_ok: torch.Tensor) -> torch.Tensor:
        if not self.mean_normalization:
            return self.global_mean.expand(items.shape)
        return torch.where(item_ok, self.item_mean[items], self.global_mean)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of the pairs (users[b], items[b])."""
        users, user_ok = _known(users, self.user_known)
        items, item_ok = _known(items, self.item_known)
        dot = (self.user_vectors(users) * self.item_factors(items)).sum(-1)
        user_term = self.user_bias(users).squeeze(-1) * user_ok
        item_term = self.item_bias(items).squeeze(-1) * item_ok
        return self._offset(items, item_ok) + user_term + item_term + dot * (user_ok & item_ok)

    def predict_all(self, users: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of each user against every item: (B, num_items)."""
        users, user_ok = _known(users, self.user_known)
        items = torch.arange(len(self.item_known), device=users.device)
        item_ok = self.item_known
        dot = self.user_vectors(users) @ self.item_factors.weight.T
        mask = user_ok[:, None] & item_ok[None, :]
        user_term = (self.user_bias(users).squeeze(-1) * user_ok)[:, None]
        item_term = (self.item_bias.weight.squeeze(-1) * item_ok)[None, :]
        return self._offset(items, item_ok)[None, :] + user_term + item_term + dot * mask

    def penalty(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair squared norms of the factors and of the biases, for L2 terms on the rows a batch touches."""
        factors = self.user_factors(users).square().sum(-1) + self.item_factors(items).square().sum(-1)
        biases = self.user_bias(users).squeeze(-1).square() + self.item_bias(items).squeeze(-1).square()
        return factors, biases

    def item_embeddings(self) -> torch.Tensor:
        return self.item_factors.weight


class SVDpp(BiasedMF):
    """SVD++ (Koren, 2008): biased MF whose user vector adds |N(u)|^-1/2 * sum of y_j over the items j the user
    rated in training, so that which movies a user chose to rate informs the prediction beside how they rated them.

    The rated items N(u) are the training ratings' (set_implicit), kept as a sparse matrix in the checkpoint; each
    forward pass forms every user's implicit term with one sparse product. Its L2 takes y_i with q_i.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        rank: int = 32,
        init_std: float = 0.1,
        sparse: bool = False,
        mean_normalization: bool = False,
    ) -> None:
        super().__init__(num_users, num_items, rank, init_std, sparse, mean_normalization)
        if sparse:
            raise ValueError(
                "SVDpp: the implicit term's sparse product needs dense gradients; set model.net.sparse=false"
            )
        self.implicit_factors = nn.Embedding(num_items, rank)
        nn.init.normal_(self.implicit_factors.weight, std=init_std)
        # N(u) as CSR rows of 1/sqrt(|N(u)|): set from the training ratings, saved with the weights
        self.register_buffer("implicit_rows", torch.zeros(num_users + 1, dtype=torch.long))
        self.register_buffer("implicit_items", torch.zeros(0, dtype=torch.long))
        self.register_buffer("implicit_weights", torch.zeros(0))

    @torch.no_grad()
    def set_implicit(self, users: torch.Tensor, items: torch.Tensor) -> None:
        """N(u) from the training pairs (a pair rated twice counts once)."""
        num_users, num_items = len(self.user_known), len(self.item_known)
        pairs = torch.unique(users.long() * num_items + items.long())
        rows, columns = pairs // num_items, pairs % num_items
        counts = torch.bincount(rows, minlength=num_users)
        self.implicit_rows = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(self.implicit_rows.device)
        self.implicit_items = columns.to(self.implicit_items.device)
        weights = counts.clamp(min=1).float().rsqrt()[rows]
        self.implicit_weights = weights.to(self.implicit_factors.weight)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            rated = torch.sparse_csr_tensor(
                self.implicit_rows,
                self.implicit_items,
                self.implicit_weights,
                (len(self.user_known), len(self.item_known)),
            )
        implicit = rated @ self.implicit_factors.weight
        return self.user_factors(users) + implicit[users]

    def penalty(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factors, biases = super().penalty(users, items)
        return factors + self.implicit_factors(items).square().sum(-1), biases


class SparsePattern:
    """The cells of a sparse (rows x columns) matrix in row-major order, with their column-major order beside it.

    A product with the matrix or with its transpose is then one `embedding_bag` (a weighted sum of dense rows per
    sparse row), which on CPU runs several times faster than torch's sparse products and their autograd, which
    densify the gradient of a sampled product.
    """

    def __init__(self, rows: torch.Tensor, columns: torch.Tensor, shape: tuple[int, int]) -> None:
        self.rows, self.columns, self.shape = rows, columns, shape
        self.row_offsets = _offsets(rows, shape[0])
        self.column_order = torch.argsort(columns, stable=True)
        self.column_offsets = _offsets(columns[self.column_order], shape[1])
        self.rows_by_column = rows[self.column_order]

    def times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S @ dense, S holding `values` at the cells."""
        return F.embedding_bag(self.columns, dense, self.row_offsets, mode="sum", per_sample_weights=values)

    def transposed_times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S.T @ dense."""
        weights = values[self.column_order]
        return F.embedding_bag(self.rows_by_column, dense, self.column_offsets, mode="sum", per_sample_weights=weights)

    def dots(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left[r] . right[c] at each cell (r, c), without the dense rows x columns product."""
        indptr = torch.cat([self.row_offsets, self.row_offsets.new_tensor([len(self.rows)])])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            ones = torch.ones(len(self.rows), dtype=left.dtype, device=left.device)
            pattern = torch.sparse_csr_tensor(indptr, self.columns, ones, self.shape)
            return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values()


def _offsets(sorted_index: torch.Tensor, count: int) -> torch.Tensor:
    """Where each of `count` groups starts in a sorted index."""
    sizes = torch.bincount(sorted_index, minlength=count)
    return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)[:-1]])


class _SparseProduct(torch.autograd.Function):
    """S @ dense with a gradient for `dense` only (S is data)."""

    @staticmethod
    def forward(ctx: Any, dense: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(values)
        return pattern.times(values, dense)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (values,) = ctx.saved_tensors
        return ctx.pattern.transposed_times(values, grad), None, None


class _SampledDots(torch.autograd.Function):
    """left[r] . right[c] at the pattern's cells; both gradients are sparse products with the pattern."""

    @staticmethod
    def forward(ctx: Any, left: torch.Tensor, right: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(left, right)
        return pattern.dots(left, right)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        left, right = ctx.saved_tensors
        return ctx.pattern.times(grad, right), ctx.pattern.transposed_times(grad, left), None


class AutoRec(RatingStatistics, nn.Module):
    """I-AutoRec (Sedhain et al., 2015): each item is its column of training ratings (one entry per user, empty
    where unrated), encoded to `hidden` sigmoid units and decoded back to a rating for every user:
    r(u, i) = W_u . sigmoid(V r_i + mu) + b_u. The squared error counts observed entries only, so the network learns
    to fill in the empty ones; its L2 covers the two weight matrices (`penalty`).

    The input columns are the training ratings (`set_ratings`), kept as a sparse matrix in the checkpoint. Encoding
    is one sparse product; decoding evaluates only the asked (user, item) cells (a sampled product), never the
    dense users x items matrix. Ids without training data get the item's training mean, or the global mean.
    """

    def __init__(self, num_users: int, num_items: int, hidden: int = 500) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1 or hidden < 1:
            raise ValueError(f"AutoRec needs num_users, num_items, hidden >= 1, got {num_users}, {num_items}, {hidden}")
        self.encoder = nn.Parameter(torch.randn(num_users, hidden) * num_users**-0.5)
        self.encoder_bias = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Parameter(torch.randn(num_users, hidden) * hidden**-0.5)
        self.decoder_bias = nn.Parameter(torch.zeros(num_users))
        self._register_statistics(num_users, num_items)
        # the training ratings as (item, user, rating) sorted by item: the encoder's input columns
        self.register_buffer("input_items", torch.zeros(0, dtype=torch.long))
        self.register_buffer("input_users", torch.zeros(0, dtype=torch.long))
        self.register_buffer("input_ratings", torch.zeros(0))
        self._inputs: SparsePattern | None = None

    @torch.no_grad()
    def set_ratings(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor) -> None:
        """The training ratings the items are encoded from (a pair rated twice keeps its last rating)."""
        num_users = len(self.user_known)
        cells, group = torch.unique(items.long() * num_users + users.long(), return_inverse=True)  # item-major
        order = torch.arange(len(group))
        last = torch.zeros(len(cells), dtype=torch.long).scatter_reduce(0, group, order, "amax", include_self=False)
        self.input_items = (cells // num_users).to(self.input_items.device)
        self.input_users = (cells % num_users).to(self.input_users.device)
        self.input_ratings = ratings[last].to(self.encoder)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._inputs = None  # the loaded ratings are copied into the buffers in place: index them afresh
        super()._load_from_state_dict(*args, **kwargs)

    def item_codes(self) -> torch.Tensor:
        """Every item's hidden code: (num_items, hidden)."""
        shape = (len(self.item_known), len(self.user_known))
        if self._inputs is None or self._inputs.rows is not self.input_items:  # new ratings, or moved to a device
            self._inputs = SparsePattern(self.input_items, self.input_users, shape)
        summed = _SparseProduct.apply(self.encoder, self.input_ratings, self._inputs)
        return torch.sigmoid(summed + self.encoder_bias)

    def _fallback(self, items: torch.Tensor, item_ok: torch.Tensor) -> torch.Tensor:
        return torch.where(item_ok, self.item_mean[items], self.global_mean)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of the pairs (users[b], items[b])."""
        users, user_ok = _known(users, self.user_known)
        items, item_ok = _known(items, self.item_known)
        num_items = len(self.item_known)
        cells, position = torch.unique(users * num_items + items, return_inverse=True)  # sorted: row-major
        pattern = SparsePattern(cells // num_items, cells % num_items, (len(self.user_known), num_items))
        dots = _SampledDots.apply(self.decoder, self.item_codes(), pattern)
        predictions = dots[position] + self.decoder_bias[users]
        return torch.where(user_ok & item_ok, predictions, self._fallback(items, item_ok))

    def predict_all(self, users: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of each user against every item: (B, num_items)."""
        users, user_ok = _known(users, self.user_known)
        items = torch.arange(len(self.item_known), device=users.device)
        scores = self.decoder[users] @ self.item_codes().T + self.decoder_bias[users, None]
        fallback = self._fallback(items, self.item_known)[None, :]
        return torch.where(user_ok[:, None] & self.item_known[None, :], scores, fallback)

    def penalty(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The squared norms of both weight matrices, spread over the training ratings: with the mean squared error
        of a batch, factor_l2 * this is the paper's objective (sum of errors + lambda/2 * norms) over the rating
        count, with factor_l2 = lambda / 2. Biases are not penalised."""
        norms = (self.encoder.square().sum() + self.decoder.square().sum()) / max(len(self.input_ratings), 1)
        return norms, torch.zeros_like(norms)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_codes()


class ALSGroups:
    """The training ratings seen from one side (users or items): each entity's count, the ratings as a sparse
    (entity x other side) CSR matrix, and padded blocks of entities with similar counts for exact solves.

    Why: alternating least squares solves one small ridge regression per user (then per item). The CSR matrix
    turns every conjugate-gradient step for all entities at once into one sampled dense product and one sparse
    product (no (ratings x rank) tensor is ever gathered); the blocks turn exact solves into a few batched matrix
    products and Cholesky solves. Both depend only on the training ratings, so they are built once.
    """

    def __init__(
        self,
        entity: torch.Tensor,
        num: int,
        other: torch.Tensor | None = None,
        num_other: int | None = None,
        block_elements: int = 1 << 21,
    ) -> None:
        self.entity, self.num, self.block_elements = entity, num, block_elements
        self.counts = torch.bincount(entity, minlength=num)
        self._blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._gathers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.order: torch.Tensor | None = None
        self.other = other
        if other is not None:
            width = int(num_other if num_other is not None else int(other.max()) + 1)
            # ratings sorted by entity, then by the other side: the CSR layout, duplicates kept as separate entries
            self.order = torch.argsort(entity * width + other, stable=True)
            self.crow = torch.cat([self.counts.new_zeros(1), torch.cumsum(self.counts, 0)])
            self.columns = other[self.order]
            self.shape = (num, width)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The ratings as a CSR matrix holding `values` (one per rating, in the ratings' own order)."""
        if self.order is None:
            raise ValueError("ALSGroups was built without the other side's indices: no CSR matrix")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta": the ops used are stable
            return torch.sparse_csr_tensor(self.crow, self.columns, values[self.order], self.shape)

    @property
    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._blocks is None:
            self._blocks = self._build_blocks()
        return self._blocks

    @property
    def gathers(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The blocks as flat gather indices: (members, the other side's row of each padded slot, the rating of each
        slot), padding pointing one past the end (a zero row and a zero target appended by the caller), so that
        a block's features and targets are two index_selects with no masking."""
        if self.other is None:
            raise ValueError("ALSGroups was built without the other side's indices: no gathers")
        if self._gathers is None:
            num_other, num_ratings = self.shape[1], len(self.entity)
            self._gathers = [
                (
                    members,
                    torch.where(valid, self.other[index], num_other).flatten(),
                    torch.where(valid, index, num_ratings).flatten(),
                )
                for members, index, valid in self.blocks
            ]
        return self._gathers

    def _build_blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        entity, counts = self.entity, self.counts
        order = torch.argsort(entity, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rated = torch.nonzero(counts > 0).squeeze(1)
        rated = rated[torch.argsort(counts[rated], stable=True)]  # fewest ratings first: little padding per block
        blocks = []
        sorted_counts = counts[rated].cpu().numpy()
        begin, total = 0, len(rated)
        while begin < total:
            end = begin + 1
            # a block ends at its budget of padded ratings, or where counts grow by a quarter (padding stays small)
            while (
                end < total
                and (end + 1 - begin) * int(sorted_counts[end]) <= self.block_elements
                and sorted_counts[end] <= 1.25 * sorted_counts[begin] + 4
            ):
                end += 1
            members = rated[begin:end]
            width = int(counts[members].max())
            position = torch.arange(width, device=entity.device)
            valid = position[None, :] < counts[members][:, None]
            index = order[(starts[members][:, None] + position[None, :]).clamp(max=len(order) - 1)]
            blocks.append((members, index, valid))
            begin = end
        return blocks


def conjugate_gradient_solve(
    groups: ALSGroups,
    weights: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    penalty: torch.Tensor,
    out: torch.Tensor,
    steps: int,
) -> None:
    """The ridge regressions of conditional_rows (exact: w_e * penalty on each entity's diagonal, no noise
    precision), approximately: `steps` conjugate-gradient steps per entity, all at once, started from the current
    rows of `out` (Takacs et al., 2011). `table` holds the other side's feature rows
    (rating n of entity e has the features table[other[n]]).

    Why: it never forms the (d x d) normal matrices. Each step is one sampled product (the features' dot products
    with the current direction at the rated cells only) and one sparse product, so high ranks stay cheap, and
    warm starts from the previous sweep need only a few steps.
    """
    scale = weights[:, None].to(table.dtype) * penalty[None, :]
    pattern = groups.matrix(torch.ones_like(targets))
    if len(targets) > groups.shape[0] * groups.shape[1]:
        # more ratings than cells (pairs rated many times): the sampled product refuses it, a dense one is small here
        pattern = pattern.to_dense()  # each cell holds how often its pair was rated

    def apply(vectors: torch.Tensor) -> torch.Tensor:
        if pattern.layout == torch.strided:
            return (pattern * (vectors @ table.T)) @ table + scale * vectors
        projected = torch.sparse.sampled_addmm(pattern, vectors, table.T, beta=0.0)
        return projected @ table + scale * vectors

    right = groups.matrix(targets) @ table
    solution = out.clone()
    residual = right - apply(solution)
    direction = residual.clone()
    norm = residual.square().sum(1)
    for _ in range(steps):
        image = apply(direction)
        curvature = (direction * image).sum(1)
        step = torch.where(curvature > 0, norm / curvature.clamp_min(1e-30), torch.zeros_like(norm))
        solution += step[:, None] * direction
        residual -= step[:, None] * image
        new_norm = residual.square().sum(1)
        direction = residual + (new_norm / norm.clamp_min(1e-30))[:, None] * direction
        norm = new_norm
    rated = groups.counts > 0
    out[rated] = solution[rated]


@torch.no_grad()
def als_sweep(
    net: BiasedMF,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    groups: tuple[ALSGroups, ALSGroups],
    factor_l2: float,
    bias_l2: float,
    cg_steps: int = 0,
    count_exponent: float = 1.0,
) -> torch.Tensor | None:
    """One sweep of alternating least squares on BiasedMF: users (p_u, b_u) exactly given the items, then items
    (with `cg_steps` > 0: that many conjugate-gradient steps from the current rows instead of the exact solve).
    `groups` are the ratings seen from the users and from the items, built with the other side's indices.

    `count_exponent` a < 1 weighs each user's and item's L2 by its rating count to the power a instead of the count
    itself: entities with many ratings are shrunk less than in proportion, those with few more.

    With count_exponent 1 it minimizes the same objective as gradient training, mean squared error + factor_l2 *
    (|p_u|^2 + |q_i|^2) + bias_l2 * (b_u^2 + b_i^2) per rating, each half in closed form, so a few sweeps converge
    with no learning rate. Returns the mean squared error on the ratings after the sweep (exact solves only; None
    with conjugate gradients).
    """
    rank = net.user_factors.weight.shape[1]
    dtype = net.user_factors.weight.dtype
    penalty = torch.tensor([factor_l2] * rank + [bias_l2], device=ratings.device, dtype=dtype)
    residual = ratings - net._offset(items, torch.ones_like(items, dtype=torch.bool))
    by_user, by_item = groups

    zero = penalty.new_zeros(rank + 1)

    def solve(groups: ALSGroups, table: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The rows of one side given the other side's `table`; rating n has the features table[other[n]]."""
        weights = groups.counts.to(dtype).pow(count_exponent)
        if cg_steps > 0:
            conjugate_gradient_solve(groups, weights, table, targets, penalty, out, cg_steps)
            return None
        return conditional_rows(groups, table, targets, zero, torch.diag(penalty), 1.0, out, weights=weights)

    ones = torch.ones(len(net.item_known), 1, device=ratings.device, dtype=dtype)
    solution = torch.cat([net.user_factors.weight, net.user_bias.weight], 1)
    item_table = torch.cat([net.item_factors.weight, ones], 1)
    solve(by_user, item_table, residual - net.item_bias.weight[:, 0].index_select(0, items), solution)
    net.user_factors.weight.copy_(solution[:, :rank])
    net.user_bias.weight.copy_(solution[:, rank:])
    ones = torch.ones(len(net.user_known), 1, device=ratings.device, dtype=dtype)
    solution = torch.cat([net.item_factors.weight, net.item_bias.weight], 1)
    user_table = torch.cat([net.user_factors.weight, ones], 1)
    squared_error = solve(by_item, user_table, residual - net.user_bias.weight[:, 0].index_select(0, users), solution)
    net.item_factors.weight.copy_(solution[:, :rank])
    net.item_bias.weight.copy_(solution[:, rank:])
    return None if squared_error is None else squared_error / max(len(ratings), 1)


def _wishart(scale: torch.Tensor, df: int, generator: torch.Generator) -> torch.Tensor:
    """A draw from the Wishart distribution (scale matrix, integer df) by Bartlett's decomposition: L A A^T L^T,
    L the Cholesky factor of the scale, A lower-triangular with N(0, 1) below the diagonal and sqrt(chi^2(df - k))
    on it, each chi^2(m) the sum of m squared normals (exact for integer m). Why by hand: every number comes from
    `generator`, so a sweep's draws depend on its seed alone."""
    dim = scale.shape[0]
    options = {"device": scale.device, "dtype": scale.dtype, "generator": generator}
    normals = torch.randn(dim, df, **options)
    keep = torch.arange(df, device=scale.device)[None, :] < (df - torch.arange(dim, device=scale.device))[:, None]
    diagonal = (normals.square() * keep).sum(1).sqrt()
    bartlett = torch.tril(torch.randn(dim, dim, **options), -1) + torch.diag(diagonal)
    factor = torch.linalg.cholesky(scale) @ bartlett
    return factor @ factor.T


def sample_prior(rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and precision of the rows' Gaussian prior, drawn from their Normal-Wishart posterior given the rows
    (BPMF's hyperprior, Salakhutdinov & Mnih 2008: mu_0 = 0, beta_0 = 2, nu_0 = dim, W_0 = identity)."""
    count, dim = rows.shape
    beta0 = 2.0
    average = rows.mean(0)
    centred = rows - average
    scatter = centred.T @ centred  # count x the rows' covariance
    eye = torch.eye(dim, device=rows.device, dtype=rows.dtype)
    inverse_scale = eye + scatter + (beta0 * count / (beta0 + count)) * torch.outer(average, average)
    scale = torch.linalg.inv(inverse_scale)
    precision = _wishart((scale + scale.T) / 2, dim + count, generator)
    draw = torch.randn(dim, 1, device=rows.device, dtype=rows.dtype, generator=generator)
    noise = torch.linalg.solve_triangular(torch.linalg.cholesky((beta0 + count) * precision).T, draw, upper=True)
    return count * average / (beta0 + count) + noise[:, 0], precision


def conditional_rows(
    groups: ALSGroups,
    table: torch.Tensor,
    targets: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_precision: torch.Tensor,
    noise_precision: float,
    out: torch.Tensor,
    generator: torch.Generator | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each rated entity's row drawn from its Gaussian conditional given the other side: precision
    w_e * Lambda + alpha * X^T X, mean its inverse times (alpha * X^T y + w_e * Lambda mu), X the rows
    table[other[n]] of its ratings (`groups` built with the other side's indices), y their targets, w_e the
    entity's weight (1 by default). Without a generator it writes the conditional's mean instead: with mu = 0 and
    alpha = 1 that is the ridge regression of an ALS half, w_e * Lambda its L2. Entities without ratings keep
    their rows.

    Returns the sum of squared errors of the new rows on the targets: the training error, for nothing extra.
    """
    anchor = prior_precision @ prior_mean
    table = torch.cat([table, table.new_zeros(1, table.shape[1])])  # the padding's row and target: zero
    targets = torch.cat([targets, targets.new_zeros(1)])
    squared_error = targets.new_zeros(())
    for members, other_rows, rating_rows in groups.gathers:
        count = len(members)
        features = table.index_select(0, other_rows).view(count, -1, table.shape[1])
        response = targets.index_select(0, rating_rows).view(count, -1)
        prior, pull = prior_precision.expand(count, -1, -1), anchor.expand(count, -1)
        if weights is not None:
            prior, pull = prior * weights[members, None, None], pull * weights[members, None]
        precision = torch.baddbmm(prior, features.transpose(1, 2), features, alpha=noise_precision)
        # (1 x w) @ (w x d) per entity: the same sums as X^T y, several times faster than (d x w) @ (w x 1) on CPU
        right = noise_precision * (response[:, None, :] @ features).squeeze(1) + pull
        factor = torch.linalg.cholesky(precision)  # precision = L L^T
        half = torch.linalg.solve_triangular(factor, right[..., None], upper=False)
        if generator is not None:  # L^-T (L^-1 b + z) = the mean + L^-T z, whose covariance is (L L^T)^-1
            half = half + torch.randn(half.shape, device=half.device, dtype=half.dtype, generator=generator)
        rows = torch.linalg.solve_triangular(factor.transpose(1, 2), half, upper=True)
        out[members] = rows.squeeze(-1)
        squared_error += (response[..., None] - features @ rows).square().sum()
    return squared_error


@torch.no_grad()
def gibbs_sweep(
    net: BiasedMF,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    groups: tuple[ALSGroups, ALSGroups],
    noise_precision: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One sweep of Bayesian probabilistic MF's Gibbs sampler (Salakhutdinov & Mnih, 2008) on BiasedMF, in place:
    each side's prior mean and precision from their Normal-Wishart conditional, then every user row, then every
    item row, from their Gaussian conditionals. Rows are [factors, bias]: the bias is one more coordinate under the
    same prior, against a constant 1 on the other side. `noise_precision` is the ratings' alpha; `groups` are built
    as for als_sweep, which finds the MAP start the paper begins the chain from. Returns the new rows' mean squared
    error on the ratings.
    """
    rank = net.user_factors.weight.shape[1]
    residual = ratings - net._offset(items, torch.ones_like(items, dtype=torch.bool))
    by_user, by_item = groups
    user_rows = torch.cat([net.user_factors.weight, net.user_bias.weight], 1)
    item_rows = torch.cat([net.item_factors.weight, net.item_bias.weight], 1)
    user_prior = sample_prior(user_rows[by_user.counts > 0], generator)
    item_prior = sample_prior(item_rows[by_item.counts > 0], generator)
    ones = user_rows.new_ones(1)
    item_table = torch.cat([item_rows[:, :rank], ones.expand(len(item_rows), 1)], 1)
    targets = residual - item_rows[:, rank].index_select(0, items)
    conditional_rows(by_user, item_table, targets, *user_prior, noise_precision, user_rows, generator)
    user_table = torch.cat([user_rows[:, :rank], ones.expand(len(user_rows), 1)], 1)
    targets = residual - user_rows[:, rank].index_select(0, users)
    squared_error = conditional_rows(by_item, user_table, targets, *item_prior, noise_precision, item_rows, generator)
    for factors, bias, rows in (
        (net.user_factors.weight, net.user_bias.weight, user_rows),
        (net.item_factors.weight, net.item_bias.weight, item_rows),
    ):
        factors.copy_(rows[:, :rank])
        bias.copy_(rows[:, rank:])
    return squared_error / max(len(ratings), 1)


class KnownIds:
    """Which user and item ids had training data (`user_known`, `item_known` buffers), set from the data: an
    implicit net scores ids without training rows as unknown rather than by their random initialisation."""

    user_known: torch.Tensor
    item_known: torch.Tensor

    @torch.no_grad()
    def set_known(self, user_known: torch.Tensor, item_known: torch.Tensor) -> None:
        self.user_known.copy_(user_known)
        self.item_known.copy_(item_known)


class ImplicitMF(KnownIds, nn.Module):
    """Implicit-feedback MF for ranking: s(u, i) = b_i + <p_u, q_i> (a user bias cannot change a user's ranking).

    Trained with BPR (Rendle et al., 2009) or a logistic loss on sampled negatives; `items` may be (B,)
    or (B, C) candidates per user. Unknown users score by item bias alone (popularity); items without
    training data score 0, since their rows hold only their random initialization.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        rank: int = 64,
        init_std: float = 0.1,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1 or rank < 1:
            raise ValueError(f"ImplicitMF needs num_users, num_items, rank >= 1, got {num_users}, {num_items}, {rank}")
        self.sparse = sparse
        self.user_factors = nn.Embedding(num_users, rank, sparse=sparse)
        self.item_factors = nn.Embedding(num_items, rank, sparse=sparse)
        self.item_bias = nn.Embedding(num_items, 1, sparse=sparse)
        nn.init.normal_(self.user_factors.weight, std=init_std)
        nn.init.normal_(self.item_factors.weight, std=init_std)
        nn.init.zeros_(self.item_bias.weight)
        self.register_buffer("user_known", torch.ones(num_users, dtype=torch.bool))
        self.register_buffer("item_known", torch.ones(num_items, dtype=torch.bool))

    def _users(self, users: torch.Tensor) -> torch.Tensor:
        users, user_ok = _known(users, self.user_known)
        return self.user_factors(users) * user_ok[:, None]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        vectors = self._users(users)
        if items.dim() == 2:
            vectors = vectors.unsqueeze(1)
        items, item_ok = _known(items, self.item_known)
        dot = (vectors * self.item_factors(items)).sum(-1)
        return (dot + self.item_bias(items).squeeze(-1)) * item_ok

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        scores = self._users(users) @ self.item_factors.weight.T + self.item_bias.weight.squeeze(-1)[None, :]
        return scores * self.item_known[None, :]

    def penalty(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per-row squared norms of the user and item vectors that the batch touches."""
        item_part = self.item_factors(items).square().sum(-1) + self.item_bias(items).squeeze(-1).square()
        if item_part.dim() == 2:
            item_part = item_part.sum(-1)
        return self.user_factors(users).square().sum(-1) + item_part

    def item_embeddings(self) -> torch.Tensor:
        return self.item_factors.weight


def _tower(width: int, hidden: Sequence[int], dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, dim))
    return nn.Sequential(*layers)


class TwoTower(KnownIds, nn.Module):
    """Content-based two-tower model: MLP(user id embedding ++ user features) and MLP(item id ++ genres).

    Both outputs are L2-normalized, so the score is a cosine similarity divided by `temperature`.
    Features make a cold-start user or item scoreable: without an id row, the tower still sees its features.
    Set `id_dim=0` for a pure content model (then each tower needs features).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        user_features: torch.Tensor | None = None,
        item_features: torch.Tensor | None = None,
        dim: int = 32,
        hidden: Sequence[int] = (64,),
        id_dim: int = 32,
        dropout: float = 0.0,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"TwoTower temperature must be > 0, got {temperature}")
        self.temperature, self.id_dim = temperature, id_dim
        user_features = torch.zeros(num_users, 0) if user_features is None else user_features.float()
        item_features = torch.zeros(num_items, 0) if item_features is None else item_features.float()
        if id_dim == 0 and (user_features.shape[1] == 0 or item_features.shape[1] == 0):
            raise ValueError("TwoTower with id_dim=0 needs user and item features; these data have none for one side")
        # side information comes from the data at construction; it is not part of the checkpoint
        self.register_buffer("user_features", user_features, persistent=False)
        self.register_buffer("item_features", item_features, persistent=False)
        self.register_buffer("user_known", torch.ones(num_users, dtype=torch.bool))
        self.register_buffer("item_known", torch.ones(num_items, dtype=torch.bool))
        self.user_ids = nn.Embedding(num_users, id_dim) if id_dim else None
        self.item_ids = nn.Embedding(num_items, id_dim) if id_dim else None
        for table in (self.user_ids, self.item_ids):
            if table is not None:
                nn.init.normal_(table.weight, std=0.1)
        self.user_tower = _tower(id_dim + user_features.shape[1], hidden, dim, dropout)
        self.item_tower = _tower(id_dim + item_features.shape[1], hidden, dim, dropout)
        self.sparse = False

    def _encode(
        self,
        index: torch.Tensor,
        known: torch.Tensor,
        ids: nn.Embedding | None,
        features: torch.Tensor,
        tower: nn.Module,
    ) -> torch.Tensor:
        inside = (index >= 0) & (index < len(known))
        safe, trained = _known(index, known)
        parts = [features[safe] * inside.unsqueeze(-1)]
        if ids is not None:
            parts.insert(0, ids(safe) * trained.unsqueeze(-1))  # an id without training data has no row to use
        return F.normalize(tower(torch.cat(parts, dim=-1)), dim=-1)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self._encode(users, self.user_known, self.user_ids, self.user_features, self.user_tower)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self._encode(items, self.item_known, self.item_ids, self.item_features, self.item_tower)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        vectors = self.user_vectors(users)
        if items.dim() == 2:
            vectors = vectors.unsqueeze(1)
        return (vectors * self.item_vectors(items)).sum(-1) / self.temperature

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        items = torch.arange(len(self.item_known), device=users.device)
        return self.user_vectors(users) @ self.item_vectors(items).T / self.temperature

    def penalty(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Squared norms of the id rows a batch touches; the towers' weights take the optimizer's weight decay."""
        total = torch.zeros(len(users), device=users.device)
        if self.user_ids is not None and self.item_ids is not None:
            item_part = self.item_ids(items.clamp(min=0)).square().sum(-1)
            total = self.user_ids(users.clamp(min=0)).square().sum(-1) + (
                item_part.sum(-1) if item_part.dim() == 2 else item_part
            )
        return total

    def item_embeddings(self) -> torch.Tensor:
        return self.item_vectors(torch.arange(len(self.item_known), device=self.item_known.device))


class NeuMF(KnownIds, nn.Module):
    """Neural collaborative filtering (He et al., 2017): a GMF branch (p_u * q_i, elementwise) beside an MLP over
    the concatenated user and item vectors of a second pair of tables, both fed to one output unit (a logit).

    Why two branches: the elementwise product is matrix factorization's inner product with learned weights, the
    MLP can learn interactions a dot product cannot; the paper found the fusion better than either alone.
    `mlp` lists the tower's widths; its input is twice the first width (user ++ item), each layer halves it in
    the paper's towers ([64, 32, 16, 8] with 8 predictive factors). Unknown users and items score 0 like ImplicitMF.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        gmf_dim: int = 8,
        mlp: Sequence[int] = (64, 32, 16, 8),
        dropout: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1 or gmf_dim < 1 or not mlp:
            raise ValueError(f"NeuMF needs num_users, num_items, gmf_dim >= 1 and an mlp, got {gmf_dim}, {mlp}")
        self.sparse = False
        self.user_gmf, self.item_gmf = nn.Embedding(num_users, gmf_dim), nn.Embedding(num_items, gmf_dim)
        half = mlp[0] // 2
        self.user_mlp, self.item_mlp = nn.Embedding(num_users, half), nn.Embedding(num_items, mlp[0] - half)
        for table in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            nn.init.normal_(table.weight, std=init_std)
        layers: list[nn.Module] = []
        for width, size in zip(mlp, mlp[1:]):
            layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        self.tower = nn.Sequential(*layers)
        self.output = nn.Linear(gmf_dim + mlp[-1], 1)
        self.register_buffer("user_known", torch.ones(num_users, dtype=torch.bool))
        self.register_buffer("item_known", torch.ones(num_items, dtype=torch.bool))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of the pairs (users[b], items[b]), or of (users[b], items[b, c]) for (B, C) candidates."""
        users, user_ok = _known(users, self.user_known)
        items, item_ok = _known(items, self.item_known)
        gmf_user, mlp_user = self.user_gmf(users), self.user_mlp(users)
        if items.dim() == 2:  # each user against its row of candidates
            gmf_user, user_ok = gmf_user[:, None], user_ok[:, None]
            mlp_user = mlp_user[:, None].expand(-1, items.shape[1], -1)
        gmf = gmf_user * self.item_gmf(items)
        deep = self.tower(torch.cat([mlp_user, self.item_mlp(items)], -1))
        return self.output(torch.cat([gmf, deep], -1)).squeeze(-1) * (user_ok & item_ok)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        items = torch.arange(len(self.item_known), device=users.device)
        return self(users, items[None, :].expand(len(users), -1))

    def penalty(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Squared norms of the user and item rows a batch touches; the tower takes the optimizer's weight decay."""
        users, items = users.clamp(min=0), items.clamp(min=0)
        user_part = self.user_gmf(users).square().sum(-1) + self.user_mlp(users).square().sum(-1)
        item_part = self.item_gmf(items).square().sum(-1) + self.item_mlp(items).square().sum(-1)
        return user_part + (item_part.sum(-1) if item_part.dim() == 2 else item_part)

    def item_embeddings(self) -> torch.Tensor:
        return torch.cat([self.item_gmf.weight, self.item_mlp.weight], 1)
