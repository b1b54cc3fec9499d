"""README tables and the plot of a ``cpu-quality`` results file (rendered, never typed by hand).

The headline is NFE-to-quality and time-to-quality per target: the least NFE whose quality is within
``suite.QUALITY_FACTOR`` of the reference, and the time of that run: its CPU time (``cpu_s``; the
suite runs one torch thread, so this is the run's work, which other jobs on a shared machine do not
inflate as they do its wall time), or its wall time for rows without one.  The reference is the
Monte-Carlo floor for the exact targets and, for the digits model, the Fréchet distance its own
probability-flow ODE reaches (rk45, rtol = atol = 1e-4): the real-vs-real floor is out of any sampler's
reach with a learned score, so it is shown beside it instead.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from .._io import atomic_write_bytes
from .suite import QUALITY_FACTOR

PLOT = "bench/results/cpu-quality.png"  # where ``scorefast bench --suite quality`` writes the plot
SDE_ORDER = ("vp", "ve", "edm", "rf")
# issue 21 item 3: adaptive_sde against the fixed-step SDE samplers it should beat on VP / VE, with the
# authors' rule (redraw a rejected attempt's noise, the default) and with the kept Brownian increments
ADAPTIVE, FIXED_SDE = "adaptive_sde", ("euler_maruyama", "pc")
ADAPTIVE_LABELS = (ADAPTIVE, f"{ADAPTIVE} [bridge]")
SDE_NAMES = {"vp": "VP", "ve": "VE", "edm": "EDM", "rf": "RectifiedFlow"}


def reference(row: dict) -> float:
    """What a row's quality is held against: the ODE limit (digits) or the Monte-Carlo floor."""
    return row["ode_limit"] if row.get("metric") == "fd" else row["floor"]


def run_time(row: dict) -> float:
    """A row's time: the CPU time of its one-thread run where recorded, else its wall time."""
    return row["cpu_s"] if row.get("cpu_s") is not None else row["median_s"]


def summary(rows: list[dict], factor: float = QUALITY_FACTOR) -> dict[tuple, dict]:
    """{(target, sde, label): {"nfe", "time_s", "best", "peer", "schedule"}}: the least NFE with quality <=
    factor x reference and that run's time (``run_time``; None if never reached); best = min quality / reference."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if "label" not in r or "target" not in r:
            continue
        key = (r["target"], r["sde"], r["label"])
        cur = out.setdefault(
            key, {"nfe": None, "time_s": None, "best": math.inf, "peer": r.get("peer"), "schedule": r.get("schedule")}
        )
        if r.get("quality") is None:
            continue
        ratio = r["quality"] / reference(r)
        cur["best"] = min(cur["best"], ratio)
        if ratio <= factor and (cur["nfe"] is None or r["nfe"] < cur["nfe"]):
            cur["nfe"], cur["time_s"] = r["nfe"], run_time(r)
    return out


def _cell(s: dict | None) -> str:
    if s is None:
        return ""
    if s["nfe"] is None:
        return f"- ({s['best']:.2g}x)" if math.isfinite(s["best"]) else "- (diverged)"
    return f"{s['nfe']} / {_seconds(s['time_s'])}"


def _seconds(v: float) -> str:
    return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.1f} s"


def _labels(summ: dict, target: str, grid: bool) -> list[str]:
    """Row labels of a target in first-seen order: scorefast's samplers, then the peers."""
    seen: dict[str, dict] = {}
    for (t, _, label), s in summ.items():
        if t == target and (s["schedule"] not in (None, "default")) == grid:
            seen.setdefault(label, s)
    return sorted(seen, key=lambda label: (seen[label]["peer"] is not None, list(seen).index(label)))


def _caption(results: dict) -> str:
    m = results["machine"]
    return f"`{results['suite']}` suite, {results['date'][:10]}, {m['gpu'] or m['cpu']}, torch {m['torch']}"


def quality_table(results: dict) -> str:
    """NFE-to-quality / time-to-quality per target, SDE and sampler (peers marked), then the grid study."""
    rows = results["results"]
    summ = summary(rows)
    first = {}
    for r in rows:
        first.setdefault(r["target"], r)
    lines = [
        _caption(results),
        "",
        f"![quality against NFE, log-log, one line per sampler, peers dashed]({PLOT})",
        "",
        f"Cells: least NFE within {QUALITY_FACTOR}x of the reference / CPU time of that run (1 thread); "
        "`- (r x)`: not reached, r = best quality / reference at any NFE.",
    ]
    for target, r0 in first.items():
        sdes = [s for s in SDE_ORDER if any(k[0] == target and k[1] == s for k in summ)]
        if r0["metric"] == "fd":
            head = (
                f"**{target}** (n = {r0['size']}): Fréchet distance on classifier features; reference = the "
                f"model's ODE limit {r0['ode_limit']:.2f} ({r0['ode_limit_by']}, {r0['ode_limit_nfe']} NFE); "
                f"real-vs-real floor {r0['floor']:.2f}"
            )
        else:
            head = (
                f"**{target}** (n = {r0['size']}): sliced W1 ({r0['n_proj']} projections); reference = "
                f"Monte-Carlo floor {r0['floor']:.4f} (sd {r0['floor_sd']:.4f} over exact sets)"
            )
        lines += [
            "",
            head,
            "",
            "| sampler | " + " | ".join(SDE_NAMES[s] for s in sdes) + " |",
            "|---|" + "---|" * len(sdes),
        ]
        for label in _labels(summ, target, grid=False):
            peer = summ[next(k for k in summ if k[0] == target and k[2] == label)]["peer"]
            name = f"{label} (peer)" if peer else label
            lines.append(f"| {name} | " + " | ".join(_cell(summ.get((target, s, label))) for s in sdes) + " |")
    lines += ode_error_lines(rows)
    lines += adaptive_lines(summ)
    grid_labels = {t: _labels(summ, t, grid=True) for t in first}
    if any(grid_labels.values()):
        lines += [
            "",
            "Grid study (same cells): each fixed-step sampler on the other grids of `scorefast.quality.grids`;"
            " `[default]` is `sf.sample`'s grid.",
            "",
        ]
        for target, labels in grid_labels.items():
            if not labels:
                continue
            bases = list(dict.fromkeys(label.split(" [")[0] for label in labels))
            scheds = list(dict.fromkeys(label.split(" [")[1][:-1] for label in labels))
            sdes = [s for s in SDE_ORDER if any(k[0] == target and k[1] == s and " [" in k[2] for k in summ)]
            cols = [(s, g) for s in sdes for g in ("default", *scheds)]
            lines += [
                f"**{target}**",
                "",
                "| sampler | " + " | ".join(f"{SDE_NAMES[s]} {g}" for s, g in cols) + " |",
                "|---|" + "---|" * len(cols),
            ]
            for base in bases:
                cells = [_cell(summ.get((target, s, base if g == "default" else f"{base} [{g}]"))) for s, g in cols]
                lines.append(f"| {base} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip()


def _error_cell(mean: float, median: float | None) -> str:
    return f"{mean:.4f}" if median is None else f"{mean:.4f} ({median:.4f})"


# the fixed-step samplers and peer loops that draw no noise (ddim at its default eta = 0)
DETERMINISTIC = (
    "ddim",
    "ode_euler",
    "heun",
    "dpm_solver++",
    "unipc",
    "k-diffusion euler",
    "k-diffusion heun",
    "k-diffusion lms",
    "k-diffusion dpmpp_2m",
    "diffusers DDIMScheduler",
    "diffusers DPMSolverMultistepScheduler",
    "diffusers UniPCMultistepScheduler",
    "diffusers EulerDiscreteScheduler",
    "score_sde probability flow (Euler)",
)


def ode_error_lines(rows: list[dict]) -> list[str]:
    """The digits rows' error to the model's probability-flow solution from the same prior draws
    (``ode_error``), per deterministic fixed-step sampler and NFE budget (peers marked)."""
    kept = [
        r
        for r in rows
        if "ode_error" in r
        and r.get("nfe_budget")
        and r.get("schedule", "default") == "default"
        and r["label"] in DETERMINISTIC
    ]
    if not kept:
        return []
    budgets = sorted({r["nfe_budget"] for r in kept})
    labels = list(dict.fromkeys(r["label"] for r in kept))
    cells = {(r["label"], r["nfe_budget"]): (r["ode_error"], r.get("ode_error_median")) for r in kept}
    lines = [
        "",
        "**digits**, distance to the model's probability-flow solution: relative L2 distance of the samples to "
        f"its solution by {kept[0]['ode_limit_by']} from the same prior draws, mean (median) over samples, by NFE "
        "budget.  For our samplers and k-diffusion's (on our grid) it is the solver's own error, down to the "
        "reference's accuracy (about 1e-3); diffusers' schedulers and score_sde's loop start or end elsewhere "
        "on their own timestep tables, so their cells include that gap",
        "",
        "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for label in labels:
        peer = any(r["kind"] == "peer" for r in kept if r["label"] == label)
        row = [_error_cell(*cells[(label, b)]) if (label, b) in cells else "" for b in budgets]
        lines.append(f"| {label}{' (peer)' if peer else ''} | " + " | ".join(row) + " |")
    return lines


def adaptive_verdicts(summ: dict) -> list[dict]:
    """Per (target, sde, label) where an adaptive_sde row (``ADAPTIVE_LABELS``) ran: its NFE-to-quality
    (``v[label]``) beside euler_maruyama's and pc's, whether it reaches the reference with fewer NFE
    than each ("fewer_than": {name: bool}; a sampler that never reaches it counts as beaten when
    adaptive_sde does) and than both ("fewer")."""
    out = []
    for (target, sde, label), s in summ.items():
        if label not in ADAPTIVE_LABELS:
            continue
        others = {name: summ.get((target, sde, name)) for name in FIXED_SDE}
        nfes = {name: (o or {}).get("nfe") for name, o in others.items()}
        fewer_than = {name: s["nfe"] is not None and (v is None or s["nfe"] < v) for name, v in nfes.items()}
        out.append(
            {
                "target": target,
                "sde": sde,
                "label": label,
                label: s,
                **others,
                "fewer": all(fewer_than.values()),
                "fewer_than": fewer_than,
            }
        )
    return out


def _beaten(fewer_than: dict) -> str:
    """The README cell: which of the fixed-step samplers adaptive_sde needs fewer NFE than."""
    beaten = [name for name, yes in fewer_than.items() if yes]
    if len(beaten) == len(fewer_than):
        return "both"
    return f"{', '.join(beaten)} only" if beaten else "neither"


def annotate(results: dict) -> dict:
    """``results`` with "adaptive_sde_vs_fixed": the verdicts of ``adaptive_verdicts`` as plain JSON
    (NFE-to-quality and time-to-quality of each, None where not reached), as the README shows them."""
    rows = []
    for v in adaptive_verdicts(summary(results["results"])):
        row = {
            "target": v["target"],
            "sde": v["sde"],
            "label": v["label"],
            "fewer_nfe": v["fewer"],
            "fewer_nfe_than": v["fewer_than"],
        }
        for key, name in (("adaptive", v["label"]), *((name, name) for name in FIXED_SDE)):
            row[f"{key}_nfe"] = (v[name] or {}).get("nfe")
            row[f"{key}_time_s"] = (v[name] or {}).get("time_s")
        rows.append(row)
    return {**results, "adaptive_sde_vs_fixed": rows}


def adaptive_lines(summ: dict) -> list[str]:
    """The adaptive_sde comparison as README lines (empty when it did not run)."""
    verdicts = adaptive_verdicts(summ)
    if not verdicts:
        return []
    lines = [
        "",
        f"**{ADAPTIVE} against {' and '.join(FIXED_SDE)}** (same cells; which of them it reaches the reference"
        ' with fewer NFE than; `[bridge]`: `brownian="bridge"`)',
        "",
        "| target | SDE | sampler | NFE / time | " + " | ".join(FIXED_SDE) + " | fewer NFE than |",
        "|---|---|---|---|" + "---|" * len(FIXED_SDE) + "---|",
    ]
    for v in verdicts:
        cells = [_cell(v[v["label"]]), *(_cell(v[name]) for name in FIXED_SDE)]
        lines.append(
            f"| {v['target']} | {SDE_NAMES[v['sde']]} | {v['label']} | "
            + " | ".join(cells)
            + f" | {_beaten(v['fewer_than'])} |"
        )
    return lines


def plot_quality(results: dict, path: str | os.PathLike) -> Path:
    """Quality against NFE, log-log, one panel per target and SDE, one line per sampler (peers dashed),
    the reference dotted; default grids only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["results"] if r.get("schedule") in (None, "default") and r.get("quality") is not None]
    if not rows:
        raise ValueError("results: no quality row to plot")
    panels = list(dict.fromkeys((r["target"], r["sde"]) for r in rows))
    targets = list(dict.fromkeys(t for t, _ in panels))
    sdes = [s for s in SDE_ORDER if any(p[1] == s for p in panels)]
    fig, axes = plt.subplots(len(targets), len(sdes), figsize=(4.2 * len(sdes), 3.4 * len(targets)), squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cmap = plt.get_cmap("tab20")
    colors = {label: cmap(i % 20) for i, label in enumerate(labels)}
    handles = {}
    for i, target in enumerate(targets):
        for j, sde in enumerate(sdes):
            ax = axes[i][j]
            mine = [r for r in rows if r["target"] == target and r["sde"] == sde]
            if not mine:
                ax.set_visible(False)
                continue
            for label in dict.fromkeys(r["label"] for r in mine):
                pts = sorted((r["nfe"], r["quality"]) for r in mine if r["label"] == label)
                peer = next(r for r in mine if r["label"] == label).get("peer")
                (line,) = ax.plot(
                    *zip(*pts, strict=True),
                    ls="--" if peer else "-",
                    marker=".",
                    ms=3,
                    lw=1,
                    color=colors[label],
                    label=label,
                )
                handles.setdefault(label, line)
            ref = reference(mine[0])
            ax.axhline(ref, color="k", ls=":", lw=1)
            ax.axhline(QUALITY_FACTOR * ref, color="grey", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{target} / {SDE_NAMES[sde]}", fontsize=9)
            ax.set_xlabel("NFE", fontsize=8)
            ax.set_ylabel("FD" if mine[0]["metric"] == "fd" else "sliced W1", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=6, fontsize=7, frameon=False)
    m = results["machine"]
    fig.suptitle(
        f"{results['suite']}, {results['date'][:10]}, {m['gpu'] or m['cpu']}: quality vs NFE "
        "(dotted: reference and 1.1x; dashed: peers)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.02 + 0.012 * math.ceil(len(handles) / 6), 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
