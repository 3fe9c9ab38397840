"""select_batch (vectorised numpy) against the plain per-prompt `select`, prompt by prompt, every method."""

import numpy as np
import pytest

from ampo.selection import SELECTORS, count_skipped, select, select_batch
from ampo.selection.baselines import ALL_EQUAL

OPTIONS = {  # every method with its defaults, plus the non-default options
    "bottomk": [{}],
    "coreset": [{}, {"cluster_on": "all", "n_init": 3}],
    "optselect": [{}, {"points": "candidates", "weight_temperature": 0.5}],
    "random": [{}],
    "extremes": [{}],
    "mean_split": [{}],
    "top_bottom": [{}, {"m": 3}],
}
CASES = [(method, options) for method in SELECTORS for options in OPTIONS[method]]


def pools(n_prompts, sizes, d=5, seed=0, ties=False):
    """Per-prompt rewards (N_i,) and embeddings (N_i, d): clustered points. ties=True rounds rewards to 1
    decimal (many tied rewards) and duplicates a response (identical embedding and reward)."""
    rng = np.random.default_rng(seed)
    rewards, embeddings = [], []
    for p in range(n_prompts):
        n = int(sizes[p % len(sizes)])
        centres = 3 * rng.standard_normal((3, d))
        emb = centres[rng.integers(0, 3, n)] + rng.standard_normal((n, d))
        r = rng.standard_normal(n)
        if ties:
            r = np.round(r, 1)
            dup = rng.integers(0, n, 2)
            emb[dup[1]], r[dup[1]] = emb[dup[0]], r[dup[0]]
        rewards.append(r)
        embeddings.append(emb.astype(np.float32))
    return rewards, embeddings


def padded(rewards, embeddings, fill=np.nan):
    """(B, Nmax) and (B, Nmax, d) arrays, padding filled with `fill`, plus lengths (B,)."""
    lengths = np.array([len(r) for r in rewards])
    r = np.full((len(rewards), lengths.max()), fill)
    e = np.full((len(rewards), lengths.max(), embeddings[0].shape[1]), fill, dtype=np.float32)
    for p, (rp, ep) in enumerate(zip(rewards, embeddings)):
        r[p, : len(rp)], e[p, : len(rp)] = rp, ep
    return r, e, lengths


def per_prompt(method, rewards, embeddings, k, seeds, **options):
    return [select(method, r, e, k, seed=int(s), **options) for r, e, s in zip(rewards, embeddings, seeds)]


@pytest.mark.parametrize("method, options", CASES)
def test_equal_sizes(method, options):
    rewards, embeddings = pools(60, sizes=[9])
    seeds = np.arange(100, 160)
    batched = select_batch(method, np.stack(rewards), np.stack(embeddings), 3, seed=seeds, **options)
    assert batched == per_prompt(method, rewards, embeddings, 3, seeds, **options)


@pytest.mark.parametrize("method, options", CASES)
def test_varying_sizes_lists_and_padded(method, options):
    rewards, embeddings = pools(45, sizes=[6, 11, 8, 14], seed=1)
    seeds = np.arange(45) * 7
    expected = per_prompt(method, rewards, embeddings, 3, seeds, **options)
    assert select_batch(method, rewards, embeddings, 3, seed=seeds, **options) == expected
    r, e, lengths = padded(rewards, embeddings)  # NaN padding must be ignored
    assert select_batch(method, r, e, 3, seed=seeds, lengths=lengths, **options) == expected


@pytest.mark.parametrize("method, options", CASES)
def test_tied_rewards_and_duplicate_responses(method, options):
    rewards, embeddings = pools(40, sizes=[7, 10], seed=2, ties=True)
    seeds = np.arange(40)
    expected = per_prompt(method, rewards, embeddings, 3, seeds, **options)
    assert select_batch(method, rewards, embeddings, 3, seed=seeds, **options) == expected


def degenerate_pools(count=40, seed=10):
    """Pools with few distinct points: all identical, two distinct points, all but one identical, or a coarse
    integer lattice (exact distance ties); rewards rounded to integers (many ties)."""
    rng = np.random.default_rng(seed)
    pools = []
    for p in range(count):
        n = int(rng.integers(4, 12))
        emb = [
            np.ones((n, 3)),
            np.repeat(rng.standard_normal((2, 3)), [n // 2, n - n // 2], axis=0),
            np.vstack([np.repeat(rng.standard_normal((1, 3)), n - 1, axis=0), rng.standard_normal((1, 3))]),
            np.round(rng.standard_normal((n, 2))),
        ][p % 4]
        pools.append((np.round(rng.standard_normal(n)), emb, int(rng.integers(1, n))))
    return pools


@pytest.mark.parametrize("method, options", [c for c in CASES if c[0] in ("coreset", "optselect")])
def test_degenerate_pools(method, options):
    # fewer distinct points than clusters: k-means++ runs out of distinct points, clusters empty out, and
    # Lloyd's distances tie exactly; both paths must break those ties the same way
    for r, e, k in degenerate_pools():
        expected = select(method, r, e, k, seed=3, **options)
        assert select_batch(method, [r], [e], k, seed=3, **options) == [expected]


def test_one_seed_for_every_prompt():
    rewards, embeddings = pools(12, sizes=[8], seed=3)
    for method in ("random", "coreset"):
        batched = select_batch(method, rewards, embeddings, 3, seed=11)
        assert batched == per_prompt(method, rewards, embeddings, 3, [11] * 12)


@pytest.mark.parametrize("chunk, floats", [(7, 4_000_000), (512, 1_000)])
def test_many_prompts_through_several_steps(monkeypatch, chunk, floats):
    import ampo.selection.batched as batched_module

    # CHUNK=7: 30 prompts of one size -> chunks of 7, 7, 7, 7, 2; FLOATS_PER_STEP=1000: one prompt per step
    monkeypatch.setattr(batched_module, "CHUNK", chunk)
    monkeypatch.setattr(batched_module, "FLOATS_PER_STEP", floats)
    rewards, embeddings = pools(30, sizes=[9], seed=4)
    for method in ("optselect", "coreset", "bottomk"):
        assert select_batch(method, rewards, embeddings, 4, seed=5) == per_prompt(
            method, rewards, embeddings, 4, [5] * 30
        )


def test_coreset_fallback_when_the_positive_is_alone():
    # cluster_on="all", the positive far from everything: its cluster gives no negative, the fallback fills in
    rewards, embeddings = pools(20, sizes=[8], seed=9)
    for r, e in zip(rewards, embeddings):
        e[np.argmax(r)] = 100.0
    expected = per_prompt("coreset", rewards, embeddings, 3, range(20), cluster_on="all")
    assert all(s.clusters.count(s.clusters[s.chosen[0]]) == 1 for s in expected)  # the positive alone
    assert select_batch("coreset", rewards, embeddings, 3, seed=np.arange(20), cluster_on="all") == expected


def test_exact_solver_loops_over_prompts():
    rewards, embeddings = pools(4, sizes=[7, 9], seed=5)
    batched = select_batch("optselect", rewards, embeddings, 2, solver="exact")
    assert batched == per_prompt("optselect", rewards, embeddings, 2, [0] * 4, solver="exact")


def test_mean_split_skips_are_counted():
    rewards, embeddings = pools(10, sizes=[5, 6], seed=6)
    for p in (2, 5, 7):
        rewards[p] = np.full(len(rewards[p]), 0.1)  # all equal: no response above the mean
    out = select_batch("mean_split", rewards, embeddings, 1)
    assert count_skipped(out) == 3
    assert [p for p, s in enumerate(out) if s.skipped] == [2, 5, 7]
    assert out[2].skipped_reason == ALL_EQUAL and out[2].chosen == [] and out[2].rejected == []


def test_empty_batch():
    assert select_batch("bottomk", [], [], 2) == []


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r, e: select_batch("foo", r, e, 2), r"unknown selector 'foo'; choose from \['bottomk'"),
        (lambda r, e: select_batch("optselect", r, e, 2, solver="foo"), r"solver='foo' is not allowed"),
        (lambda r, e: select_batch("bottomk", r, e, 0), r"k=0 must be >= 1"),
        (lambda r, e: select_batch("bottomk", r, e, 6), r"prompt 0: N=6"),
        (lambda r, e: select_batch("bottomk", r, e[:2], 2), r"embeddings must be a list of 3 arrays"),
        (
            lambda r, e: select_batch("bottomk", r, [e[0], e[1], e[2][:4]], 2),
            r"prompt 2: rewards \(N,\) and ",
        ),
        (lambda r, e: select_batch("random", r, e, 2, seed=[1, 2]), r"seed must be an int or 3 ints"),
        (
            lambda r, e: select_batch("bottomk", r, e, 2, lengths=[6, 6, 6]),
            r"lengths is only for padded arrays",
        ),
    ],
)
def test_bad_batches(call, message):
    rewards, embeddings = pools(3, sizes=[6], seed=7)
    with pytest.raises(ValueError, match=message):
        call(rewards, embeddings)


def test_bad_values_name_the_prompt():
    rewards, embeddings = pools(4, sizes=[6], seed=8)
    rewards[2][3] = np.nan
    with pytest.raises(ValueError, match=r"prompt 2: rewards must be finite; rewards\[3\]=nan"):
        select_batch("bottomk", rewards, embeddings, 2)
    rewards[2][3] = 0.0
    embeddings[3][1, 0] = np.inf
    for method in ("optselect", "bottomk"):
        with pytest.raises(ValueError, match=r"prompt 3: embeddings must be finite; embeddings\[1, 0\]=inf"):
            select_batch(method, rewards, embeddings, 2)
    embeddings[3][1, 0] = 0.0
    r, e, _ = padded(rewards, embeddings)  # NaN padding: never an error
    with pytest.raises(ValueError, match=r"lengths must be 4 ints in \[0, 6\]"):
        select_batch("bottomk", r, e, 2, lengths=[6, 6, 7, 6])
    with pytest.raises(ValueError, match=r"prompt 1: a pool needs at least 2 responses; got N=1"):
        select_batch("bottomk", r, e, 1, lengths=[6, 1, 6, 6])
    with pytest.raises(
        ValueError, match=r"padded input needs rewards \(B, Nmax\) and embeddings \(B, Nmax, d\)"
    ):
        select_batch("bottomk", r, e[:, :5], 2)


def test_fast_finiteness_screen_never_passes_a_bad_value():
    from ampo.selection.batched import all_finite_fast

    rng = np.random.default_rng(9)
    e = rng.standard_normal((5, 6, 4)).astype(np.float32)
    assert all_finite_fast(e) and all_finite_fast(np.arange(6).reshape(2, 3))
    for bad in (np.nan, np.inf, -np.inf):
        spoiled = e.copy()
        spoiled[4, 5, 3] = bad  # the very last entry: the screen reads everything
        assert not all_finite_fast(spoiled)
    both = e.copy()
    both[0, 0, 0], both[1, 0, 0] = np.inf, -np.inf  # inf + (-inf) = nan: still caught
    assert not all_finite_fast(both)
    # finite values whose sum overflows float32 (2 * 3e38 > 3.4e38): a false alarm, which the exact scan clears
    huge = np.full((2, 6, 4), 3e38, np.float32)
    assert not all_finite_fast(huge) and np.isfinite(huge).all()
    out = select_batch("bottomk", np.arange(12.0).reshape(2, 6), huge, 2)
    assert [s.rejected for s in out] == [[0, 1], [0, 1]]  # rewards 0..5 per pool: best 5, two lowest 0, 1
    # a non-contiguous view is left to the exact scan rather than copied
    assert not all_finite_fast(e[:, ::2])
    r = np.arange(30.0).reshape(5, 6)
    spoiled = e.copy()
    spoiled[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"prompt 2: embeddings must be finite; embeddings\[1, 0\]=nan"):
        select_batch("bottomk", r, spoiled, 2)
    spoiled_padding = e.copy()
    spoiled_padding[2, 5, :] = np.nan  # padding of a pool of 5: ignored
    assert len(select_batch("bottomk", r, spoiled_padding, 2, lengths=[6, 6, 5, 6, 6])) == 5
