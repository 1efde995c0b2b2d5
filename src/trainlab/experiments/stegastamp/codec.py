"""Text <-> the secret bits the StegaStamp experiment hides, protected by a BCH code (bchlib).

Layout of a secret of N bits, most significant bit of each byte first:
    [data bytes][ECC bytes][pad bits (zeros)]
The data bytes hold the UTF-8 text followed by NUL bytes up to their length; decoding strips the
trailing NULs, so a text is read back exactly (a text may not contain NUL itself).

Which code (`layout_for`): the reference (tancik/StegaStamp encode_image.py) hides 100 bits as
7 data bytes + 5 ECC bytes (BCH t=5 over GF(2^7), primitive polynomial 137: 35 ECC bits, stored
as 5 whole bytes as bchlib returns them) + 4 zero pad bits.  For N bits in general:
  * t is 5, or the largest t <= 5 that leaves at least one data byte;
  * for that t, the field order m (5..15, bchlib's range) is the one that leaves the most data
    bytes, the smallest such m on a tie.  Data bytes are limited twice: by the secret (N bits less
    the ECC bytes) and by the code (data bits + ECC bits <= 2^m - 1, the codeword length);
  * when no t leaves a data byte (N < 16), there is no ECC: the secret is N // 8 raw bytes.
The ECC stays in whole bytes, as the reference keeps it, so the 100-bit layout is the reference's
bit for bit; the few spare bits of the last ECC byte are zero when written and ignored when read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from trainlab.errors import UsageError

MAX_T = 5
FIELD_ORDERS = range(5, 16)  # the Galois field orders bchlib supports
# The reference's primitive polynomial for GF(2^7): with it a 100-bit secret written by the
# reference's encode_image.py decodes here (bchlib's own default for m=7 is 131).
REFERENCE_POLYNOMIALS = {7: 137}


@dataclass(frozen=True)
class SecretLayout:
    secret_size: int  # bits in the secret
    data_bytes: int  # bytes of text (UTF-8, NUL-padded)
    ecc_bits: int  # bits the ECC bytes take in the secret (whole bytes; 0 = no ECC)
    t: int  # bit errors the code corrects; 0 = no ECC
    pad_bits: int  # zero bits at the end
    m: int = 0  # Galois field order of the BCH code (0 = no ECC)
    prim_poly: int = 0  # its primitive polynomial (0 = no ECC)
    parity_bits: int = 0  # the code's own ECC bits, ecc_bits less the spare bits of the last ECC byte

    @property
    def codeword_bits(self) -> int:
        """The bits the code protects: data and parity (not the spare ECC bits, not the pad)."""
        return 8 * self.data_bytes + self.parity_bits

    @property
    def max_text_bytes(self) -> int:
        return self.data_bytes

    def describe(self) -> str:
        if not self.t:
            return (f"{self.secret_size}-bit secret: {self.data_bytes} raw bytes ({8 * self.data_bytes} data bits, "
                    f"no error correction), {self.pad_bits} pad bits")
        return (f"{self.secret_size}-bit secret: {self.data_bytes} bytes ({8 * self.data_bytes} data bits) + "
                f"{self.ecc_bits} BCH bits (t={self.t}, m={self.m}), {self.pad_bits} pad bits")


def _bch(t: int, m: int):
    try:
        import bchlib
    except ImportError:
        raise UsageError("the StegaStamp experiment's BCH code needs bchlib: "
                         "pip install 'trainlab[stegastamp]'") from None

    poly = REFERENCE_POLYNOMIALS.get(m)
    return bchlib.BCH(t, prim_poly=poly) if poly else bchlib.BCH(t, m=m)


@functools.lru_cache(maxsize=None)
def layout_for(secret_size: int) -> SecretLayout:
    """The layout of a `secret_size`-bit secret (the rule is in the module docstring)."""
    if secret_size < 1:
        raise UsageError(f"secret size {secret_size} bits: allowed at least 1 bit")
    for t in range(MAX_T, 0, -1):
        best = None  # (data bytes, m, bch)
        for m in FIELD_ORDERS:
            bch = _bch(t, m)
            ecc_stored_bits = 8 * bch.ecc_bytes
            data_bytes = min((secret_size - ecc_stored_bits) // 8, (bch.n - bch.ecc_bits) // 8)
            if data_bytes >= 1 and (best is None or data_bytes > best[0]):
                best = (data_bytes, m, bch)
        if best is not None:
            data_bytes, m, bch = best
            used = 8 * (data_bytes + bch.ecc_bytes)
            return SecretLayout(secret_size, data_bytes, 8 * bch.ecc_bytes, t, secret_size - used, m, bch.prim_poly,
                                bch.ecc_bits)
    data_bytes = secret_size // 8
    return SecretLayout(secret_size, data_bytes, 0, 0, secret_size - 8 * data_bytes)


def text_to_bits(text: str, secret_size: int) -> torch.Tensor:
    """The secret for `text`: float32 0/1 [secret_size]."""
    layout = layout_for(secret_size)
    data = text.encode("utf-8")
    if "\x00" in text:
        raise UsageError("the text holds a NUL character; allowed: any text without NUL (it pads the secret)")
    if len(data) > layout.data_bytes:
        if layout.t:
            room = (f"at most {layout.data_bytes} bytes ({8 * layout.data_bytes} data bits + "
                    f"{layout.ecc_bits} BCH bits)")
        else:
            room = f"at most {layout.data_bytes} bytes (no room for error correction)"
        raise UsageError(f"text of {len(data)} bytes does not fit a {secret_size}-bit secret: {room}")
    packet = bytearray(data + b"\x00" * (layout.data_bytes - len(data)))
    if layout.t:
        packet += _bch(layout.t, layout.m).encode(bytes(packet))
    bits = np.unpackbits(np.frombuffer(bytes(packet), dtype=np.uint8))  # most significant bit first
    bits = np.concatenate([bits, np.zeros(layout.pad_bits, dtype=np.uint8)])
    return torch.from_numpy(bits.astype(np.float32))


@dataclass(frozen=True)
class DecodedSecret:
    text: str  # the text read (invalid UTF-8 shown with U+FFFD)
    corrected: int | None  # bit errors the code corrected; None with no ECC or when uncorrectable
    ok: bool  # the code accepted the bits (at most t errors) and they hold valid UTF-8 text


def bits_to_text(bits, logits: bool = False) -> DecodedSecret:
    """Read a secret back.  `bits`: [secret_size] bools, or floats read as bit = value > 0.5 (0/1
    values or probabilities); with `logits=True`, the decoder's raw outputs (bit = value > 0)."""
    values = torch.as_tensor(bits).detach().flatten().cpu()
    if values.dtype == torch.bool:
        hard = values
    else:
        hard = values.float() > (0.0 if logits else 0.5)
    layout = layout_for(values.numel())
    used = 8 * layout.data_bytes + layout.ecc_bits
    packet = bytearray(np.packbits(hard[:used].numpy().astype(np.uint8)).tobytes())
    data, ecc = packet[:layout.data_bytes], packet[layout.data_bytes:]
    corrected: int | None = None
    code_ok = True
    if layout.t:
        bch = _bch(layout.t, layout.m)
        errors = bch.decode(data, ecc)
        if errors < 0:
            code_ok = False
        else:
            bch.correct(data, ecc)
            corrected = errors
    raw = bytes(data).rstrip(b"\x00")
    try:
        text, utf8_ok = raw.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8_ok = raw.decode("utf-8", errors="replace"), False
    return DecodedSecret(text, corrected, code_ok and utf8_ok)
