"""``scorefast train``: train a built-in model on built-in data (``sf.train.fit``), resumable."""

from __future__ import annotations

import json

from .cli import finite_float, nonnegative_int, positive_int, register, user_input

# API argument names in the package's error messages -> this command's options
FLAGS = {
    "data": "--data",
    "out_dir": "--out",
    "path": "--out",
    "steps": "--steps",
    "batch": "--batch",
    "lr": "--lr",
    "warmup": "--warmup",
    "grad_clip": "--grad-clip",
    "ema_decay": "--ema",
    "decay": "--ema",
    "precision": "--precision",
    "seed": "--seed",
    "save_every": "--save-every",
    "device": "--device",
}


@register("train", "train a built-in score model (digits UNet, 2-D MLP); checkpoints, loss curve, resumable")
def _train_command(parser):
    from .train.data import DATASETS
    from .train.fit import SDES

    parser.add_argument("--data", default="digits", choices=DATASETS)
    parser.add_argument(
        "--sde", default="vp", choices=tuple(SDES), help="vp: eps-prediction DSM; rectified_flow: flow matching"
    )
    parser.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    parser.add_argument(
        "--steps", type=positive_int, default=6000, help="total training steps (a resumed run stops here too)"
    )
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--lr", type=finite_float, default=2e-3)
    parser.add_argument("--warmup", type=nonnegative_int, default=200)
    parser.add_argument("--grad-clip", type=finite_float, default=1.0)
    parser.add_argument("--ema", type=finite_float, default=0.999, help="EMA decay")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=positive_int, default=500)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-samples", action="store_true", help="skip the final sample grid")

    def run(args):
        from .train.fit import fit

        with user_input(FLAGS):  # every setting is checked before --out is touched
            summary = fit(
                args.out,
                data=args.data,
                sde=args.sde,
                steps=args.steps,
                batch=args.batch,
                lr=args.lr,
                warmup=args.warmup,
                grad_clip=args.grad_clip,
                ema_decay=args.ema,
                precision=args.precision,
                seed=args.seed,
                save_every=args.save_every,
                device=args.device,
                progress=not args.no_progress,
                sample_grid=not args.no_samples,
            )
        print(json.dumps(summary, indent=2))

    return run
