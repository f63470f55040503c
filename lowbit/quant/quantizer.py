"""The quantizer module: a spec, its estimated parameters, fake-quant and codes."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant import functional as F
from lowbit.quant.spec import QuantSpec


class UniformQuantizer(nn.Module):
    """Fake-quantizes a tensor on a uniform integer grid.

    ``scale`` and ``zero_point`` are buffers (shape [] or [C]); range estimators fill them
    through :meth:`set_range`. Until then the quantizer refuses to run while enabled, so
    an uncalibrated layer can never silently pass floats through. ``observer`` is an
    optional callable the calibration loop installs to see the float input.
    """

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.signed: bool | None = None if spec.signed == "auto" else bool(spec.signed)
        self.calibrated = False
        self.enabled = True
        # The method that set this grid (a QAT kind deployed here, "kmeans"): what the layer
        # table and artifacts report; the fake-quant itself is the grid's.
        self.method = "uniform"
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.keep_abs_mean = False  # set for XNOR-Net inputs: see forward
        self.abs_mean: torch.Tensor | None = None

    # -- configuration -------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def integer_kernel(self) -> bool:
        """Whether an integer kernel can read this quantizer's values: not a 1-bit mid-rise
        sign (±s/2, no zero: ONNX's Where, float conv) nor a codebook (float levels)."""
        return not (self.spec.grid == "midrise" and self.spec.bits == 1)

    def set_bits(self, bits: int) -> None:
        """Change the bit width; the old scale no longer fits, so calibration is required."""
        if bits != self.spec.bits:
            self.spec = self.spec.with_(bits=bits)
            self.calibrated = False

    def code_range(self) -> tuple[int, int]:
        if self.signed is None:
            raise LowbitError(f"quantizer {self.name!r}: signedness not resolved; calibrate first")
        return self.spec.code_range(self.signed)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale/zero point from a clipping range (per tensor or per channel)."""
        if self.signed is None:
            self.signed = bool(torch.as_tensor(lo).min() < 0)
        scale, zero_point = F.range_to_scale_zero_point(lo, hi, self.spec, self.signed)
        self.set_params(scale, zero_point)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        device = self.scale.device
        self.scale = scale.detach().to(device=device, dtype=torch.float32).clone()
        self.zero_point = zero_point.detach().to(device=device, dtype=torch.float32).clone()
        self.calibrated = True

    # -- running ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
        if not self.enabled:
            return x
        if self.keep_abs_mean:  # XNOR-Net's A = mean_c |x|, read by the next layer (QuantLayer.xnor_scale)
            self.abs_mean = x.detach().abs().mean(1, keepdim=True)
        if not self.calibrated:
            raise LowbitError(
                f"quantizer {self.name!r} ({self.spec.bits}-bit) has no scale yet: "
                "calibrate the model (lowbit.calibrate) after changing bits or specs"
            )
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize with its gradient; trainable kinds override this only."""
        qmin, qmax = self.code_range()
        return F.fake_quantize(x, self.scale, self.zero_point, qmin, qmax, self.spec.grid, self.spec.ch_axis)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.code_range()
        return F.quantize_codes(x, self.scale, self.zero_point, qmin, qmax, self.spec.grid, self.spec.ch_axis)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return F.dequantize_codes(codes, self.scale, self.zero_point, self.spec.grid, self.spec.ch_axis)

    def param_bits(self) -> int:
        """Bits stored for this quantizer's own parameters: float32 scales, plus zero points
        (one integer code of ``bits`` width each) when the grid is affine."""
        n = self.scale.numel()
        return 32 * n + (0 if self.spec.symmetric else self.spec.bits * n)

    def extra_repr(self) -> str:
        gran = "per-channel" if self.spec.per_channel else "per-tensor"
        sign = {None: "auto", True: "signed", False: "unsigned"}[self.signed]
        kind = "sym" if self.spec.symmetric else "affine"
        return f"{self.spec.bits}-bit {sign} {kind} {gran} {self.spec.grid}"
