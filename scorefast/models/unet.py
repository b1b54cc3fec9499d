"""A small NCSN/DDPM-style UNet for small images (8x8 digits, 32x32 benchmarks)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .embedding import make_embedding


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 (+ time) -> GroupNorm -> SiLU -> dropout -> conv3x3, residual."""

    def __init__(self, c_in: int, c_out: int, temb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb, c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """net(x [B, C, H, W], t [B]) -> [B, C, H, W]; H and W divisible by 2**(len(ch_mult) - 1).

    ``ch`` base channels, multiplied per resolution level by ``ch_mult``; ``num_res_blocks`` per
    level; the time embedding (of what the network sees, the SDE's ``time_map``) feeds every block.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ch: int = 32,
        ch_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 2,
        groups: int = 8,
        dropout: float = 0.0,
        time_embedding: str = "sinusoidal",
    ):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if in_channels < 1 or ch < 1 or not ch_mult or num_res_blocks < 1:
            raise ValueError("UNet: in_channels, ch, ch_mult and num_res_blocks must be positive")
        self.in_channels, self.levels = in_channels, len(ch_mult)
        temb = 4 * ch
        self.embed = make_embedding(time_embedding, ch)
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch], ch
        for level, mult in enumerate(ch_mult):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, ch * mult, temb, groups, dropout))
                c = ch * mult
                skips.append(c)
            self.down.append(blocks)
            last = level == len(ch_mult) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, temb, groups, dropout), ResBlock(c, c, temb, groups, dropout)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), ch * mult, temb, groups, dropout))
                c = ch * mult
            self.up.append(blocks)
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if level else nn.Identity())
        self.out_norm = _norm(c, groups)
        self.out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (self.levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x: H and W must be divisible by {factor}, got {tuple(x.shape[2:])}")
        temb = self.time_mlp(self.embed(t).to(x.dtype))
        h = self.inp(x)
        hs = [h]
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, temb)
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        for block in self.mid:
            h = block(h, temb)
        for blocks, up in zip(self.up, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
