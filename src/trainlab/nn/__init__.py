"""Layers shared by trainlab experiments."""

from trainlab.nn.bitlinear import (
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

__all__ = [
    "BitLinear",
    "RMSNorm",
    "absmean_scale",
    "export_ternary_state",
    "load_ternary_state",
    "pack_ternary",
    "quantize_activations",
    "quantize_weight",
    "ternary_fraction",
    "unpack_ternary",
    "unpack_ternary_codes",
]
