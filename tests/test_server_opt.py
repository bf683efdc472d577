"""Server optimizers (FedAvg, FedAvgM, FedAdam, FedYogi) and their checkpointed state."""

import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest

from fedllm.server.server_opt import ServerOptimizer


def test_fedavg_is_global_plus_lr_times_average():
    opt = ServerOptimizer("fedavg", lr=0.5)
    new = opt.step({"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([2.0, -4.0])})
    np.testing.assert_allclose(new["w"], [2.0, 0.0])


def test_fedadam_matches_hand_computed_steps():
    # Reddi et al. 2021, Algorithm 2 (v0 = tau^2), two steps on one coordinate.
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.01
    opt = ServerOptimizer("fedadam", lr=lr, beta1=b1, beta2=b2, tau=tau)
    x, m, v = 0.0, 0.0, tau ** 2
    w = {"w": np.array([x], np.float32)}
    for d in (0.5, -0.2):
        w = opt.step(w, {"w": np.array([d])})
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        x = x + lr * m / (math.sqrt(v) + tau)
        assert float(w["w"][0]) == pytest.approx(x, rel=1e-6)


def test_fedyogi_second_moment_moves_by_sign():
    opt = ServerOptimizer("fedyogi", lr=0.01, beta2=0.99, tau=1e-3)
    opt.step({"w": np.zeros(1, np.float32)}, {"w": np.array([0.5])})
    v0 = 1e-6
    expected = v0 - 0.01 * 0.25 * np.sign(v0 - 0.25)  # v < d^2: v grows
    assert opt.v["w"][0] == pytest.approx(expected)


def test_fedavgm_accumulates_momentum():
    opt = ServerOptimizer("fedavgm", lr=1.0, beta1=0.9)
    w = opt.step({"w": np.zeros(1, np.float32)}, {"w": np.ones(1)})
    w = opt.step(w, {"w": np.ones(1)})
    assert float(w["w"][0]) == pytest.approx(1.0 + 1.9)


def test_unknown_optimizer_and_config_validation():
    from fedllm.config import ConfigError, compose

    with pytest.raises(ValueError):
        ServerOptimizer("sgd2")
    with pytest.raises(ConfigError, match="strategy.name"):
        compose(["model=tiny", "strategy.name=fedprox"])
    assert compose(["model=tiny", "strategy=fedadam"]).strategy.server_lr == 0.01


def test_checkpoint_restores_server_optimizer_state(tmp_path):
    from fedllm.server import checkpoint
    from fedllm.server.strategy import AdapterFedAvg, ServerOptimization, cohort_sampler

    def strategy():
        core = AdapterFedAvg(cfg_text="", run_id="r1",
                             sampler=cohort_sampler(2, "fixed", user_level=False, seed=0))
        return ServerOptimization(core, ServerOptimizer("fedadam", lr=0.01))

    recorder = SimpleNamespace(history=[], base=None, epsilons={})
    first = strategy()
    arrays = OrderedDict(w=np.zeros(3, np.float32))
    for d in ([0.1, -0.2, 0.3], [0.2, 0.1, -0.1]):
        first.core.global_arrays = arrays
        arrays = first.optimizer.step(arrays, {"w": np.array(d)})
    checkpoint.save(tmp_path, 2, arrays, first, recorder)
    state, loaded = checkpoint.load(tmp_path)
    resumed = strategy()
    checkpoint.restore(state, resumed, recorder)
    nxt = {"w": np.array([0.05, 0.05, 0.05])}
    assert resumed.optimizer.m and resumed.optimizer.v
    np.testing.assert_array_equal(resumed.optimizer.step(loaded, nxt)["w"],
                                  first.optimizer.step(arrays, nxt)["w"])
