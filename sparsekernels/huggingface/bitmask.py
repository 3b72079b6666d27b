"""compressed-tensors' ``sparse-24-bitmask`` checkpoints, read into the 2:4 format of
:mod:`sparsekernels.formats.sparse24`.

compressed-tensors (up to 0.14; later releases dropped the compressor but still know the config) stored a 2:4 layer
whose dense weight ``W`` is ``[rows, cols]`` (as stored in the state dict: ``[out, in]`` for ``nn.Linear``) as three
tensors next to each other, in place of ``<layer>.weight``:

* ``<layer>.compressed``: ``[rows, cols / 2]`` in the weight's dtype, the two kept values of every group of 4
  consecutive elements of a row, in increasing column order (a group keeps exactly two, zeros included);
* ``<layer>.bitmask``: ``uint8`` ``[rows, ceil(cols / 8)]``, one bit per dense element, set where a value is kept;
  bit ``j`` of byte ``b`` is column ``8 * b + j`` (little-endian bit order), so the low nibble of byte ``b`` is group
  ``2b`` and the high nibble group ``2b + 1``;
* ``<layer>.shape``: ``int64`` ``[2, 1]``, the dense shape.

The ``config.json`` of such a directory holds ``quantization_config = {"quant_method": "compressed-tensors",
"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": [...], "ignore": [...],
...}, "version": ...}``.

The values are already laid out as ``Sparse24Weight.values``, and both formats spend one byte per two groups, so a
bitmask byte maps to a metadata byte through a table: no dense weight is built on the way.
"""
from __future__ import annotations

import torch

from ..formats.sparse24 import Sparse24Weight

__all__ = ["BITMASK_SUFFIXES", "BITMASK_FORMAT", "sparse24_from_bitmask", "find_bitmask_layers"]

BITMASK_FORMAT = "sparse-24-bitmask"
BITMASK_SUFFIXES = ("compressed", "bitmask", "shape")


def _nibble_table() -> torch.Tensor:
    """4-bit keep mask -> the 2:4 metadata nibble (first position | second << 2); -1 unless exactly 2 bits are set."""
    table = torch.full((16,), -1, dtype=torch.int16)
    for mask in range(16):
        kept = [j for j in range(4) if mask >> j & 1]
        if len(kept) == 2:
            table[mask] = kept[0] | kept[1] << 2
    return table


_NIBBLES = _nibble_table()


def _shape_of(fn: str, shape) -> tuple[int, int]:
    if isinstance(shape, torch.Tensor):
        shape = shape.flatten().tolist()
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        raise ValueError(f"{fn}: expected a 2-D dense shape [rows, cols], got {shape!r}")
    rows, cols = shape
    if rows < 1 or cols < 4 or cols % 4:
        raise ValueError(f"{fn}: expected rows >= 1 and cols a positive multiple of 4, got shape {shape!r}")
    return rows, cols


def sparse24_from_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape) -> Sparse24Weight:
    """Convert one ``sparse-24-bitmask`` weight into a :class:`~sparsekernels.formats.sparse24.Sparse24Weight`.

    Args:
        compressed: ``[rows, cols / 2]`` float16 / bfloat16 / float32, the kept values (row-major, two per group).
        bitmask: ``uint8`` ``[rows, ceil(cols / 8)]``, little-endian bits, set where a value is kept.
        shape: the dense ``[rows, cols]`` (the ``.shape`` tensor of the checkpoint, or a list).

    Returns:
        The same weight in the 2:4 format of :mod:`sparsekernels.formats.sparse24` (in the stored ``[rows, cols]``
        layout; ``.to_dense()`` gives the dense weight exactly), on ``compressed``'s device. ``values`` is
        ``compressed`` itself (made contiguous).

    Raises:
        TypeError: ``bitmask`` not ``uint8``, or ``compressed`` not floating point.
        ValueError: shapes that do not fit ``shape``; a group of 4 whose mask does not keep exactly 2 values, or a
            set bit past the last column (the message names the row and group).
    """
    fn = "sparse24_from_bitmask()"
    rows, cols = _shape_of(fn, shape)
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.uint8:
        raise TypeError(f"{fn}: expected a uint8 bitmask, got {getattr(bitmask, 'dtype', type(bitmask).__name__)}")
    if bitmask.shape != (rows, (cols + 7) // 8):
        raise ValueError(f"{fn}: expected a bitmask of shape {(rows, (cols + 7) // 8)} for dense shape {(rows, cols)}, "
                         f"got {tuple(bitmask.shape)}")
    if not isinstance(compressed, torch.Tensor) or not compressed.dtype.is_floating_point:
        raise TypeError(f"{fn}: expected floating-point compressed values, got "
                        f"{getattr(compressed, 'dtype', type(compressed).__name__)}")
    if compressed.shape != (rows, cols // 2):
        raise ValueError(f"{fn}: expected compressed values of shape {(rows, cols // 2)} for dense shape "
                         f"{(rows, cols)}, got {tuple(compressed.shape)}")
    groups = cols // 4
    masks = torch.stack([bitmask & 0xF, bitmask >> 4], dim=-1).reshape(rows, -1).to(torch.int64)  # [rows, 2B]
    nibbles = _NIBBLES.to(bitmask.device)[masks]
    if masks.shape[1] > groups:  # an odd group count: the high nibble of each row's last byte is past the end
        nibbles[:, groups:] = torch.where(masks[:, groups:] == 0, 0, -1)
    bad = torch.nonzero((nibbles < 0).reshape(-1))
    if bad.numel():
        row, group = divmod(int(bad[0]), nibbles.shape[1])
        kept = bin(int(masks[row, group])).count("1")
        if group >= groups:
            raise ValueError(f"{fn}: row {row} has bits set past its last column ({cols} columns)")
        raise ValueError(f"{fn}: expected every group of 4 to keep exactly 2 values; row {row}, group {group} "
                         f"(columns {4 * group}..{4 * group + 3}) keeps {kept}")
    pairs = nibbles.reshape(rows, -1, 2)
    meta = (pairs[..., 0] | pairs[..., 1] << 4).to(torch.uint8)
    return Sparse24Weight(compressed.contiguous(), meta.contiguous(), (rows, cols))


def find_bitmask_layers(keys) -> dict[str, dict[str, str]]:
    """The layers stored as ``sparse-24-bitmask`` among checkpoint ``keys``.

    Returns:
        ``{layer prefix: {"compressed": key, "bitmask": key, "shape": key}}`` for every prefix that has all three
        suffixes (a prefix with only some of them is not a bitmask layer and is left out).
    """
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, _, suffix = key.rpartition(".")
        if prefix and suffix in BITMASK_SUFFIXES:
            found.setdefault(prefix, {})[suffix] = key
    return {p: parts for p, parts in found.items() if len(parts) == len(BITMASK_SUFFIXES)}
