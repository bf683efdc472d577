"""SecAgg+ primitives (Bonawitz et al. CCS 2017; Bell et al. CCS 2020), pure numpy + cryptography.

What the server learns is the sum of the survivors' quantized updates, nothing else, as long
as it follows the protocol (honest but curious) and fewer than ``threshold`` of a client's
neighbours collude with it. There is no consistency round: a malicious server that tells
clients different survivor sets is out of scope (clients refuse the deviations they can see).

Per round, over a neighbour graph of the sampled clients (complete up to COMPLETE_GRAPH_MAX
clients, else a Harary graph of degree O(log n) over a random order; threshold a strict
majority of each secret's shares):
  1. each client makes two X25519 key pairs: ``c`` (to encrypt shares) and ``s`` (masks);
  2. it Shamir-shares its self-mask seed ``b`` and its mask private key ``s_sk`` among its
     neighbours and itself (threshold t), each share AES-GCM-encrypted for its holder;
  3. it sends y = Q(x) + PRG(b) + sum_v sign(u, v) PRG(KDF(DH(s_u, s_v))) mod 2^k, over at
     least t - 1 of its neighbours;
  4. if the survivors are connected in the graph (else no partial sum may be unmasked), for
     every survivor the server collects shares of ``b``, for every dropped client shares of
     ``s_sk`` (never both for the same client), removes the self masks and the dropped
     clients' dangling pairwise masks, and dequantizes the sum.
Quantization is stochastic rounding to ``2^bits`` levels on [-R, R] (unbiased); sums wrap
mod 2^32 or 2^64 (the smallest that holds the sum of the cohort).
"""

from __future__ import annotations

import math
import os
import random
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # Mersenne prime > 2^256: Shamir field for 32-byte secrets
SECRET_BYTES = 32


class SecAggError(RuntimeError):
    """The protocol cannot proceed (too few shares, inconsistent request...)."""


# ----------------------------------------------------------------------------- keys

def keypair() -> tuple[bytes, bytes]:
    sk = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return (sk.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            sk.public_key().public_bytes(raw, serialization.PublicFormat.Raw))


def agree(private: bytes, peer_public: bytes, label: bytes) -> bytes:
    """32-byte key from X25519 agreement, bound to ``label`` (purpose, run, round)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


# ----------------------------------------------------------------------------- Shamir

def shamir_split(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, > 0); any ``threshold`` recover it."""
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} must be in [1, {len(xs)}]")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                                for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(66, "big")
    return shares


def shamir_combine(shares: dict[int, bytes]) -> bytes:
    """Lagrange interpolation at 0."""
    points = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("share reconstruction failed (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


# ----------------------------------------------------------------------------- masks

def modulus_dtype(bits: int, cohort: int) -> np.dtype:
    """uint32 when the cohort's sum of 2^bits levels fits in 32 bits, else uint64."""
    need = bits + math.ceil(math.log2(cohort + 1))
    if need <= 32:
        return np.dtype(np.uint32)
    if need <= 64:
        return np.dtype(np.uint64)
    raise SecAggError(f"{bits} quantization bits x {cohort} clients overflow 64 bits")


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """AES-256-CTR keystream as ``length`` unsigned integers (cryptographically secure)."""
    nbytes = length * np.dtype(dtype).itemsize
    stream = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor().update(
        b"\0" * nbytes)
    return np.frombuffer(stream, dtype=dtype)


COMPLETE_GRAPH_MAX = 20  # cohorts up to this size use the complete graph


def share_count(cohort: int, num_shares: int | str) -> int:
    """Shares per secret (neighbours + self) in a cohort of ``cohort`` clients, as the graph
    of ``neighbours`` will have them.

    ``auto``: the whole cohort (complete graph) up to COMPLETE_GRAPH_MAX clients, else
    2·ceil(1.5·log2 n) + 1, a degree O(log n) as in SecAgg+ (Bell et al. 2020). An integer is
    capped at the cohort; below it, an even one is rounded down (Harary degrees are even)."""
    if num_shares == "auto":
        if cohort <= COMPLETE_GRAPH_MAX:
            return cohort
        wanted = 2 * math.ceil(1.5 * math.log2(cohort)) + 1
    else:
        wanted = int(num_shares)
    return cohort if wanted >= cohort else wanted - (1 - wanted % 2)


def majority_threshold(shares: int, configured: int | str) -> int:
    """Reconstruction threshold t for ``shares`` holders: ``auto`` is the smallest strict
    majority; an integer is capped at ``shares``. t must exceed shares/2, so that holders that
    each reveal one of (b, s_sk) per sender cannot give the server t shares of both."""
    t = shares // 2 + 1 if configured == "auto" else min(int(configured), shares)
    if 2 * t <= shares:
        raise SecAggError(f"reconstruction threshold {t} is not above half of {shares} shares")
    return t


def neighbours(node_ids: list[int], num_shares: int,
               rng: random.Random | None = None) -> dict[int, list[int]]:
    """Symmetric neighbour graph where each secret has ``num_shares`` holders (neighbours +
    self): complete if that covers the cohort, else a Harary graph (ring lattice of even
    degree, (degree)-vertex-connected) over a random order of the nodes (OS entropy)."""
    ids = sorted(node_ids)
    n = len(ids)
    if num_shares >= n:
        return {u: [v for v in ids if v != u] for u in ids}
    order = list(ids)
    (rng or secrets.SystemRandom()).shuffle(order)
    half = max(1, (num_shares - 1) // 2)
    graph = {u: set() for u in ids}
    for i, u in enumerate(order):
        for d in range(1, half + 1):
            v = order[(i + d) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: sorted(vs) for u, vs in graph.items()}


def graph_edges(graph: dict[int, list[int]]) -> list[int]:
    """The graph as a flat list u0, v0, u1, v1, ... (u < v), for a ConfigRecord."""
    return [x for u in sorted(graph) for v in graph[u] if u < v for x in (u, v)]


def graph_from_edges(flat: list[int], nodes: list[int]) -> dict[int, list[int]]:
    graph: dict[int, set] = {int(u): set() for u in nodes}
    for u, v in zip(flat[::2], flat[1::2]):
        if u not in graph or v not in graph or u == v:
            raise SecAggError(f"graph edge ({u}, {v}) is not between two participants")
        graph[u].add(v)
        graph[v].add(u)
    return {u: sorted(vs) for u, vs in graph.items()}


def components(graph: dict[int, list[int]], nodes) -> list[list[int]]:
    """Connected components of the subgraph induced on ``nodes``."""
    left, parts = set(nodes), []
    while left:
        stack = [left.pop()]
        part = set(stack)
        while stack:
            for v in graph.get(stack.pop(), ()):
                if v in left:
                    left.discard(v)
                    part.add(v)
                    stack.append(v)
        parts.append(sorted(part))
    return parts


def check_connected(graph: dict[int, list[int]], survivors) -> None:
    """Refuse to unmask survivors that are not connected in the neighbour graph: no pairwise
    mask links the parts, so each part's sum could be unmasked on its own (and would carry
    only its share of distributed noise)."""
    parts = components(graph, survivors)
    if len(parts) > 1:
        sizes = sorted(len(p) for p in parts)
        raise SecAggError(f"survivors' neighbour graph is not connected ({len(parts)} parts of "
                          f"sizes {sizes}): each part's partial sum could be unmasked; refusing")


def check_mask_senders(senders: list[int], share_peers: list[int], threshold: int) -> None:
    """A client masks only with senders that were its share-stage neighbours, and with at
    least t - 1 of them: fewer would let the server remove all its pairwise masks."""
    strangers = sorted(set(senders) - set(share_peers))
    if strangers:
        raise SecAggError(f"server lists masking sender(s) {strangers[:5]} that are not my "
                          "share-stage neighbours: refusing")
    if len(set(senders)) < threshold - 1:
        raise SecAggError(f"server lists {len(set(senders))} masking sender(s), fewer than "
                          f"threshold - 1 = {threshold - 1}: refusing")


def quantize(x: np.ndarray, clip_range: float, bits: int, dtype: np.dtype,
             rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of x (clipped to [-R, R]) to integers in [0, 2^bits - 1].

    Non-finite values are refused: ``np.clip`` passes NaN through and the integer cast of
    NaN lands far outside the 2^bits levels, which would corrupt the whole masked sum.
    """
    bad = np.size(x) - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise SecAggError(f"update has {bad} non-finite value(s) (NaN/inf): refusing to "
                          "quantize it for secure aggregation")
    levels = 2**bits - 1
    scaled = (np.clip(x.astype(np.float64), -clip_range, clip_range) + clip_range) \
        * (levels / (2 * clip_range))
    floor = np.floor(scaled)
    q = floor + (rng.random(x.shape) < (scaled - floor))
    return q.astype(dtype)


def dequantize_sum(total: np.ndarray, count: int, clip_range: float, bits: int) -> np.ndarray:
    levels = 2**bits - 1
    return total.astype(np.float64) * (2 * clip_range / levels) - count * clip_range


def check_sum_range(total: np.ndarray, count: int, bits: int) -> None:
    """Every coordinate of an unmasked sum of ``count`` inputs quantized to ``bits`` bits is at
    most count * (2^bits - 1); a larger one means some client did not follow the protocol
    (or the masks did not cancel), and the whole sum must be discarded.

    This bounds each coordinate of the *sum*, not each client's input: since sums wrap mod
    2^k, a deviating client that keeps the sum in range (adding, or subtracting by wrapping)
    is not detected."""
    limit = count * (2**bits - 1)
    over = int(np.count_nonzero(total > limit))
    if over:
        raise SecAggError(f"{over} coordinate(s) of the unmasked sum exceed {count} x "
                          f"(2^{bits} - 1) = {limit}: an input was outside the quantization "
                          "range")


def pair_label(run_id: str, round_: int) -> bytes:
    return f"fedllm-secagg-mask|{run_id}|{round_}".encode()


def share_label(run_id: str, round_: int, sender: int, receiver: int) -> bytes:
    return f"fedllm-secagg-share|{run_id}|{round_}|{sender}|{receiver}".encode()


def pairwise_mask(node: int, peer: int, seed: bytes, length: int, dtype) -> np.ndarray:
    """+PRG for the lower id, -PRG for the higher: each pair's masks cancel in the sum."""
    mask = prg(seed, length, dtype)
    return mask if node < peer else (np.zeros(1, dtype) - mask)


@dataclass
class ClientSecrets:
    c_sk: bytes
    c_pk: bytes
    s_sk: bytes
    s_pk: bytes
    b: bytes

    @classmethod
    def generate(cls) -> "ClientSecrets":
        c_sk, c_pk = keypair()
        s_sk, s_pk = keypair()
        return cls(c_sk=c_sk, c_pk=c_pk, s_sk=s_sk, s_pk=s_pk, b=os.urandom(SECRET_BYTES))


def share_point(node: int, participants: list[int]) -> int:
    """Every participant's Shamir x coordinate: its 1-based rank among the cohort."""
    return sorted(participants).index(node) + 1


def make_shares(me: int, mine: ClientSecrets, peers_c_pk: dict[int, bytes],
                participants: list[int], threshold: int, run_id: str, round_: int
                ) -> tuple[dict[int, bytes], bytes]:
    """Encrypted shares of (b, s_sk) for each neighbour, and my own share (plaintext)."""
    holders = sorted(list(peers_c_pk) + [me])
    xs = [share_point(v, participants) for v in holders]
    b_shares = shamir_split(mine.b, xs, threshold)
    s_shares = shamir_split(mine.s_sk, xs, threshold)
    out = {}
    for v, x in zip(holders, xs):
        blob = b_shares[x] + s_shares[x]
        if v == me:
            own = blob
            continue
        key = agree(mine.c_sk, peers_c_pk[v], b"fedllm-secagg-enc")
        out[v] = encrypt(key, blob, share_label(run_id, round_, me, v))
    return out, own


def open_share(me: int, mine: ClientSecrets, sender: int, sender_c_pk: bytes, blob: bytes,
               run_id: str, round_: int) -> bytes:
    key = agree(mine.c_sk, sender_c_pk, b"fedllm-secagg-enc")
    return decrypt(key, blob, share_label(run_id, round_, sender, me))


def masked_input(me: int, mine: ClientSecrets, x_quantized: np.ndarray,
                 peers_s_pk: dict[int, bytes], run_id: str, round_: int) -> np.ndarray:
    dtype = x_quantized.dtype
    y = x_quantized + prg(mine.b, len(x_quantized), dtype)
    for v, pk in peers_s_pk.items():
        seed = agree(mine.s_sk, pk, pair_label(run_id, round_))
        y = y + pairwise_mask(me, v, seed, len(x_quantized), dtype)
    return y


def unmask_sum(masked: dict[int, np.ndarray], graph: dict[int, list[int]],
               s_pk: dict[int, bytes], b_shares: dict[int, dict[int, bytes]],
               s_sk_shares: dict[int, dict[int, bytes]], threshold: int, run_id: str,
               round_: int) -> np.ndarray:
    """Sum of the survivors' quantized inputs from their masked inputs and revealed shares.

    ``masked``: survivor -> y. ``b_shares[v]``: x -> share of b_v (v a survivor).
    ``s_sk_shares[d]``: x -> share of s_sk of dropped client d.
    """
    survivors = sorted(masked)
    if not survivors:
        raise SecAggError("no masked inputs")
    check_connected(graph, survivors)
    dtype = masked[survivors[0]].dtype
    length = len(masked[survivors[0]])
    total = np.zeros(length, dtype=dtype)
    for v in survivors:
        total = total + masked[v]
    for v in survivors:
        shares = b_shares.get(v, {})
        if len(shares) < threshold:
            raise SecAggError(f"only {len(shares)} shares of client {v}'s self mask "
                              f"(< threshold {threshold})")
        total = total - prg(shamir_combine(dict(list(shares.items())[:threshold])), length, dtype)
    for d, shares in s_sk_shares.items():
        live = [u for u in graph[d] if u in masked]
        if not live:
            continue
        if len(shares) < threshold:
            raise SecAggError(f"only {len(shares)} shares of dropped client {d}'s mask key "
                              f"(< threshold {threshold})")
        s_sk = shamir_combine(dict(list(shares.items())[:threshold]))
        for u in live:  # u added pairwise_mask(u, d, ...); remove it
            seed = agree(s_sk, s_pk[u], pair_label(run_id, round_))
            total = total - pairwise_mask(u, d, seed, length, dtype)
    return total
