"""DP zeroth-order training (train.method=zeroth_order): the estimator, the mechanism, and its
accounting.

The adversary is an honest-but-curious server that sees each step's released seeds and noised
scalars (and the update built from them). The guarantee it faces is the one DP-SGD's event
states: each step is a Poisson-subsampled Gaussian mechanism with sensitivity C and noise
multiplier z. The tests check each part of that claim on the code that runs: one example moves
the clipped sum by at most C (an adversarial canary), the noise is N(0, (zC)^2) on each scalar,
fedllm's ε for the round's event equals dp_accounting's for that mechanism, and the update a
client sends is rebuilt from the released values alone (post-processing).
"""

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedllm import models
from fedllm.config import ConfigError, compose, validate
from fedllm.privacy import dpsgd, zeroth_order
from fedllm.privacy.accounting import epsilon
from fedllm.privacy.randomness import SecretRandomness
from fedllm.train import local_round, make_optimizer


def zo_cfg(*extra):
    return compose(["model=tiny", "adapter=lora", "train.method=zeroth_order",
                    "train.batch_size=8", "train.local_steps=3", "train.zo_directions=2",
                    *extra])


@pytest.fixture(scope="module")
def tiny():
    cfg = zo_cfg()
    loaded = models.build(cfg.model, seed=0, device="cpu")
    # A trained-looking adapter: LoRA's B starts at zero, where A's derivative is zero too.
    state = {k: np.random.default_rng(1).normal(0, 0.05, v.shape).astype(np.float32)
             for k, v in models.adapter_state(loaded.model).items()}
    models.load_adapter_state(loaded.model, state)
    return loaded, state


def at_state(loaded, state):
    """The model at ``state``, in eval mode (as ZO runs it), and its trainable tensors."""
    models.load_adapter_state(loaded.model, state)
    loaded.model.eval()
    return loaded.model, [p for p in loaded.model.parameters() if p.requires_grad]


def test_directional_derivatives_match_each_examples_gradient(tiny):
    loaded, state = tiny
    model, params = at_state(loaded, state)
    batch = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    seeds = [11, 12]
    got, _ = zeroth_order.directional_derivatives(model, params, batch, seeds, smoothing=1e-3,
                                                  chunk=2, device=torch.device("cpu"))
    for i in range(len(batch)):
        model.zero_grad()
        dpsgd.sequence_loss(model, batch[i:i + 1]).backward()
        for k, seed in enumerate(seeds):
            z = zeroth_order.direction([p.shape for p in params], seed)
            exact = sum((p.grad * d).sum() for p, d in zip(params, z)).item()
            assert got[i, k].item() == pytest.approx(exact, rel=0.02, abs=2e-3)
    model.zero_grad()
    assert models.adapter_state(model).keys() == state.keys()
    for k, v in models.adapter_state(model).items():  # restored exactly after perturbing
        np.testing.assert_array_equal(v, state[k])


def test_one_example_moves_the_clipped_sum_by_at_most_c():
    # A canary whose derivatives are huge along every direction: clipping bounds it at C.
    rng = torch.Generator().manual_seed(0)
    others = torch.randn(20, 4, generator=rng) * 3
    canary = torch.full((1, 4), 1e6)
    c = 0.7
    without = zeroth_order.clip_rows(others, c).sum(dim=0)
    with_it = zeroth_order.clip_rows(torch.cat([others, canary]), c).sum(dim=0)
    assert (with_it - without).norm().item() == pytest.approx(c, rel=1e-5)
    assert zeroth_order.clip_rows(others, c).norm(dim=1).max().item() <= c * (1 + 1e-6)
    small = torch.full((1, 4), 0.01)  # rows inside the ball are untouched
    assert torch.equal(zeroth_order.clip_rows(small, c), small)


def test_the_released_scalars_carry_gaussian_noise_of_std_z_c():
    z, c, b, k = 1.3, 0.5, 8, 4
    draws = torch.stack([zeroth_order.noised_scalars(
        torch.zeros(0, k), max_norm=c, noise_multiplier=z, expected_batch_size=b,
        noise=SecretRandomness()) for _ in range(4000)]) * b
    assert draws.mean().item() == pytest.approx(0.0, abs=0.03)
    assert draws.std().item() == pytest.approx(z * c, rel=0.03)


def test_the_round_is_accounted_as_dp_accounting_accounts_the_mechanism(tiny):
    loaded, state = tiny
    cfg = zo_cfg()
    data = torch.randint(0, 200, (40, 16), generator=torch.Generator().manual_seed(1))
    result = local_round(loaded, state, data, cfg, noise_multiplier=0.9, seed=3,
                         sample_rate=0.2)
    event = result.event
    assert (event.noise_multiplier, event.steps, event.sample_rate) == (0.9, 3, 0.2)
    direct = pld_privacy_accountant.PLDAccountant()
    direct.compose(dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(0.9)), 3)
    assert epsilon([event], 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)
    assert len(result.zo_steps) == 3
    assert all(len(s.seeds) == len(s.scalars) == 2 for s in result.zo_steps)


def test_the_update_is_rebuilt_from_the_released_seeds_and_scalars_alone(tiny):
    loaded, state = tiny
    cfg = zo_cfg("train.optimizer=adamw")
    data = torch.randint(0, 200, (40, 16), generator=torch.Generator().manual_seed(2))
    models.load_adapter_state(loaded.model, state)
    start = [p.detach().numpy().copy() for p in loaded.model.parameters() if p.requires_grad]
    result = local_round(loaded, state, data, cfg, noise_multiplier=0.9, seed=4,
                         sample_rate=0.2)
    after = [p.detach().numpy() for p in loaded.model.parameters() if p.requires_grad]
    rebuilt = zeroth_order.replay(start, result.zo_steps,
                                  lambda ps: make_optimizer(ps, cfg.train, cfg.train.lr))
    for a, r in zip(after, rebuilt):
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-7)
    assert any(np.abs(v).max() > 0 for v in result.delta.values())
    # Another round seed: other directions and other noise.
    again = local_round(loaded, state, data, cfg, noise_multiplier=0.9, seed=5,
                        sample_rate=0.2)
    assert again.zo_steps[0].seeds != result.zo_steps[0].seeds


def test_a_clients_round_draws_fresh_directions_and_noise(tiny):
    """seed=None (what a client runs): nothing the server could replay. Two rounds on the
    same data and start differ in every seed and every released scalar."""
    loaded, state = tiny
    cfg = zo_cfg()
    data = torch.randint(0, 200, (40, 16), generator=torch.Generator().manual_seed(4))
    a = local_round(loaded, state, data, cfg, noise_multiplier=0.9, seed=None, sample_rate=0.5)
    b = local_round(loaded, state, data, cfg, noise_multiplier=0.9, seed=None, sample_rate=0.5)
    seeds = [x for r in (a, b) for s in r.zo_steps for x in s.seeds]
    assert len(set(seeds)) == len(seeds) == 12
    assert all(x != y for s, t in zip(a.zo_steps, b.zo_steps) for x, y in zip(s.scalars, t.scalars))


def test_one_example_moves_a_real_steps_release_by_at_most_c(tiny):
    """The released sum on real derivatives (zero noise): adding a canary whose loss is far
    off along every direction moves B x scalars by at most C."""
    loaded, state = tiny
    model, params = at_state(loaded, state)
    batch = torch.randint(0, 200, (6, 16), generator=torch.Generator().manual_seed(5))
    canary = torch.full((1, 16), 7)
    seeds, c, b = [21, 22, 23], 0.05, 8

    def released(rows):
        d, _ = zeroth_order.directional_derivatives(model, params, rows, seeds, smoothing=1e-3,
                                                    chunk=4, device=torch.device("cpu"))
        return b * zeroth_order.noised_scalars(d, max_norm=c, noise_multiplier=0.0,
                                               expected_batch_size=b, noise=SecretRandomness())

    moved = (released(torch.cat([batch, canary])) - released(batch)).norm().item()
    assert 0 < moved <= c * (1 + 1e-4)


def test_a_non_finite_derivative_counts_as_zero():
    d = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [float("inf"), 0.0]])
    out = zeroth_order.noised_scalars(d, max_norm=10.0, noise_multiplier=0.0,
                                      expected_batch_size=1, noise=SecretRandomness())
    assert torch.equal(out, torch.tensor([1.0, 2.0]))


def test_non_private_zeroth_order_lowers_the_loss():
    cfg = zo_cfg("privacy=none", "train.optimizer=sgd", "train.momentum=0", "train.lr=0.05",
                 "train.local_steps=30", "train.zo_directions=4", "train.batch_size=16")
    loaded = models.build(cfg.model, seed=0, device="cpu")
    data = torch.randint(0, 50, (16, 16), generator=torch.Generator().manual_seed(3))
    state = models.adapter_state(loaded.model)
    model = loaded.model
    before = dpsgd.sequence_loss(model, data).item()
    result = local_round(loaded, state, data, cfg, noise_multiplier=0.0, seed=0)
    model.eval()
    with torch.no_grad():
        after = dpsgd.sequence_loss(model, data).item()
    assert result.event is None
    assert after < before - 0.01


@pytest.mark.parametrize("override,message", [
    ("train.zo_directions=0", "train.zo_directions"),
    ("train.zo_smoothing=0", "train.zo_smoothing"),
    ("train.method=forward", "train.method"),
])
def test_bad_zeroth_order_settings_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["model=tiny", override]))


def test_a_zeroth_order_federation_runs_end_to_end_and_says_so(tmp_path):
    """The real apps on Flower's simulation runtime: the ledger holds each round's event,
    the reported ε is its own, and the privacy report and model card name the mechanism."""
    import json

    from fedllm.privacy.ledger import Ledger
    from test_e2e_simulate import run_simulate

    run_dir = tmp_path / "run"
    proc = run_simulate(run_dir, "model=tiny", "train.method=zeroth_order",
                        "federation.rounds=2", "federation.num_clients=3",
                        "federation.clients_per_round=3", "privacy.example.target_epsilon=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    clients = report["example_level"]["clients"]
    assert len(clients) == 3
    for client_id, c in clients.items():
        ledger = Ledger.open(run_dir / "ledger", client_id)
        trained = [e for e in ledger.events() if e.noise_multiplier == c["noise_multiplier"]]
        assert sum(e.steps for e in trained) == c["steps"] == c["rounds"] * 2
        assert ledger.epsilon(1e-5) == pytest.approx(c["lifetime_epsilon"], rel=1e-6)
        assert c["epsilon"] <= 4.0 + 1e-3
    assert "DP zeroth-order steps per round" in (run_dir / "privacy_report.html").read_text()
    assert "DP zeroth-order training" in (run_dir / "adapter" / "README.md").read_text()
