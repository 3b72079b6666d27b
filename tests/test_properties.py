"""Properties over random inputs (Hypothesis): the 2:4 and block formats round-trip exactly and their validators
accept exactly what their compressors write; random checkpoint records and tuning caches never raise anything but
the documented error."""
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import sparsekernels as sk
from sparsekernels import compress_24, compress_blocks
from sparsekernels.checkpoint import CheckpointError, read_metadata
from sparsekernels.formats.blocksparse import BlockSparseWeight, cdiv, check_block_structure
from sparsekernels.formats.sparse24 import Sparse24Weight, first_bad_metadata, pack_indices, unpack_indices
from sparsekernels.ops import dispatch
from sparsekernels.schema import SchemaError, parse_json
from test_hostile_files import json_paths, json_with
from test_swap import mask_model_24

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])


# ----------------------------------------------------------------------------------------------------
# 2:4


@st.composite
def weights_24(draw):
    """A random 2:4 weight: every group of 4 keeps 0, 1 or 2 random positions."""
    out = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 7))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out, groups, 4, generator=g).argsort(-1) < torch.randint(0, 3, (out, groups, 1), generator=g)
    values = torch.randn(out, groups, 4, generator=g) + 3.0  # never zero
    return (values * keep).reshape(out, 4 * groups).to(dtype)


@FAST
@given(weights_24())
def test_compress_24_round_trip_and_validates(w):
    w24 = compress_24(w)
    assert torch.equal(w24.to_dense(), w)
    assert w24.validate() is w24
    assert w24.values.shape == (w.shape[0], w.shape[1] // 2) and w24.meta.dtype == torch.uint8


@FAST
@given(st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_pack_unpack_inverse(out, groups, seed):
    idx = torch.randint(0, 4, (out, groups, 2), generator=torch.Generator().manual_seed(seed))
    packed = pack_indices(idx)
    assert packed.shape == (out, (groups + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_indices(packed, groups), idx)


@FAST
@given(st.integers(1, 4), st.integers(1, 7), st.integers(0, 2**31 - 1), st.just(1.0) | st.floats(0.0, 1.0))
def test_metadata_validation_accepts_exactly_what_compress_24_writes(out, groups, seed, p_valid):
    g = torch.Generator().manual_seed(seed)
    valid = torch.tensor([0x4, 0x8, 0xC, 0x9, 0xD, 0xE], dtype=torch.uint8)
    nibbles = torch.where(torch.rand(out, 2 * ((groups + 1) // 2), generator=g) < p_valid,
                          valid[torch.randint(0, 6, (out, 2 * ((groups + 1) // 2)), generator=g)],
                          torch.randint(0, 16, (out, 2 * ((groups + 1) // 2)), generator=g, dtype=torch.uint8))
    if groups % 2 and torch.rand(1, generator=g) < p_valid:
        nibbles[:, -1] = 0
    meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    values = torch.rand(out, 2 * groups, generator=g) + 1.0  # positive: values stored at one position add, never cancel
    accepted = first_bad_metadata(meta, groups) is None
    rewritten = compress_24(Sparse24Weight(values, meta, (out, 4 * groups)).to_dense()).meta
    event(f"accepted: {accepted}")
    assert accepted == torch.equal(rewritten, meta)


# ----------------------------------------------------------------------------------------------------
# block-sparse


@st.composite
def block_weights(draw):
    bs = draw(st.sampled_from([16, 32]))
    out, k = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    nbr, nbc = cdiv(out, bs), cdiv(k, bs)
    keep = torch.rand(nbr, nbc, generator=g) < draw(st.floats(0.0, 1.0))
    mask = keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:out, :k]
    return (torch.randn(out, k, generator=g) + 5.0) * mask, bs


@FAST
@given(block_weights(), DTYPES)
def test_compress_blocks_round_trip_and_validates(wbs, dtype):
    w, bs = wbs
    w = w.to(dtype)
    wb = compress_blocks(w, bs)
    assert torch.equal(wb.to_dense(), w)
    assert wb.validate() is wb


@FAST
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_block_validation_accepts_exactly_what_compress_blocks_writes(nbr, nbc, data):
    bs = 16
    nnz = data.draw(st.integers(0, nbr * nbc + 1))
    if data.draw(st.booleans()):  # near valid: row counts that add up, columns drawn per row
        counts = data.draw(st.lists(st.integers(0, nbc), min_size=nbr, max_size=nbr))
        row_ptr = [0] + [sum(counts[: i + 1]) for i in range(nbr)]
        nnz = row_ptr[-1]
        cols = []
        for c in counts:
            cols += sorted(data.draw(st.lists(st.integers(-1, nbc), min_size=c, max_size=c)))
    else:
        row_ptr = data.draw(st.lists(st.integers(-1, nnz + 1), min_size=nbr + 1, max_size=nbr + 1))
        cols = data.draw(st.lists(st.integers(-1, nbc), min_size=nnz, max_size=nnz))
    row_ptr = torch.tensor(row_ptr, dtype=torch.int32)
    col_idx = torch.tensor(cols, dtype=torch.int32).reshape(-1)
    values = torch.rand(nnz, bs, bs) + 1.0
    try:
        check_block_structure("test", row_ptr, col_idx, nbc)
        accepted = True
    except ValueError:
        accepted = False
    try:
        dense = BlockSparseWeight(values, row_ptr, col_idx, (nbr * bs, nbc * bs), bs).to_dense()
        again = compress_blocks(dense, bs)
        rewritten = torch.equal(again.row_ptr, row_ptr) and torch.equal(again.col_idx, col_idx)
    except (RuntimeError, IndexError, ValueError):
        rewritten = False
    event(f"accepted: {accepted}")
    assert accepted == rewritten


# ----------------------------------------------------------------------------------------------------
# untrusted JSON


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@FAST
@given(st.text(max_size=200) | st.binary(max_size=200).map(bytes))
def test_parse_json_raises_only_schema_errors(text):
    try:
        parse_json(text, max_bytes=100, what="the document")
    except SchemaError:
        pass


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mask_model_24(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    sk.sparsify(model)
    path = tmp_path_factory.mktemp("props") / "m.safetensors"
    record = sk.save_sparse(model, path)
    from safetensors.torch import load_file

    return record, load_file(str(path))


@FAST
@given(st.data())
def test_random_checkpoint_records_give_only_the_documented_error(real_checkpoint, tmp_path, data):
    record, tensors = real_checkpoint
    if data.draw(st.booleans()):
        doc = data.draw(JSON)
    else:  # near valid: one field of a real record replaced by random JSON
        path = data.draw(st.sampled_from([p for p, _ in json_paths(record)]))
        doc = json_with(record, path, data.draw(JSON))
    path = tmp_path / "r.safetensors"
    save_file(tensors, str(path), metadata={"sparsekernels": json.dumps(doc)})
    try:
        read_metadata(path)
        model = sk.load_sparse(lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(model[0], sk.SparseLinear)  # only an equivalent record loads


@FAST
@given(JSON)
def test_random_tuning_caches_are_ignored_never_raised(tmp_path, monkeypatch, doc):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "cache"))
    dispatch.reset()
    path = dispatch.cache_path()
    (tmp_path / "cache").mkdir(exist_ok=True)
    text = json.dumps({"format": 1, "environments": doc} if isinstance(doc, dict) and doc else doc)
    with open(path, "w") as f:
        f.write(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with dispatch.use_timer(lambda name, fn, device: 1.0):
            choice = dispatch.select("op", (1,), {"triton": lambda: 0, "dense": lambda: 0}, default="dense",
                                     device="cpu")
    assert choice in ("triton", "dense")
    dispatch.reset()
