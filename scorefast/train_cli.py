"""``scorefast train``: train a built-in model on built-in data (``sf.train.fit``), resumable."""

from __future__ import annotations

import json

from .cli import register


@register("train", "train a built-in score model (digits UNet, 2-D MLP); checkpoints, loss curve, resumable")
def _train_command(parser):
    from .train.data import DATASETS
    from .train.fit import SDES

    parser.add_argument("--data", default="digits", choices=DATASETS)
    parser.add_argument(
        "--sde", default="vp", choices=tuple(SDES), help="vp: eps-prediction DSM; rectified_flow: flow matching"
    )
    parser.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    parser.add_argument("--steps", type=int, default=6000, help="total training steps (a resumed run stops here too)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-samples", action="store_true", help="skip the final sample grid")

    def run(args):
        from .train.fit import fit

        try:
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
        except ValueError as err:
            raise SystemExit(f"scorefast train: {err}") from err
        print(json.dumps(summary, indent=2))

    return run
