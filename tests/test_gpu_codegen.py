"""GPU code generation without a GPU: compile every Triton kernel for Hopper (sm_90) and Ampere (sm_80), the 2:4
kernels both without and with their input-permutation gather (``HAS_PERM``).

The interpreter tests check indexing and arithmetic, not whether Triton can lower a kernel to PTX: an op the
GPU backend rejects, a layout it cannot convert or a shared-memory overflow only shows up in a real compile.
``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin through the bundled ptxas) on the CPU, so we compile the kernels for the GPU configurations they
autotune over and check that fp16 / bf16 tiles reach the tensor cores (``mma`` in the PTX).

The compile runs in a subprocess because the test session sets ``TRITON_INTERPRET=1``, under which
``triton.jit`` builds interpreter functions instead of compilable ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _compile(fn, signature: dict, constexprs: dict, target, num_warps: int, num_stages: int) -> str:
    import triton
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    missing = [n for n in names if n not in signature]
    assert not missing, f"no signature entry for {missing}"
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"]


def _signature(fn, pointers: dict, constexpr_names) -> dict:
    return {
        n: ("constexpr" if n in constexpr_names else pointers.get(n, "i32"))
        for n in fn.arg_names
    }


def _cases(dtypes=tuple(DTYPES)):
    """(kernel name, dtype name, JIT fn, signature, constexprs, warps, stages) for the configs we ship."""
    from sparsekernels.ops import blocksparse_linear as B
    from sparsekernels.ops import sparse24_conv2d as C
    from sparsekernels.ops import sparse24_linear as L

    lin = L._sparse24_linear_kernel
    conv = C._sparse24_conv2d_kernel
    block = B._block_sparse_linear_kernel
    for dname in dtypes:
        ptr = DTYPES[dname]
        prec = "ieee" if dname == "fp32" else "tf32"
        # 2:4 Linear: the first config of both regimes, with and without split-K; the input-permutation gather in
        # the activation load on the few-token regime (without and with split-K) and on the many-token one.
        for regime, (bm, bn, bk, w, s) in enumerate(L.few_token_configs()[:1] + L.many_token_configs()[:1]):
            for split in (1, 4):
                for perm in (False, True) if regime == 0 or split == 1 else (False,):
                    ptrs = {"x_ptr": ptr, "v_ptr": ptr, "bias_ptr": ptr, "meta_ptr": "*u8", "perm_ptr": "*i64",
                            "y_ptr": "*fp32" if split > 1 else ptr}
                    consts = {"HAS_BIAS": split == 1, "HAS_PERM": perm, "SPLIT_K": split, "DOT_PRECISION": prec,
                              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                    name = "sparse24_linear_input_perm" if perm else "sparse24_linear"
                    yield (name, dname, lin, _signature(lin, ptrs, consts), consts, w, s)
        red = L._sparse24_splitk_reduce_kernel
        ptrs = {"ws_ptr": "*fp32", "bias_ptr": ptr, "y_ptr": ptr}
        consts = {"SPLIT_K": 4, "HAS_BIAS": True, "BLOCK": L._REDUCE_BLOCK}
        yield ("sparse24_splitk_reduce", dname, red, _signature(red, ptrs, consts), consts, 4, 1)
        # 2:4 Conv2d: implicit GEMM (3x3) and the 1x1 GEMM path, each without and with the input-channel gather.
        for bm, bn, bk, w, s in C.autotune_configs()[:1]:
            for kh, is_gemm in ((3, False), (1, True)):
                for perm in (False, True):
                    ptrs = {"x_ptr": ptr, "vals_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, "meta_ptr": "*u8",
                            "perm_ptr": "*i64"}
                    consts = {"KH": kh, "KW": kh, "IS_GEMM": is_gemm, "HAS_BIAS": True, "HAS_PERM": perm,
                              "INPUT_PRECISION": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                    name = "sparse24_conv2d_input_perm" if perm else "sparse24_conv2d"
                    yield (name, dname, conv, _signature(conv, ptrs, consts), consts, w, s)
        # Block-sparse Linear: block sizes 16 and 64.
        for bm, w, s in B.autotune_configs()[:1]:
            for bs in (16, 64):
                ptrs = {"x_ptr": ptr, "vals_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr,
                        "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32"}
                consts = {"HAS_BIAS": True, "BS": bs, "INPUT_PRECISION": prec, "BLOCK_M": bm}
                yield ("block_sparse_linear", dname, block, _signature(block, ptrs, consts), consts, w, s)


def main() -> None:
    from triton.backends.compiler import GPUTarget

    results = []
    # Every dtype for Hopper (the target); fp16 for Ampere, to keep the test under a minute.
    for arch, dtypes in ((90, ("fp16", "bf16", "fp32")), (80, ("fp16",))):
        target = GPUTarget("cuda", arch, 32)
        for name, dname, fn, sig, consts, warps, stages in _cases(dtypes):
            ptx = _compile(fn, sig, consts, target, warps, stages)
            results.append({"kernel": name, "dtype": dname, "arch": arch, "mma": "mma" in ptx,
                            "config": {k: v for k, v in consts.items() if k.startswith("BLOCK") or k == "BS"}})
    print(json.dumps(results))


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper_and_ampere_and_uses_tensor_cores():
    pytest.importorskip("triton")
    import inspect

    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this Triton's ASTSource predates the constexprs= argument (Triton < 3.3)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"compile failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in results}
    assert kernels == {"sparse24_linear", "sparse24_linear_input_perm", "sparse24_splitk_reduce", "sparse24_conv2d",
                       "sparse24_conv2d_input_perm", "block_sparse_linear"}
    assert {r["arch"] for r in results} == {80, 90}
    no_mma = [r for r in results
              if r["dtype"] in ("fp16", "bf16") and r["kernel"] != "sparse24_splitk_reduce" and not r["mma"]]
    assert not no_mma, f"fp16/bf16 tiles that do not reach the tensor cores: {no_mma}"


if __name__ == "__main__":
    main()
