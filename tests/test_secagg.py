"""SecAgg+ protocol run in-process: exact sums, dropouts, quantization error, security checks."""

import random

import numpy as np
import pytest

from fedllm.secagg import primitives as sa
from fedllm.config import ConfigError, compose


def run_protocol(inputs, drop_after_shares=(), threshold="auto", num_shares="auto", bits=24,
                 R=1.0, quantized=None):
    """Every client follows the protocol; clients in drop_after_shares vanish before step 3.

    ``quantized``: client -> integer vector it masks instead of quantizing its input (a client
    that does not follow the protocol)."""
    quantized = quantized or {}
    ids = sorted(inputs)
    shares = sa.share_count(len(ids), num_shares)
    threshold = sa.majority_threshold(shares, threshold)
    graph = sa.neighbours(ids, shares)
    dtype = sa.modulus_dtype(bits, len(ids))
    secrets_ = {u: sa.ClientSecrets.generate() for u in ids}
    own, inbox = {}, {u: {} for u in ids}
    for u in ids:
        enc, own[u] = sa.make_shares(u, secrets_[u], {v: secrets_[v].c_pk for v in graph[u]},
                                     ids, threshold, "run", 1)
        for v, blob in enc.items():
            inbox[v][u] = blob
    held = {u: {u: own[u]} for u in ids}  # holder -> sender -> plaintext share
    for v in ids:
        for u, blob in inbox[v].items():
            held[v][u] = sa.open_share(v, secrets_[v], u, secrets_[u].c_pk, blob, "run", 1)
    rng = np.random.default_rng(0)
    masked = {}
    for u in ids:
        if u in drop_after_shares:
            continue
        q = quantized[u].astype(dtype) if u in quantized else sa.quantize(inputs[u], R, bits,
                                                                          dtype, rng)
        masked[u] = sa.masked_input(u, secrets_[u], q, {v: secrets_[v].s_pk for v in graph[u]},
                                    "run", 1)
    survivors, dropped = set(masked), set(ids) - set(masked)
    b_shares, s_shares = {}, {}
    for holder in survivors:
        x = sa.share_point(holder, ids)
        for sender, blob in held[holder].items():
            b, s = blob[:66], blob[66:]
            if sender in survivors:
                b_shares.setdefault(sender, {})[x] = b
            else:
                s_shares.setdefault(sender, {})[x] = s
    total = sa.unmask_sum(masked, graph, {u: secrets_[u].s_pk for u in ids}, b_shares, s_shares,
                          threshold, "run", 1)
    sa.check_sum_range(total, len(survivors), bits)  # what the server does before applying it
    return sa.dequantize_sum(total, len(survivors), R, bits), survivors


def make_inputs(n, d=1000, seed=1):
    rng = np.random.default_rng(seed)
    return {10 + 7 * i: rng.uniform(-0.5, 0.5, d) for i in range(n)}


@pytest.mark.parametrize("n,num_shares", [(3, 3), (6, 3), (10, 5)])
def test_sum_equals_plain_sum_within_quantization_error(n, num_shares):
    inputs = make_inputs(n)
    result, survivors = run_protocol(inputs, num_shares=num_shares)
    expected = sum(inputs.values())
    step = 2 * 1.0 / (2**24 - 1)
    assert np.max(np.abs(result - expected)) <= n * step


def test_dropouts_after_sharing_still_give_the_survivors_sum():
    inputs = make_inputs(6)
    ids = sorted(inputs)
    result, survivors = run_protocol(inputs, drop_after_shares={ids[1], ids[4]})
    assert survivors == set(ids) - {ids[1], ids[4]}
    expected = sum(inputs[u] for u in survivors)
    assert np.max(np.abs(result - expected)) <= 6 * 2 / (2**24 - 1)


def test_too_many_dropouts_cannot_be_unmasked():
    inputs = make_inputs(3)
    ids = sorted(inputs)
    with pytest.raises(sa.SecAggError, match="threshold"):
        run_protocol(inputs, drop_after_shares={ids[0], ids[1]}, threshold=2)


def test_masked_input_hides_the_input():
    inputs = make_inputs(3, d=5000)
    ids = sorted(inputs)
    secrets_ = {u: sa.ClientSecrets.generate() for u in ids}
    dtype = sa.modulus_dtype(24, 3)
    q = sa.quantize(inputs[ids[0]], 1.0, 24, dtype, np.random.default_rng(0))
    y = sa.masked_input(ids[0], secrets_[ids[0]], q, {v: secrets_[v].s_pk for v in ids[1:]},
                        "run", 1)
    # Masked values are spread over the whole modulus, unlike the 24-bit quantized input.
    assert y.max() > 2**28 and np.corrcoef(q.astype(float), y.astype(float))[0, 1] < 0.05


def test_shamir_threshold():
    secret = bytes(range(32))
    shares = sa.shamir_split(secret, [1, 2, 3, 4], 3)
    assert sa.shamir_combine({x: shares[x] for x in (1, 3, 4)}) == secret
    try:  # below the threshold: garbage (usually out of range, so an error)
        assert sa.shamir_combine({x: shares[x] for x in (1, 2)}) != secret
    except sa.SecAggError:
        pass


def test_tampered_share_fails_authentication():
    a, b = sa.ClientSecrets.generate(), sa.ClientSecrets.generate()
    enc, _ = sa.make_shares(1, a, {2: b.c_pk}, [1, 2], 2, "run", 1)
    blob = bytearray(enc[2])
    blob[-1] ^= 1
    with pytest.raises(Exception):
        sa.open_share(2, b, 1, a.c_pk, bytes(blob), "run", 1)


def test_quantization_is_unbiased():
    x = np.full(200_000, 0.123456789)
    q = sa.quantize(x, 1.0, 8, np.dtype(np.uint32), np.random.default_rng(0))
    assert sa.dequantize_sum(q, 1, 1.0, 8).mean() == pytest.approx(0.123456789, abs=1e-3)


def test_neighbour_graph_is_symmetric():
    g = sa.neighbours(list(range(20)), 5)
    assert all(u in g[v] for u in g for v in g[u])
    assert all(len(vs) == 4 for vs in g.values())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_refuses_non_finite_updates(bad):
    x = np.zeros(100)
    x[17] = bad
    with pytest.raises(sa.SecAggError, match="non-finite"):
        sa.quantize(x, 1.0, 16, np.dtype(np.uint32), np.random.default_rng(0))


def test_an_out_of_range_input_is_caught_in_the_unmasked_sum():
    """A client that skips quantization (as a NaN update did before the fix) puts
    values above 2^bits - 1 in the sum; the server's range check refuses the sum."""
    inputs = make_inputs(4)
    ids = sorted(inputs)
    hostile = np.full(1000, 2**31)  # a NaN cast to uint32 can give this (platform-dependent)
    with pytest.raises(sa.SecAggError, match="exceed"):
        run_protocol(inputs, bits=16, quantized={ids[2]: hostile})


def test_in_range_hostile_inputs_pass_the_range_check():
    """The check bounds the sum, not each input: a client at the top level is not detected
    (the README says so)."""
    inputs = make_inputs(4)
    ids = sorted(inputs)
    top = np.full(1000, 2**16 - 1)
    result, _ = run_protocol(inputs, bits=16, quantized={ids[2]: top})
    expected = sum(inputs[u] for u in ids if u != ids[2]) + 1.0
    assert np.max(np.abs(result - expected)) <= 4 * 2 / (2**16 - 1)


def test_sum_range_check_boundary():
    assert sa.check_sum_range(np.array([3 * 255], dtype=np.uint32), 3, 8) is None
    with pytest.raises(sa.SecAggError):
        sa.check_sum_range(np.array([0, 3 * 255 + 1], dtype=np.uint32), 3, 8)


# ----------------------------------------------------------------------------- graph (issue 17)

@pytest.mark.parametrize("cohort,shares", [(2, 2), (20, 20), (21, 15), (100, 21), (1000, 31)])
def test_auto_shares_complete_up_to_20_then_logarithmic(cohort, shares):
    assert sa.share_count(cohort, "auto") == shares


@pytest.mark.parametrize("cohort,num_shares", [(4, 7), (40, 7), (40, 8), (8, 8), (9, 4)])
def test_share_count_is_what_the_graph_has(cohort, num_shares):
    shares = sa.share_count(cohort, num_shares)
    graph = sa.neighbours(list(range(cohort)), shares)
    assert all(len(vs) + 1 == shares for vs in graph.values())
    assert shares == min(cohort, num_shares) or shares == num_shares - 1 < cohort


@pytest.mark.parametrize("shares,t", [(2, 2), (3, 2), (4, 3), (15, 8), (21, 11)])
def test_auto_threshold_is_the_smallest_strict_majority(shares, t):
    assert sa.majority_threshold(shares, "auto") == t


def test_a_threshold_at_half_the_shares_is_refused():
    with pytest.raises(sa.SecAggError, match="above half"):
        sa.majority_threshold(6, 3)
    assert sa.majority_threshold(6, 4) == 4 and sa.majority_threshold(3, 5) == 3


def test_large_cohort_graph_has_log_degree_and_survives_fewer_than_degree_dropouts():
    ids = list(range(100, 200))
    shares = sa.share_count(len(ids), "auto")
    g = sa.neighbours(ids, shares, rng=random.Random(3))
    degree = shares - 1
    assert all(len(vs) == degree for vs in g.values()) and all(u in g[v] for u in g for v in g[u])
    rng = random.Random(4)
    for _ in range(50):  # a Harary graph of degree k stays connected after k - 1 removals
        dropped = set(rng.sample(ids, degree - 1))
        assert len(sa.components(g, set(ids) - dropped)) == 1


def test_graph_order_comes_from_os_entropy():
    ids = list(range(50))  # two graphs over 50! orders: equal with negligible probability
    assert sa.neighbours(ids, 5) != sa.neighbours(ids, 5)


def test_graph_travels_as_an_edge_list():
    g = sa.neighbours(list(range(30)), 7)
    assert sa.graph_from_edges(sa.graph_edges(g), list(g)) == g
    with pytest.raises(sa.SecAggError, match="participants"):
        sa.graph_from_edges([0, 99], [0, 1])


def test_unmasking_a_split_survivor_set_is_refused():
    ring = sa.neighbours(list(range(6)), 3, rng=random.Random(0))
    d1 = 0
    d2 = next(v for v in range(1, 6) if v not in ring[d1]
              and len(sa.components(ring, set(range(6)) - {d1, v})) == 2)
    with pytest.raises(sa.SecAggError, match="not connected"):
        sa.check_connected(ring, set(range(6)) - {d1, d2})
    with pytest.raises(sa.SecAggError, match="not connected"):  # unmask_sum checks it too
        sa.unmask_sum({u: np.zeros(10, np.uint32) for u in set(range(6)) - {d1, d2}}, ring, {},
                      {}, {}, 2, "run", 1)


@pytest.mark.parametrize("senders,match", [([], "fewer than"), ([2], "fewer than"),
                                           ([2, 9], "not my share-stage")])
def test_mask_sender_lists_are_checked(senders, match):
    with pytest.raises(sa.SecAggError, match=match):
        sa.check_mask_senders(senders, [2, 3, 4], threshold=3)
    sa.check_mask_senders([2, 3], [2, 3, 4], threshold=3)


@pytest.mark.parametrize("overrides,ok", [
    ([], True),
    (["secagg.num_shares=5", "secagg.reconstruction_threshold=3"], True),
    (["secagg.num_shares=2"], False),
    (["secagg.num_shares=many"], False),
    (["secagg.num_shares=6", "secagg.reconstruction_threshold=3"], False),
    (["secagg.num_shares=5", "secagg.reconstruction_threshold=6"], False),
    (["secagg.reconstruction_threshold=4"], False),  # an integer t needs an integer num_shares
])
def test_secagg_graph_config_is_validated_in_one_line(overrides, ok):
    if ok:
        cfg = compose(overrides)
        assert cfg.secagg.num_shares in ("auto", 5)
        return
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert str(info.value).startswith("secagg.") and "\n" not in str(info.value).strip()


def test_reported_dropout_tolerance_includes_the_secagg_threshold():
    """10 clients on the complete graph need t = 6 of 10 shares: 4 dropouts, not the 7 that
    min_clients=3 alone would allow."""
    from fedllm.config import compose
    from fedllm.report import tolerated_dropouts

    cfg = compose(["model=tiny", "privacy.user.enabled=true", "privacy.user.noise_multiplier=1",
                   "secagg=secaggplus", "federation.clients_per_round=10",
                   "federation.min_clients=3"])
    assert tolerated_dropouts(cfg) == 4
    cfg.secagg.enabled = False
    assert tolerated_dropouts(cfg) == 7
