"""Load the peers' real packages for parity tests (DESIGN.md "Testing against the peers").

k-diffusion's package ``__init__`` pulls clip, wandb, scikit-image and a torchvision that does not
load beside the CPU torch, so its ``sampling.py`` and ``utils.py`` are loaded into a stand-in
package, with a stub ``torchvision.transforms.functional`` only while they load.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

_KD = None


def k_diffusion_sampling():
    """k-diffusion's real ``sampling`` module (skips the test if k-diffusion is not installed)."""
    global _KD
    if _KD is not None:
        return _KD
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion not installed (pip install --no-deps k-diffusion; see README)")
    root = Path(next(iter(spec.submodule_search_locations)))
    stubs = {}
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        stubs = {
            "torchvision": tv,
            "torchvision.transforms": tv.transforms,
            "torchvision.transforms.functional": tv.transforms.functional,
        }
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        pkg = types.ModuleType("_kd_standin")
        pkg.__path__ = [str(root)]
        sys.modules["_kd_standin"] = pkg
        for name in ("utils", "sampling"):
            sub = importlib.util.spec_from_file_location(f"_kd_standin.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(sub)
            sys.modules[sub.name] = module
            sub.loader.exec_module(module)
            setattr(pkg, name, module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    _KD = pkg.sampling
    return _KD


# -- diffusers: a float64 run of a stock scheduler, and the same noise for stock and ours -------------
class KeepFloat64(torch.overrides.TorchFunctionMode):
    """Inside, ``t.float()`` / ``t.to(torch.float32)`` of a float64 tensor keep it float64.

    diffusers' steps cast the sample to float32 in places (``sample.to(torch.float32)``); with the
    scheduler's tables made float64 (``tables_to_float64``) and float64 inputs, a stock scheduler then
    runs its own arithmetic in float64 end to end: the reference the parity tests measure against.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in ("to", "float") and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            if name == "float":
                return args[0]
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def tables_to_float64(scheduler) -> None:
    """The scheduler's float32 tables (sigmas, alphas_cumprod, ...) as float64 with the same values."""
    for key, value in vars(scheduler).items():
        if key != "timesteps" and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            setattr(scheduler, key, value.double())


def patch_diffusers_randn(monkeypatch, classes, randn) -> None:
    """Make these stock diffusers schedulers' modules draw noise with ``randn(shape, generator, device, dtype)``."""

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return randn(shape, generator, device or "cpu", dtype or torch.float32)

    for cls in classes:
        module = sys.modules[cls.__module__]
        if hasattr(module, "randn_tensor"):
            monkeypatch.setattr(module, "randn_tensor", randn_tensor)
