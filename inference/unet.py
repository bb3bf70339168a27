"""A compact 3D U-Net family (CPU-sized) and its ONNX export.

``UNet3D(in_ch, n_classes, base=12, stages=4)``: per stage two 3x3x3 conv + InstanceNorm + LeakyReLU,
stride-2 conv downsampling, transposed-conv upsampling, skip connections by concatenation.
Channels double per stage up to ``max_ch``. With ``stem=2`` the input is first reduced by a
stride-2 convolution and the logits are upsampled trilinearly at the end (a U-Net at half
resolution: ~4-5x cheaper, for coarse anatomy). ``refine=F`` (only with a stem) adds a light
full-resolution path: two 3x3x3 convolutions with F filters on the input, joined with the
upsampled decoder features by a convolution of kernel ``refine_k`` and a 1x1x1 one to the logits,
which are *added* to the upsampled logits of the U-Net; its last layer starts
at zero, so a network grown from a stem-only checkpoint starts as exactly that network. (At 6 mm
even a perfect label map, upsampled back, caps the ribs of example_ct at Dice ~0.5: docs/models.md.)
Input sizes must be divisible by
``stem * 2**(stages-1)`` (the node's client pads to ``pad_multiple``). Output: logits [N, K, Z, Y, X].
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True),
    )


class UNet3D(nn.Module):
    """3D U-Net; see module docstring."""

    def __init__(self, in_ch: int, n_classes: int, base: int = 12, stages: int = 4, max_ch: int = 128,
                 stem: int = 1, refine: int = 0, refine_k: int = 1) -> None:
        """Raises ValueError for ``refine`` without a stem (``stem`` < 2)."""
        super().__init__()
        if refine and stem < 2:
            raise ValueError("refine needs a stem (stem >= 2)")
        in_ch0 = in_ch
        ch = [min(base * 2 ** i, max_ch) for i in range(stages)]
        self.stages, self.stem_factor = stages, stem
        self.stem = None
        if stem > 1:
            self.stem = nn.Sequential(nn.Conv3d(in_ch, ch[0], stem, stride=stem, bias=False),
                                      nn.InstanceNorm3d(ch[0], affine=True), nn.LeakyReLU(0.01, inplace=True))
            in_ch = ch[0]
        self.enc = nn.ModuleList([_block(in_ch, ch[0])])
        self.down = nn.ModuleList()
        for i in range(1, stages):
            self.down.append(nn.Sequential(nn.Conv3d(ch[i - 1], ch[i - 1], 2, stride=2, bias=False),
                                           nn.InstanceNorm3d(ch[i - 1], affine=True), nn.LeakyReLU(0.01, inplace=True)))
            self.enc.append(_block(ch[i - 1], ch[i]))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(stages - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(ch[i], ch[i - 1], 2, stride=2))
            self.dec.append(_block(2 * ch[i - 1], ch[i - 1]))
        self.head = nn.Conv3d(ch[0], n_classes, 1)
        self.fine: nn.Module | None = None
        self.fine_head: nn.Module | None = None
        if refine:
            self.fine = _block(in_ch0, refine)
            self.fine_head = nn.Sequential(
                nn.Conv3d(ch[0] + refine, ch[0], refine_k, padding=refine_k // 2), nn.LeakyReLU(0.01, inplace=True),
                nn.Conv3d(ch[0], n_classes, 1))
            nn.init.zeros_(self.fine_head[-1].weight)
            nn.init.zeros_(self.fine_head[-1].bias)

    @property
    def pad_multiple(self) -> int:
        """Every spatial input dimension must be a multiple of this."""
        return self.stem_factor * 2 ** (self.stages - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        skips = []
        h = self.enc[0](x if self.stem is None else self.stem(x))
        for i in range(1, self.stages):
            skips.append(h)
            h = self.enc[i](self.down[i - 1](h))
        for up, dec in zip(self.up, self.dec):
            h = dec(torch.cat([up(h), skips.pop()], 1))
        out = self.head(h)
        if self.stem is not None:
            f = float(self.stem_factor)
            out = F.interpolate(out, scale_factor=f, mode="trilinear", align_corners=False)
            if self.fine is not None and self.fine_head is not None:
                up = F.interpolate(h, scale_factor=f, mode="trilinear", align_corners=False)
                out = out + self.fine_head(torch.cat([up, self.fine(x)], 1))
        return out


class ConstantSuppressed(nn.Module):
    """``net`` whose voxels with an exactly constant 3x3x3 input neighbourhood are background.

    The foreground seed paper's failure mode: a large field of view with an artificial boundary to
    a constant-valued region (padding outside the reconstruction circle, synthetic fills) becomes
    foreground. Imaged tissue and air always carry noise, padding never does, so such voxels are
    forced to class 0 (logit margin ``margin``) - in every channel of the input at once. Voxels at
    the upper clip of a window (``upper``: metal, dense bone clipped to 1.0) are exempt, so a clipped
    implant is not punched out of the body. Used for the ``body`` model (inference.train.export).
    """

    def __init__(self, net: nn.Module, eps: float = 1e-6, upper: float | None = 1.0, margin: float = 30.0) -> None:
        super().__init__()
        self.net, self.eps, self.upper, self.margin = net, eps, upper, margin

    def constant(self, x: torch.Tensor) -> torch.Tensor:
        """[N,1,Z,Y,X] float: 1 where every channel's 3x3x3 neighbourhood is constant (and not clipped high)."""
        lmax = F.max_pool3d(x, 3, 1, 1)
        lmin = -F.max_pool3d(-x, 3, 1, 1)
        flat = ((lmax - lmin) <= self.eps).float().amin(1, keepdim=True)
        if self.upper is not None:
            flat = flat * (x.amax(1, keepdim=True) < self.upper - 1e-4).float()
        return flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.net(x)
        c = self.constant(x) * self.margin
        bias = torch.cat([c, -c.expand(-1, out.shape[1] - 1, -1, -1, -1)], 1)
        return out + bias


def n_params(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def export_onnx(net: nn.Module, in_ch: int, path: Path, side: int = 32) -> bytes:
    """Export to ONNX (opset 17; INPUT [N,C,Z,Y,X] -> OUTPUT [N,K,Z,Y,X], dynamic N/Z/Y/X); returns the bytes."""
    net = net.eval()
    x = torch.zeros(1, in_ch, side, side, side)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "N", 2: "Z", 3: "Y", 4: "X"}
    with torch.no_grad():
        torch.onnx.export(net, (x,), str(path), input_names=["INPUT"], output_names=["OUTPUT"],
                          dynamic_axes={"INPUT": axes, "OUTPUT": axes}, opset_version=17, dynamo=False)
    return path.read_bytes()
