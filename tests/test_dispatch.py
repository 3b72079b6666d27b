"""The dispatcher: the choice follows measured times, dense wins ties, decisions persist across restarts
and concurrent processes, and the per-tensor cache dies with its owner. Runs on the CPU: the
dispatcher is device-agnostic, so candidates here are CPU callables of known cost or a fake timer."""
import gc
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch

from sparsekernels import __version__
from sparsekernels.timing import Timing
from sparsekernels.ops import dispatch
from sparsekernels.ops.cache import cached, cached_entries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "cache"))
    dispatch.reset()
    dispatch.set_timer(None)
    yield
    dispatch.set_timer(None)
    dispatch.reset()


def fake_timer(times_ms: dict, calls: list | None = None):
    """A timer that reports fixed medians per candidate name (and records which it was asked for)."""

    def timer(name, fn, device):
        if calls is not None:
            calls.append(name)
        fn()  # the candidate still runs once: its result must be computable
        return times_ms[name]

    return timer


def candidates(*names):
    return {n: (lambda n=n: torch.full((2,), float(len(n)))) for n in names}


def test_choice_follows_fake_times():
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
        assert dispatch.select("op", (1, 64, torch.float16), candidates("triton", "dense"), default="dense") == "triton"
    with dispatch.use_timer(fake_timer({"triton": 2.0, "dense": 1.0})):
        assert dispatch.select("op", (2, 64, torch.float16), candidates("triton", "dense"), default="triton") == "dense"
    with dispatch.use_timer(fake_timer({"triton": 0.9, "cusparselt": 0.7, "dense": 1.0})):
        choice = dispatch.select("op", (3,), candidates("triton", "cusparselt", "dense"), default="dense")
    assert choice == "cusparselt"


def test_dense_kept_unless_beaten_by_more_than_noise():
    # 1.5 % faster is within NOISE_REL (2 %): dense stays.
    with dispatch.use_timer(fake_timer({"triton": 0.985, "dense": 1.0})):
        assert dispatch.select("op", (1,), candidates("triton", "dense"), default="triton") == "dense"
    # 3 % faster but with a wide spread (IQR 0.1 ms each): still noise.
    wide = {"triton": Timing(0.97, 0.92, 1.02, 0.9, 10), "dense": Timing(1.0, 0.95, 1.05, 0.93, 10)}
    with dispatch.use_timer(fake_timer(wide)):
        assert dispatch.select("op", (2,), candidates("triton", "dense"), default="triton") == "dense"
    # Without a dense candidate, the fastest wins outright.
    with dispatch.use_timer(fake_timer({"triton": 0.99, "cusparselt": 1.0})):
        assert dispatch.select("op", (3,), candidates("triton", "cusparselt"), default="cusparselt") == "triton"
    assert dispatch.choose({"dense": Timing(1.0, 1.0, 1.0, 1.0, 5), "triton": Timing(0.97, 0.97, 0.97, 0.97, 5)}) == "triton"
    with pytest.raises(ValueError, match="at least one"):
        dispatch.choose({})


def _spin(seconds: float):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return torch.zeros(1)


def test_choice_follows_real_measured_times():
    """The default timer (time_fn, warm-up + median) on CPU callables of different, known cost."""
    fast = {"triton": lambda: _spin(0.0002), "dense": lambda: _spin(0.004)}
    assert dispatch.select("spin", (1,), fast, default="dense", device="cpu") == "triton"
    slow = {"triton": lambda: _spin(0.004), "dense": lambda: _spin(0.0002)}
    assert dispatch.select("spin", (2,), slow, default="triton", device="cpu") == "dense"
    d = dispatch.lookup("spin", (1,), device="cpu")
    assert d.choice == "triton" and d.source == "measured"
    assert set(d.timings) == {"triton", "dense"}
    assert d.timings["dense"].median_ms > 3.0 and d.timings["triton"].median_ms < 2.0
    assert d.timings["dense"].n >= 3
    assert d.speedup_over_dense() > 2.0


def test_measures_once_then_cached():
    calls = []
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0}, calls)):
        for _ in range(5):
            assert dispatch.select("op", (7,), candidates("triton", "dense"), default="dense") == "triton"
    assert sorted(calls) == ["dense", "triton"]
    assert [d.key for d in dispatch.decisions()] == ["[7]"]


def test_new_candidate_triggers_remeasure():
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
        dispatch.select("op", (1,), candidates("triton", "dense"), default="dense")
    calls = []
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0, "cusparselt": 0.2}, calls)):
        choice = dispatch.select("op", (1,), candidates("triton", "dense", "cusparselt"), default="dense")
    assert choice == "cusparselt" and sorted(calls) == ["cusparselt", "dense", "triton"]


def test_failing_candidate_is_excluded_and_recorded():
    def broken():
        raise RuntimeError("shape not supported")

    cands = {"cusparselt": broken, "dense": lambda: torch.ones(1)}
    with dispatch.use_timer(fake_timer({"dense": 1.0, "cusparselt": 0.1})):
        assert dispatch.select("op", (1,), cands, default="dense") == "dense"
    d = dispatch.lookup("op", (1,))
    assert "shape not supported" in d.errors["cusparselt"] and "cusparselt" not in d.timings
    with pytest.raises(RuntimeError, match="every candidate"):
        dispatch.select("op", (2,), {"cusparselt": broken}, default="cusparselt")


def test_no_timing_while_compiling_or_capturing(monkeypatch):
    calls = []
    dispatch.set_timer(fake_timer({"triton": 0.5, "dense": 1.0}, calls))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not dispatch.timing_allowed()
    assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense") == "dense"
    assert calls == [] and dispatch.decisions() == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    # CUDA-graph capture, simulated (no GPU here): same rule.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not dispatch.timing_allowed()
    assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu") == "dense"
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu") == "triton"
    # once decided, capture returns the decision, not the default
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    dispatch._memo.clear()
    assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu") == "triton"


def test_cache_file_layout_and_key():
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
        dispatch.select("sparse24_linear", (16, 4096, 4096, torch.float16, True), candidates("triton", "dense"),
                        default="dense", device="cpu")
    path = dispatch.cache_path()
    assert path.startswith(os.environ[dispatch.CACHE_ENV]) and os.path.exists(path)
    with open(path) as f:
        data = json.load(f)
    (env, entries), = data["environments"].items()
    assert env == dispatch.environment_key("cpu")
    from sparsekernels.environment import environment_stamp

    stamp = environment_stamp("cpu")
    # device name and every version that decides a timing are part of the key
    for part in (stamp["device"], f"torch {torch.__version__}", f"triton {stamp['triton']}", f"sparsekernels {__version__}"):
        assert part in env
    entry = entries['sparse24_linear|[16,4096,4096,"torch.float16",true]']
    assert entry["choice"] == "triton" and entry["timings"]["dense"]["median_ms"] == 1.0


def test_decisions_are_per_environment(monkeypatch):
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
        dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu")
    dispatch.reset()
    # Another GPU / library version: the decision measured elsewhere is not reused.
    monkeypatch.setattr(dispatch, "environment_key", lambda device="cpu": "Other GPU|torch 9|triton 9|sparsekernels 9")
    calls = []
    with dispatch.use_timer(fake_timer({"triton": 2.0, "dense": 1.0}, calls)):
        assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu") == "dense"
    assert calls
    with open(dispatch.cache_path()) as f:
        assert len(json.load(f)["environments"]) == 2


def test_cache_survives_reset():
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
        dispatch.select("op", (1, torch.float16), candidates("triton", "dense"), default="dense", device="cpu")
    dispatch.reset()

    def must_not_time(name, fn, device):
        raise AssertionError("measured again although the decision was cached")

    with dispatch.use_timer(must_not_time):
        assert dispatch.select("op", (1, torch.float16), candidates("triton", "dense"), default="dense", device="cpu") == "triton"
    d = dispatch.lookup("op", (1, torch.float16), device="cpu")
    assert d.source == "cache" and d.timings["triton"].median_ms == 0.5


_CHILD = """
import sys
from sparsekernels.ops import dispatch
def must_not_time(name, fn, device):
    raise AssertionError("measured again")
dispatch.set_timer(must_not_time)
cands = {"triton": lambda: None, "dense": lambda: None}
print(dispatch.select("op", (42, "float16"), cands, default="dense", device="cpu"))
"""


def test_cache_survives_a_new_process():
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
        dispatch.select("op", (42, "float16"), candidates("triton", "dense"), default="dense", device="cpu")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "triton"


def _writer(cache_dir, offset, barrier, n):
    os.environ[dispatch.CACHE_ENV] = cache_dir
    dispatch.reset()
    dispatch.set_timer(lambda name, fn, device: 0.5 if name == "triton" else 1.0)
    barrier.wait()
    for i in range(n):
        dispatch.select("op", (offset + i,), {"triton": lambda: None, "dense": lambda: None}, default="dense",
                        device="cpu")


def test_two_processes_writing_at_once(tmp_path):
    cache_dir = str(tmp_path / "shared")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 15
    procs = [ctx.Process(target=_writer, args=(cache_dir, off, barrier, n)) for off in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open(os.path.join(cache_dir, dispatch.CACHE_FILE)) as f:
        entries = json.load(f)["environments"][dispatch.environment_key("cpu")]
    assert set(entries) == {f"op|[{off + i}]" for off in (0, 1000) for i in range(n)}
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


@pytest.mark.parametrize("content", ['{not json', '{"format": 2, "environments": {}}'])
def test_unusable_cache_is_kept_as_it_is_and_decisions_stay_in_memory(content):
    path = dispatch.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(content)
    calls = []
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache .*left as it is"):
        with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0}, calls)):
            assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense") == "triton"
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once per file
                assert dispatch.select("op", (2,), candidates("triton", "dense"), default="dense") == "triton"
                assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense") == "triton"
    assert calls == ["triton", "dense"] * 2  # the first decision is remembered in memory
    with open(path) as f:
        assert f.read() == content  # never overwritten


def test_timer_results_must_fit_the_cache_schema():
    for bad in (float("nan"), -1.0, float("inf"), Timing(1.0, 1.0, 1.0, 1.0, 0)):
        with dispatch.use_timer(lambda name, fn, device, bad=bad: bad):
            with pytest.raises(ValueError, match="finite, non-negative"):
                dispatch.select("op", (7,), candidates("triton", "dense"), default="dense")
    with pytest.raises(ValueError, match="candidate names"):
        dispatch.select("op", (8,), {"x" * 65: lambda: None, "dense": lambda: None}, default="dense")


def test_unwritable_cache_warns_and_keeps_decision(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(dispatch.CACHE_ENV, str(blocker / "sub"))
    dispatch.reset()
    with pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
            assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense") == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("op", (1,), candidates("triton", "dense"), default="dense") == "triton"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "explicit"))
    assert dispatch.cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv(dispatch.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dispatch.cache_dir() == str(tmp_path / "xdg" / "sparsekernels")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dispatch.cache_dir() == str(tmp_path / "home" / ".cache" / "sparsekernels")
    assert dispatch.cache_path().endswith(os.path.join("sparsekernels", dispatch.CACHE_FILE))


def test_record_collects_calls():
    with dispatch.use_timer(fake_timer({"triton": 0.5, "dense": 1.0})):
        with dispatch.record() as log:
            dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu")
            dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu")
    assert log == [("op", (1,), torch.device("cpu"))] * 2
    dispatch.select("op", (1,), candidates("triton", "dense"), default="dense", device="cpu")
    assert len(log) == 2


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: dispatch.select(3, (1,), candidates("dense"), default="dense"), TypeError, "op to be a non-empty str"),
        (lambda: dispatch.select("op", [1], candidates("dense"), default="dense"), TypeError, "key to be a tuple"),
        (lambda: dispatch.select("op", (object(),), candidates("dense"), default="dense"), TypeError, "key to hold"),
        (lambda: dispatch.select("op", ([1],), candidates("dense"), default="dense"), TypeError, "key to hold"),
        (lambda: dispatch.select("op", (1,), ["dense"], default="dense"), TypeError, "mapping"),
        (lambda: dispatch.select("op", (1,), {}, default="dense"), ValueError, "at least one candidate"),
        (lambda: dispatch.select("op", (1,), {"dense": 3}, default="dense"), TypeError, "str -> callable"),
        (lambda: dispatch.select("op", (1,), candidates("dense"), default="triton"), ValueError, "default to be one of"),
        (lambda: dispatch.set_timer(5), TypeError, "callable or None"),
    ],
)
def test_select_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_timer_returning_garbage_is_a_type_error():
    with dispatch.use_timer(lambda name, fn, device: "fast"):
        with pytest.raises(TypeError, match="Timing or a float"):
            dispatch.select("op", (1,), candidates("dense"), default="dense")


# ----------------------------------------------------------------------------------------------------
# cached(): the weak per-tensor cache


def test_cached_builds_once_and_per_kind():
    owner = torch.randn(4, 4)
    builds = []

    def build():
        builds.append(1)
        return owner.clone() * 2

    a = cached(owner, "dense", (), build)
    b = cached(owner, "dense", (), build)
    assert a is b and len(builds) == 1
    c = cached(owner, "other", (), lambda: torch.zeros(1))
    assert c is not a and set(cached_entries(owner)) == {"dense", "other"}
    other_owner = owner.clone()
    assert cached(other_owner, "dense", (), build) is not a and len(builds) == 2


def test_cached_rebuilds_after_in_place_change():
    owner = torch.randn(3)
    first = cached(owner, "dense", (), lambda: owner.clone())
    owner.add_(1.0)
    second = cached(owner, "dense", (), lambda: owner.clone())
    assert second is not first and torch.equal(second, owner)


def test_cached_dies_with_owner():
    owner = torch.randn(8)
    value = cached(owner, "dense", (), lambda: torch.randn(8))
    ref = weakref.ref(value)
    del value, owner
    gc.collect()
    assert ref() is None


def test_cached_inference_tensor():
    with torch.inference_mode():
        owner = torch.randn(3)
    v = cached(owner, "x", (), lambda: torch.ones(1))
    assert cached(owner, "x", (), lambda: torch.zeros(1)) is v


def test_cached_rebuilds_when_data_is_replaced_without_a_version_bump():
    """module.half() / .to(dtype) / param.data = ... swap the data under the same Parameter object and
    leave its version counter alone: the entry must still be rebuilt (data pointer, dtype, shape)."""
    lin = torch.nn.Linear(8, 4)
    owner = lin.weight
    first = cached(owner, "dense", (), lambda: owner.detach().clone())
    version = owner._version
    lin.half()
    assert lin.weight is owner and owner._version == version  # what made the old check miss it
    second = cached(owner, "dense", (), lambda: owner.detach().clone())
    assert second is not first and second.dtype == torch.float16 and torch.equal(second, owner.detach())
    # half -> float -> new data of the same dtype and shape: a freed buffer's address may come back,
    # but the entry keeps the data it was built from alive, so the address cannot repeat.
    lin.float()
    third = cached(owner, "dense", (), lambda: owner.detach().clone())
    assert third.dtype == torch.float32 and torch.equal(third, owner.detach())
    for _ in range(3):
        owner.data = torch.randn(4, 8)
        fresh = cached(owner, "dense", (), lambda: owner.detach().clone())
        assert torch.equal(fresh, owner.detach())
    owner.data = torch.randn(2, 16)  # same numel, other shape
    assert cached(owner, "dense", (), lambda: owner.detach().clone()).shape == (2, 16)


def test_cached_follows_its_dependencies():
    owner, meta = torch.randn(4), torch.zeros(2, dtype=torch.uint8)
    build = lambda: owner.sum() + meta.sum()  # noqa: E731
    first = cached(owner, "v", (meta,), build)
    assert cached(owner, "v", (meta,), build) is first
    meta.add_(1)  # only the dependency changes
    assert float(cached(owner, "v", (meta,), build)) == pytest.approx(float(owner.sum()) + 2)
    meta.data = torch.full((2,), 3, dtype=torch.uint8)
    assert float(cached(owner, "v", (meta,), build)) == pytest.approx(float(owner.sum()) + 6)


def _sparse_modules():
    """(sparse module, dense twin) pairs of every kind, with random 2:4 / block-sparse weights."""
    from sparsekernels.nn.blocksparse import BlockSparseLinear
    from sparsekernels.nn.conv import SparseConv2d
    from sparsekernels.nn.linear import SparseLinear

    lin = torch.nn.Linear(16, 12)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    for layer in (lin, conv):
        w = layer.weight.detach()
        w2 = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w
        keep = torch.rand(w2.shape[0], w2.shape[1] // 4, 4).argsort(-1) < 2
        w2 = w2 * keep.reshape(w2.shape)
        with torch.no_grad():
            layer.weight.copy_(w2.reshape(w.shape[0], *w.shape[2:], w.shape[1]).permute(0, 3, 1, 2) if w.dim() == 4 else w2)
    blin = torch.nn.Linear(40, 36)
    with torch.no_grad():
        blin.weight[:16, 16:] = 0
        blin.weight[16:, :16] = 0
    return [
        (SparseLinear.from_dense(lin), torch.randn(3, 16)),
        (SparseConv2d.from_dense(conv), torch.randn(2, 8, 5, 5)),
        (BlockSparseLinear.from_dense(blin, block_size=16, min_block_sparsity=0.1), torch.randn(20, 40)),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["SparseLinear", "SparseConv2d", "BlockSparseLinear"])
def test_cpu_dense_copy_follows_dtype_data_and_state_dict_changes(index):
    """The CPU "auto" path serves a cached dense copy: after every way of changing the module's data it
    must equal the module's own dense twin, run then."""
    module, x = _sparse_modules()[index]

    def check(dtype):
        with torch.no_grad():
            got = module(x.to(dtype))
            want = module.to_dense()(x.to(dtype))
        assert got.dtype == dtype and torch.equal(got, want)

    check(torch.float32)
    module.half()
    check(torch.float16)
    module.float()  # half -> float: rounded values, same dtype and shape as the first copy
    check(torch.float32)
    module.bfloat16()
    module.float()  # two conversions between calls
    check(torch.float32)
    state = {k: (v * 2 if v.is_floating_point() else v) for k, v in module.state_dict().items()}
    module.load_state_dict(state)  # in place (copy_): version bump
    check(torch.float32)
    state = {k: (v * 3 if v.is_floating_point() else v.clone()) for k, v in module.state_dict().items()}
    module.load_state_dict(state, assign=True)  # new Parameter objects
    check(torch.float32)
    params = dict(module.named_parameters())
    first = next(iter(params.values()))
    first.data = first.data * -1  # .data assignment: no version bump
    check(torch.float32)


# ----------------------------------------------------------------------------------------------------
# the per-layer benchmark suite (CPU smoke run: tiny repetition counts, real files)


def test_resnet50_conv_shapes_from_the_model():
    from sparsekernels.benchmarks.layers import resnet50_conv_shapes

    shapes = resnet50_conv_shapes()
    assert len(shapes) == 22 and all(s.in_channels % 4 == 0 for s in shapes)
    # 53 convs in ResNet-50, minus the 3-channel stem
    assert sum(s.count for s in shapes) == 52
    first = shapes[0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.height) == (64, 64, (1, 1), 56)


def test_layer_suite_writes_stamped_results(tmp_path):
    from sparsekernels.benchmarks.layers import LayerRow, measure_layers, run_layer_suite

    paths = run_layer_suite("cpu", suites=("bert-base",), tokens=(3,), dtype=torch.float32, out_dir=tmp_path,
                            progress=False, rep=2, rounds=1)
    assert paths == [tmp_path / "layers.json", tmp_path / "layers.md"]
    data = json.loads(paths[0].read_text())
    rows = [LayerRow(**r) for r in data["rows"]]
    assert {(r.layer, r.backend) for r in rows} == {
        (layer, b) for layer in ("768->768", "768->3072", "3072->768") for b in ("dense", "reference", "auto")
    }
    for r in rows:
        assert r.median_ms > 0 and (r.rel_err_vs_dense is None or r.rel_err_vs_dense < 1e-5)
        assert (r.choice is not None) == (r.backend == "auto")
    assert data["environment"]["torch"] == torch.__version__ and len(data["rows"]) == 9
    assert data["meta"]["auto_rows"] == 3
    assert "vs dense" in paths[1].read_text()
    with pytest.raises(ValueError, match="suites"):
        measure_layers("cpu", suites=("gpt",))
    with pytest.raises(ValueError, match="rep >= 1"):
        measure_layers("cpu", suites=("bert-base",), rep=0)
    with pytest.raises(ValueError, match="dtype or dtypes"):
        run_layer_suite("cpu", dtype=torch.float32, dtypes=(torch.float32,))


def test_layer_suite_sections_and_budget():
    from sparsekernels.benchmarks.layers import layer_suite_sections, measure_layers

    assert measure_layers("cpu", suites=("bert-base",), tokens=(1,), budget_s=0.0, progress=False) == []
    sections = layer_suite_sections("cpu", dtype=torch.float32, quick=True, progress=False, budget_s=0.0)
    assert sections == []


def test_layer_suite_sections_shape(monkeypatch):
    from sparsekernels.benchmarks import layers

    def fake_measure(device, *, suites, dtypes, **kw):
        suite = f"{suites[0]}-linear" if suites[0] != "resnet50" else "resnet50-conv"
        return [layers.LayerRow(suite, "8->8", 1, "float16", b, "triton" if b == "auto" else None, ms, 0.0, ms, ms,
                                5, 1.0 / ms, 0.1, None) for b, ms in (("dense", 1.0), ("auto", 0.8))]

    monkeypatch.setattr(layers, "measure_layers", fake_measure)
    sections = layers.layer_suite_sections("cpu", dtype=torch.float16, progress=False)
    assert [s["name"] for s in sections] == ["layers_llama_linear", "layers_bert_base_linear", "layers_resnet50_conv"]
    for s in sections:
        assert set(s) == {"name", "title", "rows", "columns", "notes"} and len(s["rows"]) == 2
        assert "below 0.97x of dense: 0 of 1" in s["notes"] and "1.250x" in s["notes"]
