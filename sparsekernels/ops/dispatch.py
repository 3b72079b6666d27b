"""The dispatcher: for every op and shape bucket, run whichever backend is fastest on the device at hand.

The ops call :func:`select` with a mapping of candidate backends (``"triton"``, ``"dense"``, and
``"cusparselt"`` where the GPU supports it), each a zero-argument callable that computes the op. The
first time a ``(op, key, device)`` is seen, every candidate is timed (warm-up, then the median of
several runs with :func:`sparsekernels.timing.time_fn`) and the fastest wins -- except that
``"dense"`` is kept unless a sparse candidate beats it by more than the measurement noise, so a
dispatched layer is never slower than dense. The decision and every measured time are kept in memory
and persisted to a JSON tuning cache, so a later process reuses them without measuring again.

The tuning cache lives in ``$SPARSEKERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparsekernels``, else
``~/.cache/sparsekernels``, in the file :data:`CACHE_FILE`. Decisions are grouped by an *environment
key* (device name + torch / triton / sparsekernels versions, see :func:`sparsekernels.environment.environment_key`): a
decision measured on one GPU or library version is never reused on another. Writers take an
exclusive ``fcntl`` lock on a side file, re-read the cache, merge their entry and replace the file
atomically (``os.replace``), so concurrent processes never lose each other's entries and readers
never see a torn file.

No measuring happens while ``torch.compile`` traces (``torch.compiler.is_compiling()``) or while a
CUDA graph is being captured: then :func:`select` returns the cached decision, or ``default`` when
there is none. Which candidates exist, and when the dispatcher is asked at all, is the routing module's
business (:mod:`sparsekernels.ops.routing`); this module only measures and remembers.

The cache file is read as untrusted input: it is parsed with limits and checked against a schema
(:data:`CACHE_SCHEMA`) before any decision is taken from it. A file that fails (not JSON, another format version,
a field of the wrong type or out of range, too large) is never rewritten: this process warns once, leaves the file
as it is and keeps its decisions in memory.

Tests and benchmarks may inject a timer (:func:`use_timer`), and may call :func:`select` with CPU
callables: the dispatcher itself is device-agnostic.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

from ..environment import environment_key
from ..schema import SchemaError, constant, integer, mapping, number, parse_json, record, string
from ..timing import Timing, time_fn

__all__ = [
    "select",
    "Decision",
    "lookup",
    "decisions",
    "record",
    "use_timer",
    "set_timer",
    "reset",
    "cache_dir",
    "cache_path",
    "timing_allowed",
    "choose",
    "CACHE_ENV",
    "CACHE_FILE",
    "CACHE_SCHEMA",
    "MAX_CACHE_BYTES",
    "NOISE_REL",
]

CACHE_ENV = "SPARSEKERNELS_CACHE_DIR"
CACHE_FILE = "tuning-v1.json"
_FORMAT = 1

# A sparse candidate replaces dense only when its median is faster than dense's by more than this
# fraction of dense's median (and by more than half the two interquartile ranges). 2 % sits above the
# run-to-run spread of CUDA-event medians with an L2 flush (typically < 1 %), and keeps every
# dispatched layer within the 0.97x-of-dense target even when a measurement is slightly optimistic.
NOISE_REL = 0.02
DENSE = "dense"

# Timing budget per candidate. On a GPU time_fn repeats until ~100 ms of runs are taken.
_WARMUP = 3
_REP = 10
_MAX_TIME_S = 2.0

Timer = Callable[[str, Callable[[], object], torch.device], "Timing | float"]

# Limits of the tuning cache file: far above what tuning ever writes (a few hundred entries per model and GPU).
MAX_CACHE_BYTES = 64 << 20
_MAX_ENVIRONMENTS = 1024
_MAX_ENTRIES = 1 << 16
_MAX_CANDIDATES = 16
_MS = number(0.0, 1e9)
_NAME = string(64)
_TIMING_SCHEMA = record(
    {"median_ms": _MS, "p25_ms": _MS, "p75_ms": _MS, "min_ms": _MS, "n": integer(1, 1 << 31)},
    optional={"iqr_ms": number(-1e9, 1e9)},
)
_DECISION_SCHEMA = record({
    "choice": _NAME,
    "timings": mapping(_NAME, _TIMING_SCHEMA, _MAX_CANDIDATES),
    "errors": mapping(_NAME, string(4096), _MAX_CANDIDATES),
    "measured_at": string(64),
})
CACHE_SCHEMA = record({
    "format": constant(_FORMAT),
    "environments": mapping(string(1024), mapping(string(4096), _DECISION_SCHEMA, _MAX_ENTRIES), _MAX_ENVIRONMENTS),
})


@dataclass(frozen=True)
class Decision:
    """One dispatch decision.

    Attributes:
        op: the op name, e.g. ``"sparse24_linear"``.
        key: the shape bucket as a JSON string (the ``key`` tuple given to :func:`select`).
        choice: the chosen candidate.
        timings: candidate -> measured :class:`~sparsekernels.timing.Timing` (milliseconds).
        errors: candidate -> error message, for candidates that raised while being measured.
        environment: the environment key the decision belongs to (device name and versions).
        source: ``"measured"`` (this process measured it) or ``"cache"`` (read from the tuning cache).
        measured_at: UTC time of the measurement, ISO 8601.
    """

    op: str
    key: str
    choice: str
    timings: Mapping[str, Timing] = field(default_factory=dict)
    errors: Mapping[str, str] = field(default_factory=dict)
    environment: str = ""
    source: str = "measured"
    measured_at: str = ""

    def speedup_over_dense(self) -> float | None:
        """Dense median / chosen median, or None when dense was not measured."""
        if DENSE not in self.timings or self.choice not in self.timings:
            return None
        return self.timings[DENSE].median_ms / self.timings[self.choice].median_ms

    def to_json(self) -> dict:
        return {
            "choice": self.choice,
            "timings": {name: t.as_dict() for name, t in self.timings.items()},
            "errors": dict(self.errors),
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_json(cls, op: str, key: str, environment: str, data: dict) -> "Decision":
        """A decision from its :meth:`to_json` form, already checked against the cache schema."""
        timings = {name: Timing(t["median_ms"], t["p25_ms"], t["p75_ms"], t["min_ms"], t["n"])
                   for name, t in data["timings"].items()}
        return cls(op=op, key=key, choice=data["choice"], timings=timings, errors=dict(data["errors"]),
                   environment=environment, source="cache", measured_at=data["measured_at"])


# ----------------------------------------------------------------------------------------------------
# State. ``_memo`` is the fast path every op call takes: (op, key, device) -> (choice, candidates considered).
_lock = threading.RLock()
_memo: dict[tuple, str] = {}
_decisions: dict[tuple[str, str, str], Decision] = {}  # (environment, op, key json) -> Decision
_disk: dict[str, dict] = {}  # cache file path -> its parsed "environments" mapping, loaded once
_recorders: list[list] = []
_timer: Timer | None = None
_warned_unwritable: set[str] = set()
_unusable: dict[str, str] = {}  # cache file path -> why this process neither reads nor rewrites it


def reset() -> None:
    """Forget every in-memory decision and the loaded cache file (the next call re-reads the disk).

    This is what a new process sees; tests use it to simulate a restart.
    """
    with _lock:
        _memo.clear()
        _decisions.clear()
        _disk.clear()
        _unusable.clear()


# ----------------------------------------------------------------------------------------------------
# Keys and paths


def cache_dir() -> str:
    """The tuning-cache folder: ``$SPARSEKERNELS_CACHE_DIR``, ``$XDG_CACHE_HOME/sparsekernels`` or
    ``~/.cache/sparsekernels``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "sparsekernels")


def cache_path() -> str:
    """The tuning-cache file (JSON)."""
    return os.path.join(cache_dir(), CACHE_FILE)


def _atom(x):
    if isinstance(x, bool) or x is None or isinstance(x, (int, float, str)):
        return x
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, tuple):
        return [_atom(v) for v in x]
    raise TypeError(
        "select(): expected the key to hold only int, float, str, bool, None, torch.dtype, torch.device or "
        f"nested tuples of them, got an element of type {type(x).__name__}: {x!r}"
    )


def _key_json(key: tuple) -> str:
    return json.dumps(_atom(key), separators=(",", ":"))


def _resolve_device(device) -> torch.device:
    if device is None:
        # The ops call select() on CUDA only, with CUDA initialised by their inputs.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------------------------------
# Timing


def timing_allowed() -> bool:
    """False while ``torch.compile`` traces or while the current CUDA stream captures a graph."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _default_timer(name: str, fn: Callable[[], object], device: torch.device) -> Timing:
    return time_fn(fn, device=device, warmup=_WARMUP, rep=_REP, max_time_s=_MAX_TIME_S)


def set_timer(timer: Timer | None) -> Timer | None:
    """Replace the timer used to measure candidates; ``None`` restores the default. Returns the previous one.

    A timer is called as ``timer(name, fn, device)`` and returns a
    :class:`~sparsekernels.timing.Timing` or a median in milliseconds (a float).
    """
    global _timer
    if timer is not None and not callable(timer):
        raise TypeError(f"set_timer(): expected a callable or None, got {type(timer).__name__}")
    with _lock:
        previous, _timer = _timer, timer
    return previous


@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[None]:
    """Context manager form of :func:`set_timer` (restores the previous timer on exit)."""
    previous = set_timer(timer)
    try:
        yield
    finally:
        set_timer(previous)


def _as_timing(value) -> Timing:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        value = Timing(v, v, v, v, 1)
    if not isinstance(value, Timing):
        raise TypeError(f"select(): expected the timer to return a Timing or a float (ms), got {type(value).__name__}")
    try:  # what is measured must be what the cache schema accepts on the next read
        _TIMING_SCHEMA(value.as_dict(), "")
    except SchemaError as exc:
        raise ValueError(f"select(): expected the timer to return finite, non-negative times, got {value}: {exc}") \
            from None
    return value


def choose(timings: Mapping[str, Timing]) -> str:
    """The fastest candidate, except that ``"dense"`` stays unless beaten by more than the noise.

    Args:
        timings: candidate name -> :class:`Timing` (at least one).

    Returns:
        The chosen name. A non-dense candidate wins over ``"dense"`` only if its median is below
        ``dense.median - max(NOISE_REL * dense.median, (dense.iqr + candidate.iqr) / 2)``.
    """
    if not timings:
        raise ValueError("choose(): expected at least one measured candidate, got none")
    fastest = min(timings, key=lambda n: (timings[n].median_ms, n != DENSE))
    if fastest == DENSE or DENSE not in timings:
        return fastest
    dense, best = timings[DENSE], timings[fastest]
    margin = max(NOISE_REL * dense.median_ms, 0.5 * (dense.iqr_ms + best.iqr_ms))
    return fastest if best.median_ms < dense.median_ms - margin else DENSE


def _measure(op: str, key: str, env: str, candidates: Mapping[str, Callable], device: torch.device) -> Decision:
    timer = _timer or _default_timer
    timings: dict[str, Timing] = {}
    errors: dict[str, str] = {}
    first_error: BaseException | None = None
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                measured = timer(name, fn, device)
            except Exception as exc:  # a backend that cannot run this shape is excluded, and recorded
                errors[name] = f"{type(exc).__name__}: {exc}"[:4096]
                first_error = first_error or exc
                continue
            timings[name] = _as_timing(measured)
    if not timings:
        raise RuntimeError(
            f"select(): every candidate of {op} {key} failed on {device}: {errors}"
        ) from first_error
    return Decision(
        op=op,
        key=key,
        choice=choose(timings),
        timings=timings,
        errors=errors,
        environment=env,
        source="measured",
        measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# ----------------------------------------------------------------------------------------------------
# The tuning cache on disk


def _read_cache(path: str) -> tuple[dict, str | None]:
    """The checked ``environments`` of the cache file and None; ``{}`` and None when there is no file; ``{}`` and
    the reason when there is a file this process must neither use nor rewrite."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CACHE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return {}, None
    except OSError as exc:
        return {}, f"cannot be read ({exc})"
    try:
        data = CACHE_SCHEMA(parse_json(raw, max_bytes=MAX_CACHE_BYTES, what="the file"), "")
        for env, entries in data["environments"].items():
            for entry, decision in entries.items():
                if decision["choice"] not in decision["timings"]:
                    raise SchemaError(f"environments.{env}.{entry}.choice",
                                      f"expected one of the measured candidates, got {decision['choice']!r}")
    except SchemaError as exc:
        return {}, str(exc)
    return data["environments"], None


def _mark_unusable(path: str, reason: str) -> None:
    if path not in _unusable:
        _unusable[path] = reason
        warnings.warn(
            f"sparsekernels: ignoring the tuning cache {path}: {reason}. The file is left as it is and this process "
            "keeps its decisions in memory; move or delete the file to let sparsekernels write a new one.",
            RuntimeWarning,
            stacklevel=4,
        )


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: atomic replace only (a concurrent writer may drop an entry)
        yield
        return
    with open(path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _disk_store(path: str) -> dict:
    store = _disk.get(path)
    if store is None:
        store, problem = _read_cache(path)
        if problem is not None:
            _mark_unusable(path, problem)
        _disk[path] = store
    return store


def _persist(path: str, decision: Decision) -> None:
    if path in _unusable:
        return
    entry = f"{decision.op}|{decision.key}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path + ".lock"):
            envs, problem = _read_cache(path)  # merge with what other processes wrote meanwhile
            if problem is not None:
                _mark_unusable(path, problem)
                return
            envs.setdefault(decision.environment, {})[entry] = decision.to_json()
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": _FORMAT, "environments": envs}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _disk[path] = envs
    except OSError as exc:
        if path not in _warned_unwritable:
            _warned_unwritable.add(path)
            warnings.warn(
                f"sparsekernels: cannot write the tuning cache {path} ({exc}); decisions are kept in memory only. "
                f"Set {CACHE_ENV} to a writable folder.",
                RuntimeWarning,
                stacklevel=3,
            )


def _cached_decision(path: str, env: str, op: str, key: str) -> Decision | None:
    decision = _decisions.get((env, op, key))
    if decision is not None:
        return decision
    data = _disk_store(path).get(env, {}).get(f"{op}|{key}")
    if data is None:
        return None
    decision = Decision.from_json(op, key, env, data)
    _decisions[(env, op, key)] = decision
    return decision


# ----------------------------------------------------------------------------------------------------
# Public entry points


def select(
    op: str,
    key: tuple,
    candidates: Mapping[str, Callable[[], torch.Tensor]],
    *,
    default: str,
    device: torch.device | str | None = None,
) -> str:
    """Name of the fastest candidate for ``(op, key, device)``, measuring once and caching.

    Args:
        op: the op's name, e.g. ``"sparse24_linear"``.
        key: the shape bucket, a tuple of int / float / str / bool / None / torch.dtype (e.g.
            ``(m_bucket, n, k, torch.float16, has_bias)``). Everything that changes which backend is
            fastest belongs in it; the device does not (it is added here).
        candidates: backend name -> zero-argument callable computing the op with that backend (its
            result is discarded). Called many times while measuring; never called on a cache hit.
        default: the name returned when there is no decision yet and timing is not allowed
            (``torch.compile`` tracing, CUDA-graph capture). Must be one of ``candidates``.
        device: where the candidates run; default: the current CUDA device if CUDA is initialised,
            else the CPU.

    Returns:
        The chosen candidate name (a key of ``candidates``).

    Raises:
        TypeError: ``op`` not a str, ``key`` not a tuple (or holding other types), ``candidates`` not a
            mapping of callables, or the injected timer returning something else than a Timing / float.
        ValueError: no candidates, or ``default`` not among them.
        RuntimeError: every candidate raised while being measured.
    """
    dev = _resolve_device(device)
    memo_key = (op, key, dev)
    if _recorders:
        for rec in _recorders:
            rec.append((op, key, dev))
    try:
        hit = _memo.get(memo_key)
    except TypeError:  # unhashable key: validated (and rejected) below
        hit = None
    if hit is not None and hit[0] in candidates and hit[1].issuperset(candidates):
        return hit[0]
    return _select_slow(op, key, candidates, default, dev, memo_key)


def _select_slow(op, key, candidates, default, dev, memo_key) -> str:
    if not isinstance(op, str) or not op:
        raise TypeError(f"select(): expected op to be a non-empty str, got {op!r}")
    if not isinstance(key, tuple):
        raise TypeError(f"select(): expected key to be a tuple, got {type(key).__name__}")
    if not isinstance(candidates, Mapping):
        raise TypeError(f"select(): expected candidates to be a mapping name -> callable, got {type(candidates).__name__}")
    if len(candidates) == 0:
        raise ValueError("select(): expected at least one candidate, got an empty mapping")
    for name, fn in candidates.items():
        if not isinstance(name, str) or not callable(fn):
            raise TypeError(f"select(): expected candidates to map str -> callable, got {name!r} -> {type(fn).__name__}")
        if not name or len(name) > 64:
            raise ValueError(f"select(): expected candidate names of 1 to 64 characters, got {name!r}")
    if len(candidates) > _MAX_CANDIDATES:
        raise ValueError(f"select(): expected at most {_MAX_CANDIDATES} candidates, got {len(candidates)}")
    if default not in candidates:
        raise ValueError(f"select(): expected default to be one of {sorted(candidates)}, got {default!r}")
    key_json = _key_json(key)
    if len(op) + 1 + len(key_json) > 4096:
        raise ValueError(f"select(): expected op and key to take at most 4096 characters in JSON, got {op!r} "
                         f"{key_json}")
    with _lock:
        env = environment_key(dev)
        path = cache_path()
        decision = _cached_decision(path, env, op, key_json)
        considered = set(decision.timings) | set(decision.errors) if decision is not None else set()
        if decision is not None and decision.choice in candidates and set(candidates) <= considered:
            _memo[memo_key] = (decision.choice, frozenset(considered))
            return decision.choice
        if not timing_allowed():
            # Not now; a cached decision over another candidate set is still better than nothing.
            if decision is not None and decision.choice in candidates:
                return decision.choice
            return default
        decision = _measure(op, key_json, env, candidates, dev)
        _decisions[(env, op, key_json)] = decision
        _memo[memo_key] = (decision.choice, frozenset(decision.timings) | frozenset(decision.errors))
        _persist(path, decision)
        return decision.choice


def lookup(op: str, key: tuple, *, device: torch.device | str | None = None) -> Decision | None:
    """The decision for ``(op, key, device)`` -- in memory or in the tuning cache -- or None."""
    dev = _resolve_device(device)
    with _lock:
        return _cached_decision(cache_path(), environment_key(dev), op, _key_json(key))


def decisions() -> list[Decision]:
    """Every decision this process has measured or read from the cache so far."""
    with _lock:
        return list(_decisions.values())


@contextlib.contextmanager
def record() -> Iterator[list]:
    """Collect every ``(op, key, device)`` passed to :func:`select` inside the block (used by ``tune``)."""
    log: list = []
    with _lock:
        _recorders.append(log)
    try:
        yield log
    finally:
        with _lock:
            _recorders.remove(log)
