"""Base of the wrapper strategies around the adapter FedAvg (``fedllm.server.strategy``).

Flower composes server-side behaviour by wrapping one Message-API ``Strategy`` in another
(``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``); fedllm does the same::

    ServerOptimization(UserLevelDP(SecAggPlus(AdapterFedAvg(...), ...), ...), optimizer)

Every layer is a ``flwr.serverapp.strategy.Strategy`` whose ``start`` runs the rounds. Layers
talk through three methods besides Flower's:
  * ``aggregate_sum(server_round, replies, max_norm) -> (sum | None, count)``: the sum of
    the accepted updates (``AdapterFedAvg``: of the checked deltas; ``SecAggPlus``: unmasked);
  * ``aggregate_update(server_round, replies) -> update | None``: the update this round
    releases (the plain mean, or the user-level DP noised sum over the expected cohort);
  * ``core.apply(update)``: the new global adapter (global + update) as Flower's result.
The run's bookkeeping (rounds, privacy events, sampler, round offset after a resume) lives
in the innermost strategy, ``core``; wrappers read and update it there.
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

T = TypeVar("T")


class StrategyWrapper(Strategy):
    """Delegates everything to the wrapped strategy; subclasses override what they change."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    @property
    def core(self):
        """The innermost strategy: it holds the run's bookkeeping."""
        return self.strategy.core

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.core.apply(self.aggregate_update(server_round, replies))

    def aggregate_update(self, server_round: int, replies: Iterable[Message]):
        return self.strategy.aggregate_update(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def find_layer(strategy: Strategy, kind: type[T]) -> T | None:
    """The first layer of type ``kind`` from the outside in, or None."""
    while strategy is not None:
        if isinstance(strategy, kind):
            return strategy
        strategy = getattr(strategy, "strategy", None)
    return None


def require(strategy: Strategy, method: str, wrapper: str, why: str) -> None:
    """Refuse a composition in which the wrapped strategy lacks what the wrapper needs."""
    if not callable(getattr(strategy, method, None)):
        raise ValueError(f"{wrapper} cannot wrap {type(strategy).__name__}: it needs "
                         f"{method}() ({why})")
