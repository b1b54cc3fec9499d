"""CPU likelihood: ``sf.log_likelihood`` vs score_sde's scipy ``solve_ivp`` loop, same run.

The 2-D mixture ring under the VP SDE has an exact log p_eps, so each row carries the NFE (of the
hardest sample), the time per NFE and the error of the batch-mean NLL against the exact value.
Both sides use the exact p_T as prior and the same fixed Rademacher probe per sample (stream 1,
fp32 from the fast generator, handed to score_sde's loop in place of its torch.randint draw), so
they estimate the same integral: their errors compare, and ``mc_floor`` (the Hutchinson
Monte-Carlo error of the mean) is given beside them.  ``nfe`` is the hardest sample's (the batch's
evaluations), ``nfe_mean`` the mean over samples: with the per-sample norm, finished samples retire
from the batch, so the time follows the mean more than the maximum.  Ours runs with ``error_norm="sample"`` (the
default: every sample's error controlled on its own, batch-invariant) and ``"batch"`` (one norm
over the batch, scipy's rule), side by side at the same rtol = atol; ratios are score_sde's median
over ours, same run, in wall time, and ``ratio_cpu_paired`` the median ratio of CPU times with the
two run back to back in each round (robust to the VM's load).  The exact-divergence rows show the
solver's own error, without probes.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

import scorefast as sf
from bench.baselines import score_sde
from bench.conftest import QUICK, _results
from scorefast.sde import VPSDE

torch.set_num_threads(1)  # one thread: the paired ratio compares CPU times, each run's own work
B = 64 if QUICK else 256
PAIRED_ROUNDS = 3 if QUICK else 9
EPS = 1e-5
_cache: dict = {}
_medians: dict = {}


def _setup():
    if not _cache:
        gm = sf.testing.GaussianMixture.builtin()
        sde = VPSDE()
        x = gm.sample(B, seed=0).float()
        exact = -gm.log_prob(x.double(), torch.full((B,), EPS, dtype=torch.float64), sde)
        prior = lambda z: gm.log_prob(z.double(), torch.full((z.shape[0],), sde.T, dtype=torch.float64), sde)  # noqa: E731
        probe = sf.rademacher(x.shape, seed=0, stream=1)  # = log_likelihood's probe 0 for seed 0, step 0
        _cache.update(gm=gm, sde=sde, x=x, exact=exact, prior=prior, score=gm.score_fn(sde), probe=probe)
    return _cache


def _ours(tol, divergence, error_norm):
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
            error_norm=error_norm,
            return_nfe=True,
        )
        return nll, int(nfe.max()), float(nfe.double().mean())

    return run


def _theirs(tol):
    c = _setup()

    def run():
        nll, nfe = score_sde.likelihood(
            c["score"], c["sde"], c["x"], rtol=tol, atol=tol, eps=EPS, prior_logp=c["prior"], epsilon=c["probe"]
        )
        return nll, nfe, float(nfe)

    return run


ROLES = {  # role -> (divergence, error_norm); "fused" is the default call
    "eager": None,
    "fused": ("hutchinson", "sample"),
    "fused_batch": ("hutchinson", "batch"),
    "fused_exact": ("exact", "sample"),
    "fused_exact_batch": ("exact", "batch"),
}


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_likelihood(record, role, tol):
    c = _setup()
    divergence, error_norm = ROLES[role] or ("hutchinson", None)
    fn = _theirs(tol) if role == "eager" else _ours(tol, divergence, error_norm)
    nll, nfe, nfe_mean = fn()
    err = (nll.double().mean() - c["exact"].mean()).abs().item()
    row = record(
        fn,
        name="score_sde likelihood (scipy RK45)" if role == "eager" else f"log_likelihood, error_norm={error_norm}",
        backend="torch" if role == "eager" else "cpu",
        dtype=torch.float32,
        size=B,
        group=f"likelihood-tol{tol:g}",
        role=role,
        rounds=9,
        nfe=nfe,
        nfe_mean=nfe_mean,
        peer="score_sde get_likelihood_fn (scipy solve_ivp)" if role == "eager" else None,
        divergence=divergence,
        rtol=tol,
        abs_err_mean_nll=err,
        mc_floor=(nll.double() - c["exact"]).std().item() / math.sqrt(B) if divergence == "hutchinson" else None,
    )
    _medians[(tol, role)] = row["median_s"]
    if role == "fused_batch" and (tol, "eager") in _medians:  # bench.derive gives the "fused" row its ratio
        row["ratio_vs_eager"] = _medians[(tol, "eager")] / row["median_s"]
    if role in ("fused", "fused_batch"):
        row["ratio_cpu_paired"] = _paired_cpu_ratio(_theirs(tol), fn)
    _results().flush()


def _paired_cpu_ratio(theirs, ours, rounds: int = PAIRED_ROUNDS) -> float:
    """Median over rounds of score_sde's CPU time over ours, the two run back to back each round: one
    thread each, so the CPU time is each run's work, which the wall-clock medians of separate rows
    mix with the shared VM's load (their per-NFE wall time moved 2x between runs)."""
    ratios = []
    for _ in range(rounds):
        start = time.process_time()
        theirs()
        mid = time.process_time()
        ours()
        ratios.append((mid - start) / (time.process_time() - mid))
    return statistics.median(ratios)
