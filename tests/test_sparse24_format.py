"""The 2:4 compressed format: exact round trip, metadata packing, sizes and every error path."""
import pytest
import torch

from sparsekernels.formats.sparse24 import (
    Sparse24Weight,
    compress_24,
    first_bad_metadata,
    is_24_sparse,
    pack_indices,
    unpack_indices,
    zero_weight_metadata,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def random_24(out: int, k: int, dtype=torch.float32, nonzeros_per_group=2) -> torch.Tensor:
    """Random weight with ``nonzeros_per_group`` non-zeros (never 0-valued) at random positions per group."""
    w = torch.randn(out, k).abs() + 0.1
    w = w * torch.where(torch.rand(out, k) < 0.5, -1.0, 1.0)
    keep = torch.rand(out, k // 4, 4).argsort(-1) < nonzeros_per_group
    return (w * keep.reshape(out, k)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (33, 68), (5, 100)])
def test_round_trip_exact(dtype, shape):
    w = random_24(*shape, dtype=dtype)
    w24 = compress_24(w)
    assert w24.values.shape == (shape[0], shape[1] // 2)
    assert w24.meta.shape == (shape[0], (shape[1] + 7) // 8) and w24.meta.dtype == torch.uint8
    assert w24.shape == shape and w24.dtype == dtype and w24.device == w.device
    dense = w24.to_dense()
    assert dense.dtype == dtype
    assert torch.equal(dense, w)


def test_groups_with_zero_one_two_nonzeros():
    # Row 0: groups with 0, 1 (every position), 2 non-zeros; row 1 mixes them in another order.
    w = torch.tensor(
        [
            [0, 0, 0, 0, 1.5, 0, 0, 0, 0, -2, 0, 0, 0, 0, 3, 0, 0, 0, 0, 4, 5, 0, 0, 6],
            [0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, -9, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 4],
        ]
    )
    w24 = compress_24(w)
    assert torch.equal(w24.to_dense(), w)
    assert is_24_sparse(w)
    for k in (1, 0):
        w_sparser = random_24(9, 36, nonzeros_per_group=k)
        assert torch.equal(compress_24(w_sparser).to_dense(), w_sparser)


def test_indices_point_at_the_kept_columns():
    w = random_24(6, 20)
    w24 = compress_24(w)
    assert torch.equal(w.gather(1, w24.indices()), w24.values)


def test_pack_unpack_inverse_odd_group_count():
    idx = torch.sort(torch.rand(5, 7, 4).argsort(-1)[..., :2], dim=-1).values
    packed = pack_indices(idx)
    assert packed.shape == (5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_indices(packed, 7), idx)


def test_nbytes_is_0_5625_of_dense_fp16():
    w24 = compress_24(random_24(1024, 1024, torch.float16))
    dense_bytes = 1024 * 1024 * 2
    assert w24.nbytes == w24.values.nbytes + w24.meta.nbytes
    assert w24.nbytes <= 0.5625 * dense_bytes + 16
    assert w24.dense_nbytes == dense_bytes


def test_to_moves_and_casts():
    w24 = compress_24(random_24(8, 16))
    half = w24.to(torch.float16)
    assert half.dtype == torch.float16 and half.meta.dtype == torch.uint8
    assert torch.equal(half.to_dense(), w24.to_dense().half())
    moved = w24.to("meta")
    assert moved.device.type == "meta" and moved.meta.device.type == "meta" and moved.shape == w24.shape


def test_error_not_a_tensor():
    with pytest.raises(TypeError, match="expected a torch.Tensor weight, got list"):
        compress_24([[1.0, 0, 0, 0]])


def test_error_wrong_rank():
    with pytest.raises(ValueError, match="expected a 2-D weight.*got 3-D"):
        compress_24(torch.zeros(2, 3, 4))


def test_error_non_float_dtype():
    with pytest.raises(TypeError, match="expected a floating-point weight.*got torch.int32"):
        compress_24(torch.zeros(2, 4, dtype=torch.int32))


def test_error_unsupported_float_dtype():
    with pytest.raises(TypeError, match="expected dtype float16, bfloat16 or float32, got torch.float64"):
        compress_24(torch.zeros(2, 4, dtype=torch.float64))


def test_error_meta_device_weight():
    # used to fail deep inside torch.nonzero with a NotImplementedError about meta registrations
    with pytest.raises(ValueError, match="meta device"):
        compress_24(torch.zeros(8, 16, device="meta"))


def test_error_in_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4.*got in=6"):
        compress_24(torch.zeros(2, 6))


def test_error_three_nonzeros_names_row_and_group():
    w = random_24(5, 16)
    w[3, 8:12] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    with pytest.raises(ValueError, match=r"row 3, group 2 \(columns 8..11\) has 3"):
        compress_24(w)
    assert not is_24_sparse(w)


def test_dataclass_rejects_inconsistent_parts():
    w24 = compress_24(random_24(4, 16))
    with pytest.raises(ValueError, match="expected values of shape"):
        Sparse24Weight(w24.values[:, :4], w24.meta, w24.shape)
    with pytest.raises(ValueError, match="expected uint8 meta of shape"):
        Sparse24Weight(w24.values, w24.meta.to(torch.int32), w24.shape)


def test_empty_weights_are_refused():
    with pytest.raises(ValueError, match=r"non-empty weight, got shape \(0, 8\)"):
        compress_24(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="in a positive multiple of 4, got \\(0, 8\\)"):
        Sparse24Weight(torch.zeros(0, 4), torch.zeros(0, 1, dtype=torch.uint8), (0, 8))
    with pytest.raises(ValueError, match="positive multiple of 4"):
        Sparse24Weight(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.uint8), (2, 0))


def test_validate_names_the_first_bad_group():
    w24 = compress_24(random_24(3, 12))  # 3 groups per row: the last byte's high nibble is padding
    assert w24.validate() is w24
    assert torch.equal(zero_weight_metadata(3, 12), compress_24(torch.zeros(3, 12)).meta)
    for row, byte, col, match in [
        (1, 0x55, 0, r"row 1, group 0 \(columns 0..3\) holds positions 1 and 1"),
        (2, 0x46, 0, r"row 2, group 0 \(columns 0..3\) holds positions 2 and 1"),
        (0, 0x14, 1, r"unused high nibble .* row 0 has 0x1"),
    ]:
        meta = w24.meta.clone()
        meta[row, col] = byte
        bad = Sparse24Weight(w24.values, meta, w24.shape)
        assert first_bad_metadata(meta, 3) is not None
        with pytest.raises(ValueError, match=match):
            bad.validate()
    assert Sparse24Weight(w24.values.to("meta"), w24.meta.to("meta"), w24.shape).validate()  # nothing to read


def test_values_stored_at_one_position_add():
    # what every kernel does with metadata that bypassed validation: the same dense weight on every backend
    values = torch.tensor([[1.0, 2.0]])
    meta = torch.tensor([[0x5]], dtype=torch.uint8)  # both values at position 1
    assert torch.equal(Sparse24Weight(values, meta, (1, 4)).to_dense(), torch.tensor([[0.0, 3.0, 0.0, 0.0]]))
