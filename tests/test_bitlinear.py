"""BitLinear b1.58: hand-computed values, both quantisers, the straight-through gradient, learning through
it, the packed ternary export and its exact reload, autocast; the fused autograd path against the
plain-autograd reference (values bit for bit, gradients, what backward keeps)."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainlab.nn import (
    BitLinear,
    RMSNorm,
    absmean_scale,
    export_ternary_state,
    load_ternary_state,
    pack_ternary,
    quantize_activations,
    quantize_weight,
    ternary_fraction,
    unpack_ternary,
    unpack_ternary_codes,
)

# Binary fractions, so mean|W| and s are exact: sum|W| = .625+.125+0+1.5+.375+.125+.875+.375 = 4.0,
# mean|W| = 4/8 = 0.5, s = 1/0.5 = 2.
HAND_WEIGHT = [[0.625, -0.125, 0.0, 1.5],
               [-0.375, 0.125, 0.875, -0.375]]
# sum x^2 = 1 + 9 + 1 + 25 = 36, mean 9, rms 3 (eps 1e-6 moves it by 5e-8 relative).
HAND_INPUT = [[1.0, 3.0, -1.0, -5.0]]


def hand_layer() -> BitLinear:
    layer = BitLinear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(HAND_WEIGHT))
    assert torch.equal(layer.norm.weight, torch.ones(4))  # gain 1
    return layer


def test_hand_computed_example():
    layer = hand_layer()
    x = torch.tensor(HAND_INPUT)

    # RMSNorm: x / 3 = [1/3, 1, -1/3, -5/3]
    x_norm = layer.norm(x)
    torch.testing.assert_close(x_norm, torch.tensor([[0.3333333, 1.0, -0.3333333, -1.6666667]]))

    # absmax: scale = 127 / (5/3) = 76.2;  x_norm * 76.2 = [25.4, 76.2, -25.4, -127] -> [25, 76, -25, -127]
    x_q = quantize_activations(x_norm)
    torch.testing.assert_close(x_q * 76.2, torch.tensor([[25.0, 76.0, -25.0, -127.0]]))
    # x_q = [25, 76, -25, -127] / 76.2
    torch.testing.assert_close(x_q, torch.tensor([[0.3280840, 0.9973753, -0.3280840, -1.6666667]]))

    # W * 2 = [[1.25, -0.25, 0, 3], [-0.75, 0.25, 1.75, -0.75]]
    #  round  [[1, 0, 0, 3], [-1, 0, 2, -1]]  clamp  [[1, 0, 0, 1], [-1, 0, 1, -1]];  w_q = codes / 2
    assert absmean_scale(layer.weight).item() == 2.0
    expected_w_q = torch.tensor([[0.5, 0.0, 0.0, 0.5],
                                 [-0.5, 0.0, 0.5, -0.5]])
    assert torch.equal(quantize_weight(layer.weight), expected_w_q)
    assert ternary_fraction(layer.weight) == {"neg": 2 / 8, "zero": 3 / 8, "pos": 3 / 8}

    # y0 = 0.5 * 25/76.2 + 0.5 * (-127/76.2)              = -51/76.2  = -0.6692913
    # y1 = -0.5 * 25/76.2 + 0.5 * (-25/76.2) - 0.5 * (-127/76.2) = 38.5/76.2 = 0.5052493
    torch.testing.assert_close(layer(x), torch.tensor([[-0.6692913, 0.5052493]]))


def test_rmsnorm_gain_is_learnable_and_scales_output():
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    out = norm(torch.tensor([[1.0, 3.0, -1.0, -5.0]]))  # x / 3 times the gain
    torch.testing.assert_close(out, torch.tensor([[1 / 3, 2.0, -1 / 6, 5 / 3]]))
    out.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_activation_quantisation_is_per_token_on_the_int8_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    x[0, 1] *= 1000.0  # a loud token must not coarsen its neighbours' grids
    x[1, 2] *= 1e-3
    x_q = quantize_activations(x)
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True)
    grid = x_q * scale
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    assert grid.abs().max() <= 127.0 + 1e-4
    # max|x| of every token maps to exactly +-127
    torch.testing.assert_close(grid.abs().amax(dim=-1), torch.full((2, 3), 127.0))
    # each token is quantised by its own scale: rescaling a token rescales only its output
    torch.testing.assert_close(x_q[0, 1] / 1000.0, quantize_activations(x[0, 1] / 1000.0))
    torch.testing.assert_close(x_q[0, 0], quantize_activations(x[0, 0]))
    # the quantisation error is at most half a grid step
    assert ((x_q - x).abs() <= 0.5 / scale + 1e-6).all()


def test_all_zero_token_stays_zero():
    x = torch.zeros(2, 8)
    x[1] = torch.arange(8.0)
    x_q = quantize_activations(x)
    assert torch.equal(x_q[0], torch.zeros(8)) and torch.isfinite(x_q).all()


def test_weight_quantisation_is_ternary_with_absmean_scale():
    torch.manual_seed(1)
    w = torch.randn(64, 48) * 0.02
    s = absmean_scale(w)
    assert s.dtype == torch.float32 and s.dim() == 0
    torch.testing.assert_close(s, 1.0 / w.abs().mean())
    w_q = quantize_weight(w)
    step = (1.0 / s).item()  # the float32 reciprocal, as the quantiser computes it
    assert set(w_q.unique().tolist()) == {-step, 0.0, step}
    # round-to-nearest: |W s| < 0.5 -> 0, larger -> the sign
    codes = w_q * s
    assert torch.equal(codes, (w * s).round().clamp(-1, 1))
    assert torch.equal(codes == 0, (w * s).abs() < 0.5)


def test_quantisers_have_identity_jacobian():
    torch.manual_seed(2)
    x = torch.randn(2, 5)
    jac = torch.autograd.functional.jacobian(quantize_activations, x)
    assert torch.equal(jac.reshape(10, 10), torch.eye(10))
    w = torch.randn(3, 4)
    jac = torch.autograd.functional.jacobian(quantize_weight, w)
    assert torch.equal(jac.reshape(12, 12), torch.eye(12))


def test_straight_through_value_is_the_quantised_value_exactly():
    # x + (q - x).detach() can be off by an ulp when |x| > 2|q| (clamped outliers); ours must not be
    w = torch.tensor([[1e3, 1e-3, -7.3, 0.2, 0.0, -250.0]])
    s = absmean_scale(w)
    assert torch.equal(quantize_weight(w.requires_grad_()), (w.detach() * s).round().clamp(-1, 1) / s)


def test_gradients_reach_latent_weight_and_input():
    torch.manual_seed(3)
    layer = BitLinear(8, 5, bias=True)
    x = torch.randn(4, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for grad in (layer.weight.grad, x.grad, layer.norm.weight.grad, layer.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the latent weight gets the full-precision gradient of F.linear: x_q^T-shaped, not zeroed by round
    assert (layer.weight.grad != 0).float().mean() > 0.9


def test_two_bitlinear_layers_learn_a_toy_task():
    torch.manual_seed(4)
    teacher = torch.randn(16, 4)
    x = torch.randn(512, 16)
    y = (x @ teacher).argmax(dim=1)
    model = nn.Sequential(BitLinear(16, 64), nn.ReLU(), BitLinear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    codes_before = [m.weight.detach().clone() for m in model if isinstance(m, BitLinear)]
    codes_before = [quantize_weight(w) * absmean_scale(w) for w in codes_before]
    losses = []
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    assert losses[-1] < 0.5 * losses[0], losses[::25]
    assert accuracy > 0.8
    # learning happened in the ternary weights themselves, not only in norm gains
    for m, before in zip([m for m in model if isinstance(m, BitLinear)], codes_before):
        after = quantize_weight(m.weight) * absmean_scale(m.weight)
        assert (after != before).float().mean() > 0.05


def test_pack_code_layout():
    # codes 0, +1, -1, +1 | -1 -> byte0 = 0b00 | 0b01<<2 | 0b10<<4 | 0b01<<6 = 4 + 32 + 64 = 100, byte1 = 0b10
    w = torch.tensor([0.0, 1.0, -1.0, 1.0, -1.0])
    packed = pack_ternary(w)
    assert packed["codes"].dtype == torch.uint8
    assert packed["codes"].tolist() == [100, 2]
    assert packed["scale"].item() == 1.25  # 1 / (4/5)
    assert packed["shape"].tolist() == [5]
    assert torch.equal(unpack_ternary_codes(packed), w)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 3), (2, 2), (5, 9), (16, 33)])
def test_pack_unpack_round_trip(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * 0.05
    packed = pack_ternary(w)
    numel = shape[0] * shape[1]
    assert packed["codes"].dtype == torch.uint8 and packed["codes"].numel() == -(-numel // 4)
    assert packed["scale"].dtype == torch.float32 and packed["scale"].dim() == 0
    assert packed["shape"].tolist() == list(shape)
    assert packed["scale"] == absmean_scale(w)
    assert torch.equal(unpack_ternary(packed), quantize_weight(w))  # bit for bit


def test_unpack_rejects_corrupt_codes():
    packed = pack_ternary(torch.randn(3, 3))
    with pytest.raises(ValueError, match="bytes"):
        unpack_ternary({**packed, "codes": packed["codes"][:-1]})
    bad = packed["codes"].clone()
    bad[0] = 0b11
    with pytest.raises(ValueError, match="0b11"):
        unpack_ternary({**packed, "codes": bad})


def test_dequantised_weight_is_not_a_fixed_point_of_the_quantiser():
    # Why load_ternary_state does not simply load codes / s as the latent: mean|codes / s| = f / s,
    # so re-quantising shrinks the weight by f, the fraction of non-zero codes.
    torch.manual_seed(5)
    w_q = quantize_weight(torch.randn(20, 30))
    f = (w_q != 0).float().mean()
    assert f < 1
    torch.testing.assert_close(quantize_weight(w_q), w_q * f)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(BitLinear(5, 7, bias=True), nn.GELU(), BitLinear(7, 9), nn.LayerNorm(9),
                          nn.Linear(9, 3))
    with torch.no_grad():  # gains away from their initial ones, so a lost entry shows up
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-1.5, 1.5)
    return model.eval()


def test_export_safetensors_reload_gives_identical_outputs(tmp_path):
    original = make_model(seed=6)
    state = export_ternary_state(original)
    assert {"0.weight.codes", "0.weight.scale", "0.weight.shape", "2.weight.codes"} <= state.keys()
    assert "0.weight" not in state and "2.weight" not in state
    for key in ("0.bias", "0.norm.weight", "2.norm.weight", "3.weight", "4.weight", "4.bias"):
        assert torch.equal(state[key], original.state_dict()[key])
    assert state["2.weight.codes"].numel() == -(-9 * 7 // 4)

    path = tmp_path / "ternary.safetensors"
    save_file(state, str(path))
    reloaded = make_model(seed=7)
    x = torch.randn(11, 5)
    assert not torch.equal(reloaded(x), original(x))
    load_ternary_state(reloaded, load_file(str(path)))

    with torch.no_grad():
        assert torch.equal(reloaded(x), original(x))
        for a, b in zip([m for m in original if isinstance(m, BitLinear)],
                        [m for m in reloaded if isinstance(m, BitLinear)]):
            assert torch.equal(b.quantized_weight(), a.quantized_weight())
    # exporting the reloaded model reproduces the file
    again = export_ternary_state(reloaded)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_reload_is_bit_exact_for_many_layers_and_needs_the_pinned_scale():
    unpinned_exact = []
    for seed in range(24):
        torch.manual_seed(seed)
        original = BitLinear(int(torch.randint(1, 40, ())), int(torch.randint(1, 40, ())))
        reloaded = BitLinear(original.in_features, original.out_features)
        load_ternary_state(reloaded, export_ternary_state(original))
        assert torch.equal(reloaded.quantized_weight(), original.quantized_weight())
        # the latent's own codes are the exported codes...
        assert torch.equal(unpack_ternary_codes(pack_ternary(reloaded.weight)),
                           unpack_ternary_codes(original.pack_weight()))
        # ...but its float32 mean|W| only sometimes gives back the exported scale to the bit
        unpinned_exact.append(bool(absmean_scale(reloaded.weight) == original.pack_weight()["scale"]))
    assert not all(unpinned_exact), "a latent alone reproduced every scale: the pin would be unnecessary"


def test_reloaded_model_trains_on_without_a_jump():
    original = make_model(seed=8)
    reloaded = make_model(seed=9)
    load_ternary_state(reloaded, export_ternary_state(original))
    x = torch.randn(6, 5)
    pinned = reloaded(x).detach()
    layer = reloaded[0]
    # latent magnitude 1/(s f): the recomputed absmean scale matches the exported one to rounding
    torch.testing.assert_close(absmean_scale(layer.weight), layer.pinned_weight_scale, rtol=1e-5, atol=0)
    with torch.no_grad():
        layer.weight.add_(0.0)  # any in-place write drops the pin
    assert layer._weight_scale() is not layer.pinned_weight_scale
    torch.testing.assert_close(reloaded(x).detach(), pinned, rtol=1e-5, atol=1e-6)


def test_load_ternary_state_is_strict():
    state = export_ternary_state(make_model(seed=10))
    with pytest.raises(KeyError, match="2.weight"):
        load_ternary_state(make_model(seed=11), {k: v for k, v in state.items() if k != "2.weight.scale"})
    with pytest.raises(RuntimeError, match="Unexpected"):
        load_ternary_state(make_model(seed=11), {**state, "extra": torch.zeros(1)})


def test_autocast_bfloat16_cpu():
    torch.manual_seed(12)
    model = nn.Sequential(BitLinear(32, 64), nn.ReLU(), BitLinear(64, 8))
    x = torch.randn(4, 10, 32) * 50.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.float(), model(x), rtol=0.05, atol=0.05)


def test_low_precision_inputs_quantise_in_float32():
    # in bf16, x * (127 / max) would be rounded before round() and leave the int8 grid
    torch.manual_seed(13)
    x = (torch.randn(3, 64) * 300.0).to(torch.bfloat16)
    x_q = quantize_activations(x)
    assert x_q.dtype == torch.bfloat16
    torch.testing.assert_close(x_q, quantize_activations(x.float()).to(torch.bfloat16), rtol=0, atol=0)
    layer = BitLinear(64, 4).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- the fused autograd path (BitLinearFunction, the default) against the plain-autograd reference ---

def _values_and_grads(layer: BitLinear, x: Tensor, upstream: Tensor, fused: bool) -> dict[str, Tensor]:
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    y.backward(upstream.to(y.dtype))
    out = {"y": y.detach(), "weight": layer.weight.grad, "gain": layer.norm.weight.grad}
    if x.requires_grad:
        out["x"] = x.grad
    if layer.bias is not None:
        out["bias"] = layer.bias.grad
    return out


def _assert_grads_close(fused: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    assert fused.keys() == reference.keys()
    for key in fused.keys() - {"y"}:
        ref = reference[key]
        assert fused[key].dtype == ref.dtype, key
        # reordered float32 sums only: 1e-5 of the gradient's own scale
        torch.testing.assert_close(fused[key], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=key)


@pytest.mark.parametrize("shape, out_features, bias", [
    ((16, 24), 12, False),
    ((16, 24), 12, True),
    ((3, 7, 24), 20, False),
    ((3, 7, 24), 20, True),
    ((2, 3, 5, 24), 8, True),
    ((24,), 5, True),
])
def test_fused_path_matches_reference_values_exactly_and_gradients(shape, out_features, bias):
    torch.manual_seed(len(shape) * 100 + out_features + bias)
    layer = BitLinear(shape[-1], out_features, bias=bias)
    with torch.no_grad():
        layer.norm.weight.uniform_(-1.5, 1.5)  # a gain away from 1, with signs, so its gradient matters
        if bias:
            layer.bias.uniform_(-1.0, 1.0)
    x = torch.randn(shape) * 3.0
    if len(shape) > 1:
        x[0] *= 1e3  # a loud token and a near-silent one: different per-token scales
        x[-1] *= 1e-4
    x.requires_grad_()
    upstream = torch.randn(*shape[:-1], out_features)
    fused = _values_and_grads(layer, x, upstream, fused=True)
    reference = _values_and_grads(layer, x, upstream, fused=False)
    assert torch.equal(fused["y"], reference["y"])  # bit for bit
    _assert_grads_close(fused, reference)


def test_fused_path_matches_reference_with_pinned_scale_and_partial_grads():
    source = make_model(seed=14)[0]
    layer = BitLinear(source.in_features, source.out_features, bias=True)
    load_ternary_state(layer, export_ternary_state(source))  # pins the exported scale
    assert layer.pinned_weight_scale is not None
    x = torch.randn(4, 6, source.in_features)  # input that needs no gradient
    upstream = torch.randn(4, 6, source.out_features)
    fused = _values_and_grads(layer, x, upstream, fused=True)
    reference = _values_and_grads(layer, x, upstream, fused=False)
    assert torch.equal(fused["y"], reference["y"]) and torch.equal(fused["y"], source(x))
    _assert_grads_close(fused, reference)
    # frozen layer, input gradient only
    layer.requires_grad_(False)
    x.requires_grad_()
    for fused_flag in (True, False):
        layer.fused = fused_flag
        x.grad = None
        layer(x).backward(upstream)
        if fused_flag:
            fused_grad = x.grad.clone()
    torch.testing.assert_close(fused_grad, x.grad, rtol=1e-5, atol=1e-5 * x.grad.abs().max().item())


def test_fused_path_under_no_grad_and_in_bfloat16():
    torch.manual_seed(15)
    layer = BitLinear(32, 16, bias=True)
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = layer(x)
    layer.fused = False
    assert torch.equal(y, layer(x))
    layer = layer.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    upstream = torch.randn(5, 16)
    fused = _values_and_grads(layer, x.requires_grad_(), upstream, fused=True)
    reference = _values_and_grads(layer, x, upstream, fused=False)
    assert fused["y"].dtype == torch.bfloat16 and torch.equal(fused["y"], reference["y"])
    for key in fused.keys() - {"y"}:
        assert fused[key].dtype == torch.bfloat16
        torch.testing.assert_close(fused[key], reference[key], rtol=1e-2, atol=1e-2 * reference[key].abs().max().item())


def test_fused_path_under_autocast_keeps_the_reference_dtypes_and_values():
    torch.manual_seed(16)
    layer = BitLinear(32, 24, bias=True)
    x = torch.randn(3, 10, 32) * 20.0
    upstream = torch.randn(3, 10, 24)
    results = {}
    for fused in (True, False):
        layer.fused = fused
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xg)
        y.backward(upstream.to(y.dtype))
        results[fused] = {"y": y.detach(), "x": xg.grad, "weight": layer.weight.grad,
                          "gain": layer.norm.weight.grad, "bias": layer.bias.grad}
    assert results[True]["y"].dtype == torch.bfloat16 and torch.equal(results[True]["y"], results[False]["y"])
    for key in ("x", "weight", "gain", "bias"):
        assert results[True][key].dtype == results[False][key].dtype == torch.float32, key
        ref = results[False][key]
        torch.testing.assert_close(results[True][key], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=key)


class _Saved:
    def __init__(self, tensor: Tensor):
        self.tensor = tensor


def _saved_for_backward(layer: BitLinear, x: Tensor) -> list[Tensor]:
    """Tensors the live graph holds for backward after one forward, minus the input and parameters."""
    boxes = []

    def pack(t):
        box = _Saved(t)
        boxes.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        y = layer(x)
    alive = [box.tensor for box in (ref() for ref in boxes) if box is not None]
    del y
    exists_anyway = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters()]}
    storages = {t.untyped_storage().data_ptr(): t for t in alive if t.untyped_storage().data_ptr() not in exists_anyway}
    return list(storages.values())


def test_fused_path_saves_int8_codes_and_per_token_floats_only():
    torch.manual_seed(17)
    n, c = 96, 64
    layer = BitLinear(c, 48)
    x = torch.randn(n, c, requires_grad=True)
    assert layer.fused is None  # the default: the autograd function in eager
    fused = _saved_for_backward(layer, x)
    layer.fused = True
    assert [(t.dtype, t.shape) for t in _saved_for_backward(layer, x)] == [(t.dtype, t.shape) for t in fused]
    layer.fused = False
    reference = _saved_for_backward(layer, x)
    nbytes = lambda ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    # the reference keeps float32 x_norm (before the gain), float32 x_q and the float32 ternary weight
    assert nbytes(reference) >= 2 * n * c * 4 + 48 * c * 4
    # fused: int8 codes (1 byte an element), two float32 per token (rstd, activation scale), the 0-d s
    assert sorted((str(t.dtype), t.numel()) for t in fused) == sorted(
        [("torch.int8", n * c), ("torch.float32", n), ("torch.float32", n), ("torch.float32", 1)]), \
        [(t.dtype, tuple(t.shape)) for t in fused]
    assert nbytes(fused) == n * c + 2 * n * 4 + 4
    assert nbytes(fused) * 8 < nbytes(reference)
