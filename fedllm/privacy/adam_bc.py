"""DP-AdamBC: Adam with the DP noise's variance taken out of its second moment.

Under DP-SGD the optimizer sees g~ = g + N(0, s^2 I) per coordinate, with s = z*C/B the std of
the noise on the averaged gradient (noise multiplier z, clip norm C, expected batch B). Adam's
second moment then estimates E[g^2] + s^2, and when the noise dominates (it does for
adapters at useful ε) every coordinate is divided by about s: DP-Adam degenerates into
sign-blind DP-SGD with step lr/s. Tang et al., "DP-AdamBC: Your DP-Adam Is Actually DP-SGD
(Unless You Apply Bias Correction)" (AAAI 2024) subtract s^2 from the bias-corrected second
moment and floor the result at gamma:

    m_t = b1 m + (1 - b1) g~,  v_t = b2 v + (1 - b2) g~^2,
    update = m_t/(1 - b1^t) / (eps + sqrt(max(v_t/(1 - b2^t) - s^2, gamma)))

Here gamma = floor * s^2 (a fraction of the noise variance, not an absolute value as in the
paper): a client runs only a few local steps, so its estimate of v is rough and often falls
below s^2; the relative floor bounds the step at 1/sqrt(floor) times DP-Adam's for any z, C
and B (10x for the default 0.01).

It only post-processes the already-noised gradient: no privacy cost, nothing to account. With
s = 0 (no DP) it is Adam with decoupled weight decay (AdamW), so a non-private twin trains
exactly as `train.optimizer=adamw` does.
"""

from __future__ import annotations

import torch


class AdamBC(torch.optim.Optimizer):
    def __init__(self, params, lr: float, noise_std: float, floor: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if noise_std < 0 or not 0 < floor <= 1:
            raise ValueError(f"AdamBC needs noise_std >= 0 and 0 < floor <= 1, got "
                             f"{noise_std}, {floor}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      noise_var=noise_std ** 2, floor=floor * noise_std ** 2))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t, g = state["step"], p.grad
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["m"] / (1 - b1 ** t)
                v_hat = state["v"] / (1 - b2 ** t)
                if group["noise_var"] > 0:
                    v_hat = (v_hat - group["noise_var"]).clamp_(min=group["floor"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m_hat, v_hat.sqrt_().add_(group["eps"]), value=-group["lr"])
        return loss
