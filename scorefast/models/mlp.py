"""A residual MLP score network for low-dimensional data (e.g. 2-D toys)."""

from __future__ import annotations

from torch import Tensor, nn

from .embedding import make_embedding


class MLP(nn.Module):
    """net(x [B, dim], t [B]) -> [B, dim], t being what the network sees (the SDE's ``time_map``).

    ``hidden`` units, ``layers`` residual blocks (SiLU), the time embedding added to every block.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_embedding: str = "sinusoidal"):
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"MLP: dim, hidden and layers must be >= 1, got {dim}, {hidden}, {layers}")
        self.dim = dim
        self.embed = make_embedding(time_embedding, hidden)
        self.time_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(layers)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected [B, {self.dim}], got {tuple(x.shape)}")
        temb = self.time_proj(self.embed(t).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + temb)
        return self.out(h)
