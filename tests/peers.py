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
