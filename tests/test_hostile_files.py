"""Files the process did not write: real checkpoints (SparseLinear, SparseConv2d, BlockSparseLinear, tied weights,
non-persistent buffers) and tuning caches, mutated field by field. A bad checkpoint gives one CheckpointError naming
the file and the entry, leaves the model it was loaded into exactly as it was, and reaches no kernel; a bad tuning
cache is ignored with one warning and never rewritten. Faults injected while loading and saving leave the model
and the file as they were."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparsekernels as sk
from sparsekernels import checkpoint
from sparsekernels.checkpoint import CheckpointError, read_metadata
from model_state import assert_same_state, model_state
from sparsekernels.ops import dispatch, routing
from test_swap import mask_model_24

NESTED = "[" * 100_000 + "]" * 100_000  # deeper than any JSON parser follows by recursion


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 12)
        self.head = nn.Linear(12, 10, bias=False)
        self.head.weight = self.emb.weight
        self.mid = nn.Linear(12, 12)  # 3 groups of 4 per row: the odd-group padding nibble is in play
        self.register_buffer("pos", torch.arange(5), persistent=False)

    def forward(self, ids):
        return self.head(self.mid(self.emb(ids + self.pos[: ids.shape[-1]])))


def linear_model():
    return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def conv_model():
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))


def block_model():
    return nn.Sequential(nn.Linear(40, 36), nn.ReLU(), nn.Linear(36, 8))


def _block_masked():
    model = block_model()
    with torch.no_grad():
        model[0].weight[:, 16:32] = 0  # out 36, in 40: edge blocks padded in both directions
        model[0].weight[16:32] = 0  # an empty block row
    return model


KINDS = {
    "linear": (linear_model, lambda: mask_model_24(linear_model()), {}),
    "conv": (conv_model, lambda: mask_model_24(conv_model()), {}),
    "block": (block_model, _block_masked, {"pattern": "block", "block_size": 16}),
    "tied": (Tied, lambda: mask_model_24(Tied()), {}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (path of a real checkpoint, its record, its tensors)."""
    folder = tmp_path_factory.mktemp("hostile")
    out = {}
    for kind, (_, build, options) in KINDS.items():
        torch.manual_seed(0)
        model = build().eval()
        assert sk.sparsify(model, **options).swapped
        path = folder / f"{kind}.safetensors"
        record = sk.save_sparse(model, path)
        out[kind] = (path, record, load_file(str(path)))
    return out


@pytest.fixture
def no_kernel(monkeypatch):
    """Loading must never run an op: every backend implementation raises if reached."""

    def reached(*args, **kwargs):
        raise AssertionError("a kernel was reached while loading")

    monkeypatch.setattr(routing, "run", reached)
    monkeypatch.setattr(routing, "implementation", reached)


def _write(path, tensors, record_text):
    save_file(tensors, str(path), metadata={"sparsekernels": record_text})
    return path


def _assert_refused(kind, path, match=None):
    """load_sparse refuses ``path`` with one CheckpointError naming it, from a factory and into an instance, and
    the instance is left exactly as it was."""
    factory = KINDS[kind][0]
    with pytest.raises(CheckpointError, match=match) as info:
        sk.load_sparse(factory, path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    instance = factory()
    before = model_state(instance)
    with pytest.raises(CheckpointError):
        sk.load_sparse(instance, path)
    assert_same_state(before, model_state(instance))
    return info.value


# ----------------------------------------------------------------------------------------------------
# the header record, field by field


def json_paths(node, path=()):
    """``(path, value)`` for every place in a JSON document, the document itself first."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from json_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from json_paths(v, path + (i,))


REMOVE = object()


def json_with(doc, path, value):
    """A copy of ``doc`` with ``value`` at ``path`` (``REMOVE``: without the entry there)."""
    doc = json.loads(json.dumps(doc))
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    if value is REMOVE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def _wrong_type(v):
    if isinstance(v, bool):
        return 1
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return 7
    if isinstance(v, list):
        return {"0": v}
    return [v]


def _out_of_range(path, v):
    """Values of the right type that no valid checkpoint of this model has at ``path``."""
    if path == ("sparsekernels_version",):
        return []  # any version string is fine
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [-1, v + 1, 2**31, 10**30]
    if isinstance(v, str):
        return [v + "x", ""] if v else ["x"]
    if isinstance(v, list) and v and all(isinstance(i, int) for i in v):
        return [v[:-1], v + [1]]
    return []


def _huge(v):
    if isinstance(v, str):
        return "x" * 100_000
    if isinstance(v, list):
        return [0] * (checkpoint.MAX_MODULES + 1)
    if isinstance(v, dict):
        return {**v, **{f"extra{i}": 0 for i in range(40)}}
    return 10**400  # a number no float holds


def header_mutations(record):
    """(label, record JSON text) for every field: removed, of the wrong type, out of range, huge, deeply nested."""
    for path, value in json_paths(record):
        label = ".".join(map(str, path)) or "(root)"
        if path and isinstance(path[-1], str):
            yield f"remove {label}", json.dumps(json_with(record, path, REMOVE))
        yield f"wrong type {label}", json.dumps(json_with(record, path, _wrong_type(value)))
        for bad in _out_of_range(path, value):
            yield f"{label} = {str(bad)[:20]}", json.dumps(json_with(record, path, bad))
        yield f"huge {label}", json.dumps(json_with(record, path, _huge(value)))
        yield f"nested {label}", json.dumps(json_with(record, path, "@NESTED@")).replace('"@NESTED@"', NESTED)
    yield "extra field", json.dumps({**record, "extra": 1})
    yield "not an object", json.dumps([record])
    yield "not JSON", json.dumps(record)[:-1]
    yield "duplicate key", json.dumps(record)[:-1] + ', "format": 1}'
    yield "NaN", json.dumps(record)[:-1] + ', "x": NaN}'
    yield "too large", json.dumps({**record, "pad": "x" * checkpoint.MAX_RECORD_BYTES})


def _assert_all_refused(kind, files) -> int:
    """Every ``(label, path)`` of ``files`` refused as :func:`_assert_refused` says; returns how many."""
    count = 0
    for label, path in files:
        try:
            _assert_refused(kind, path)
        except BaseException as exc:
            raise AssertionError(f"mutation {label!r} was not refused cleanly: {exc!r}") from exc
        count += 1
    return count


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_header_mutation_is_one_clear_error(saved, tmp_path, no_kernel, kind):
    path0, record, tensors = saved[kind]
    files = ((label, _write(tmp_path / "m.safetensors", tensors, text)) for label, text in header_mutations(record))
    assert _assert_all_refused(kind, files) > 60
    sk.load_sparse(KINDS[kind][0], path0)  # the unmutated file still loads


def test_errors_name_the_entry(saved, tmp_path):
    path0, record, tensors = saved["conv"]
    stride = json_with(record, ("sparse_modules", 1, "args", "stride"), [1, 1])
    err = _assert_refused("conv", _write(tmp_path / "c.safetensors", tensors, json.dumps(stride)))
    assert err.entry == "header record: sparse_modules[1].args.stride" and "stride=(2, 2) in the model" in str(err)
    # padding="same" on the model's layer means padding 1: a record saying 0 is refused, 1 accepted
    same = json_with(record, ("sparse_modules", 0, "args", "padding"), [0, 0])
    err = _assert_refused("conv", _write(tmp_path / "s.safetensors", tensors, json.dumps(same)))
    assert err.entry.endswith("sparse_modules[0].args.padding")
    missing = json_with(record, ("sparse_modules", 1, "args", "stride"), REMOVE)
    err = _assert_refused("conv", _write(tmp_path / "m.safetensors", tensors, json.dumps(missing)), "missing 'stride'")
    nested = json.dumps(json_with(record, ("aliases",), "@N@")).replace('"@N@"', NESTED)
    err = _assert_refused("conv", _write(tmp_path / "n.safetensors", tensors, nested), "deeper")
    assert err.entry == "header record"
    fmt = json_with(record, ("format",), 2)
    err = _assert_refused("conv", _write(tmp_path / "f.safetensors", tensors, json.dumps(fmt)), "expected 1, got 2")
    assert err.entry == "header record: format"


# ----------------------------------------------------------------------------------------------------
# the tensors


def tensor_mutations(record, tensors):
    """(label, tensors) with one tensor of a real checkpoint made invalid."""
    sparse = tuple(f"{m['name']}." for m in record["sparse_modules"])
    for name, t in tensors.items():
        yield f"{name} without its last row", {**tensors, name: t[:-1].clone()}
        yield f"{name} with an extra dim", {**tensors, name: t.unsqueeze(0).clone()}
        other = torch.int32 if t.is_floating_point() or t.dtype == torch.uint8 else torch.float32
        if name.startswith(sparse) and t.is_floating_point():
            other = torch.float16  # a sparse layer's tensors have exactly the recorded dtype
        yield f"{name} as {other}", {**tensors, name: t.to(other)}
        rest = {k: v for k, v in tensors.items() if k != name}
        yield f"without {name}", rest
    yield "an extra tensor", {**tensors, "extra.weight": torch.zeros(2)}
    for name, t in tensors.items():
        if name.endswith("weight_meta"):
            for label, byte in (("two equal positions", 0x55), ("decreasing positions", 0x21), ("zero", 0x00)):
                bad = t.clone()
                bad[1, 0] = byte
                yield f"{name}: {label}", {**tensors, name: bad}
            if tensors[name.replace("weight_meta", "weight_values")].shape[1] // 2 % 2:  # an odd group count
                bad = t.clone()
                bad[0, -1] |= 0x40
                yield f"{name}: padding nibble", {**tensors, name: bad}
        if name.endswith("block_col_idx") and t.numel() > 1:
            for label, fix in (("out of range", lambda c: c.fill_(3)), ("negative", lambda c: c.fill_(-1)),
                               ("huge", lambda c: c.fill_(2**30)), ("unsorted", lambda c: c.flip(0)),
                               ("duplicate", lambda c: c.fill_(0))):
                yield f"{name} {label}", {**tensors, name: fix(t.clone()).contiguous()}
        if name.endswith("block_row_ptr"):
            prefix = name[: -len("block_row_ptr")]
            nnz = tensors[prefix + "block_values"].shape[0]
            for label, fix in (("not starting at 0", lambda r: r.add_(1)), ("beyond nnz", lambda r: r.mul_(5)),
                               ("not monotone", lambda r: r.flip(0)),
                               ("ending short", lambda r: r.clamp_(max=nnz - 1))):
                yield f"{name} {label}", {**tensors, name: fix(t.clone()).contiguous()}
        if name.endswith("block_values"):
            bad = t.clone()
            bad[-1, -1, -1] = float("inf")  # the padding of an edge block
            yield f"{name}: non-zero padding", {**tensors, name: bad}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_tensor_mutation_is_one_clear_error(saved, tmp_path, no_kernel, kind):
    _, record, tensors = saved[kind]
    text = json.dumps(record)
    files = ((label, _write(tmp_path / "t.safetensors", mutated, text))
             for label, mutated in tensor_mutations(record, tensors))
    assert _assert_all_refused(kind, files) >= 20


def test_floating_tensors_of_ordinary_layers_may_change_precision(saved, tmp_path):
    # documented: an ordinary layer's floating tensor keeps the file's floating dtype (a model saved after .half())
    _, record, tensors = saved["tied"]
    path = _write(tmp_path / "h.safetensors", {**tensors, "emb.weight": tensors["emb.weight"].double()},
                  json.dumps(record))
    assert sk.load_sparse(Tied, path).emb.weight.dtype == torch.float64


@pytest.mark.parametrize("cut", [1, 100, 10_000])
def test_truncated_and_foreign_files(saved, tmp_path, no_kernel, cut):
    path0, _, _ = saved["linear"]
    raw = path0.read_bytes()
    cases = {
        "truncated": raw[: max(len(raw) - cut, 0)],
        "header length past the end": struct.pack("<Q", len(raw) * 2) + raw[8:],
        "empty": b"",
        "text": b"not a safetensors file\n" * cut,
        "pickle": b"\x80\x04\x95" + raw[3:],
    }
    for label, data in cases.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(data)
        err = _assert_refused("linear", path)
        assert err.entry in ("", "tensors"), label


def test_a_record_from_another_library_is_refused(saved, tmp_path):
    _, _, tensors = saved["linear"]
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    _assert_refused("linear", tmp_path / "x.safetensors", "without it")


# ----------------------------------------------------------------------------------------------------
# faults while loading and saving


@pytest.mark.parametrize("where", ["module load", "model load", "interrupt"])
def test_load_into_an_instance_is_all_or_nothing(saved, monkeypatch, where):
    path, _, _ = saved["tied"]
    model = Tied()
    model.mid.register_forward_hook(lambda m, i, o: None)
    model.emb.weight.grad = torch.ones_like(model.emb.weight)
    model.mid.train()
    model.emb.eval()
    if where == "module load":
        monkeypatch.setattr(sk.SparseLinear, "_load_from_state_dict",
                            lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("simulated")))
    else:
        real = nn.Module.load_state_dict
        error = KeyboardInterrupt if where == "interrupt" else RuntimeError

        def half_then_fail(self, state, *args, **kwargs):  # the model's own load fails after assigning a part
            real(self, dict(list(state.items())[:1]), strict=False, assign=True)
            raise error("simulated")

        monkeypatch.setattr(model, "load_state_dict", half_then_fail.__get__(model))
    before = model_state(model)
    with pytest.raises((RuntimeError, KeyboardInterrupt), match="simulated"):
        sk.load_sparse(model, path)
    assert_same_state(before, model_state(model))
    monkeypatch.undo()
    assert sk.load_sparse(model, path) is model and isinstance(model.mid, sk.SparseLinear)


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    import safetensors.torch

    path0, _, _ = saved["linear"]
    target = tmp_path / "model.safetensors"
    target.write_bytes(path0.read_bytes())
    model = mask_model_24(linear_model())
    sk.sparsify(model)

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="simulated"):
        sk.save_sparse(model, target)
    assert target.read_bytes() == path0.read_bytes()
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind
    monkeypatch.undo()
    sk.save_sparse(model, target)
    assert isinstance(sk.load_sparse(linear_model, target)[0], sk.SparseLinear)


def test_save_refuses_a_model_it_could_not_load(tmp_path):
    model = mask_model_24(linear_model())
    sk.sparsify(model)
    model[0].constructor_args = lambda: {"in_features": 12, "out_features": 8, "bias": True, "note": {"a": 1}}
    with pytest.raises(ValueError, match="cannot be recorded.*args.note"):
        sk.save_sparse(model, tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------------
# the tuning cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "cache"))
    dispatch.reset()
    yield tmp_path / "cache"
    dispatch.set_timer(None)
    dispatch.reset()


def _cands():
    return {"triton": lambda: torch.zeros(1), "dense": lambda: torch.zeros(1)}


_CACHE_FIELDS = ("format", "environments", "choice", "timings", "errors", "measured_at", "median_ms", "p25_ms",
                 "p75_ms", "min_ms", "n")


def cache_mutations(doc):
    for path, value in json_paths(doc):
        label = ".".join(map(str, path)) or "(root)"
        if path and path[-1] in _CACHE_FIELDS:  # (entries of the environment / decision / timing maps are optional)
            yield f"remove {label}", json.dumps(json_with(doc, path, REMOVE))
        yield f"wrong type {label}", json.dumps(json_with(doc, path, _wrong_type(value)))
        yield f"nested {label}", json.dumps(json_with(doc, path, "@N@")).replace('"@N@"', NESTED)
        if isinstance(value, str):
            yield f"huge {label}", json.dumps(json_with(doc, path, "x" * 5000))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and path[-1:] != ("iqr_ms",):
            yield f"{label} negative", json.dumps(json_with(doc, path, -1))
    choice = next(p for p, _ in json_paths(doc) if p[-1:] == ("choice",))
    yield "choice not measured", json.dumps(json_with(doc, choice, "cusparselt"))
    yield "not JSON", json.dumps(doc)[:-3]
    yield "NaN", json.dumps(doc).replace("0.5", "NaN", 1)
    yield "duplicate key", json.dumps(doc)[:-1] + ', "format": 1}'
    yield "not UTF-8", b"\xff\xfe" + json.dumps(doc).encode()
    yield "too large", json.dumps({**doc, "pad": " " * 2000})


def test_every_cache_mutation_is_ignored_and_kept(cache_dir, monkeypatch):
    with dispatch.use_timer(lambda name, fn, device: 0.5 if name == "triton" else 1.0):
        dispatch.select("op", (1, "float16"), _cands(), default="dense", device="cpu")
    path = dispatch.cache_path()
    with open(path) as f:
        doc = json.load(f)
    monkeypatch.setattr(dispatch, "MAX_CACHE_BYTES", len(json.dumps(doc)) + 1000)
    count = 0
    for label, content in cache_mutations(doc):
        data = content if isinstance(content, bytes) else content.encode()
        with open(path, "wb") as f:
            f.write(data)
        dispatch.reset()
        calls = []
        with pytest.warns(RuntimeWarning, match="ignoring the tuning cache") as warned:
            with dispatch.use_timer(lambda name, fn, device: calls.append(name) or (2.0 if name == "triton" else 1.0)):
                choice = dispatch.select("op", (1, "float16"), _cands(), default="dense", device="cpu")
        assert choice == "dense" and calls == ["triton", "dense"], label  # measured again, nothing taken from it
        assert len(warned) == 1 and path in str(warned[0].message), label
        with open(path, "rb") as f:
            assert f.read() == data, f"{label}: the file was rewritten"
        count += 1
    assert count > 30
