"""Data types in bits, byte helpers and the only GiB/GB conversions of the package."""

from __future__ import annotations

GIB = 2**30  # gibibyte, what nvidia-smi's "MiB" columns add up to
GB = 10**9  # gigabyte, what vendors print on the box

#: Bits per element of every dtype the model reasons about.
DTYPE_BITS: dict[str, int] = {
    "fp32": 32,
    "bf16": 16,
    "fp16": 16,
    "int8": 8,
    "uint8": 8,
    "bool": 8,
    "int64": 64,
    "nf4": 4,
    "fp4": 4,
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a whole-byte dtype ("fp32" -> 4)."""
    bits = DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype} is a sub-byte type; use bits_to_bytes on a whole tensor")
    return bits // 8


def bits_to_bytes(n_bits: int) -> int:
    """Ceiling division of a bit count into bytes (sub-byte tensors are packed)."""
    return -(-n_bits // 8)


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of a / b for non-negative a and positive b."""
    return -(-a // b)


def gib(n_bytes: int | float) -> float:
    """Bytes as GiB (2**30), for display at the edges only."""
    return n_bytes / GIB


def fmt_gib(n_bytes: int | float, digits: int = 2) -> str:
    """'12.34 GiB' for display."""
    return f"{gib(n_bytes):.{digits}f} GiB"


def fmt_size(n_bytes: int | float) -> str:
    """'12.34 GiB' from 1 GiB up, '123 MiB' below, for display."""
    if abs(n_bytes) >= GIB:
        return fmt_gib(n_bytes)
    return f"{n_bytes / 2**20:.0f} MiB"
