"""``TrainStep``: one optimisation step of a score network, eager or captured in a CUDA graph.

The step is a function of the model, the optimizer, the batch and the integer step counter n:
the loss draws its times (stream 4) and noise (stream 2) at Philox step n with global sample ids,
so a resumed run repeats exactly the draws an uninterrupted one would make.  Micro-batch m of
``accumulate`` = A on rank r with local batch b uses ids (r A + m) b + arange(b) (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import numbers
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .. import _checks, adapters, backends, losses
from .._io import atomic_save_file
from ..distributed import rank_and_world
from ..errors import NonFiniteError
from ..sde import EDM, SDE, VESDE, VPSDE, RectifiedFlow, SubVPSDE
from . import clip, optim
from .ema import EMA
from .state import flatten, read_metadata, unflatten

LOSSES = ("dsm", "edm", "fm")
STATE_VERSION = 1
FOLD_EVERY = 64  # eager steps whose losses are kept before they are folded into the non-finite flag


class TrainStep:
    """``step(x) -> loss``: the loss on batch x [A*b, ...] at step n, backward, clip, optimizer, EMA.

    Args:
        model: the network, called as ``model(x, time_map(t))``.
        optimizer: any torch optimizer over the model's parameters.  A CPU ``Adam`` / ``AdamW`` whose
            implementation is left to torch (``foreach=None, fused=None``, float lr) steps in torch's
            foreach form, which gives its per-parameter loop's numbers bit for bit (``train.optim``);
            ``foreach=False`` keeps the loop.
        loss: ``"dsm"`` (score_sde's DSM on VE / VP / sub-VP, EDM's loss on EDM), ``"edm"`` (EDM
            only), ``"fm"`` (flow matching on RectifiedFlow: the network is a velocity, options such as
            ``t_dist="logit_normal"`` in ``loss_kwargs``), or a callable ``loss(score_fn, x, sde, *,
            seed, step, sample_ids) -> [B]``.
        sde: the SDE whose perturbation the loss uses.
        parameterisation, time_map: how the network's output becomes a score (``sf.adapters``);
            parameterisation None means "velocity" for the fm loss, else "eps".
        precision: the network's forward in ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16
            with a GradScaler); parameters, optimizer state and the loss arithmetic stay fp32.
        grad_clip: max global gradient norm (None: no clipping).
        ema: an ``EMA`` of the model, or a decay in (0, 1) to build one.
        warmup: linear learning-rate warmup, lr_n = lr * min(1, (n + 1) / warmup).
        accumulate: A micro-batches per step (the batch splits into A equal parts).
        skip_nonfinite: a NaN/inf loss skips the update (counted in ``skipped``) instead of raising
            ``NonFiniteError``; the step counter still advances.  This reads the loss on the host.
        check_every: without skipping, a device flag records the first step whose loss was not finite
            and the host reads it every ``check_every`` steps (1: before that step's update, so the
            weights stay finite; 0: only in ``check()``), raising ``NonFiniteError`` naming the step.
            K > 1 or 0 keeps the loop free of host syncs, as CUDA-graph capture needs: eagerly each
            step's loss is kept and folded into the flag at the check (or every FOLD_EVERY steps), so a
            step between checks runs no flag op at all; a captured step updates the flag in place.
        device_state: keep the step counter (the loss's Philox step), the warmup learning rates and the
            EMA's update counter as 0-d device tensors updated in place, so a step reads nothing on the
            host (the form a CUDA graph can replay; DESIGN "Host syncs").  Needs tensor learning rates
            (e.g. ``Adam(params, lr=torch.tensor(2e-4), capturable=True)`` on CUDA) when warmup > 0.
            Results equal the host-state path bitwise.  The schedules are device tables indexed by the
            counter; sample ids are made once per micro-batch and rank.
        loss_kwargs: passed to the named loss (e.g. ``likelihood_weighting``, ``reduce_mean``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: str | Callable = "dsm",
        *,
        sde: SDE,
        parameterisation: str | None = None,
        time_map: str | Callable | None = "default",
        precision: str = "fp32",
        grad_clip: float | None = None,
        ema: EMA | float | None = None,
        warmup: int = 0,
        seed: int = 0,
        accumulate: int = 1,
        skip_nonfinite: bool = False,
        check_every: int = 1,
        device_state: bool = False,
        loss_kwargs: dict | None = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError("model: has no parameters to train")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde: expected a scorefast.sde SDE, got {type(sde).__name__}")
        if not isinstance(precision, str) or precision not in _checks.PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(_checks.PRECISIONS)}, got {precision!r}")
        if parameterisation is not None and not isinstance(parameterisation, str):
            raise TypeError(f"parameterisation: expected a name or None, got {type(parameterisation).__name__}")
        for name, flag in (("skip_nonfinite", skip_nonfinite), ("device_state", device_state)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected True or False, got {flag!r}")
        if loss_kwargs is not None and not isinstance(loss_kwargs, dict):
            raise TypeError(f"loss_kwargs: expected a dict, got {type(loss_kwargs).__name__}")
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"loss: expected one of {', '.join(LOSSES)} or a callable, got {loss!r}")
            if loss == "fm" and not isinstance(sde, RectifiedFlow):
                raise ValueError(
                    f"loss: 'fm' is flow matching and needs sde=RectifiedFlow(...), got {type(sde).__name__}"
                )
            if loss == "fm" and parameterisation not in (None, "velocity"):
                raise ValueError(f"parameterisation: the 'fm' loss trains a velocity, got {parameterisation!r}")
            if loss == "edm" and not isinstance(sde, EDM):
                raise ValueError(f"loss: 'edm' is EDM's loss and needs sde=EDM(...), got {type(sde).__name__}")
            if loss == "dsm" and not isinstance(sde, VESDE | VPSDE | SubVPSDE | EDM):
                raise ValueError(
                    f"loss: 'dsm' follows score_sde on VESDE, VPSDE and SubVPSDE (EDM's loss on EDM), "
                    f"got sde={type(sde).__name__}"
                )
        elif not callable(loss):
            raise TypeError(f"loss: expected a name or a callable, got {type(loss).__name__}")
        if grad_clip is not None:
            grad_clip = _checks.check_finite_scalar("grad_clip", grad_clip, positive=True)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup: must be an int >= 0, got {warmup!r}")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate: must be an int >= 1, got {accumulate!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every: must be an int >= 0, got {check_every!r}")
        self.seed = _checks.check_counter("seed", seed, torch.device("cpu"), upper=_checks.UINT64)
        if isinstance(ema, numbers.Real) and not isinstance(ema, bool):
            ema = EMA(model, decay=ema)
        elif ema is not None and not isinstance(ema, EMA):
            raise TypeError(f"ema: expected an sf.train.EMA or a decay, got {type(ema).__name__}")
        if parameterisation is None:
            parameterisation = "velocity" if loss == "fm" else "eps"
        self.model, self.optimizer, self.sde, self.ema = model, optimizer, sde, ema
        self.parameterisation, self.precision = parameterisation, precision
        self.time_map_name = time_map if isinstance(time_map, str) or time_map is None else "custom"
        self.score_fn = adapters.from_parameterisation(model, sde, parameterisation, time_map=time_map)
        self.loss_kwargs = dict(loss_kwargs or {})
        self._time_map = time_map
        self._eps_dsm: dict | None = None  # options of the eps network's DSM, set by _dsm_loss where it applies
        self._grad_coefs: dict = {}  # (A, b, D, dtype) -> d loss / d r of that path without a GradScaler
        self._loss = self._named_loss(loss, self.loss_kwargs) if isinstance(loss, str) else loss
        if loss == "dsm" and not isinstance(sde, EDM):
            self._loss = self._dsm_loss(self.loss_kwargs)
        self.grad_clip, self.warmup, self.accumulate = grad_clip, warmup, accumulate
        self.skip_nonfinite, self.check_every = bool(skip_nonfinite), check_every
        self.base_lrs = [g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in optimizer.param_groups]
        self._params = list(model.parameters())
        by_kind: dict[tuple, list[Tensor]] = {}
        for param in self._params:
            by_kind.setdefault((param.device, param.dtype), []).append(param)
        self._clip_groups = list(by_kind.values())  # clip_grad_norm_'s (device, dtype) grouping, made once
        self._clip_backend: str | None = None  # resolved at the first clip
        self._ids: dict = {}  # (rank, m, b, device) -> the micro-batch's global sample ids, made once
        device = self._params[0].device
        self.autocast_dtype = _checks.PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.step, self.skipped = 0, 0
        self.last_grad_norm: Tensor | None = None
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
        self._pending: list[Tensor] = []  # losses of steps _pending_from, ... not yet folded into the flag
        self._pending_from = 0
        self._step_t: Tensor | None = None
        self._lr_table_cache: tuple | None = None
        if device_state:
            if warmup and not all(isinstance(g["lr"], Tensor) for g in optimizer.param_groups):
                raise ValueError(
                    "optimizer: device_state with warmup needs tensor learning rates, e.g. "
                    "Adam(params, lr=torch.tensor(2e-4)) (capturable=True on CUDA)"
                )
            self._step_t = torch.zeros((), dtype=torch.int64, device=device)
            if self.ema is not None:
                self.ema.use_device_counter()

    def periodic_check(self) -> None:
        """``check()`` every ``check_every`` (K > 1) steps, after step ``self.step`` was counted."""
        if self.check_every > 1 and self.step % self.check_every == 0:
            self.check()
        elif len(self._pending) >= FOLD_EVERY:
            self._fold()

    def check(self) -> None:
        """Raise ``NonFiniteError`` if any step so far had a non-finite loss (one host read)."""
        self._fold()
        first = int(self._first_bad)
        if first >= 0:
            raise NonFiniteError(f"loss: non-finite at training step {first}")

    def _fold(self) -> None:
        """Fold the losses of the steps since the last fold into the device flag (a few ops, no read):
        the flag keeps the first step whose loss was not finite."""
        if not self._pending:
            return
        losses_ = torch.stack(self._pending)
        bad = losses_ * 0 != 0  # NaN or inf
        first = torch.argmax(bad.to(torch.uint8)) + self._pending_from  # the first True
        flag = torch.where(bad.any() & (self._first_bad < 0), first, self._first_bad)
        self._first_bad.copy_(flag)
        self._pending.clear()

    def _record(self, total: Tensor) -> None:
        """Remember step n's loss for the non-finite flag.  Eagerly it is kept as it is (no op) and
        folded at the next check or every FOLD_EVERY steps; under capture the flag is updated in place."""
        if self.check_every != 1 and not _checks.is_capturing_or_compiling():
            if not self._pending:
                self._pending_from = self.step
            self._pending.append(total)
            return
        keep = torch.logical_or(total * 0 == 0, self._first_bad >= 0)  # finite (x * 0 == 0) or flagged
        if self._step_t is not None:
            torch.where(keep, self._first_bad, self._step_t, out=self._first_bad)
        else:
            self._first_bad.copy_(torch.where(keep, self._first_bad, self.step))

    @staticmethod
    def _named_loss(name: str, kwargs: dict) -> Callable:
        fn = {"dsm": losses.dsm_loss, "edm": losses.edm_loss, "fm": losses.fm_loss}[name]
        first = "velocity_fn" if name == "fm" else "score_fn"
        known = set(inspect.signature(fn).parameters) - {first, "x", "sde", "seed", "step", "sample_ids"}
        known.discard("return_per_sample")
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"loss_kwargs: {name!r} takes {', '.join(sorted(known))}, got {', '.join(unknown)}")

        def loss(score_fn, x, sde, *, seed, step, sample_ids):
            net = score_fn.output if name == "fm" else score_fn  # fm trains the velocity itself
            return fn(net, x, sde, seed=seed, step=step, sample_ids=sample_ids, return_per_sample=True, **kwargs)

        return loss

    def _dsm_loss(self, kwargs: dict) -> Callable:
        """score_sde's DSM (VE / VP / sub-VP) on the package's own ids: options checked once here,
        nothing read on the host per step.  An eps-prediction network's residual std s + z is z - eps."""
        options = {"likelihood_weighting": False, "reduce_mean": False, "eps": 1e-5, **kwargs}
        for key in ("likelihood_weighting", "reduce_mean"):
            if not isinstance(options[key], bool):
                raise TypeError(f"loss_kwargs: {key} must be True or False, got {options[key]!r}")
        options["eps"] = _checks.check_finite_scalar("loss_kwargs eps", options["eps"], positive=True)
        if self.parameterisation == "eps":  # the network itself, its residual z - eps
            options["eps_net"] = (self.model, adapters.resolve_time_map(self.sde, self._time_map))
            if not options["likelihood_weighting"]:  # the step backpropagates from the network's output
                self._eps_dsm = {"eps": options["eps"], "reduce_mean": options["reduce_mean"]}
                self._eps_dsm["time_map"] = options["eps_net"][1]

        def loss(score_fn, x, sde, *, seed, step, sample_ids):
            backend = backends.resolve(None, x.device, x.dtype)
            return losses.dsm_per_sample(
                score_fn, x, sde, seed=seed, step=step, sample_ids=sample_ids, backend=backend, **options
            )

        return loss

    # -- the step ---------------------------------------------------------------------------
    def micro_batch_ids(self, m: int, b: int, device) -> Tensor:
        """Global sample ids of micro-batch m (of ``accumulate``) with local batch b on this rank.

        Made once per (rank, m, b, device) and checked on the host from Python ints, so a step
        neither rebuilds nor re-validates them (no host read of a device tensor)."""
        rank, _ = rank_and_world()
        key = (rank, m, b, torch.device(device))
        ids = self._ids.get(key)
        if ids is None:
            first = (rank * self.accumulate + m) * b
            if first + b > _checks.UINT32:
                raise ValueError(f"x: sample ids up to {first + b - 1} exceed the 2**32 the noise counter holds")
            ids = self._ids[key] = torch.arange(first, first + b, dtype=torch.int64, device=device)
        return ids

    def _set_lr(self) -> None:
        """lr_n = base * min(1, (n + 1) / warmup) while n < warmup (from then on lr stays base)."""
        if not self.warmup or self.step >= self.warmup:
            return
        if self._step_t is not None:  # on the device: a table of the schedule at the step counter
            at = self._step_t  # eagerly the counter is self.step < warmup; replays run past the table
            if _checks.is_capturing_or_compiling():
                at = torch.clamp(at, max=self.warmup - 1)
            for group, table in zip(self.optimizer.param_groups, self._lr_tables()):
                torch.take(table, at if at.device == table.device else at.to(table.device), out=group["lr"])
            return
        scale = min(1.0, (self.step + 1) / self.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(float(base) * scale)
            else:
                group["lr"] = base * scale

    def _lr_tables(self) -> list[Tensor]:
        """Each group's warmup learning rates for n = 0 .. warmup-1, rounded as the host path rounds
        them (float64 base * float64 scale, then the lr's dtype); made once per ``base_lrs``."""
        if self._lr_table_cache is None or self._lr_table_cache[0] is not self.base_lrs:
            tables = []
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                device, dtype = group["lr"].device, group["lr"].dtype  # made there: no copy, no sync
                n = torch.arange(self.warmup, dtype=torch.float64, device=device)
                base = torch.as_tensor(base, dtype=torch.float64, device=device)
                tables.append((base * torch.clamp((n + 1) / self.warmup, max=1.0)).to(dtype))
            self._lr_table_cache = (self.base_lrs, tables)
        return self._lr_table_cache[1]

    def _clip(self) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_(params, grad_clip)``'s rule on the groups made in __init__
        (``clip.clip_grad_norm``: one C++ call for a float32 model on the cpu backend)."""
        groups = []
        for params in self._clip_groups:
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                grads = [g for g in grads if g is not None]
            if grads:
                groups.append(grads)
        if self._clip_backend is None:
            self._clip_backend = backends.resolve(None, self._params[0].device, torch.float32)
        return clip.clip_grad_norm(groups, self.grad_clip, self._clip_backend)

    def _zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)``: torch's own sets each grad to None, done here
        without its profiler record per call; an optimizer that overrides it (in its class or on the
        instance, as apex's amp does) is called."""
        own = getattr(self.optimizer.zero_grad, "__func__", None)  # not torch's own on the instance either
        if own is not torch.optim.Optimizer.zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _advance(self) -> None:
        self.step += 1
        if self._step_t is not None:
            self._step_t += 1

    def __call__(self, x: Tensor) -> Tensor:
        """One step on x [A*b, ...] (fp32 data); returns the step's mean loss (a detached 0-d tensor,
        which the non-finite check reads again later: do not modify it in place).

        With ``device_state=True`` and ``check_every`` 0 or K > 1 nothing is read on the host between
        checks: the sample ids are the package's own, the counters, learning rates and EMA decay live
        on the device and the non-finite flag is read every K steps."""
        _checks.check_float_tensor("x", x)
        B = _checks.check_batched("x", x)
        A = self.accumulate
        if B % A:
            raise ValueError(f"x: batch {B} does not split into accumulate={A} equal micro-batches")
        b = B // A
        self._set_lr()
        if not self.model.training:
            self.model.train()
        step = self._step_t if self._step_t is not None else self.step
        total = None
        for m, xm in enumerate(x.split(b) if A > 1 else (x,)):
            ids = self.micro_batch_ids(m, b, x.device)
            if self._eps_dsm is not None:
                loss = self._eps_dsm_backward(xm, step, ids)
                total = loss.detach() if A == 1 else (loss.detach().double() + (total if total is not None else 0))
                continue
            with self._autocast(x.device):
                per_sample = self._loss(self.score_fn, xm, self.sde, seed=self.seed, step=step, sample_ids=ids)
            if per_sample.shape != (b,):
                raise ValueError(f"loss: must return per-sample losses [{b}], got shape {tuple(per_sample.shape)}")
            loss = per_sample.float().mean()
            if A > 1:
                loss = loss / A
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            # A = 1: the fp32 loss is the float64 sum's value exactly
            total = loss.detach() if A == 1 else (loss.detach().double() + (total if total is not None else 0))
        if self.skip_nonfinite:
            if not bool(torch.isfinite(total)):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped += 1
                self._advance()
                return total.float()
        else:
            self._record(total)
            if self.check_every == 1 and int(self._first_bad) >= 0:  # before the update: weights stay finite
                self.optimizer.zero_grad(set_to_none=True)
                self.check()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            with torch.no_grad():
                self.last_grad_norm = self._clip()
        with optim.foreach_where_open(self.optimizer):  # torch's foreach form where it leaves the choice open
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self._zero_grad()
        if self.ema is not None:
            self.ema.update()
        self._advance()
        self.periodic_check()
        return total.float()

    def _eps_dsm_backward(self, x: Tensor, step, ids: Tensor) -> Tensor:
        """One micro-batch of the eps network's DSM: its loss (mean over the micro-batch, / A) and its
        gradients, backpropagated from the network's output with d loss / d out = -2 c r (no autograd
        node for the loss, no Python backward).  The same values and gradients as the autograd path
        (``dsm_per_sample(..., eps_net=...)``, then mean, / A, GradScaler), bit for bit."""
        options = self._eps_dsm
        backend = backends.resolve(None, x.device, x.dtype)
        with self._autocast(x.device):
            out = losses.dsm_eps_output(
                self.model, options["time_map"], x, self.sde, seed=self.seed, step=step, sample_ids=ids,
                eps=options["eps"], backend=backend,
            )  # fmt: skip
        D = x[0].numel()
        coef = self._residual_grad_coef(x.shape[0], D, _checks.state_dtype(out), x.device)
        sq, g = losses.dsm_eps_residual(out.detach(), coef, self.seed, step, ids, backend)
        loss = (sq / D if options["reduce_mean"] else sq).float().mean()
        if self.accumulate > 1:
            loss = loss / self.accumulate
        out.backward(g.to(out.dtype))
        return loss

    def _residual_grad_coef(self, b: int, D: int, dtype: torch.dtype, device) -> float | Tensor:
        """d loss / d r for the eps DSM path, computed as autograd's backward computes it, in its order:
        the GradScaler's scale (or 1), / A, the mean's / b, to r's dtype, the reduce_mean's / D, times -2
        (loss = mean(||r||^2 [/ D]) [/ A] [* scale]).  Without a scaler a host number made once per
        shape (numpy's IEEE float32 / float64 arithmetic); with one a 0-d device tensor (the scale
        changes; nothing is read on the host)."""
        key = (self.accumulate, b, D, dtype)
        if self.scaler is None:
            coef = self._grad_coefs.get(key)
            if coef is None:
                c = np.float32(1.0)
                if self.accumulate > 1:
                    c = c / np.float32(self.accumulate)
                c = (np.float64 if dtype == torch.float64 else np.float32)(c / np.float32(b))
                if self._eps_dsm["reduce_mean"]:
                    c = c / c.dtype.type(D)
                coef = self._grad_coefs[key] = float(c * c.dtype.type(-2.0))
            return coef
        c = self.scaler.scale(torch.ones((), dtype=torch.float32, device=device)).reshape(())
        if self.accumulate > 1:
            c = c / self.accumulate
        c = (c / b).to(dtype)
        if self._eps_dsm["reduce_mean"]:
            c = c / D
        return c * -2.0

    def cuda_graph(self, *, warmup: int = 3):
        """This step captured in a CUDA graph: ``graphed = step.cuda_graph(); loss = graphed(x)``.

        Needs ``device_state=True``, ``check_every`` 0 or K > 1, ``capturable=True`` param groups
        (tensor learning rates for warmup) and, in fp16, a fused optimizer; batches of one shape.
        The first ``warmup`` calls are eager steps; on CPU every call is eager (same results).
        """
        from ..graphs import GraphedTrainStep

        return GraphedTrainStep(self, warmup=warmup)

    # -- checkpoints ------------------------------------------------------------------------
    def config(self) -> dict:
        """The settings a resumed run must share with the one that saved (checked on load)."""
        return {
            "seed": int(self.seed) % (1 << 64),
            "loss": self.loss_name,
            "loss_kwargs": self.loss_kwargs,
            "sde": type(self.sde).__name__,
            "sde_kwargs": hashlib.sha256(json.dumps(self.sde.config()).encode()).hexdigest()[:16],
            "parameterisation": self.parameterisation,
            "time_map": self.time_map_name,
            "precision": self.precision,
            "accumulate": self.accumulate,
            "warmup": self.warmup,
            "grad_clip": self.grad_clip,
        }

    def state_dict(self) -> dict:
        self._fold()
        return {
            "step": self.step,
            "skipped": self.skipped,
            "first_bad": self._first_bad,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "base_lrs": self.base_lrs,
        }

    def save(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Everything needed to resume (model, optimizer, scaler, EMA, step) in one safetensors file,
        written atomically (temp file + rename)."""
        tensors: dict[str, Tensor] = {}
        skeleton = flatten(self.state_dict(), "s", tensors)
        meta = {"version": STATE_VERSION, "config": self.config(), "state": skeleton, "extra": extra or {}}
        return atomic_save_file(tensors, path, {"scorefast_train": json.dumps(meta)})

    def load(self, path: str | os.PathLike) -> dict:
        """Restore a ``save``d state; a differing setting is a ValueError naming it.  Returns ``extra``."""
        meta = read_metadata(path, "scorefast_train", STATE_VERSION)  # refuses unknown versions, damage
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"path: {path} is not a readable training state: {err}") from err
        for key, value in meta["config"].items():
            mine = self.config().get(key)
            if mine != value:
                raise ValueError(f"{key}: the checkpoint was trained with {value!r}, this TrainStep has {mine!r}")
        state = unflatten(meta["state"], tensors)
        device = next(self.model.parameters()).device
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.base_lrs = [b.to(device) if isinstance(b, Tensor) else b for b in state["base_lrs"]]
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        self._first_bad.copy_(state["first_bad"])
        self._pending.clear()
        if self._step_t is not None:
            self._step_t.fill_(self.step)
        return meta["extra"]
