"""Token trees: verifying several candidate continuations in one target forward (pure code).

A round's block is a tree instead of a chain (docs/algorithm.md, *Token trees*). Node 0 is
the root: the last committed token x_n, explicit and always present. Every other node is a
proposed token whose parent comes before it (topological order), so node i is also block
row i of the target forward. A chain [x_n, d_1..d_γ] is the tree whose node j is d_j.

Rows, positions and mask (`rows`): with `committed_len` = n committed tokens, the target's
cache holds the n - 1 rows of x_1..x_{n-1} (the scheduler's invariant for a chain block);
node i sits at position n - 1 + depth(i), so the root is at n - 1 and d_j of a chain at
n - 1 + j, as today. Row i sees every cached row, its ancestors and itself.

Verification: `verify_tree_greedy` walks from the root along the child equal to the target's
argmax; `verify_tree_sampling` applies multi-draft speculative sampling (SpecInfer's
recursive rejection sampling), exact under the conditions in its docstring. Both reduce to
`acceptance.verify_greedy` / `verify_sampling` on a chain, random draws included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mirror_sd.graphs.masks import tree_mask
from mirror_sd.runtime.acceptance import Verdict, sample

Q_SUM_TOLERANCE = 1e-3  # how far a draft distribution's sum may stray from 1 (fp32 softmax)


@dataclass(frozen=True)
class Node:
    token: int
    parent: int  # index of the parent node; -1 for the root
    depth: int  # 0 for the root, parent's depth + 1 otherwise
    q: torch.Tensor | None  # (V,) law `token` was drawn from; None = deterministic proposal


class TokenTree:
    """Candidate continuations of one sequence, rooted at its last committed token.

    Nodes are numbered in insertion order, which is topological (a parent before its
    children) and is the block's row order. Children are tried in insertion order.
    """

    def __init__(self, root: int):
        self._nodes = [Node(_token(root), -1, 0, None)]
        self._children: list[list[int]] = [[]]
        self._vocab: int | None = None  # V of the first q seen; every q must match it

    @classmethod
    def chain(cls, tokens: Sequence[int], q: torch.Tensor | None = None, *, root: int) -> TokenTree:
        """The chain root -> tokens[0] -> ... ; q (γ, V): row j is the law tokens[j] was
        drawn from (as `verify_sampling` takes it), or None for a deterministic draft."""
        if q is not None and (q.dim() != 2 or q.shape[0] != len(tokens)):
            raise ValueError(
                f"q must be ({len(tokens)}, V) for {len(tokens)} tokens, got {tuple(q.shape)}"
            )
        tree = cls(root)
        for j, t in enumerate(tokens):
            tree.add(j, t, None if q is None else q[j])
        return tree

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]], *, root: int) -> TokenTree:
        """Deterministic candidates (e.g. several retrieval matches) merged on shared
        prefixes; nodes and siblings keep the order in which the paths first name them."""
        tree = cls(root)
        for path in paths:
            node = 0
            for t in path:
                same = [c for c in tree.children(node) if tree[c].token == t]
                node = same[0] if same else tree.add(node, t)
        return tree

    @classmethod
    def with_siblings(cls, tokens: Sequence[int], alts: Sequence[Sequence[int]], *,
                      root: int) -> TokenTree:  # fmt: skip
        """A greedy draft chain (nodes 1..γ) plus, at each depth j, the draft's next-best
        tokens `alts[j]` as leaves beside d_j (after the chain, so the chain's rows come
        first). All deterministic: the greedy walk takes a leaf when the target's token is
        one."""
        tree = cls.chain(tokens, root=root)
        for j, leaves in enumerate(alts):
            for t in leaves:
                if t != tokens[j]:
                    tree.add(j, t)
        return tree

    def add(self, parent: int, token: int, q: torch.Tensor | None = None) -> int:
        """Append `token` as the last child of node `parent`; returns its index.

        q: the (V,) distribution the token was sampled from, or None when it was proposed
        deterministically. Deterministic siblings must be distinct; sampled siblings may
        repeat (i.i.d. draws do, and dropping repeats would bias the output).
        """
        if not 0 <= parent < len(self._nodes):
            raise ValueError(f"parent {parent} is not a node (the tree has {len(self)})")
        token = _token(token)
        if q is not None:
            self._check_q(q, token)
        elif any(self[c].token == token and self[c].q is None for c in self._children[parent]):
            raise ValueError(f"node {parent} already has the deterministic child {token}")
        self._nodes.append(Node(token, parent, self._nodes[parent].depth + 1, q))
        self._children.append([])
        self._children[parent].append(len(self._nodes) - 1)
        return len(self._nodes) - 1

    def _check_q(self, q: torch.Tensor, token: int) -> None:
        if q.dim() != 1:
            raise ValueError(f"q must be one (V,) distribution, got shape {tuple(q.shape)}")
        if self._vocab is not None and q.shape[0] != self._vocab:
            raise ValueError(f"q has {q.shape[0]} entries; earlier ones had {self._vocab}")
        if token >= q.shape[0]:
            raise ValueError(f"token {token} outside q's vocabulary of {q.shape[0]}")
        if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
            raise ValueError("q must be finite and non-negative")
        if abs(float(q.sum()) - 1.0) > Q_SUM_TOLERANCE:
            raise ValueError(f"q sums to {float(q.sum()):.6f}, not 1")
        if float(q[token]) <= 0.0:
            raise ValueError(f"token {token} has probability 0 under its q: not drawn from it")
        self._vocab = q.shape[0]

    def __len__(self) -> int:
        return len(self._nodes)

    def __getitem__(self, i: int) -> Node:
        return self._nodes[i]

    @property
    def vocab(self) -> int | None:
        """V of the nodes' q, or None when every proposal is deterministic."""
        return self._vocab

    def children(self, i: int) -> tuple[int, ...]:
        return tuple(self._children[i])

    @property
    def tokens(self) -> list[int]:
        return [n.token for n in self._nodes]

    @property
    def parents(self) -> list[int]:
        return [n.parent for n in self._nodes]

    @property
    def depths(self) -> list[int]:
        return [n.depth for n in self._nodes]

    def path(self, i: int) -> list[int]:
        """Node indices from the root to node i, both included (increasing)."""
        out = [i]
        while self._nodes[out[-1]].parent >= 0:
            out.append(self._nodes[out[-1]].parent)
        return out[::-1]


def _token(t) -> int:
    if isinstance(t, bool) or int(t) != t or t < 0:
        raise ValueError(f"token {t!r} is not a non-negative integer id")
    return int(t)


@dataclass(frozen=True)
class TreeRows:
    """One target forward over a tree block: T = len(tree) rows in node order."""

    ids: torch.Tensor  # (1, T) long: node tokens, the root (x_n) first
    positions: torch.Tensor  # (1, T) long: committed_len - 1 + depth
    mask: torch.Tensor  # (T, T) bool: row i sees row j iff j is i or an ancestor of i


def rows(tree: TokenTree, committed_len: int) -> TreeRows:
    """Inputs of the tree's forward when `committed_len` tokens are committed (the cache then
    holds committed_len - 1 rows; the root row is the last committed token)."""
    if committed_len < 1:
        raise ValueError(f"committed_len {committed_len}: the root must be a committed token")
    ids = torch.tensor([tree.tokens], dtype=torch.long)
    positions = torch.tensor([tree.depths], dtype=torch.long) + (committed_len - 1)
    return TreeRows(ids, positions, tree_mask(0, tree.parents)[0])


def attention_mask(tree: TokenTree, past_len: int) -> torch.Tensor:
    """The model's mask (1, T, past_len + T): every cached column visible, then the tree
    mask among the block rows (`graphs.masks.tree_mask` with the root as the forest root)."""
    return tree_mask(past_len, tree.parents)


@dataclass(frozen=True)
class TreeVerdict:
    """The outcome of one tree round.

    The sequence gains `tokens` and then `correction` (a bonus when the last accepted node
    is a leaf). `keep_rows` are the block rows whose K/V stay: the root and the accepted
    path, increasing; after a forward that appended the T rows at cache rows [S, S + T), the
    caller keeps them with `cache.keep(S, [S + r for r in keep_rows])`.
    """

    accepted: tuple[int, ...]  # accepted node indices along the path (root excluded)
    tokens: tuple[int, ...]  # their tokens
    correction: int  # the target's token after the last accepted node

    @property
    def keep_rows(self) -> tuple[int, ...]:
        return (0, *self.accepted)

    def as_verdict(self) -> Verdict:
        """The chain verdict (accepted count, correction)."""
        return Verdict(len(self.accepted), self.correction)


def _verdict(tree: TokenTree, path: list[int], correction: int) -> TreeVerdict:
    return TreeVerdict(tuple(path), tuple(tree[i].token for i in path), correction)


def verify_tree_greedy(tree: TokenTree, target_logits: torch.Tensor) -> TreeVerdict:
    """target_logits (T, V), row i for node i. From the root, follow the first child whose
    token is the target's argmax at the current node; the correction is that argmax at the
    last accepted node."""
    if target_logits.dim() != 2 or target_logits.shape[0] != len(tree):
        raise ValueError(
            f"target_logits must be ({len(tree)}, V), got {tuple(target_logits.shape)}"
        )
    best = target_logits.argmax(-1).tolist()
    node, path = 0, []
    while True:
        nxt = [c for c in tree.children(node) if tree[c].token == best[node]]
        if not nxt:
            return _verdict(tree, path, best[node])
        node = nxt[0]
        path.append(node)


def verify_tree_sampling(tree: TokenTree, p: torch.Tensor, gen: torch.Generator) -> TreeVerdict:
    """Multi-draft speculative sampling over the tree (lossless under the conditions below).

    p: (T, V) target distributions (after `acceptance.probs`), row i for node i.
    At the current node, with r = p[node], try its children c_1..c_m in order: accept c_i
    with probability min(1, r(c_i) / q_i(c_i)) and move to it; on rejection
    r <- normalize(max(0, r - q_i)), where q_i is the child's q (one-hot on its token when
    None: the residual zeroes that token). When every child is rejected the correction is
    sampled from r; at a leaf the bonus is sampled from p[node]. On a chain this is
    `verify_sampling`, draw for draw.

    Exact (the output has the target's law) when every child's token, given the path to its
    parent and its earlier siblings with their subtrees, is a fresh draw from its own q,
    and how many children a node gets does not depend on those children's tokens. That
    covers: m i.i.d. samples from one q (keep repeats: dropping them biases the output);
    distinct deterministic candidates fixed by the path (retrieval matches, top-k of a
    draft distribution); ordered mixtures of independent proposals of both kinds. It is
    NOT exact for samples drawn without replacement or deduplicated, for samples kept or
    ordered after looking at their values, or when q is not the law actually sampled from;
    the tree cannot see those. What it can see raises ValueError at `TokenTree.add` (a q
    with no mass on its token, a malformed q, repeated deterministic siblings) or here
    (shapes, a token outside p's vocabulary).
    """
    if p.dim() != 2 or p.shape[0] != len(tree):
        raise ValueError(f"p must be ({len(tree)}, V), got {tuple(p.shape)}")
    if tree.vocab is not None and tree.vocab != p.shape[1]:
        raise ValueError(f"p has {p.shape[1]} tokens; the tree's q have {tree.vocab}")
    if max(tree.tokens[1:], default=0) >= p.shape[1]:
        raise ValueError(f"a node's token lies outside p's vocabulary of {p.shape[1]}")
    node, path = 0, []
    while True:
        child, token = _step(tree, tree.children(node), p[node], gen)
        if child is None:
            return _verdict(tree, path, token)
        node = child
        path.append(node)


def _step(
    tree: TokenTree, kids: tuple[int, ...], r: torch.Tensor, gen: torch.Generator
) -> tuple[int | None, int]:
    """(accepted child, its token), or (None, correction) when no child is accepted."""
    if not kids:
        return None, sample(r, gen)
    for c in kids:
        d, q = tree[c].token, tree[c].q
        q_d = 1.0 if q is None else float(q[d])
        if q_d > 0 and torch.rand((), generator=gen).item() * q_d < float(r[d]):
            return c, d  # accepted with probability min(1, r(d) / q(d))
        if q is None:
            residual = r.clone()
            residual[d] = 0.0
        else:
            residual = (r - q).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # r == q: this rejection had probability 0; keep r
            residual = r
        r = residual / residual.sum()
    return None, sample(r, gen)
