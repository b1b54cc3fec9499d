"""``scorefast sample``: the README's main job.

``--model gmm2d`` samples a built-in 2-D Gaussian-mixture ring with its exact score (offline, no
weights), and writes to ``--out``: ``samples.safetensors``, ``samples.png`` (samples beside exact
draws) and ``timing.json`` (sampler, steps, NFE, wall time, samples/s, sliced-Wasserstein to exact
samples).  Work runs in chunks of ``--batch`` with global sample ids, so the samples do not depend
on the chunk size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .cli import register
from .testing import sliced_wasserstein

MODELS = ("gmm2d",)


def gmm2d():
    from .sde import VPSDE
    from .testing import GaussianMixture

    gm = GaussianMixture.ring(8, 4.0, 0.35)
    sde = VPSDE()
    return gm.score_fn(sde), sde, (2,), gm


def _plot(samples: torch.Tensor, exact: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    for ax, data, name in zip(axes, (samples, exact), ("scorefast samples", "exact samples")):
        ax.scatter(data[:, 0].numpy(), data[:, 1].numpy(), s=1, alpha=0.4)
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@register("sample", "draw samples with a built-in model; write samples, a PNG and timing/NFE")
def _sample_command(parser):
    parser.add_argument("--model", default="gmm2d", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--sampler", default="pc")
    parser.add_argument("--steps", type=int, default=None, help="grid times N (default: the sampler's)")
    parser.add_argument("--n", type=int, default=10000, help="number of samples")
    parser.add_argument("--batch", type=int, default=4096, help="samples per chunk (global ids keep results equal)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, choices=("torch", "cpu", "triton", "cuda"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true")

    def run(args):
        from safetensors.torch import save_file

        from .sampling import sample

        if args.model not in MODELS:
            raise SystemExit(f"--model: unknown model {args.model!r}; built in: {', '.join(MODELS)}")
        if args.n < 1 or args.batch < 1:
            raise SystemExit("--n and --batch must be >= 1")
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write_test").touch()
            (out / ".write_test").unlink()
        except OSError as err:
            raise SystemExit(f"--out: cannot write to {out}: {err}") from err
        score_fn, sde, sample_shape, target = gmm2d()
        options = {"norm": "batch"} if args.sampler == "pc" else {}  # low-D data: batch norms (DESIGN.md)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        chunks, nfe = [], 0
        start = time.perf_counter()
        from tqdm.auto import tqdm

        with tqdm(total=args.n, unit="sample", disable=args.no_progress, desc=f"{args.sampler}") as bar:
            for first in range(0, args.n, args.batch):
                count = min(args.batch, args.n - first)
                ids = torch.arange(first, first + count, device=device)
                x, info = sample(
                    score_fn,
                    sde,
                    (count, *sample_shape),
                    sampler=args.sampler,
                    steps=args.steps,
                    seed=args.seed,
                    sample_ids=ids,
                    device=device,
                    backend=args.backend,
                    precision=args.precision,
                    return_info=True,
                    **options,
                )
                chunks.append(x.cpu())
                nfe = info["nfe"]
                bar.update(count)
        seconds = time.perf_counter() - start
        samples = torch.cat(chunks)
        exact = target.sample(args.n, seed=args.seed + 1).float()
        report = {
            "model": args.model,
            "sde": repr(sde),
            "sampler": args.sampler,
            "steps": info["steps"],
            "nfe_per_sample": nfe,
            "n": args.n,
            "seconds": seconds,
            "samples_per_s": args.n / seconds,
            "seconds_per_nfe": seconds / max(nfe, 1) / max(1, -(-args.n // args.batch)),
            "sliced_wasserstein_to_exact": sliced_wasserstein(samples, exact),
            "sliced_wasserstein_exact_vs_exact": sliced_wasserstein(
                target.sample(args.n, seed=args.seed + 2).float(), exact
            ),
            "backend": args.backend or "default",
            "device": str(device),
            "precision": args.precision,
        }
        save_file(
            {"samples": samples.contiguous()}, str(out / "samples.safetensors"), metadata={"report": json.dumps(report)}
        )
        _plot(
            samples,
            exact,
            out / "samples.png",
            f"{args.sampler}, {info['steps']} steps, {nfe} NFE, {args.n} samples in {seconds:.2f} s",
        )
        (out / "timing.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        print(f"wrote {out / 'samples.safetensors'}, {out / 'samples.png'}, {out / 'timing.json'}")

    return run
