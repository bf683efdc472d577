"""Server optimizers on the (noised) average of client adapter deltas (Reddi et al., 2021,
"Adaptive Federated Optimization"). Pure numpy; the server owns the state and checkpoints it.

The average is treated as a pseudo-gradient step Δ (new − old, already pointing downhill):
  * fedavg:  x += lr·Δ
  * fedavgm: m = β1·m + Δ;  x += lr·m                      (server momentum)
  * fedadam: m = β1·m + (1−β1)·Δ;  v = β2·v + (1−β2)·Δ²;  x += lr·m / (√v + τ)
  * fedyogi: as fedadam with v −= (1−β2)·Δ²·sign(v − Δ²)
Post-processing of a DP release: none of these changes any privacy guarantee.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from fedllm.choices import StrategyName

SERVER_OPTIMIZERS = tuple(s.value for s in StrategyName)  # the config's strategy.name choices


class ServerOptimizer:
    def __init__(self, name: str = "fedavg", lr: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}")
        self.name, self.lr, self.beta1, self.beta2, self.tau = name, lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, weights: "dict[str, np.ndarray]", delta: "dict[str, np.ndarray]"
             ) -> "OrderedDict[str, np.ndarray]":
        out = OrderedDict()
        for k, x in weights.items():
            d = np.asarray(delta[k], dtype=np.float64)
            out[k] = (x + self.lr * self._direction(k, d)).astype(np.float32)
        return out

    def _direction(self, key: str, d: np.ndarray) -> np.ndarray:
        if self.name == "fedavg":
            return d
        m = self.m.get(key, np.zeros_like(d))
        if self.name == "fedavgm":
            self.m[key] = self.beta1 * m + d
            return self.m[key]
        self.m[key] = m = self.beta1 * m + (1 - self.beta1) * d
        v = self.v.get(key, np.full_like(d, self.tau ** 2))
        d2 = d * d
        if self.name == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:
            v = v - (1 - self.beta2) * d2 * np.sign(v - d2)
        self.v[key] = v
        return m / (np.sqrt(v) + self.tau)

    # ------------------------------------------------------------- checkpointing
    def state_arrays(self) -> "dict[str, np.ndarray]":
        state = {f"server_opt/m/{k}": v for k, v in self.m.items()}
        state.update({f"server_opt/v/{k}": v for k, v in self.v.items()})
        return state

    def load_state_arrays(self, arrays: "dict[str, np.ndarray]") -> None:
        for key, value in arrays.items():
            if key.startswith("server_opt/m/"):
                self.m[key[len("server_opt/m/"):]] = np.asarray(value, dtype=np.float64)
            elif key.startswith("server_opt/v/"):
                self.v[key[len("server_opt/v/"):]] = np.asarray(value, dtype=np.float64)
