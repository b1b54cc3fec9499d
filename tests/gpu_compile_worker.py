"""Compile every Triton kernel for real GPUs on a machine without one (run by test_gpu_compile.py).

The interpreter (``TRITON_INTERPRET=1``, what CI runs) executes kernels as NumPy, so it accepts
code that the compiler rejects (globals that are not ``tl.constexpr(...)``, type mixes) and
it never shows the PTX.  Here the launchers in ``scorefast.kernels`` run as they do on a GPU,
with the same arguments, but ``kernel[grid](...)`` only compiles (Triton's own warm-up path)
for a fake driver whose target is sm_80 or sm_90.  Triton then types and specialises the
arguments exactly as it would on the device, runs its whole pipeline and ``ptxas``.

Prints one JSON line: for each (kernel, arch, specialisation) its launch grid, its PTX instruction
census and whether a cubin came out.  Run in a fresh process: it replaces Triton's active driver.
"""

from __future__ import annotations

import json
import math
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# instructions whose presence in noise code would break the contract (DESIGN.md: no fast math)
APPROX = ("sin.approx", "cos.approx", "lg2.approx", "ex2.approx", "sqrt.approx", "rsqrt.approx", "div.approx")
ROUNDED = ("sqrt.rn.f32", "div.rn.f32")


class _CompileOnlyDriver:
    """Just enough of a Triton driver for compilation: a target, a device and a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _census(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    ops = {name: len(re.findall(re.escape(name), ptx)) for name in APPROX + ROUNDED}
    return {"cubin_bytes": len(kernel.asm.get("cubin", b"")), "ops": ops}


def _cases():
    """(label, thunk) for each launcher configuration a backend uses."""
    from scorefast.backends.triton_backend import _COMPILED_GROUPS
    from scorefast.kernels import fused_update, noise, snr_langevin_step, sumsq_norms

    B, D = 3, 37
    ids = torch.arange(B, dtype=torch.int64)
    seed_t, step_t = torch.tensor(2**40 + 5), torch.tensor(7)
    # ints 1 and 1: the common small seed, and the value Triton would specialise into a constant;
    # "wide" ints take the uint64 / int64 argument types, for one case of each launcher
    counters = {"ones": (1, 1), "tensors": (seed_t, step_t), "wide": (2**63 + 11, 2**40 + 7)}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    max_elements = 4 * _COMPILED_GROUPS

    def update(x, terms, coefs, ids, seed, step, with_noise, out=None):
        out = torch.empty_like(x) if out is None else out
        return fused_update.fused_update(out, x, terms, coefs, ids, seed, step, 1, with_noise, _COMPILED_GROUPS)

    def norms(t, ids, seed, step, size, make=torch.zeros):
        """sumsq_norms of t [n, size] (None: the noise's alone), out and scratch made by ``make``."""
        n = ids.shape[0]
        out, partial = make(2, n), make(2, n, sumsq_norms.n_tiles_for(size, max_elements))
        return sumsq_norms.sumsq_norms(out, partial, t, ids, seed, step, size, 2, True, max_elements)

    for cname, (seed, step) in counters.items():
        every = cname != "wide"
        for kind in (0, 1, 2) if every else (1,):
            out = torch.empty(B, D)
            yield (
                f"noise kind={kind} {cname}",
                lambda o=out, s=seed, k=step, kd=kind: noise.fill_noise(o, ids, s, k, 3, 5, kd, _COMPILED_GROUPS),
            )
        pairs = (("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"), ("fp16", "fp16"))
        for xname, tname in pairs if every else pairs[:1]:
            tdtype = dtypes[tname]
            for n_terms in range(fused_update.MAX_TERMS + 1) if every else (1,):
                for with_noise in (False, True) if every else (True,):
                    x = torch.zeros(B, D, dtype=dtypes[xname])
                    terms = [torch.zeros(B, D, dtype=tdtype) for _ in range(n_terms)]
                    coefs = torch.zeros(n_terms + 2, 1 if with_noise else B)  # a shared column, or per sample
                    yield (
                        f"fused_update x={xname} terms={n_terms} {tname} noise={with_noise} {cname}",
                        lambda x=x, t=terms, c=coefs, s=seed, k=step, w=with_noise: update(x, t, c, ids, s, k, w),
                    )
        inputs = (("fp32", D), ("none", D), ("bf16", D), ("fp16", D), ("fp32", 5000))  # 5000: 5 tiles
        for tname, size in inputs if every else inputs[:1]:
            t = None if tname == "none" else torch.zeros(B, size, dtype=dtypes[tname])
            yield (
                f"sumsq_norms t={tname} D={size} {cname}",
                lambda t=t, s=seed, k=step, size=size: norms(t, ids, s, k, size),
            )
    # B = D = 1 (and an element offset of 1): every size argument Triton would make a constant
    one = torch.arange(1, dtype=torch.int64)
    yield (
        "noise kind=1 B=1 D=1 ones",
        lambda: noise.fill_noise(torch.empty(1, 1), one, 1, 1, 3, 1, 1, _COMPILED_GROUPS),
    )
    yield (
        "fused_update x=fp32 terms=1 fp32 noise=True B=1 D=1 ones",
        lambda: update(torch.zeros(1, 1), [torch.zeros(1, 1)], torch.zeros(3, 1), one, 1, 1, True),
    )
    yield ("sumsq_norms t=fp32 D=1 B=1 ones", lambda: norms(torch.zeros(1, 1), one, 1, 1, 1))
    # rows that start 4 bytes past an allocation (x[1:] of a contiguous batch): pointers Triton
    # cannot assume 16-byte aligned, so it compiles unvectorised variants

    def offset(*shape, dtype=torch.float32):
        return torch.zeros(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)

    yield ("noise kind=1 misaligned ones", lambda: noise.fill_noise(offset(B, D), ids, 1, 1, 3, 0, 1, _COMPILED_GROUPS))
    yield (
        "fused_update x=fp32 terms=2 bf16 noise=True misaligned ones",
        lambda: update(
            offset(B, D),
            [offset(B, D, dtype=torch.bfloat16), offset(B, D, dtype=torch.bfloat16)],
            offset(4, 1),
            ids,
            1,
            1,
            True,
            out=offset(B, D),
        ),
    )
    yield (
        "sumsq_norms t=bf16 D=37 misaligned ones",
        lambda: norms(offset(B, D, dtype=torch.bfloat16), ids, 1, 1, D, make=offset),
    )
    # the step ops: a coefficient table read at a device row, the Philox step n*S + j made in-kernel,
    # ids = arange(B) made in-kernel, the non-finite flag (atomic compare-and-swap)
    row_t, flag_t = torch.tensor(3), torch.tensor(-1)
    step_forms = {
        "tensors": dict(seed=seed_t, step=row_t, draws=3, draw=2),
        "ones": dict(seed=1, step=1, draws=1, draw=1),
    }
    for cname, form in step_forms.items():
        for xname, tname in (("fp32", "fp32"), ("fp32", "bf16"), ("fp16", "fp16")):
            x = torch.zeros(B, D, dtype=dtypes[xname])
            terms = [torch.zeros(B, D, dtype=dtypes[tname]) for _ in range(2)]
            yield (
                f"fused_update table x={xname} terms=2 {tname} noise=True {cname}",
                lambda x=x, t=terms, f=form: fused_update.fused_update(
                    torch.empty_like(x), x, t, torch.zeros(6, 4), None, f["seed"], f["step"], 0, True,
                    _COMPILED_GROUPS, row=row_t, draws=f["draws"], draw=f["draw"], flag=flag_t,
                ),
            )  # fmt: skip
    yield (
        "fused_update x=fp32 terms=1 fp32 noise=False flag=True per-sample ones",
        lambda: fused_update.fused_update(
            torch.empty(B, D), torch.zeros(B, D), [torch.zeros(B, D)], torch.zeros(3, B), ids, 1, 1, 0, False,
            _COMPILED_GROUPS, flag=flag_t,
        ),
    )  # fmt: skip

    def snr(size, alpha, form, x_dtype=torch.float32, score_dtype=torch.float32, flag=None):
        x = torch.zeros(B, size, dtype=x_dtype)
        alphas = {"none": (None, (0, 0), None), "batch": (torch.zeros(B), (0, 1), None)}
        alphas["table"] = (torch.zeros(9), (1, 0), row_t)
        a, strides, row = alphas[alpha]
        n = snr_langevin_step.scratch_floats(B, size, max_elements)
        return snr_langevin_step.snr_langevin_step(
            torch.empty_like(x), torch.empty(B), x, torch.zeros(B, size, dtype=score_dtype), a, strides, 0.05,
            None if alpha == "table" else ids, form["seed"], form["step"], 0, max_elements,
            torch.zeros(n) if n else None, row=row, draws=form["draws"], draw=form["draw"], flag=flag,
        )  # fmt: skip

    for size in (37, 8193):  # one kernel; partial sums + step sizes + update
        yield (
            f"snr_langevin_step D={size} alpha=table noise=True tensors",
            lambda size=size: snr(size, "table", step_forms["tensors"], flag=flag_t),
        )
        yield (
            f"snr_langevin_step D={size} alpha=none noise=True ones",
            lambda size=size: snr(size, "none", step_forms["ones"]),
        )
    yield (
        "snr_langevin_step D=300 x=bf16 score=fp16 alpha=batch noise=True ones",
        lambda: snr(300, "batch", step_forms["ones"], torch.bfloat16, torch.float16),
    )
    # one sample of more elements than 65535 tiles hold (a grid axis past x is limited to 65535);
    # torch.empty maps the 2 x 268 MB without touching it, and a compile-only launch reads none of it
    big = 65535 * max_elements + 5
    yield (f"sumsq_norms t=fp32 D={big} ones", lambda: norms(torch.empty(2, big), ids[:2], 1, 0, big))


def main(archs: list[int]) -> None:
    compiled: list = []
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, list(grid), kernel))
        return kernel

    JITFunction.run = compile_only
    report = []
    for arch in archs:
        driver.set_active(_CompileOnlyDriver(arch))
        for label, launch in _cases():
            compiled.clear()
            launch()
            for name, grid, kernel in compiled:
                report.append({"arch": arch, "case": label, "kernel": name, "grid": grid, **_census(kernel)})
    print(json.dumps({"triton": triton.__version__, "report": report}))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
