"""The one DP statistic of a client's size: its sampling rate comes from it, not from n.

DP-SGD's Poisson rate q = B/n is sent with every update and published in the report; from q
and the public B anyone gets n back, and under add/remove adjacency n and n - 1 are then told
apart with certainty (Opacus can treat n as public: one central dataset; here n is each
site's own). So a client releases, once per dataset, the Gaussian mechanism

    estimate = round(n + N(0, size_noise^2))      (sensitivity 1 under add/remove)

records it in its ledger (a ``size`` entry, composed into every run's ε and the lifetime ε),
and derives q = min(1, B / estimate) from that released value. Everything computed from q
(the noise multiplier, the reports) is then post-processing of released values. The rate does
not need to be exact for DP-SGD: Poisson sampling at any public q is accounted at that q, and
Opacus divides the noised sum by the public expected batch B, not by anything of n.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np

from fedllm.privacy.accounting import PrivacyEvent


def size_event(size_noise: float) -> PrivacyEvent:
    """The size release as an accountable event: one unsampled Gaussian, sensitivity 1."""
    return PrivacyEvent(noise_multiplier=float(size_noise), steps=1, sampling="poisson",
                        sample_rate=1.0)


def noisy_size(n: int, size_noise: float) -> int:
    """n + N(0, size_noise^2), rounded and at least 1 (post-processing), from OS entropy."""
    rng = np.random.default_rng(secrets.randbits(128))
    return max(1, int(round(n + rng.normal(0.0, size_noise))))


def data_fingerprint(train_data, unit: str) -> str:
    """Which dataset an estimate describes: a new estimate only when the data changes."""
    digest = hashlib.sha256(unit.encode())
    array = np.ascontiguousarray(np.asarray(train_data))
    digest.update(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def eval_event(noise_multiplier: float) -> PrivacyEvent:
    """One node's held-out statistic (clipped loss sum / L, count), each with noise std
    ``noise_multiplier``: one example moves the pair by at most (1, 1), L2 norm sqrt(2), so it
    is a Gaussian mechanism of multiplier noise_multiplier / sqrt(2)."""
    return PrivacyEvent(noise_multiplier=float(noise_multiplier) / math.sqrt(2), steps=1,
                        sampling="poisson", sample_rate=1.0)


def evaluations_event(cfg, evaluations: int) -> PrivacyEvent | None:
    """A deployed node's DP evaluations (eval.mode=clients), ``evaluations`` of them, as one
    event; None in simulation (the server evaluates on the held-out share it holds)."""
    if cfg.eval.mode != "clients" or evaluations <= 0:
        return None
    single = eval_event(cfg.eval.noise_multiplier)
    return PrivacyEvent(noise_multiplier=single.noise_multiplier, steps=int(evaluations),
                        sampling="poisson", sample_rate=1.0)


def side_releases(cfg, evaluations: int) -> list[PrivacyEvent]:
    """What every example-level client releases besides its training rounds, as the config
    says it runs: its one DP size estimate and, deployed, its DP evaluations (counted for every
    client whether or not it was asked: conservative). Empty without example-level DP."""
    if not cfg.privacy.example.enabled:
        return []
    evals = evaluations_event(cfg, evaluations)
    return [size_event(cfg.privacy.example.size_noise)] + ([evals] if evals else [])
