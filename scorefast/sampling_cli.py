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
import os
import time
from pathlib import Path

import torch

from ._io import writable_dir
from .cli import register

MODELS = ("gmm2d", "digits")
PLOT_POINTS, GRID_IMAGES = 20_000, 64


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
    """(score_fn, sde, sample shape, exact target or None, identity for resume checks) for --model."""
    from . import models

    if name == "gmm2d":
        return (*gmm2d(), {"model": "gmm2d"})
    path = models.digits_checkpoint() if name == "digits" else Path(name)
    if not path.exists():
        raise SystemExit(f"--model: {name!r} is neither a built-in model ({', '.join(MODELS)}) nor a checkpoint file")
    try:
        score_fn, sde, shape = models.load(path)
    except ValueError as err:
        raise SystemExit(f"--model: {err}") from err
    return score_fn, sde, shape, None, {"model": name, "checkpoint_sha256": _file_digest(path)}


def _init_distributed(device_arg):
    """Join the torchrun group if launched by torchrun; (rank, world, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_arg != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    return rank, world, device


@register("sample", "draw samples with a built-in model or a checkpoint; write samples, a PNG and timing/NFE")
def _sample_command(parser):
    parser.add_argument("--model", default="gmm2d", help=f"one of {', '.join(MODELS)}, or a checkpoint path")
    parser.add_argument("--sampler", default=None, help="default: pc for gmm2d, ddim for image models")
    parser.add_argument("--steps", type=int, default=None, help="grid times N (default: the sampler's; ddim 50)")
    parser.add_argument("--n", type=int, default=None, help="number of samples (default: 10000 points, 64 images)")
    parser.add_argument("--batch", type=int, default=4096, help="samples per chunk (global ids keep results equal)")
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
        from safetensors.torch import save_file

        from . import samplers
        from .distributed import load_samples, sample_sharded
        from .testing import sliced_wasserstein
        from .visualize import save_samples_png

        if args.sampler is not None:
            samplers.get(args.sampler)  # an unknown sampler fails before any work
        if (args.n is not None and args.n < 1) or args.batch < 1:
            raise SystemExit("--n and --batch must be >= 1")
        try:
            out = writable_dir(args.out, "--out")
        except ValueError as err:
            raise SystemExit(str(err)) from err
        score_fn, sde, sample_shape, target, identity = resolve_model(args.model)
        images = len(sample_shape) == 3  # a few image samples by default: a UNet step costs far more than a 2-D one
        args.sampler = args.sampler or ("ddim" if images else "pc")
        args.n = args.n or (GRID_IMAGES if images else 10000)
        rank, world, device = _init_distributed(args.device)
        options = {"backend": args.backend, "precision": args.precision, "cuda_graph": args.cuda_graph}
        start = time.perf_counter()
        try:
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
        except ValueError as err:  # bad settings, or a resume whose settings differ: say which
            raise SystemExit(f"scorefast sample: {err}") from err
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
        save_file(
            {"samples": samples.contiguous()}, str(out / "samples.safetensors"), metadata={"report": json.dumps(report)}
        )
        title = f"{args.sampler}, {nfe} NFE, {args.n} samples in {seconds:.2f} s"
        if samples.dim() == 2 and samples.shape[1] == 2:
            reference = target.sample(min(args.n, PLOT_POINTS), seed=args.seed + 1).float() if target else None
            save_samples_png(samples[:PLOT_POINTS], out / "samples.png", title=title, reference=reference)
        elif samples.dim() == 4:
            data_range = tuple(getattr(score_fn, "metadata", {}).get("data_range", (-1.0, 1.0)))
            save_samples_png(samples[:GRID_IMAGES], out / "samples.png", title=title, data_range=data_range)
        (out / "timing.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        print(f"wrote {out / 'samples.safetensors'}, {out / 'samples.png'}, {out / 'timing.json'}")
        return 0

    return run
