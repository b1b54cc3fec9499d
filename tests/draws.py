"""Spy on the noise draws of a run: every draw reaches a backend kernel with its counter."""

from __future__ import annotations

import importlib


def record_draws(monkeypatch) -> list[tuple[int, int]]:
    """Within the test: a list that receives (stream, Philox step n*S + j) of every draw, whether it
    comes through a table update, a coefficient update, the fused corrector or the host-number path."""
    seen: list[tuple[int, int]] = []
    backends = importlib.import_module("scorefast.backends")
    fused = importlib.import_module("scorefast.ops.fused_update")
    get, host_update = backends.get, fused.host_number_update

    def counter(step, kw) -> int:
        return int(step) * kw.get("draws", 1) + kw.get("draw", 0)

    class Spy:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def fused_update(self, out, x, terms, coefs, ids, seed, step, stream, with_noise, **kw):
            if with_noise:
                seen.append((stream, counter(step, kw)))
            return self.module.fused_update(out, x, terms, coefs, ids, seed, step, stream, with_noise, **kw)

        def snr_langevin_step(self, out, eps, x, score, alpha, two_snr2, ids, seed, step, stream, **kw):
            seen.append((stream, counter(step, kw)))
            return self.module.snr_langevin_step(out, eps, x, score, alpha, two_snr2, ids, seed, step, stream, **kw)

    def host_spy(x, terms, x_coef, noise, seed, step, stream, sample_ids, with_noise):
        out = host_update(x, terms, x_coef, noise, seed, step, stream, sample_ids, with_noise)
        if out is not None and with_noise:
            seen.append((stream, int(step)))
        return out

    monkeypatch.setattr(backends, "get", lambda name: Spy(get(name)))
    monkeypatch.setattr(fused, "host_number_update", host_spy)
    return seen
