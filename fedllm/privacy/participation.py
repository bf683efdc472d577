"""How often a client may take part in a run, and which clients the server may still sample.

Pure Python (no torch, no flwr), like the accountant it feeds.

Each client calibrates its example-level noise for the participations it can actually make:
``max_participations × train.local_steps`` DP-SGD steps, not ``rounds × local_steps``. The cap
is hard: a client's ledger refuses a participation beyond it (``clients/app.py``), so the
reported per-client ε can never exceed the target, whoever samples the cohort.

``auto`` derives the cap from the plan:
  * example-level DP only: ``ceil(rounds × cohort / population)``, the fewest participations
    that still let every round fill its cohort. The server samples only among clients that can
    still train (``eligible``), so no cohort slot is wasted. Client sampling plays no part in
    the example-level guarantee (it is per client, over that client's own steps), so narrowing
    the eligible set changes no accounting.
  * user-level DP on: the user-level guarantee is amplified by sampling every client with the
    same q = cohort / population in every round, so the server keeps sampling the whole
    population and a client past its cap declines (its slot stays empty: its contribution is a
    function of its own sampling history only, never of other clients' data). The cap is then
    the smallest P with Pr[Binomial(rounds, q) > P] <= ``DECLINE_TAIL``, so a decline is rare.
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Sequence

AUTO = "auto"
# user-level DP + auto cap: the chance that one client would be sampled more often than its cap
DECLINE_TAIL = 0.01


class ParticipationError(ValueError):
    """A participation cap that is neither ``auto`` nor a positive integer."""


def resolve_cap(setting, *, rounds: int, cohort: int, population: int,
                user_level: bool) -> int:
    """The per-client participation cap for this run (an int in [1, rounds])."""
    if setting != AUTO:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ParticipationError(
                f"max_participations must be 'auto' or a positive integer, got {setting!r}")
        return min(setting, rounds)
    if population <= 0:
        raise ParticipationError(f"population must be positive, got {population}")
    cohort = min(cohort, population)
    if not user_level:
        return max(1, min(rounds, math.ceil(rounds * cohort / population)))
    return binomial_quantile(rounds, cohort / population, 1 - DECLINE_TAIL)


def binomial_quantile(n: int, p: float, level: float) -> int:
    """Smallest k >= 1 with Pr[Binomial(n, p) <= k] >= level."""
    cumulative = 0.0
    for k in range(n + 1):
        cumulative += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if k >= 1 and cumulative >= level:
            return k
    return max(1, n)


class CohortSampler:
    """The server's client sampling, aware of participation caps and exhausted clients.

    ``fixed``: k of the eligible clients without replacement, those that trained least so far
    first; ``poisson``: each eligible client independently with probability k / (eligible).
    With ``narrow=False`` (user-level DP) every client stays eligible and ``fixed`` is a uniform
    k of N, so q = k / population holds exactly in every round.

    Counts are conservative for capacity: a sampled client counts as having participated unless
    it explicitly declined (an error or a timeout may have been preceded by a ledger entry).
    """

    def __init__(self, *, cohort: int, sampling: str, cap: int, narrow: bool,
                 rng: random.Random) -> None:
        self.cohort, self.sampling, self.cap, self.narrow = cohort, sampling, cap, narrow
        self.rng = rng
        self.participations: dict[str, int] = {}
        self.exhausted: set[str] = set()   # declined: cannot train again in this run
        self.last_pool = 0

    def eligible(self, clients: Iterable) -> list:
        clients = sorted(clients)
        if not self.narrow:
            return clients
        return [c for c in clients if str(c) not in self.exhausted
                and self.participations.get(str(c), 0) < self.cap]

    def sample(self, clients: Sequence) -> list:
        pool = self.eligible(clients)
        self.last_pool = len(pool)  # this round's real population (user-level q = k / pool)
        if not pool:
            return []
        k = min(self.cohort, len(pool))
        if self.sampling == "poisson":
            q = k / len(pool)
            chosen = [c for c in pool if self.rng.random() < q]
        elif self.narrow:
            # Those that trained least so far first, ties at random: participations stay
            # within one of each other, so every cohort fills while rounds x k <= N x cap.
            keyed = sorted((self.participations.get(str(c), 0), self.rng.random(), c)
                           for c in pool)
            chosen = [c for _, _, c in keyed[:k]]
        else:
            chosen = self.rng.sample(pool, k)
        for c in chosen:
            self.participations[str(c)] = self.participations.get(str(c), 0) + 1
        return chosen

    def declined(self, client) -> None:
        """A sampled client declined (cap or budget): it did not participate, and will not."""
        key = str(client)
        self.participations[key] = max(0, self.participations.get(key, 0) - 1)
        self.exhausted.add(key)

    def state(self) -> dict:
        return {"participations": dict(self.participations), "exhausted": sorted(self.exhausted)}

    def restore(self, state: dict) -> None:
        self.participations = {str(k): int(v) for k, v in state.get("participations", {}).items()}
        self.exhausted = set(map(str, state.get("exhausted", [])))
