"""Token trees: construction, the rows of a tree forward, and greedy / sampling verification."""

from __future__ import annotations

import pytest
import torch

from mirror_sd.runtime.acceptance import verify_greedy, verify_sampling
from mirror_sd.runtime.autoregressive import extend, greedy_decode
from mirror_sd.runtime.token_tree import (
    TokenTree,
    attention_mask,
    rows,
    verify_tree_greedy,
    verify_tree_sampling,
)
from tests.runtime.conftest import CHI2_99_9, chi2, tiny_model

# --- construction ------------------------------------------------------------------------


def _hand_tree() -> TokenTree:
    """0:5 -> {1:7 -> 3:9 -> 5:11, 2:8 -> 4:10}"""
    t = TokenTree(5)
    for parent, token in [(0, 7), (0, 8), (1, 9), (2, 10), (3, 11)]:
        t.add(parent, token)
    return t


def test_nodes_and_paths():
    t = _hand_tree()
    assert len(t) == 6 and t.tokens == [5, 7, 8, 9, 10, 11]
    assert t.parents == [-1, 0, 0, 1, 2, 3] and t.depths == [0, 1, 1, 2, 2, 3]
    assert t.children(0) == (1, 2) and t.children(4) == ()
    assert t.path(5) == [0, 1, 3, 5] and t.path(0) == [0]
    assert t.vocab is None and t[2].q is None


def test_from_paths_merges_shared_prefixes():
    t = TokenTree.from_paths([[1, 2, 3], [1, 2, 4], [1, 5], [6], []], root=0)
    assert t.tokens == [0, 1, 2, 3, 4, 5, 6]
    assert t.parents == [-1, 0, 1, 2, 2, 1, 0]
    assert t.children(1) == (2, 5)


def test_chain_carries_q_rows():
    q = torch.softmax(torch.randn(3, 4), -1)
    t = TokenTree.chain([1, 2, 3], q, root=0)
    assert t.parents == [-1, 0, 1, 2] and t.vocab == 4
    assert all(torch.equal(t[j + 1].q, q[j]) for j in range(3))


def test_validation():
    q = torch.tensor([0.5, 0.5, 0.0])
    t = TokenTree(0)
    t.add(0, 1, q)
    t.add(0, 1, q)  # i.i.d. samples may repeat
    t.add(0, 2)
    with pytest.raises(ValueError, match="already has the deterministic child"):
        t.add(0, 2)
    with pytest.raises(ValueError, match="not a node"):
        t.add(9, 1)
    with pytest.raises(ValueError, match="not a non-negative integer"):
        t.add(0, -1)
    with pytest.raises(ValueError, match="probability 0"):
        t.add(0, 2, q)
    with pytest.raises(ValueError, match="entries"):
        t.add(0, 1, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="sums to"):
        t.add(0, 1, torch.tensor([0.5, 0.6, 0.0]))
    with pytest.raises(ValueError, match="one"):
        t.add(0, 1, q[None])
    with pytest.raises(ValueError, match="outside q"):
        t.add(0, 3, q)
    with pytest.raises(ValueError, match="must be"):
        TokenTree.chain([1, 2], torch.full((3, 3), 1 / 3), root=0)
    with pytest.raises(ValueError, match="committed"):
        rows(t, 0)
    with pytest.raises(ValueError, match="target_logits"):
        verify_tree_greedy(t, torch.zeros(2, 3))
    gen = torch.Generator()
    with pytest.raises(ValueError, match="p has"):
        verify_tree_sampling(t, torch.full((4, 4), 0.25), gen)
    with pytest.raises(ValueError, match="vocabulary"):
        verify_tree_sampling(TokenTree.chain([5], root=0), torch.full((2, 3), 1 / 3), gen)


# --- rows -------------------------------------------------------------------------------


def test_rows_positions_and_mask():
    r = rows(_hand_tree(), committed_len=10)  # the cache holds 9 rows; the root sits at 9
    assert torch.equal(r.ids, torch.tensor([[5, 7, 8, 9, 10, 11]]))
    assert torch.equal(r.positions, torch.tensor([[9, 10, 10, 11, 11, 12]]))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 0, 1, 0, 1, 0],
            [1, 1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(r.mask, expected)
    full = attention_mask(_hand_tree(), past_len=9)
    assert full.shape == (1, 6, 15) and full.dtype == torch.bool
    assert full[0, :, :9].all() and torch.equal(full[0, :, 9:], expected)


def test_chain_rows_match_a_causal_block():
    r = rows(TokenTree.chain([4, 5, 6], root=3), committed_len=7)
    assert torch.equal(r.positions, torch.arange(6, 10)[None])
    assert torch.equal(r.mask, torch.ones(4, 4, dtype=torch.bool).tril())


# --- a chain is a tree ------------------------------------------------------------------


def test_greedy_on_chains_equals_verify_greedy():
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        v, gamma = (
            int(torch.randint(2, 9, (), generator=g)),
            int(torch.randint(0, 6, (), generator=g)),
        )
        logits = torch.randn(gamma + 1, v, generator=g)
        best = logits.argmax(-1)
        noise = torch.randint(0, v, (gamma,), generator=g)
        draft = torch.where(torch.rand(gamma, generator=g) < 0.7, best[:gamma], noise).tolist()
        tv = verify_tree_greedy(TokenTree.chain(draft, root=0), logits)
        assert tv.as_verdict() == verify_greedy(draft, logits)
        assert list(tv.tokens) == draft[: len(tv.accepted)]
        assert tv.keep_rows == tuple(range(len(tv.accepted) + 1))


@pytest.mark.parametrize("deterministic", [False, True])
def test_sampling_on_chains_equals_verify_sampling(deterministic):
    g = torch.Generator().manual_seed(2)
    for seed in range(300):
        v, gamma = (
            int(torch.randint(2, 9, (), generator=g)),
            int(torch.randint(0, 6, (), generator=g)),
        )
        sharp = float(torch.rand((), generator=g)) * 4
        p = torch.softmax(torch.randn(gamma + 1, v, generator=g) * sharp, -1)
        if deterministic:
            q, draft = None, torch.randint(0, v, (gamma,), generator=g).tolist()
        else:
            q = torch.softmax(torch.randn(gamma, v, generator=g) * sharp, -1)
            draft = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(gamma)]
        tree = TokenTree.chain(draft, q, root=0)
        tv = verify_tree_sampling(tree, p, torch.Generator().manual_seed(seed))
        assert tv.as_verdict() == verify_sampling(draft, q, p, torch.Generator().manual_seed(seed))


# --- a tree forward through a real model ------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tree"), seed=0, num_hidden_layers=2)


def _other(t: int, v: int = 97) -> int:
    return (t + 1) % v


@torch.inference_mode()
def test_greedy_tree_forward_on_a_model(model):
    prompt = [3, 17, 42, 5, 9]
    g = greedy_decode(model, prompt, 7)
    cache = model.new_cache(64)
    assert int(extend(model, cache, prompt)[-1].argmax()) == g[0]
    committed_len, s = len(prompt) + 1, len(prompt)  # committed: prompt + [g0]; cache: prompt
    tree = TokenTree(g[0])  # the greedy path g1..g4 hides among wrong siblings and cousins
    w1 = tree.add(0, _other(g[1]))
    n1 = tree.add(0, g[1])
    tree.add(w1, g[2])
    tree.add(0, _other(_other(g[1])))
    n2 = tree.add(n1, g[2])
    tree.add(n1, _other(g[2]))
    tree.add(n2, _other(g[3]))
    n3 = tree.add(n2, g[3])
    n4 = tree.add(n3, g[4])
    tree.add(n4, _other(g[5]))
    r = rows(tree, committed_len)
    logits = model(r.ids, r.positions, attention_mask(tree, s), cache)[0]  # (T, V)
    tv = verify_tree_greedy(tree, logits)
    assert tv.accepted == (n1, n2, n3, n4) and list(tv.tokens) == g[1:5]
    assert tv.correction == g[5] and tv.keep_rows == (0, n1, n2, n3, n4)

    ref = model.new_cache(64)  # every node's logits = its root-to-node path fed causally
    extend(model, ref, prompt)
    for i in range(len(tree)):
        chain = extend(model, ref, [tree[j].token for j in tree.path(i)])
        torch.testing.assert_close(logits[i], chain[-1], atol=1e-5, rtol=0)
        ref.rollback(s)

    cache.keep(s, [s + k for k in tv.keep_rows])  # roll back the rejected rows
    assert cache.length == committed_len + len(tv.accepted)
    assert int(extend(model, cache, [tv.correction])[-1].argmax()) == g[6]


@torch.inference_mode()
def test_greedy_tree_stops_at_the_first_disagreement(model):
    prompt = [8, 1, 60]
    g = greedy_decode(model, prompt, 3)
    cache = model.new_cache(32)
    extend(model, cache, prompt)
    tree = TokenTree.from_paths([[_other(g[1])], [g[1], _other(g[2]), g[2]]], root=g[0])
    r = rows(tree, len(prompt) + 1)
    tv = verify_tree_greedy(tree, model(r.ids, r.positions, attention_mask(tree, 3), cache)[0])
    assert list(tv.tokens) == [g[1]] and tv.correction == g[2]


# --- sampling is lossless: χ² on the first two output tokens ------------------------------

V = 6
N = 4000


def _table(seed: int, shape) -> torch.Tensor:
    """Seeded random distributions over the last axis (Dirichlet(1) via exponentials)."""
    u = torch.rand(*shape, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = -torch.log1p(-u)  # exponential samples: u in [0, 1) keeps the log finite
    return x / x.sum(-1, keepdim=True)


P = [_table(10, ()), _table(11, (V,)), _table(12, (V, V))]  # target law after 0, 1, 2 tokens
Q = [_table(20, ()), _table(21, (V,))]  # draft law after 0, 1 tokens


def _law(table, path):
    return table[len(path)][tuple(path)]


def _draft_tree(mode: str, gen: torch.Generator) -> TokenTree:
    """Root (the last committed token, 0) with 3 children, each with 2 children, proposed as
    i.i.d. samples from the node's q, deterministic top-k of q, or the top-1 of q followed by
    i.i.d. samples."""
    tree = TokenTree(0)

    def grow(node: int, path: list[int], m: int) -> list[int]:
        q = _law(Q, path)
        kids = []
        if mode in ("deterministic", "mixed"):
            top = torch.topk(q, m if mode == "deterministic" else 1).indices.tolist()
            kids += [tree.add(node, t) for t in top]
        while len(kids) < m:
            kids.append(tree.add(node, int(torch.multinomial(q, 1, generator=gen)), q))
        return kids

    for c in grow(0, [], 3):
        grow(c, [tree[c].token], 2)
    return tree


def _target_rows(tree: TokenTree) -> torch.Tensor:
    return torch.stack(
        [_law(P, [tree[j].token for j in tree.path(i)[1:]]) for i in range(len(tree))]
    )


def _first_two(tree: TokenTree, out: list[int], gen: torch.Generator) -> tuple[int, int]:
    """Complete a one-token round with the target's own next draw (what the next round gives)."""
    if len(out) < 2:
        out = [out[0], int(torch.multinomial(_law(P, out[:1]), 1, generator=gen))]
    return out[0], out[1]


def _counts(rule, mode: str, seed: int, n: int = N) -> torch.Tensor:
    draft_gen, verify_gen = (
        torch.Generator().manual_seed(seed),
        torch.Generator().manual_seed(seed + 1),
    )
    counts = torch.zeros(V, V, dtype=torch.float64)
    for _ in range(n):
        tree = _draft_tree(mode, draft_gen)
        counts[_first_two(tree, rule(tree, _target_rows(tree), verify_gen), verify_gen)] += 1
    return counts


def _tree_rule(tree, p, gen) -> list[int]:
    tv = verify_tree_sampling(tree, p, gen)
    return [*tv.tokens, tv.correction]


def _first_child_rule(tree, p, gen) -> list[int]:  # wrong: always accept the first child
    node, out = 0, []
    while tree.children(node):
        node = tree.children(node)[0]
        out.append(tree[node].token)
    return out + [int(torch.multinomial(p[node], 1, generator=gen))]


def _no_residual_rule(tree, p, gen) -> list[int]:  # wrong: every sibling tested against p
    node, out = 0, []
    while True:
        for c in tree.children(node):
            d, q = tree[c].token, tree[c].q
            if (
                torch.rand((), generator=gen).item() * (1.0 if q is None else float(q[d]))
                < p[node, d]
            ):
                node = c
                out.append(d)
                break
        else:
            return out + [int(torch.multinomial(p[node], 1, generator=gen))]


JOINT = P[0][:, None] * P[1]  # exact law of the first two tokens


@pytest.mark.parametrize("mode", ["iid", "deterministic", "mixed"])
def test_tree_sampling_is_lossless(mode):
    counts = _counts(_tree_rule, mode, seed=3)
    assert chi2(counts, JOINT) < CHI2_99_9[35]
    assert chi2(counts.sum(1), P[0]) < CHI2_99_9[5]


@pytest.mark.parametrize("rule", [_first_child_rule, _no_residual_rule])
def test_the_statistic_rejects_wrong_rules(rule):
    # their statistics at N trials are in the thousands; a quarter of N still rejects them
    assert chi2(_counts(rule, "iid", seed=3, n=N // 4), JOINT) > CHI2_99_9[35]
