"""Everything observable about a model, to check that a failed operation left it exactly as it was.

Written independently of :mod:`pruning.transaction` (the code under test): it records, for every submodule
(shared ones under each name), its class, train / eval flag, attribute names and plain attribute values, every
hook dict, and for every parameter and buffer its identity, values, dtype, ``requires_grad``, and its ``.grad``
(identity and values).
"""
import torch

# every hook dict an nn.Module of the installed torch has (found, not listed, so the list cannot fall behind)
HOOK_DICTS = tuple(sorted(name for name, value in vars(torch.nn.Module()).items()
                          if "hook" in name and isinstance(value, dict)))
_PLAIN = (bool, int, float, str, tuple, type(None))


def _tensor(t: torch.Tensor) -> tuple:
    grad = t.grad if t.is_leaf else None
    return (id(t), t.detach().clone(), t.dtype, t.requires_grad, id(grad) if grad is not None else None,
            grad.detach().clone() if grad is not None else None)


def model_state(*models) -> dict:
    """A comparable record of ``models`` (see the module docstring)."""
    state = {}
    for i, model in enumerate(models):
        for name, m in model.named_modules(remove_duplicate=False):
            key = f"{i}:{name}"
            state[f"{key} class"] = type(m)
            state[f"{key} training"] = m.training
            state[f"{key} attributes"] = sorted(m.__dict__)
            state[f"{key} plain"] = {k: v for k, v in m.__dict__.items() if isinstance(v, _PLAIN)}
            for hooks in HOOK_DICTS:
                state[f"{key} {hooks}"] = [(k, id(v)) for k, v in getattr(m, hooks, {}).items()]
            state[f"{key} children"] = [(k, id(v)) for k, v in m._modules.items()]
            state[f"{key} non-persistent"] = sorted(m._non_persistent_buffers_set)
            for kind, store in (("param", m._parameters), ("buffer", m._buffers)):
                for attr, t in store.items():
                    state[f"{key} {kind} {attr}"] = None if t is None else _tensor(t)
    return state


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
                and torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def assert_same_state(before: dict, after: dict) -> None:
    """Fail with the first few differences between two :func:`model_state` records."""
    diffs = sorted(set(before) ^ set(after))
    diffs += [k for k in before if k in after and not _same(before[k], after[k])]
    assert not diffs, f"the model changed: {diffs[:8]}"
