"""A client's sampling and noise come from the OS CSPRNG. The adversary is a server that
searches seeds: torch's CPU generator keeps 32 bits of any seed, so a seeded generator's
output is one of 2^32 streams a server can enumerate against a release."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedllm.privacy.randomness import SecretRandomness, SeededRandomness, randomness


def test_a_seeded_torch_generator_is_only_32_bits_deep():
    # Why releases never use one: two seeds 2^40 apart give the same stream.
    a = torch.Generator().manual_seed(5)
    b = torch.Generator().manual_seed(5 + 2 ** 40)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_secret_randomness_is_what_a_client_gets_and_never_repeats():
    assert isinstance(randomness(None), SecretRandomness)
    assert isinstance(randomness(3), SeededRandomness)
    r = SecretRandomness()
    assert not torch.equal(r.uniform(64), r.uniform(64))
    assert not torch.equal(r.normal((64,), 1.0), r.normal((64,), 1.0))


def test_secret_uniforms_and_gaussians_have_the_right_law():
    r = SecretRandomness()
    u = r.uniform(20000).numpy()
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    z = r.normal((20000,), 2.5, dtype=torch.float64).numpy()
    assert stats.kstest(z / 2.5, "norm").pvalue > 1e-3
    assert np.std(z) == pytest.approx(2.5, rel=0.03)
    assert math.isfinite(z.max()) and math.isfinite(z.min())


def test_seeded_randomness_reproduces_a_round():
    a, b = SeededRandomness(7), SeededRandomness(7)
    assert torch.equal(a.uniform(5), b.uniform(5))
    assert torch.equal(a.normal((3,), 1.0), b.normal((3,), 1.0))
    assert a.seed() == b.seed()


def test_dp_sgd_noise_comes_from_the_source_with_std_z_c_over_b():
    """Opacus' DPOptimizer with fedllm's noise source: a noise-only step (empty Poisson batch)
    of SGD at lr 1 moves each parameter by N(0, (zC/B)^2), and two such steps differ."""
    from fedllm.privacy import dpsgd

    params = [torch.nn.Parameter(torch.zeros(20000))]
    z, c, b = 1.5, 0.8, 4
    opt = dpsgd.make_dp_optimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=z,
                                  max_grad_norm=c, expected_batch_size=b,
                                  noise=SecretRandomness())
    steps = []
    for _ in range(2):
        before = params[0].detach().clone()
        params[0].grad_sample = torch.zeros((0, 20000))
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append((before - params[0].detach()).numpy())
    for step in steps:
        assert np.std(step) == pytest.approx(z * c / b, rel=0.03)
        assert stats.kstest(step / (z * c / b), "norm").pvalue > 1e-3
    assert not np.allclose(steps[0], steps[1])
