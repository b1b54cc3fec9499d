"""TrainStep's optimizer step (``scorefast.train.optim``): a CPU Adam / AdamW whose implementation is
left to torch steps in torch's foreach form, which must give torch's per-parameter loop's parameters
and optimizer state bit for bit; every group the user pinned, or that the foreach form would refuse
or change, keeps torch's own choice; the group's flags read as the user left them after the step."""

from __future__ import annotations

import itertools

import pytest
import torch

from scorefast import models
from scorefast.sde import VPSDE
from scorefast.train import EMA, TrainStep, optim

FLAGS = [
    dict(weight_decay=wd, amsgrad=ams, maximize=mx)
    for wd, ams, mx in itertools.product((0.0, 0.05), (False, True), (False, True))
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("MLP", dim=3, hidden=38, layers=2)  # widths off the vector size: tails in every kernel


def _state(step: TrainStep) -> list[torch.Tensor]:
    opt = [v for s in step.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [p.detach() for p in step.model.parameters()] + opt + step.ema.shadow


def _run(cls, flags: dict, foreach, steps: int = 12, seen: list | None = None) -> TrainStep:
    model = _model()
    opt = cls(model.parameters(), lr=3e-3, foreach=foreach, **flags)
    if seen is not None:  # the implementation torch is asked for, as the step starts
        opt.register_step_pre_hook(lambda o, *_: seen.append([g["foreach"] for g in o.param_groups]))
    step = TrainStep(model, opt, "dsm", sde=VPSDE(), grad_clip=1.0, ema=EMA(model, 0.99), warmup=5, check_every=4)
    x = torch.randn(29, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        step(x)
    step.check()
    return step


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_the_foreach_form_gives_the_loops_bits(cls, flags):
    seen: list = []
    left_open = _run(cls, flags, foreach=None, seen=seen)
    loop = _run(cls, flags, foreach=False)
    assert seen and all(s == [True] for s in seen)  # the open groups did step in the foreach form
    assert left_open.optimizer.param_groups[0]["foreach"] is None  # and read as the user left them
    mine, theirs = _state(left_open), _state(loop)
    assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs))
    groups = [g | {"foreach": False} for g in left_open.optimizer.state_dict()["param_groups"]]
    assert groups == loop.optimizer.state_dict()["param_groups"]  # the same but for the flag left open


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False), id="foreach=False"),
        pytest.param(lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), id="fused"),
        pytest.param(lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-3)), id="tensor-lr"),
        pytest.param(
            lambda p: torch.optim.Adam(p, lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.99))), id="tensor-betas"
        ),
        pytest.param(lambda p: torch.optim.Adam(p, lr=1e-3, differentiable=True), id="differentiable"),
        pytest.param(lambda p: torch.optim.NAdam(p, lr=1e-3), id="NAdam"),  # its foreach form differs
        pytest.param(lambda p: torch.optim.SGD(p, lr=1e-3), id="SGD"),
        pytest.param(lambda p: type("MyAdam", (torch.optim.Adam,), {})(p, lr=1e-3), id="subclass"),
    ],
)
def test_what_stays_torchs_choice(make):
    opt = make(_model().parameters())
    before = [dict(g) for g in opt.param_groups]
    assert optim.open_cpu_groups(opt) == []
    with optim.foreach_where_open(opt):
        assert [g["foreach"] for g in opt.param_groups] == [b["foreach"] for b in before]


def test_only_the_open_groups_and_the_flag_comes_back_on_error():
    model = _model()
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = torch.optim.Adam([{"params": first}, {"params": rest, "foreach": False}], lr=1e-3)
    assert optim.open_cpu_groups(opt) == [opt.param_groups[0]]
    with pytest.raises(RuntimeError, match="inside"), optim.foreach_where_open(opt):
        assert [g["foreach"] for g in opt.param_groups] == [True, False]
        raise RuntimeError("inside")
    assert [g["foreach"] for g in opt.param_groups] == [None, False]


def test_a_parameter_off_the_cpu_keeps_torchs_choice():
    """torch already takes the foreach form on CUDA; a group with any parameter elsewhere (here the
    meta device stands in for one) is left to it."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert optim.open_cpu_groups(torch.optim.Adam(params, lr=1e-3)) == []
    assert optim.open_cpu_groups(torch.optim.Adam(params[:1], lr=1e-3)) != []


def test_a_resumed_run_continues_bitwise(tmp_path):
    """The foreach form leaves nothing in the saved state: save after 6 steps (foreach form), resume in
    a fresh step whose optimizer pins the loop (foreach=False), and the run agrees bit for bit with
    12 uninterrupted steps in the foreach form."""
    full = _run(torch.optim.Adam, {}, foreach=None, steps=12)
    half = _run(torch.optim.Adam, {}, foreach=None, steps=6)
    half.save(tmp_path / "s.safetensors")
    model = _model()
    resumed = TrainStep(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3, foreach=False),  # the loop from here on
        "dsm",
        sde=VPSDE(),
        grad_clip=1.0,
        ema=EMA(model, 0.99),
        warmup=5,
        check_every=4,
    )
    resumed.load(tmp_path / "s.safetensors")
    x = torch.randn(29, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        resumed(x)
    assert all(torch.equal(a, b) for a, b in zip(_state(resumed), _state(full)))
    assert half.optimizer.state_dict()["param_groups"][0]["foreach"] is None  # nothing of the form was saved


def test_a_tensor_betas_adam_still_steps_in_train_step():
    """torch's per-parameter Adam takes tensor betas and its foreach form refuses them: left to torch."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.99)))
    step = TrainStep(model, opt, "dsm", sde=VPSDE())
    assert torch.isfinite(step(torch.randn(8, 3)))
