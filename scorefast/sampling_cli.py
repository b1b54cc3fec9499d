"""``scorefast sample``: the README's main job.

``--model gmm2d`` samples a built-in 2-D Gaussian-mixture ring with its exact score (offline, no
weights); ``--model digits`` the shipped 8x8-digits UNet; ``--model PATH`` any ``sf.models``
checkpoint.  Work runs through ``sf.distributed.sample_sharded`` in chunks of ``--batch`` global
sample ids, so the samples do not depend on the chunk size or the number of processes (run it
under ``torchrun`` to shard, rerun it to resume).  ``--out`` gets ``samples.safetensors``,
``samples.png`` (scatter beside exact draws, or an image grid), ``timing.json`` (sampler, steps,
NFE, wall time, samples/s; sliced-Wasserstein to exact samples for gmm2d) and ``shards/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ._io import atomic_path, atomic_save_file, atomic_write_text, dir_path
from .cli import positive_int, register, user_input

MODELS = ("gmm2d", "digits")
PLOT_POINTS, GRID_IMAGES = 20_000, 64
# API argument names in the package's error messages -> this command's options
FLAGS = {
    "sampler": "--sampler",
    "steps": "--steps",
    "n_samples": "--n",
    "chunk": "--batch",
    "seed": "--seed",
    "backend": "--backend",
    "device": "--device",
    "precision": "--precision",
    "cuda_graph": "--cuda-graph",
    "out_dir": "--out",
    "path": "--model",
}


def gmm2d():
    from .sde import VPSDE
    from .testing import GaussianMixture

    gm = GaussianMixture.builtin()
    sde = VPSDE()
    return gm.score_fn(sde), sde, (2,), gm


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model(name: str):
    """(score_fn, sde, sample shape, exact target or None, identity for resume checks) for --model;
    a ValueError naming ``path`` for a missing, unreadable or malformed checkpoint."""
    from . import models

    if name == "gmm2d":
        return (*gmm2d(), {"model": "gmm2d"})
    path = models.digits_checkpoint() if name == "digits" else Path(name)
    if not path.is_file():
        raise ValueError(f"path: {name!r} is neither a built-in model ({', '.join(MODELS)}) nor a checkpoint file")
    score_fn, sde, shape = models.load(path)
    return score_fn, sde, shape, None, {"model": name, "checkpoint_sha256": _file_digest(path)}


@register("sample", "draw samples with a built-in model or a checkpoint; write samples, a PNG and timing/NFE")
def _sample_command(parser):
    parser.add_argument("--model", default="gmm2d", help=f"one of {', '.join(MODELS)}, or a checkpoint path")
    parser.add_argument("--sampler", default=None, help="default: pc for gmm2d, ddim for image models")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="grid times N (default: the sampler's; ddim 50)"
    )
    parser.add_argument(
        "--n", type=positive_int, default=None, help="number of samples (default: 10000 points, 64 images)"
    )
    parser.add_argument(
        "--batch", type=positive_int, default=4096, help="samples per chunk (global ids keep results equal)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, choices=("torch", "cpu", "triton", "cuda"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument(
        "--cuda-graph", action="store_true", help="capture and replay sampler steps as CUDA graphs (CPU: no-op)"
    )
    parser.add_argument("--out", required=True, help="output directory (rerun with the same settings to resume)")
    parser.add_argument("--no-progress", action="store_true")

    def run(args):
        from . import samplers
        from .distributed import init_from_env, load_samples, sample_sharded
        from .testing import sliced_wasserstein
        from .visualize import save_samples_png

        with user_input(FLAGS):  # the user's settings: checked (nothing written) before any work
            if args.sampler is not None:
                samplers.get(args.sampler)
            out = dir_path(args.out, "--out")
            score_fn, sde, sample_shape, target, identity = resolve_model(args.model)
        images = len(sample_shape) == 3  # a few image samples by default: a UNet step costs far more than a 2-D one
        args.sampler = args.sampler or ("ddim" if images else "pc")
        args.n = args.n or (GRID_IMAGES if images else 10000)
        with user_input(FLAGS):
            rank, world, device = init_from_env(args.device)
        options = {"backend": args.backend, "precision": args.precision, "cuda_graph": args.cuda_graph}
        start = time.perf_counter()
        with user_input(FLAGS):  # bad settings, or a resume whose settings differ: refused before any write
            manifest_path = sample_sharded(
                score_fn,
                sde,
                args.n,
                out / "shards",
                sample_shape=sample_shape,
                chunk=args.batch,
                sampler=args.sampler,
                steps=args.steps,
                seed=args.seed,
                progress=not args.no_progress,
                device=device,
                config_extra=identity,
                **options,
            )
        seconds = time.perf_counter() - start
        if rank != 0:
            return 0
        manifest = json.loads(manifest_path.read_text())
        samples = load_samples(out / "shards")
        nfe = max(c["nfe"] for c in manifest["chunks"])
        chunk_seconds = sum(c["seconds"] for c in manifest["chunks"])
        report = {
            "model": args.model,
            "sde": repr(sde),
            "sampler": args.sampler,
            "steps": args.steps,
            "nfe_per_sample": nfe,
            "n": args.n,
            "chunk": args.batch,
            "world_size": world,
            "seconds": seconds,
            "samples_per_s": args.n / seconds,
            "seconds_per_nfe_per_chunk": chunk_seconds / max(nfe, 1) / len(manifest["chunks"]),
            "backend": args.backend or "default",
            "device": str(device),
            "precision": args.precision,
            "cuda_graph": args.cuda_graph,
        }
        if target is not None:
            exact = target.sample(args.n, seed=args.seed + 1).float()
            report["sliced_wasserstein_to_exact"] = sliced_wasserstein(samples, exact)
            report["sliced_wasserstein_exact_vs_exact"] = sliced_wasserstein(
                target.sample(args.n, seed=args.seed + 2).float(), exact
            )
        with user_input({}, errors=(OSError,)):  # e.g. a full disk: one line, the samples stay in shards/
            atomic_save_file(
                {"samples": samples.contiguous()}, out / "samples.safetensors", {"report": json.dumps(report)}
            )
            title = f"{args.sampler}, {nfe} NFE, {args.n} samples in {seconds:.2f} s"
            if samples.dim() == 2 and samples.shape[1] == 2:
                reference = target.sample(min(args.n, PLOT_POINTS), seed=args.seed + 1).float() if target else None
                with atomic_path(out / "samples.png") as tmp:
                    save_samples_png(samples[:PLOT_POINTS], tmp, title=title, reference=reference)
            elif samples.dim() == 4:
                data_range = tuple(getattr(score_fn, "metadata", {}).get("data_range", (-1.0, 1.0)))
                with atomic_path(out / "samples.png") as tmp:
                    save_samples_png(samples[:GRID_IMAGES], tmp, title=title, data_range=data_range)
            atomic_write_text(out / "timing.json", json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        print(f"wrote {out / 'samples.safetensors'}, {out / 'samples.png'}, {out / 'timing.json'}")
        return 0

    return run
