"""One tolerance table for every kernel test: relative error ||out - ref|| / ||ref|| against a float64
reference. A sparse kernel may be at most about twice as far from float64 as the dense PyTorch op at
the same precision; these bounds are that rule's ceiling."""
import torch

RTOL = {
    torch.float32: 1e-5,
    "tf32": 5e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in float64."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype, factor: float = 1.0) -> None:
    """Assert ``out`` is within the dtype's relative tolerance (times ``factor``) of ``ref``."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out.to(torch.float32)).all(), "output has NaN/Inf (an element left unwritten?)"
    err = rel_error(out, ref)
    tol = RTOL[dtype] * factor
    assert err <= tol, f"relative error {err:.3e} exceeds {tol:.1e} for {dtype}"
