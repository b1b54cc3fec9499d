"""The quality suite's pieces (``scorefast.quality``) and its smoke run (``scorefast bench --suite quality --quick``).

Metrics against closed forms and scipy, the fast mixture score against ``GaussianMixture``'s own,
the digits classifier's determinism, accuracy and the order FD puts on real, degraded and noise
images, the NFE-to-quality summary on hand-made rows, and the quick suite end to end (every
registered sampler, the peers, the digits model, the table and the plot).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import scorefast as sf
from scorefast.bench import render_table
from scorefast.quality import TARGETS, digits, frechet_distance, grids, mc_floor, random_mixture, sliced_w1, suite
from scorefast.quality.report import adaptive_verdicts, annotate, plot_quality, quality_table, summary
from scorefast.quality.targets import ring
from scorefast.sde import EDM, VESDE, VPSDE
from scorefast.testing import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]


# -- metrics -------------------------------------------------------------------------------
def test_sliced_w1_in_one_dimension_is_w1_for_unequal_sizes_too():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 1, generator=g, dtype=torch.float64)
    b = torch.randn(1200, 1, generator=g, dtype=torch.float64) * 1.5 + 0.3
    expected = scipy_stats.wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy())
    assert sliced_w1(a, b, n_proj=4) == pytest.approx(expected, rel=1e-12)


def test_sliced_w1_of_a_shift_is_its_mean_projected_length():
    """Shifting a set by v: every projection moves by |u.v|, whose mean over directions in 2-D is 2|v|/pi."""
    a = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.tensor([0.6, -0.8], dtype=torch.float64)
    assert sliced_w1(a + v, a, n_proj=4000) == pytest.approx(2 / math.pi, rel=0.03)
    assert sliced_w1(a, a) == 0.0


def test_sliced_w1_bad_input_and_non_finite_samples():
    a = torch.zeros(8, 2)
    with pytest.raises(ValueError, match="b"):
        sliced_w1(a, torch.zeros(12, 2))
    with pytest.raises(ValueError, match="a, b"):
        sliced_w1(a, torch.zeros(8, 3))
    with pytest.raises(ValueError, match="n_proj"):
        sliced_w1(a, a, n_proj=0)
    assert sliced_w1(torch.full((8, 2), float("nan")), a) == math.inf


def test_floor_separates_the_ring_from_a_ring_of_the_wrong_radius():
    """At the suite's n = 4096 a further exact set stays within 1.5x the Monte-Carlo floor and a ring
    of 10% too large a radius does not (the floor is mostly the modes' multinomial weights)."""
    gm, wrong = ring(), ring(radius=4.4)
    n = 4096
    ref = gm.sample(n, seed=100)
    floor, spread = mc_floor(lambda s: gm.sample(n, seed=s), ref, range(4))
    assert 0 < spread < floor
    assert sliced_w1(gm.sample(n, seed=7), ref) < 1.5 * floor < sliced_w1(wrong.sample(n, seed=7), ref)


def test_frechet_distance_is_the_gaussian_formula_of_the_empirical_moments():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(2)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(300, 5, generator=g, dtype=torch.float64) + 0.5
    ma, mb = a.mean(0).numpy(), b.mean(0).numpy()
    sa, sb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    expected = ((ma - mb) ** 2).sum() + (sa + sb - 2 * linalg.sqrtm(sa @ sb).real).trace()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="a, b"):
        frechet_distance(a, b[:, :4])


# -- targets -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), EDM(), None], ids=["VP", "VE", "EDM", "data"])
def test_fast_score_and_log_prob_equal_the_mixture_formulas(name, sde):
    """One batch time (the fast path) and per-sample times, against GaussianMixture's generic code."""
    gm = TARGETS[name].build()
    x = gm.sample(64, seed=3) * 1.3 + 0.2
    times = [None] if sde is None else [torch.full((64,), 0.3), torch.rand(64, dtype=torch.float64) * 0.9 + 0.05]
    for t in times:
        expected = GaussianMixture.score(gm, x, t, sde)
        torch.testing.assert_close(gm.score(x, t, sde), expected, rtol=1e-10, atol=1e-10 * expected.abs().max())
        torch.testing.assert_close(gm.log_prob(x, t, sde), GaussianMixture.log_prob(gm, x, t, sde), rtol=0, atol=1e-10)


def test_ring_target_is_the_builtin_mixture():
    gm, builtin = ring(), GaussianMixture.builtin()
    x = builtin.sample(100, seed=1)
    torch.testing.assert_close(gm.score(x, 0.4, VPSDE()), builtin.score(x, 0.4, VPSDE()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.sample(100, seed=1), x, rtol=1e-12, atol=1e-12)


def test_random_mixture_is_fixed_by_its_seed_anisotropic_and_sampled_exactly():
    a, b = random_mixture(16, 8, seed=16), random_mixture(16, 8, seed=16)
    assert torch.equal(a.covs, b.covs) and torch.equal(a.means, b.means)
    assert not torch.equal(a.means, random_mixture(16, 8, seed=17).means)
    ratio = a.spectra.max(1).values / a.spectra.min(1).values
    assert bool((ratio > 10).all())
    x = a.sample(20_000, seed=5)
    mean, cov = a.mean_cov()
    assert (x.mean(0) - mean).abs().max() < 0.05
    assert (torch.cov(x.T) - cov).abs().max() < 0.1 * cov.abs().max()


@pytest.mark.parametrize("schedule", grids.SCHEDULES)
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_grids_run_from_T_to_eps_and_follow_their_rule(sde, schedule):
    t = grids.grid(sde, 11, schedule)
    assert t[0] == sde.T and t[-1] == sde.eps and bool((t[1:] < t[:-1]).all())
    lam = torch.log(sde.mean_coef(t) / sde.std(t))
    sigma = sde.std(t) / sde.mean_coef(t)
    rule = {
        "uniform": t,
        "quadratic": (t - sde.eps).sqrt(),
        "logsnr": lam,
        "karras": sigma ** (1 / 7),
    }[schedule]
    steps = rule[1:] - rule[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(10), rtol=1e-6, atol=1e-9)


# -- the digits classifier -----------------------------------------------------------------
def test_classifier_training_is_deterministic():
    a, b = digits.train(steps=5), digits.train(steps=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_classifier_accuracy_and_fd_order_real_degraded_noise():
    model = digits.classifier()
    _, _, x_test, y_test = digits.train_split()
    assert digits.accuracy(model, x_test, y_test) > 0.95
    real = digits.real_digits()
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(1))
    ref, other = real[perm[:899]], real[perm[899:]]
    g = torch.Generator().manual_seed(3)
    same = digits.fd(other, ref)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(other, (1, 1, 1, 1), mode="replicate"), 3, 1)
    shifted = torch.roll(other, 1, dims=3)
    noise = torch.rand(other.shape, generator=g) * 2 - 1
    fd_blur, fd_shift, fd_noise = digits.fd(blurred, ref), digits.fd(shifted, ref), digits.fd(noise, ref)
    assert same < 0.1 * min(fd_blur, fd_shift), (same, fd_blur, fd_shift)
    assert max(fd_blur, fd_shift) < 0.5 * fd_noise, (fd_blur, fd_shift, fd_noise)


# -- the suite's bookkeeping ---------------------------------------------------------------
@pytest.mark.parametrize("name", [s for s in sf.samplers.SAMPLERS if not suite.is_adaptive(s)])
def test_steps_for_nfe_spends_at_most_the_budget(name):
    sde_key = "ve"
    for nfe in (5, 20):
        steps = suite.steps_for_nfe(name, nfe, sde_key, suite.options(name))
        assert steps is not None
        spent = suite._probe_nfe(name, sde_key, steps, tuple(sorted(suite.options(name).items())))
        more = suite._probe_nfe(name, sde_key, steps + 1, tuple(sorted(suite.options(name).items())))
        assert spent <= nfe < more


def test_adaptive_samplers_are_the_ones_with_a_tolerance():
    assert suite.is_adaptive("rk45") and not suite.is_adaptive("unipc") and not suite.is_adaptive("heun")


def _row(label, nfe, quality, floor=0.1, **kw):
    return {
        "name": label,
        "label": label,
        "backend": "cpu",
        "dtype": "float32",
        "size": 100,
        "median_s": nfe / 100,
        "target": "ring2d",
        "sde": "vp",
        "nfe": nfe,
        "quality": quality,
        "floor": floor,
        "floor_sd": 0.01,
        "metric": "sliced_w1",
        "n_proj": 256,
        "schedule": "default",
        **kw,
    }


def test_summary_takes_the_least_nfe_within_the_factor():
    rows = [
        _row("a", 5, 0.5),
        _row("a", 10, 0.105),
        _row("a", 20, 0.12),
        _row("a", 50, 0.1),
        _row("b", 5, 0.3),
        _row("b", 10, None, error="non-finite"),
        _row("c", 10, 0.2, peer="k-diffusion"),
    ]
    s = summary(rows)
    assert s["ring2d", "vp", "a"]["nfe"] == 10 and s["ring2d", "vp", "a"]["time_s"] == pytest.approx(0.1)
    # the CPU time of the run where recorded (a loaded machine inflates wall time, not CPU time)
    loaded = summary([_row("a", 10, 0.105, cpu_s=0.02)])
    assert loaded["ring2d", "vp", "a"]["time_s"] == pytest.approx(0.02)
    assert s["ring2d", "vp", "b"]["nfe"] is None and s["ring2d", "vp", "b"]["best"] == pytest.approx(3.0)
    results = {"suite": "cpu-quality", "date": "2026-12-02", "machine": {"gpu": None, "cpu": "x", "torch": "2"}}
    table = quality_table({**results, "results": rows})
    assert "| a | 10 / 100 ms |" in table and "| b | - (3x) |" in table and "| c (peer) | - (2x) |" in table


def test_adaptive_sde_verdict_needs_fewer_nfe_than_both_fixed_step_sde_samplers():
    rows = [
        *(_row("adaptive_sde", n, q, sde="vp") for n, q in ((40, 0.3), (90, 0.105))),
        *(_row("euler_maruyama", n, q, sde="vp") for n, q in ((50, 0.2), (100, 0.1))),
        *(_row("pc", n, q, sde="vp") for n, q in ((50, 0.2), (100, 0.2))),  # pc never reaches it
        *(_row("adaptive_sde", n, q, sde="ve") for n, q in ((40, 0.1), (90, 0.1))),
        *(_row("euler_maruyama", n, q, sde="ve") for n, q in ((20, 0.1), (100, 0.1))),
    ]
    verdicts = {v["sde"]: v for v in adaptive_verdicts(summary(rows))}
    assert verdicts["vp"]["fewer"] and verdicts["vp"]["adaptive_sde"]["nfe"] == 90
    assert not verdicts["ve"]["fewer"] and verdicts["ve"]["pc"] is None
    results = {"suite": "cpu-quality", "date": "2026-12-02", "machine": {"gpu": None, "cpu": "x", "torch": "2"}}
    annotated = annotate({**results, "results": rows})
    assert json.loads(json.dumps(annotated["adaptive_sde_vs_fixed"])) == annotated["adaptive_sde_vs_fixed"]
    vp = next(r for r in annotated["adaptive_sde_vs_fixed"] if r["sde"] == "vp")
    assert vp["fewer_nfe"] and vp["label"] == "adaptive_sde" and vp["adaptive_nfe"] == 90
    assert vp["euler_maruyama_nfe"] == 100 and vp["pc_nfe"] is None
    assert vp["fewer_nfe_than"] == {"euler_maruyama": True, "pc": True}
    table = quality_table({**results, "results": rows})
    assert "| ring2d | VP | adaptive_sde | 90 / 900 ms | 100 / 1.0 s | - (2x) | both |" in table
    assert "| ring2d | VE | adaptive_sde | 40 / 400 ms | 20 / 200 ms |  | pc only |" in table


def test_adaptive_sde_verdict_names_what_it_beats_and_what_it_does_not():
    rows = [
        _row("adaptive_sde", 60, 0.1),
        _row("euler_maruyama", 50, 0.1),
        _row("pc", 100, 0.1),
        *(_row(name, 50, 0.1, target="gmm16") for name in ("adaptive_sde", "euler_maruyama", "pc")),
    ]
    verdicts = {v["target"]: v for v in adaptive_verdicts(summary(rows))}
    assert verdicts["ring2d"]["fewer_than"] == {"euler_maruyama": False, "pc": True} and not verdicts["ring2d"]["fewer"]
    assert verdicts["gmm16"]["fewer_than"] == {"euler_maruyama": False, "pc": False}  # equal NFE is not fewer
    results = {"suite": "cpu-quality", "date": "2026-12-02", "machine": {"gpu": None, "cpu": "x", "torch": "2"}}
    table = quality_table({**results, "results": rows})
    assert "| ring2d | VP | adaptive_sde | 60 / 600 ms | 50 / 500 ms | 100 / 1.0 s | pc only |" in table
    assert "| gmm16 | VP | adaptive_sde | 50 / 500 ms | 50 / 500 ms | 50 / 500 ms | neither |" in table


def test_adaptive_sde_verdicts_cover_the_bridge_rows_too():
    """Rows labelled "adaptive_sde [bridge]" (``brownian="bridge"``) get their own verdict beside the
    default's, against the same fixed-step rows; other labels get none."""
    rows = [
        _row("adaptive_sde", 60, 0.1),
        _row("adaptive_sde [bridge]", 40, 0.1),
        _row("adaptive_sde [other]", 10, 0.1),
        _row("euler_maruyama", 50, 0.1),
        _row("pc", 100, 0.1),
    ]
    verdicts = {v["label"]: v for v in adaptive_verdicts(summary(rows))}
    assert set(verdicts) == {"adaptive_sde", "adaptive_sde [bridge]"}
    assert verdicts["adaptive_sde [bridge]"]["fewer"] and not verdicts["adaptive_sde"]["fewer"]
    results = {"suite": "cpu-quality", "date": "2026-12-02", "machine": {"gpu": None, "cpu": "x", "torch": "2"}}
    bridge = next(r for r in annotate({**results, "results": rows})["adaptive_sde_vs_fixed"] if "bridge" in r["label"])
    assert bridge["adaptive_nfe"] == 40 and bridge["euler_maruyama_nfe"] == 50
    table = quality_table({**results, "results": rows})
    assert "| ring2d | VP | adaptive_sde [bridge] | 40 / 400 ms | 50 / 500 ms | 100 / 1.0 s | both |" in table


def test_plot_quality_writes_a_png(tmp_path):
    rows = [_row("a", n, 1 / n) for n in (5, 10, 20)] + [_row("c", n, 2 / n, peer="k-diffusion") for n in (5, 10)]
    results = {"suite": "cpu-quality", "date": "2026-12-02", "machine": {"gpu": None, "cpu": "x", "torch": "2"}}
    path = plot_quality({**results, "results": rows}, tmp_path / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the suite end to end ------------------------------------------------------------------
def test_quick_quality_suite_runs_every_sampler_and_peer(tmp_path):
    from tests.test_cli import _quick_bench

    data, stdout = _quick_bench("quality", tmp_path / "quality.json")
    assert data["suite"] == "cpu-quality"
    rows = data["results"]
    ours = {(r["sde"], r["label"]) for r in rows if r["target"] == "ring2d" and r["kind"] == "scorefast"}
    for name in sf.samplers.SAMPLERS:
        for sde_key in suite.sdes():
            if (name == "annealed_langevin" and sde_key in ("vp", "rf")) or (
                suite.is_adaptive(name) and sde_key != "vp"  # the smoke run: adaptive ones on VP only
            ):
                continue
            assert (sde_key, name) in ours, (sde_key, name)
    assert {r["peer"] for r in rows if r["kind"] == "peer"} >= {"k-diffusion", "diffusers", "score_sde"}
    assert any(r["target"] == "digits" and r["metric"] == "fd" for r in rows)
    digit_rows = [r for r in rows if r["target"] == "digits" and r.get("quality") is not None]
    assert digit_rows and all(0 <= r["ode_error_median"] <= 10 * r["ode_error"] for r in digit_rows)
    head = "distance to the model's probability-flow solution"
    assert head in stdout and "| unipc |" in stdout.split(head)[1]
    assert all(r["nfe"] <= r["nfe_budget"] for r in rows if "nfe_budget" in r)
    assert all(r["floor"] > 0 and r["median_s"] > 0 for r in rows)
    assert "**ring2d**" in stdout and "| unipc |" in stdout and "| ring2d | VP |" in stdout
    verdicts = [(v["target"], v["sde"], v["label"]) for v in data["adaptive_sde_vs_fixed"]]
    assert verdicts == [("ring2d", "vp", "adaptive_sde"), ("ring2d", "vp", "adaptive_sde [bridge]")]
    bridge = [r for r in rows if r["label"] == "adaptive_sde [bridge]"]
    assert {r["target"] for r in bridge} == {"ring2d"}
    assert all(r["options"]["brownian"] == "bridge" for r in bridge)
    assert render_table(data) in stdout
    assert (tmp_path / "quality.png").stat().st_size > 10_000  # written by the run, beside the JSON
    png = plot_quality(data, tmp_path / "quality.png")
    assert png.stat().st_size > 10_000


def test_readme_quality_block_is_rendered_from_the_committed_results():
    results = json.loads((ROOT / "bench" / "results" / "cpu-quality.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- bench:cpu-quality -->\n", 1)[1].split("\n<!-- /bench:cpu-quality -->", 1)[0]
    assert results["suite"] == "cpu-quality" and block == render_table(results)
    assert "](bench/results/cpu-quality.png)" in block and (ROOT / "bench" / "results" / "cpu-quality.png").is_file()
    assert results == annotate(results)  # the adaptive_sde verdicts in the file are the rows' own


# -- the default grid the suite chose (issue 21 item 5) ------------------------------------
def _times(sde, steps, **kw):
    seen = []
    sf.sample(
        lambda x, t, **_: -x,
        sde,
        (2, 1),
        sampler="ode_euler",
        steps=steps,
        callback=lambda d: seen.append(d["t"][0]),
        **kw,
    )
    return torch.stack(seen).double()


@pytest.mark.parametrize("sde", [VPSDE(N=50), sf.sde.SubVPSDE(N=50)], ids=["VP", "subVP"])
def test_vp_default_grid_is_quadratic_off_score_sde_own_steps(sde):
    """VP / sub-VP: steps != N runs DPM-Solver's quadratic grid (the suite's winner at low NFE),
    steps == N score_sde's own grid, and schedule="uniform" score_sde's uniform grid at any steps."""
    u = torch.linspace(1, 0, 10, dtype=torch.float64)
    quadratic = sde.eps + (sde.T - sde.eps) * u**2
    torch.testing.assert_close(_times(sde, 10), quadratic.float().double(), rtol=0, atol=1e-7)
    torch.testing.assert_close(_times(sde, 10, schedule="quadratic"), _times(sde, 10))
    uniform = torch.linspace(sde.T, sde.eps, 10, dtype=torch.float64)
    torch.testing.assert_close(_times(sde, 10, schedule="uniform"), uniform.float().double(), rtol=0, atol=1e-7)
    own = sde.grid(50)
    torch.testing.assert_close(_times(sde, 50), own.float().double(), rtol=0, atol=1e-7)


def test_other_sdes_keep_their_own_default_grid():
    for sde in (VESDE(), sf.sde.DiscreteVP.linear(), sf.sde.RectifiedFlow()):
        torch.testing.assert_close(_times(sde, 10), sde.grid(10).float().double(), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="schedule"):
        _times(VPSDE(), 10, schedule="quadratik")
