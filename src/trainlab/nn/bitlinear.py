"""BitLinear b1.58: ternary weights, 8-bit activations, trained through a straight-through estimator.

Sources:
  * S. Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
    arXiv:2402.17764 -- absmean ternary weights {-1, 0, +1}, absmax int8 activations per token.
  * Microsoft (microsoft/unilm, bitnet/), "The Era of 1-bit LLMs: Training Tips, Code and FAQ" --
    the reference forward: RMSNorm inside the layer, activation_quant / weight_quant, and the
    straight-through estimator written as ``x + (quant(x) - x).detach()``; clamp eps 1e-5.
  * H. Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language Models",
    arXiv:2310.11453 -- BitLinear and its absmax activation quantiser.
  * Y. Bengio, N. Leonard, A. Courville 2013, "Estimating or Propagating Gradients Through Stochastic
    Neurons", arXiv:1308.3432 -- the straight-through estimator.
  * B. Zhang, R. Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467.

Forward of ``BitLinear``, all quantisation arithmetic in float32 whatever the input dtype:

    x_n = RMSNorm(x)                                   # learnable gain, eps 1e-6
    x_q = round(x_n * 127 / max|x_n|).clamp(-128, 127) / (127 / max|x_n|)     # per token (last dim)
    s   = 1 / mean|W|                                  # one scale per weight tensor
    w_q = round(W * s).clamp(-1, 1) / s                # {-1/s, 0, +1/s}
    y   = F.linear(x_q, w_q, bias)                     # gradients pass both quantisers as identity

Autograd: ``BitLinearFunction`` computes this forward (the same values bit for bit) with a hand-written
backward that keeps the int8 activation codes and per-token float32 scalars instead of float32 copies
of the normalised and quantised activations; ``bitlinear_reference`` is the same forward in plain
autograd, the definition the function is tested against (``BitLinear(fused=...)`` picks the path).

Packed export: four 2-bit codes per byte (0 -> 0b00, +1 -> 0b01, -1 -> 0b10, first element in the
low bits) plus the float32 scale s, so a ternary model ships at ~2 bits per weight.  Reloading pins s
on the layer until its weight is next written, so the reloaded model reproduces the exported one's
outputs bit for bit (why the latent alone cannot: ``_latent_for_ternary``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-6
# The FAQ clamps both max|x| and mean|W| at 1e-5 before dividing by them.
QUANT_EPS = 1e-5

# int8 grid: symmetric absmax maps max|x| to 127; -128 is reachable only through the clamp.
ACT_QMAX = 127.0

CODE_ZERO, CODE_PLUS, CODE_MINUS = 0b00, 0b01, 0b10
CODES_PER_BYTE = 4
_CODE_SHIFTS = (0, 2, 4, 6)


def _straight_through(quantized: Tensor, full_precision: Tensor) -> Tensor:
    """Value of ``quantized``, gradient of the identity w.r.t. ``full_precision``.

    The FAQ writes ``x + (q - x).detach()``; this is the same estimator, arranged so that the value is
    ``q`` bit for bit: ``x - x.detach()`` is exactly 0 and ``q + 0 == q``.  In the FAQ form the
    rounding of ``q - x`` leaks into the value whenever |x| > 2|q| (a weight clamped to +-1/s, an
    outlier): harmless for training, but it would break the exact reproduction of outputs from the
    packed export, whose weight is exactly ``q``.
    """
    return quantized.detach() + (full_precision - full_precision.detach())


def rms_norm_fp32(x: Tensor, gain: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in float32 (bf16/fp16 squares lose too much); returns float32."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * gain.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_fp32(x, self.weight, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def quantize_activations(x: Tensor, eps: float = QUANT_EPS) -> Tensor:
    """Per-token absmax int8 fake quantisation over the last dim, with the straight-through gradient.

    Returns the dequantised values (k / scale, k an integer in [-128, 127]) in ``x.dtype``.  The
    arithmetic runs in float32: in fp16 ``x * scale`` is rounded before ``round`` sees it and the
    grid points stop being exact.
    """
    x32 = x.float()
    scale = ACT_QMAX / x32.detach().abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    quantized = (x32 * scale).round().clamp(-ACT_QMAX - 1, ACT_QMAX) / scale
    return _straight_through(quantized, x32).to(x.dtype)


def absmean_scale(weight: Tensor, eps: float = QUANT_EPS) -> Tensor:
    """s = 1 / mean|W| (float32, 0-d); the ternary grid of ``weight`` is {-1/s, 0, +1/s}."""
    return 1.0 / weight.detach().float().abs().mean().clamp(min=eps)


def ternary_codes(weight: Tensor, scale: Tensor) -> Tensor:
    """round(W * s).clamp(-1, 1): the integers {-1, 0, +1} as float32, no gradient."""
    return (weight.detach().float() * scale).round().clamp(-1.0, 1.0)


def quantize_weight(weight: Tensor, eps: float = QUANT_EPS, scale: Tensor | None = None) -> Tensor:
    """Absmean ternary fake quantisation with the straight-through gradient; float32 result.

    ``scale`` overrides the absmean scale (``BitLinear`` passes its pinned scale after a ternary load).
    """
    w32 = weight.float()
    if scale is None:
        scale = absmean_scale(w32, eps)
    return _straight_through(ternary_codes(w32, scale) / scale, w32)


def ternary_fraction(weight: Tensor, eps: float = QUANT_EPS) -> dict[str, float]:
    """Fractions of the ternary codes of ``weight`` (a latent weight): keys "neg", "zero", "pos".

    A zero fraction that creeps towards 1 (or to 0) is the collapse to watch for in BitNet training.
    """
    codes = ternary_codes(weight, absmean_scale(weight, eps))
    n = max(codes.numel(), 1)
    return {"neg": (codes < 0).sum().item() / n,
            "zero": (codes == 0).sum().item() / n,
            "pos": (codes > 0).sum().item() / n}


def bitlinear_reference(x: Tensor, weight: Tensor, gain: Tensor, bias: Tensor | None = None, *,
                        weight_scale: Tensor | None = None, norm_eps: float = NORM_EPS,
                        quant_eps: float = QUANT_EPS) -> Tensor:
    """BitLinear's forward in plain autograd: the definition the fused path (``bitlinear``) is tested against.

    ``weight_scale`` is s of the ternary grid (default 1/mean|W|).  Backward keeps what autograd keeps:
    the float32 normalised input, the float32 quantised activations and the float32 ternary weight.
    """
    x_norm = rms_norm_fp32(x, gain, norm_eps)
    x_q = quantize_activations(x_norm, quant_eps).to(x.dtype)
    w_q = quantize_weight(weight, quant_eps, scale=weight_scale).to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    # Under autocast F.linear casts its operands itself; outside it everything is already x.dtype.
    return F.linear(x_q, w_q, bias)


def _ternary_weight(weight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """codes / s cast to ``dtype``: the value of quantize_weight(...).to(dtype), no graph."""
    return (ternary_codes(weight, weight_scale) / weight_scale).to(dtype)


def _bitlinear_forward(x: Tensor, weight: Tensor, gain: Tensor, bias: Tensor | None, weight_scale: Tensor,
                       norm_eps: float, quant_eps: float, keep_codes: bool
                       ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The reference forward op for op, without the straight-through bookkeeping.

    Returns (y, int8 activation codes or None, per-token activation scale, per-token rstd).  Every op
    and operand order is that of ``bitlinear_reference`` (e.g. ``ACT_QMAX / amax``, which torch
    evaluates as ``amax.reciprocal() * 127``, not as a true division), so y is the same bit for bit;
    the elementwise steps run in place on one buffer (on CPU a fresh tensor costs about as much as the
    arithmetic that fills it).  (One difference no value shows: a code rounded to -0.0 stays -0.0 here,
    where the reference's ``q + (x - x)`` makes it +0.0; it can change only the sign of an output that
    is exactly zero, and ``torch.equal`` treats the two as equal.)
    """
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm_eps)
    x_norm = (x32 * rstd).mul_(gain.float())
    act_scale = ACT_QMAX / x_norm.abs().amax(dim=-1, keepdim=True).clamp(min=quant_eps)
    quantized = x_norm.mul_(act_scale).round_().clamp_(-ACT_QMAX - 1, ACT_QMAX)  # the integer codes
    codes = quantized.to(torch.int8) if keep_codes else None
    x_q = quantized.div_(act_scale).to(x.dtype)
    w_q = _ternary_weight(weight, weight_scale, x.dtype)
    y = F.linear(x_q, w_q, None if bias is None else bias.to(x.dtype))
    return y, codes, act_scale, rstd


class BitLinearFunction(torch.autograd.Function):
    """BitLinear forward + backward with the straight-through gradients of ``bitlinear_reference``.

    Forward values: those of the reference, bit for bit (same ops, same order).  Gradients: both
    quantisers pass the gradient as the identity, the RMSNorm gets its exact backward (gain included),
    and every cast the reference's graph makes (x_q and w_q to x.dtype, then to the autocast dtype of
    F.linear; back again in backward) is made here too, so the gradients equal the reference's up to
    float rounding of reordered sums.

    Saved for backward, per token row of the input (N rows of C features):
      * ``x`` itself -- the layer's input, which exists anyway (the reference keeps it too, and under
        low precision a float32 copy of it on top); the RMSNorm backward needs only x and
      * ``rstd`` -- 1 / rms per row, float32 (4 bytes a row); x_hat = x * rstd is implied;
      * the activation ``codes`` as torch.int8 (1 byte an element) and the per-row ``act_scale``
        (float32): x_q = codes / act_scale is recomputed bit for bit for the weight gradient
        grad_out^T @ x_q.  The reference keeps the float32 x * rstd and the float32 x_q (8 bytes an
        element).  Recomputing the codes from x instead would save the last byte an element too, but
        costs a quantiser pass in backward and makes the weight gradient depend on re-deriving the
        same roundings in a separately generated (compiled) kernel; the int8 codes are exact by
        construction;
      * nothing of the ternary weight but its 0-d scale s: w_q is recomputed from the latent weight
        (a parameter, kept anyway) in backward -- one elementwise pass over the weight, negligible
        next to the matmuls, instead of a float32 copy (the reference) or int8 codes of its size.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gain: Tensor, bias: Tensor | None, weight_scale: Tensor,
                norm_eps: float, quant_eps: float) -> Tensor:
        y, codes, act_scale, rstd = _bitlinear_forward(x, weight, gain, bias, weight_scale, norm_eps, quant_eps,
                                                       keep_codes=True)
        ctx.save_for_backward(x, weight, gain, weight_scale, codes, act_scale, rstd)
        # y.dtype is the matmul dtype: x.dtype, or the autocast dtype under autocast.
        ctx.compute_dtype = y.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, gain, weight_scale, codes, act_scale, rstd = ctx.saved_tensors
        need_x, need_w, need_gain, need_bias = ctx.needs_input_grad[:4]
        dtype, compute = x.dtype, ctx.compute_dtype
        in_features, out_features = x.shape[-1], weight.shape[0]
        grad_2d = grad_y.to(compute).reshape(-1, out_features)
        grad_x = grad_w = grad_gain = grad_bias = None
        if need_x or need_gain:
            # dL/dx_norm: F.linear's input gradient in the matmul dtype, cast back as the reference's
            # graph casts it; the activation quantiser passes it unchanged.
            w_q = _ternary_weight(weight, weight_scale, dtype).to(compute)
            grad_norm = (grad_2d @ w_q).to(dtype).float()
            x32 = x.reshape(-1, in_features).float()
            r = rstd.reshape(-1)
            # x_norm = x * r * g with r = (mean(x^2) + eps)^-1/2.  With p = dL/dx_norm * x (elementwise):
            #   dL/dg = sum_rows r * p                               (a matrix-vector product)
            #   dL/dx = r * g * dL/dx_norm - x * r^3 * (p @ g) / C   (rsqrt and mean, chain-ruled)
            p = grad_norm * x32
            if need_gain:
                grad_gain = torch.mv(p.t(), r).to(gain.dtype)
            if need_x:
                g32 = gain.float()
                coef = (r.pow(3) * torch.mv(p, g32)).div_(-in_features).unsqueeze(1)
                grad_x = (grad_norm.mul_(g32).mul_(r.unsqueeze(1)).addcmul_(x32, coef)
                          .to(dtype).reshape(x.shape))
        if need_w:
            x_q = codes.reshape(-1, in_features).float().div_(act_scale.reshape(-1, 1)).to(dtype).to(compute)
            grad_w = (grad_2d.t() @ x_q).to(dtype).float().to(weight.dtype)
        if need_bias:
            grad_bias = grad_2d.sum(dim=0).to(dtype).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_gain, grad_bias, None, None, None


def bitlinear(x: Tensor, weight: Tensor, gain: Tensor, bias: Tensor | None = None, *,
              weight_scale: Tensor | None = None, norm_eps: float = NORM_EPS,
              quant_eps: float = QUANT_EPS) -> Tensor:
    """BitLinear's forward (RMSNorm -> int8 activations -> ternary weight -> F.linear), fused backward.

    Same values as ``bitlinear_reference`` bit for bit, same gradients; see ``BitLinearFunction`` for
    what backward keeps.  Without autograd (no_grad, nothing requiring grad) nothing is saved.
    """
    if weight_scale is None:
        weight_scale = absmean_scale(weight, quant_eps)
    weight_scale = weight_scale.detach()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, gain, bias)):
        return BitLinearFunction.apply(x, weight, gain, bias, weight_scale, norm_eps, quant_eps)
    return _bitlinear_forward(x, weight, gain, bias, weight_scale, norm_eps, quant_eps, keep_codes=False)[0]


class BitLinear(nn.Linear):
    """Drop-in ``nn.Linear`` with BitNet b1.58 quantisation (see the module docstring).

    The latent full-precision weight is what the optimizer updates; the forward only ever sees its
    ternary projection.  The RMSNorm in front is part of the layer, as in the FAQ, so a transformer
    built from BitLinear drops its separate pre-projection norms.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eps: float = NORM_EPS,
                 quant_eps: float = QUANT_EPS, fused: bool | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant_eps = quant_eps
        # Which autograd path (same values bit for bit, same gradients either way):
        #   True   BitLinearFunction: keeps int8 codes + per-token floats for backward, not float32 copies;
        #   False  bitlinear_reference, plain autograd;
        #   None   (default) BitLinearFunction in eager, the reference inside torch.compile.  Inductor
        #          re-partitions either graph itself: from the Function's it recomputes x_q in backward
        #          (saving only per-token floats), from the reference's it keeps the float32 x_q, and
        #          on CPU the latter measured 3-7% faster compiled (docs/benchmarks.md, section 4),
        #          while eager the Function is the faster one (0.72-0.86x the time, 8-10x less kept).
        self.fused = fused
        self.norm = RMSNorm(in_features, eps=eps, device=device, dtype=dtype)
        # Set only by load_ternary_state, see _weight_scale.  Not persistent: an ordinary state_dict of
        # a BitLinear stays exactly that of nn.Linear plus the norm gain.
        self.register_buffer("pinned_weight_scale", None, persistent=False)
        self._pinned_at_version: int | None = None

    def pin_weight_scale(self, scale: Tensor) -> None:
        """Use ``scale`` instead of 1/mean|W| for as long as the weight is not modified in place."""
        self.pinned_weight_scale = scale.detach().to(device=self.weight.device,
                                                     dtype=torch.float32).reshape(())
        self._pinned_at_version = self.weight._version

    def _weight_scale(self) -> Tensor:
        # A weight reloaded from its ternary export cannot, in float32, always reproduce the exported
        # scale through mean|W| (see _latent_for_ternary), so the exported scale is pinned.  Tensor
        # _version counts in-place writes (optimizer steps, load_state_dict, copy_), so the first update
        # of the weight drops the pin and the layer is an ordinary, trainable BitLinear again.  (Writes
        # through ``weight.data`` bypass the counter; nothing in trainlab updates weights that way.)
        pinned = self.pinned_weight_scale
        if pinned is not None and self._pinned_at_version == self.weight._version:
            return pinned
        return absmean_scale(self.weight, self.quant_eps)

    def quantized_weight(self) -> Tensor:
        """The ternary weight the forward uses (float32, straight-through gradient to the latent)."""
        return quantize_weight(self.weight, scale=self._weight_scale())

    def forward(self, x: Tensor) -> Tensor:
        fused = self.fused if self.fused is not None else not torch.compiler.is_compiling()
        fn = bitlinear if fused else bitlinear_reference
        return fn(x, self.weight, self.norm.weight, self.bias, weight_scale=self._weight_scale(),
                  norm_eps=self.norm.eps, quant_eps=self.quant_eps)

    def pack_weight(self) -> dict[str, Tensor]:
        """The packed ternary form of the weight exactly as the forward uses it (pinned scale included)."""
        return pack_ternary(self.weight, scale=self._weight_scale())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", quant_eps={self.quant_eps}" + (
            "" if self.fused is None else f", fused={self.fused}")


def pack_ternary(weight: Tensor, eps: float = QUANT_EPS, scale: Tensor | None = None) -> dict[str, Tensor]:
    """Pack the ternary projection of ``weight``: {"codes": uint8 (4 per byte), "scale", "shape"}.

    ``scale`` is s of the forward (w_q = codes / s); float32, 0-d.  ``shape`` is int64.
    """
    if scale is None:
        scale = absmean_scale(weight, eps)
    scale = scale.detach().float().reshape(())
    ternary = ternary_codes(weight, scale).flatten()
    codes = torch.full_like(ternary, CODE_ZERO, dtype=torch.uint8)
    codes[ternary > 0] = CODE_PLUS
    codes[ternary < 0] = CODE_MINUS
    padding = (-codes.numel()) % CODES_PER_BYTE
    codes = F.pad(codes, (0, padding)).view(-1, CODES_PER_BYTE)
    shifts = torch.tensor(_CODE_SHIFTS, dtype=torch.uint8, device=codes.device)
    # The four shifted codes occupy disjoint bit pairs, so their sum is their bitwise or.
    packed = (codes << shifts).sum(dim=1, dtype=torch.uint8)
    return {"codes": packed, "scale": scale, "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def unpack_ternary_codes(packed: dict[str, Tensor]) -> Tensor:
    """The integer codes {-1, 0, +1} of a packed weight, float32, in the original shape."""
    shape = [int(d) for d in packed["shape"].tolist()]
    numel = math.prod(shape)
    codes = packed["codes"]
    if codes.dtype != torch.uint8 or codes.numel() != -(-numel // CODES_PER_BYTE):
        raise ValueError(f"packed codes: expected {-(-numel // CODES_PER_BYTE)} uint8 bytes for shape "
                         f"{shape}, got {codes.numel()} of {codes.dtype}")
    shifts = torch.tensor(_CODE_SHIFTS, dtype=torch.uint8, device=codes.device)
    fields = ((codes.reshape(-1, 1) >> shifts) & 0b11).flatten()[:numel]
    if (fields == 0b11).any():
        raise ValueError("packed codes: 0b11 is not a ternary code")
    values = torch.tensor([0.0, 1.0, -1.0, 0.0], device=codes.device)  # indexed by code
    return values[fields.long()].reshape(shape)


def unpack_ternary(packed: dict[str, Tensor]) -> Tensor:
    """The dequantised weight codes / s, equal bit for bit to the w_q the forward used."""
    return unpack_ternary_codes(packed) / packed["scale"].float()


def _bitlinear_modules(model: nn.Module) -> dict[str, BitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


def export_ternary_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state_dict with each BitLinear weight replaced by ``<key>.codes/.scale/.shape``.

    ``<key>`` is the weight's state_dict key (e.g. ``blocks.0.ffn.up.weight.codes``).  Every other entry
    is kept as is; all values are plain contiguous CPU tensors, ready for safetensors.
    """
    state = {key: value.detach() for key, value in model.state_dict().items()}
    for name, module in _bitlinear_modules(model).items():
        key = f"{name}.weight" if name else "weight"
        del state[key]
        for part, tensor in module.pack_weight().items():
            state[f"{key}.{part}"] = tensor
    return {key: value.cpu().contiguous() for key, value in state.items()}


def _latent_for_ternary(codes: Tensor, scale: Tensor) -> Tensor:
    """A latent weight whose ternary projection has these codes and whose mean|W| is ~1/s.

    The dequantised weight codes/s itself is NOT a fixed point of the quantiser: its mean|W| is
    f/s (f = fraction of non-zero codes), so re-quantising it gives codes * f/s, a layer shrunk by f.
    Putting magnitude 1/(s f) on the non-zero codes restores mean|W| = 1/s in exact arithmetic (and
    |W s| = 1/f >= 1 still rounds and clamps to the same codes), so training can resume smoothly.
    In float32 the recomputed scale lands within a few ulps of s but not reliably on its bits (the
    rounded sum inside mean|W| skips floats; in a trial about one layer in four missed even after
    trying neighbouring magnitudes), and one ulp of s moves every output -- hence the exported scale is
    also pinned on the module for bit-exact outputs.
    """
    nonzero = codes.count_nonzero().item()
    if nonzero == 0:
        return torch.zeros_like(codes)
    magnitude = (1.0 / scale.double().item()) * codes.numel() / nonzero
    return codes * magnitude


def load_ternary_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an ``export_ternary_state`` dict into a model of the same architecture.

    Every BitLinear gets a latent weight whose ternary projection is exactly the exported one and the
    exported scale pinned (see ``BitLinear._weight_scale``), so the outputs equal those of the exported
    model bit for bit on the same device and dtype.  Other entries load through ``load_state_dict``
    (strict: missing or unexpected keys raise).
    """
    state = dict(state)
    scales = {}
    for name, module in _bitlinear_modules(model).items():
        key = f"{name}.weight" if name else "weight"
        try:
            packed = {part: state.pop(f"{key}.{part}") for part in ("codes", "scale", "shape")}
        except KeyError as missing:
            raise KeyError(f"ternary state has no packed weight for BitLinear {key!r}: {missing}") from None
        codes = unpack_ternary_codes(packed)
        if tuple(codes.shape) != tuple(module.weight.shape):
            raise ValueError(f"{key}: packed shape {tuple(codes.shape)} != model's {tuple(module.weight.shape)}")
        state[key] = _latent_for_ternary(codes, packed["scale"])
        scales[name] = packed["scale"]
    model.load_state_dict(state, strict=True)
    # Pinned after load_state_dict, whose copy_ into the weight advances its version.
    for name, module in _bitlinear_modules(model).items():
        module.pin_weight_scale(scales[name])
