"""fedllm's fast path for DP-SGD on LoRA: exact per-sample gradients without Opacus hooks.

For a LoRA layer y = W x + s · B A x (x: [n, t, i], A: [r, i], B: [o, r]), with h = A x and
g = dL/dy the per-sample gradients have a closed form from quantities the layer already has:

    dL/dB_n = s · Σ_t g_nt ⊗ h_nt            [o, r]
    dL/dA_n = s · Σ_t (Bᵀ g_nt) ⊗ x_nt       [r, i]

No full-weight ([o, i]) per-sample tensor is ever formed. One custom autograd function per
LoRA layer computes both inside its backward and stores them on ``p.grad_sample``, which is
exactly what Opacus' ``DPOptimizer`` consumes (clipping, noise and accounting stay Opacus').
Why it is faster than Opacus' hooks on the lora_A / lora_B linears: autograd no longer also
computes the *summed* weight gradients (the optimizer replaces them with the clipped, noised
sum anyway), and there are no per-module Python hooks or activation bookkeeping.

It applies when every trainable parameter is the A or B weight of a plain PEFT ``lora.Linear``
(no DoRA or other variant, no LoRA bias, not merged); otherwise callers fall back to Opacus'
``GradSampleModule``. ``tests/test_lora_fast.py`` checks it equals Opacus' per-sample gradients.
"""

from __future__ import annotations

import contextlib
import types

import torch


def lora_layer_type():
    from peft.tuners.lora.layer import Linear

    return Linear


def _fast_layers(model) -> list | None:
    """The LoRA linears if the fast path covers every trainable parameter, else None."""
    linear = lora_layer_type()
    layers, covered = [], set()
    for module in model.modules():
        if type(module) is not linear:
            continue
        if module.merged or module.disable_adapters or getattr(module, "lora_variant", None):
            return None
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a, b = module.lora_A[name], module.lora_B[name]
            if a.bias is not None or b.bias is not None:
                return None
            covered.update((id(a.weight), id(b.weight)))
        layers.append(module)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not layers or not trainable or any(id(p) not in covered for p in trainable):
        return None
    return layers


def applies(model) -> bool:
    """True if the fast path computes per-sample gradients for every trainable parameter."""
    return _fast_layers(model) is not None


def _store(param: torch.Tensor, grad_sample: torch.Tensor) -> None:
    # A layer that runs twice in one backward (shared weights) contributes twice, summed.
    existing = getattr(param, "grad_sample", None)
    param.grad_sample = grad_sample if existing is None else existing + grad_sample


class _LoraPerSample(torch.autograd.Function):
    """s · B(A x), whose backward stores exact per-sample gradients of A and B.

    The per-sample gradients are those of ``batch_size × loss`` (Opacus' convention for
    ``loss_reduction="mean"``: the optimizer divides the clipped, noised sum by the expected
    batch size). A and B get no summed ``.grad`` from autograd: DPOptimizer writes it.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight_a, weight_b, scaling: float):
        h = x @ weight_a.t()
        ctx.save_for_backward(x, h, weight_a, weight_b)
        ctx.scaling = scaling
        ctx.weights = (weight_a, weight_b)
        return (h @ weight_b.t()) * scaling

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, h, weight_a, weight_b = ctx.saved_tensors
        s = ctx.scaling
        n = x.shape[0]
        g = grad_out.reshape(n, -1, grad_out.shape[-1])
        gh = (g @ weight_b.to(g.dtype)) * s                       # dL/dh: [n, t, r]
        x3 = x.reshape(n, -1, x.shape[-1])
        h3 = h.reshape(n, -1, h.shape[-1])
        f32 = torch.float32
        param_a, param_b = ctx.weights
        if param_b.requires_grad:
            gs_b = torch.einsum("nto,ntr->nor", g.to(f32), h3.to(f32)).mul_(s * n)
            _store(param_b, gs_b.to(param_b.dtype))
        if param_a.requires_grad:  # frozen under FFA-LoRA (model.lora.freeze_a)
            gs_a = torch.einsum("ntr,nti->nri", gh.to(f32), x3.to(f32)).mul_(n)
            _store(param_a, gs_a.to(param_a.dtype))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gh @ weight_a.to(gh.dtype)).reshape(x.shape).to(x.dtype)
        return grad_x, None, None, None


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` (vanilla LoRA branch) with the per-sample function."""
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name], self.lora_B[name]
        xa = self.lora_dropout[name](self._cast_input_dtype(x, a.weight.dtype))
        result = result + _LoraPerSample.apply(xa, a.weight, b.weight, self.scaling[name])
    return result.to(dtype)


@contextlib.contextmanager
def lora_per_sample_gradients(model):
    """Within the context, backward passes store ``grad_sample`` on every LoRA weight.

    Yields ``model`` itself (no wrapper). Raises ValueError if the fast path does not apply.
    """
    layers = _fast_layers(model)
    if layers is None:
        raise ValueError("the LoRA fast path needs every trainable parameter to be a plain "
                         "PEFT LoRA Linear weight")
    for layer in layers:
        layer.forward = types.MethodType(_fast_forward, layer)
    try:
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
