"""A ``sample_sharded`` worker for the multi-process tests (run under torchrun or alone).

argv: out_dir n_samples chunk [slow]; 'slow' makes each score call sleep so a test can kill a rank
mid-run.  Every process pins one torch thread (DESIGN.md: world-size tests pin the thread count).
"""

import os
import sys
import time

import torch

import scorefast as sf


def main():
    out_dir, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    slow = len(sys.argv) > 4 and sys.argv[4] == "slow"
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    gm = sf.testing.GaussianMixture.builtin()
    sde = sf.sde.VPSDE()
    exact = gm.score_fn(sde)

    def score(x, t, shift=None):
        if slow:
            time.sleep(0.02)
        s = exact(x, t)
        return s if shift is None else s + shift

    shift = 0.01 * torch.arange(2 * n, dtype=torch.float32).reshape(n, 2) / n
    sf.distributed.sample_sharded(
        score,
        sde,
        n,
        out_dir,
        sample_shape=(2,),
        chunk=chunk,
        sampler="euler_maruyama",
        steps=20,
        seed=11,
        extra_args={"shift": shift},
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
