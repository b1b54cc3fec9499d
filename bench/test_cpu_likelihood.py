"""CPU likelihood: ``sf.log_likelihood`` vs score_sde's scipy ``solve_ivp`` loop, same run.

The 2-D mixture ring under the VP SDE has an exact log p_eps, so each row carries the NFE, the time
per NFE and the error of the batch-mean NLL against the exact value (both use the exact p_T as
prior and one fixed Rademacher probe per sample; the Hutchinson Monte-Carlo error of the mean,
``mc_floor``, is given beside it).  The exact-divergence row shows the error without probes.
"""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from bench.baselines import score_sde
from bench.conftest import QUICK
from scorefast.sde import VPSDE

B = 64 if QUICK else 256
EPS = 1e-5
_cache: dict = {}


def _setup():
    if not _cache:
        gm = sf.testing.GaussianMixture.builtin()
        sde = VPSDE()
        x = gm.sample(B, seed=0).float()
        exact = -gm.log_prob(x.double(), torch.full((B,), EPS, dtype=torch.float64), sde)
        prior = lambda z: gm.log_prob(z.double(), torch.full((z.shape[0],), sde.T, dtype=torch.float64), sde)  # noqa: E731
        _cache.update(gm=gm, sde=sde, x=x, exact=exact, prior=prior, score=gm.score_fn(sde))
    return _cache


def _ours(tol, divergence):
    c = _setup()

    def run():
        nll, _, nfe = sf.log_likelihood(
            c["score"],
            c["sde"],
            c["x"],
            eps=EPS,
            divergence=divergence,
            rtol=tol,
            atol=tol,
            seed=0,
            prior_logp=c["prior"],
            return_nfe=True,
        )
        return nll, int(nfe.max()) if isinstance(nfe, torch.Tensor) else int(nfe)

    return run


def _theirs(tol):
    c = _setup()

    def run():
        torch.manual_seed(0)
        return score_sde.likelihood(c["score"], c["sde"], c["x"], rtol=tol, atol=tol, eps=EPS, prior_logp=c["prior"])

    return run


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
@pytest.mark.parametrize("role", ["eager", "fused", "fused_exact"])
def test_likelihood(record, role, tol):
    c = _setup()
    fn = _theirs(tol) if role == "eager" else _ours(tol, "exact" if role == "fused_exact" else "hutchinson")
    nll, nfe = fn()
    err = (nll.double().mean() - c["exact"].mean()).abs().item()
    record(
        fn,
        name="log_likelihood" if role != "eager" else "score_sde likelihood (scipy RK45)",
        backend="torch" if role == "eager" else "cpu",
        dtype=torch.float32,
        size=B,
        group=f"likelihood-tol{tol:g}",
        role="fused" if role == "fused" else role,
        rounds=3,
        nfe=nfe,
        peer="score_sde get_likelihood_fn (scipy solve_ivp)" if role == "eager" else None,
        divergence="exact" if role == "fused_exact" else "hutchinson",
        rtol=tol,
        abs_err_mean_nll=err,
        mc_floor=(nll.double() - c["exact"]).std().item() / math.sqrt(B) if role != "fused_exact" else None,
    )
