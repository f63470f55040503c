"""GPTQ (Frantar et al. 2022): round a layer's weights one input column at a time, moving
each column's rounding error onto the columns not yet rounded, weighted by the inverse
Hessian of the layer's reconstruction error.

For a layer y = Wx with calibration inputs X (one column per position: im2col for convs),
the output error ‖(W − Q)X‖² has Hessian H = 2XXᵀ, shared by every output row. The paper's
algorithm (its Algorithm 1), per row block, in column order:

1. H ← H + λ·mean(diag H)·I (dampening, λ = ``damp``); a column no input ever drives
   (H_jj = 0) is set to zero with H_jj = 1.
2. Optionally visit columns by decreasing H_jj ("act order", its sec. 4 / the reference code).
3. U = Cholesky(H⁻¹)ᵀ, upper triangular: row j of U holds the inverse-Hessian terms of
   column j against the later ones (eq. (3) done all at once, "Cholesky reformulation").
4. For column j: q_j = quant(w_j) on the layer's fixed grid (its calibrated per-channel
   scale), e_j = (w_j − q_j)/U_jj, and every later column k ← w_k − e_j·U_jk (eq. (2)).
   Updates inside a block of ``block_size`` columns are immediate; the block's errors reach
   the later columns in one matrix product ("lazy batch updates").

Layers are done in network order on the inputs the quantized network gives them (earlier
layers already rounded, activations quantized). Plain GPTQ minimises ‖(W − Q)X_q‖²: it rounds
well for the inputs the layer reads but leaves the error those inputs already carry.
``target="float"`` aims at the float network's output instead, ‖W·X_f − Q·X_q‖² with X_f the
float network's input to the same layer (the asymmetric objective of GPTAQ, Li et al. 2025).
Since W·X_f = W*·X_q + R with W* = W·X_f X_qᵀ (X_q X_qᵀ)⁻¹ the least-squares fit and R
orthogonal to X_q's rows, ‖W·X_f − Q·X_q‖² = ‖(W* − Q)X_q‖² + ‖R‖²: the same GPTQ on W* instead
of W solves it (``retarget``; dampened towards W so that X_f = X_q gives W back). W* is not W,
so the grid calibrated for W need not suit it: ``regrid`` re-runs the weight range estimator
on W* before rounding (ResNet-20 W3A3: 87.76 → 88.04, seed 0). The estimator scores a clipping by
the weights' own error, every weight alike; ``grid_objective: output`` (``OUTPUT_GRID``) scores it by
the layer's output error of rounding W* onto it, (w − q)·H·(w − q)ᵀ per row, the quantity GPTQ then
minimises (ResNet-20 W2A4 over 3 seeds: 88.58 ± 0.16 → 88.89 ± 0.03).

The rounded weight is written into the float master copy (as AdaRound's ``bake``): the
unchanged quantizer reproduces those codes, and artifacts and ONNX need nothing new.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn
from tqdm import tqdm

from lowbit.errors import LowbitError, NumericalError
from lowbit.model.quant_layer import QuantLayer
from lowbit.ptq.calibrate import apply_range, calibrate_weight_quantizer
from lowbit.ptq.cache import CHUNK, capture_inputs, walk_units
from lowbit.ptq.units import split_units
from lowbit.quant import functional as F
from lowbit.quant.estimators import Range, search_shrink
from lowbit.quant.spec import QuantSpec
from lowbit.quant.quantizer import UniformQuantizer


def _columns(layer: QuantLayer, x: torch.Tensor, group: int) -> torch.Tensor:
    """The layer's input as a [columns, positions] matrix for weight group ``group``: row j
    lines up with column j of weight.reshape(out, -1) of that group."""
    if isinstance(layer.module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T
    return _conv_columns(layer.module, x, group)


def _conv_columns(m: nn.Module, x: torch.Tensor, group: int) -> torch.Tensor:
    """im2col written straight in [channel·kernel offset, image·position] order: one copy of
    each strided slice of the padded input, where unfold's [image, column, position] layout
    needed a second, transposed copy before the product (ResNet-32's Hessians 1.2-2x faster)."""
    per = m.in_channels // m.groups
    x = x[:, group * per:(group + 1) * per]
    if isinstance(m, nn.Conv1d):
        x, kernel, dilation, padding, stride = (x.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]),
                                                (0, m.padding[0]), (1, m.stride[0]))
    else:
        kernel, dilation, padding, stride = m.kernel_size, m.dilation, m.padding, m.stride
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    rows = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    cols = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = TF.pad(x, (pw, pw, ph, ph)).transpose(0, 1)  # [channels, images, H, W]
    out = x.new_empty(per, kh * kw, x.shape[0], rows, cols)
    for i in range(kh):
        for j in range(kw):
            out[:, i * kw + j] = padded[:, :, i * dh:i * dh + sh * (rows - 1) + 1:sh,
                                        j * dw:j * dw + sw * (cols - 1) + 1:sw]
    return out.reshape(per * kh * kw, -1)


def _gram(layer: QuantLayer, x: torch.Tensor, group: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """Σ cols(x)·cols(y)ᵀ of ``_columns`` (y = x when not given): one matrix product."""
    u = _columns(layer, x, group)
    return u @ (u if y is None else _columns(layer, y, group)).T


def _check_padding(layer: QuantLayer) -> None:
    """The Hessians' columns are built for explicit zero padding only."""
    m = layer.module
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
        raise LowbitError(f"gptq: layer {layer.name!r} uses padding={m.padding!r}, padding_mode={m.padding_mode!r}; "
                          "only explicit zero padding is supported")


def _check_layer(layer: QuantLayer) -> None:
    _check_padding(layer)
    q = layer.weight_quantizer
    if type(q) is not UniformQuantizer or not q.calibrated:
        raise LowbitError(f"gptq: layer {layer.name!r} has a {getattr(q, 'method', type(q).__name__)} weight "
                          "quantizer; GPTQ rounds onto a calibrated uniform grid: run it after `calibrate` and "
                          "before steps that change the weight kind")


@torch.no_grad()
def retarget(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """W* = (W·C + λW)(H + λI)⁻¹, λ = damp·mean(diag H): the weights whose output on the
    quantized inputs best matches W's output on the float inputs (C = X_f X_qᵀ, H = X_q X_qᵀ),
    regularised towards W (C = H gives W exactly)."""
    w, h, c = w.double(), h.double(), c.double()
    lam = damp * torch.diagonal(h).mean().clamp_min(1e-30)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)  # with H: a model on the GPU has its Hessians there
    try:
        factor = torch.linalg.cholesky(h + lam * eye)
    except torch.linalg.LinAlgError:
        raise NumericalError("gptq: the layer's Hessian is not positive definite even after dampening; "
                             "raise `damp`") from None
    rhs = (w @ c + lam * w).T  # solve (H + λI)·W*ᵀ = (W·C + λW)ᵀ; H is symmetric
    return torch.cholesky_solve(rhs, factor).T


# ``regrid`` estimator name meaning "search the grid by the layer's output error" (not a weight estimator)
OUTPUT_GRID = "output"


@torch.no_grad()
def output_weighted_range(w: torch.Tensor, hessians: list[torch.Tensor], spec: QuantSpec, signed: bool) -> Range:
    """Each row's grid from the range estimators' shrink search, scored by the output error of
    rounding to it, (w − q)·H·(w − q)ᵀ, instead of the weight MSE: a weight the inputs drive
    hard counts for more than one they barely touch. ``w`` is [out, in] (groups stacked)."""
    rows = w.shape[0] // len(hessians)
    hs = [h.float() for h in hessians]
    x = w.float() if spec.per_channel else w.float().reshape(1, -1)

    def score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = b.sub_(a).reshape(b.shape[0], w.shape[0], -1)
        per_row = torch.cat([torch.einsum("krc,krc->kr", d[:, g * rows:(g + 1) * rows] @ h,
                                          d[:, g * rows:(g + 1) * rows]) for g, h in enumerate(hs)], dim=1)
        return per_row if spec.per_channel else per_row.sum(dim=1, keepdim=True)

    return search_shrink(x, spec, signed, score)


@torch.no_grad()
def layer_hessians(layer: QuantLayer, x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
    """H = 2/N·XXᵀ of each weight group, from the layer's (quantized) inputs ``x``, in chunks;
    with ``y`` the cross term 2/N·XYᵀ instead (the float target's C = X_f X_qᵀ: x float, y quantized)."""
    if y is not None and y.shape != x.shape:
        raise LowbitError(f"gptq: layer {layer.name!r}: float inputs {tuple(x.shape)} and quantized inputs "
                          f"{tuple(y.shape)} differ in shape")
    groups = getattr(layer.module, "groups", 1)
    hs: list[torch.Tensor] = [torch.zeros(0)] * groups
    n = 0
    for i in range(0, x.shape[0], CHUNK):
        chunk = x[i:i + CHUNK].float()
        other = None if y is None else y[i:i + CHUNK].float()
        for g in range(groups):
            h = _gram(layer, chunk, g, other).double()  # float32 products per chunk (4x faster), summed in float64
            hs[g] = h if hs[g].numel() == 0 else hs[g] + h
        n += _columns(layer, chunk[:1], 0).shape[1] * chunk.shape[0]
    return [2 * h / max(n, 1) for h in hs]


@torch.no_grad()
def gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
               qmax: int, grid: str = "midtread", damp: float = 0.01, block_size: int = 128,
               act_order: bool = False) -> torch.Tensor:
    """GPTQ of one weight matrix ``w`` [rows, columns] on the grid (scale, zero point per row
    or scalar) with Hessian ``h`` [columns, columns]; returns the rounded matrix (on the grid)."""
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    # dampening relative to the live columns' mean curvature: the dead ones' placeholder 1s (below) made it
    # depend on the input's scale (at inputs ~1e-3 GPTQ was no better than rounding)
    live = torch.diagonal(h)[~dead]
    lam = damp * (float(live.mean()) if live.numel() else 1.0)
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols, device=h.device)
    w, h = w[:, order], h[order][:, order]
    h += lam * torch.eye(cols, dtype=h.dtype, device=h.device)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise NumericalError("gptq: the layer's Hessian is not positive definite even after dampening; "
                             "raise `damp`") from None
    s, z = scale.double().reshape(-1, 1), zero_point.double().reshape(-1, 1)

    def quant(col: torch.Tensor) -> torch.Tensor:
        return F.fake_quantize(col.unsqueeze(1), s.reshape(-1), z.reshape(-1), qmin, qmax, grid, 0).squeeze(1)

    q = torch.zeros_like(w)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w1, u1 = w[:, start:end].clone(), u[start:end, start:end]
        err = torch.zeros_like(w1)
        for j in range(end - start):
            col = w1[:, j]
            qc = quant(col)
            q[:, start + j] = qc
            e = (col - qc) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)  # eq. (2) within the block
            err[:, j] = e
        w[:, end:] -= err @ u[start:end, end:]  # the block's errors, to every later column at once
    inverse = torch.argsort(order)
    return q[:, inverse]


@torch.no_grad()
def gptq_layer(layer: QuantLayer, x: torch.Tensor, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False, float_inputs: torch.Tensor | None = None,
               float_weight: torch.Tensor | None = None, regrid: tuple[str, dict] | None = None) -> float:
    """Round one layer in place from its quantized inputs ``x``; returns the relative output
    error ‖(W − Q)X‖/‖WX‖ proxy tr((W−Q)H(W−Q)ᵀ)/tr(WHWᵀ) for the report. With
    ``float_inputs`` (the float network's inputs to this layer) and ``float_weight`` (its
    float weight) the weights are first retargeted to the float output (module docstring);
    ``regrid`` = (estimator, options) then re-fits the weight grid to the retargeted weights."""
    _check_layer(layer)
    q = layer.weight_quantizer
    weight = layer.module.weight
    w = weight.detach().reshape(weight.shape[0], -1)
    groups = getattr(layer.module, "groups", 1)
    rows = w.shape[0] // groups
    qmin, qmax = q.code_range()
    out = torch.empty_like(w, dtype=torch.float64)
    num = den = 0.0
    hessians = layer_hessians(layer, x)
    target = w.double().clone()
    if float_inputs is not None:
        wf = (weight if float_weight is None else float_weight).detach().reshape(w.shape)
        for g, c in enumerate(layer_hessians(layer, float_inputs, x)):
            part = slice(g * rows, (g + 1) * rows)
            target[part] = retarget(wf[part], hessians[g], c, damp)
        if regrid is not None and regrid[0] == OUTPUT_GRID:
            apply_range(q, *output_weighted_range(target, hessians, q.spec, q.signed))
        elif regrid is not None:
            calibrate_weight_quantizer(q, target.float().reshape(weight.shape), regrid[0], regrid[1])
    scale = torch.broadcast_to(q.scale.detach(), (w.shape[0],))
    zp = torch.broadcast_to(q.zero_point.detach(), (w.shape[0],))
    for g, h in enumerate(hessians):
        part = slice(g * rows, (g + 1) * rows)
        out[part] = gptq_round(target[part], h, scale[part], zp[part], qmin, qmax, q.spec.grid, damp, block_size,
                               act_order)
        d = (w[part].double() - out[part])
        num += float(torch.einsum("ij,jk,ik->", d, h, d))
        den += float(torch.einsum("ij,jk,ik->", w[part].double(), h, w[part].double()))
    weight.copy_(out.reshape(weight.shape).to(weight.dtype))
    # the float32 copy must still round to the same codes (it is a grid value, so it does)
    return num / den if den > 0 else 0.0


def images_for_rows(layer: QuantLayer, one_input: torch.Tensor, images: int, rows_per_column: int | None) -> int:
    """How many of ``images`` calibration images (``one_input``: the layer's input for one) a Hessian with at most about
    ``rows_per_column`` input positions per weight column needs (all of them when None). A 3x3 conv
    on 32x32 maps reads 1,024 positions per image for 144 columns: 1,024 images give it 7,000 rows per
    column where the 64-channel 8x8 layers get 114, so a cap spares the wide maps' Hessians (most of
    GPTQ's time) and leaves the narrow ones whole."""
    if rows_per_column is None:
        return images
    _check_padding(layer)  # named here, not a shape error from building its columns
    k, per_image = _columns(layer, one_input[:1].float(), 0).shape
    return max(1, min(images, -(-rows_per_column * k // per_image)))


@torch.no_grad()
def gptq(qm, batches: list[torch.Tensor], damp: float = 0.01, block_size: int = 128, act_order: bool = False,
         progress: bool = True, target: str = "quantized",
         regrid: tuple[str, dict] | None = None, rows_per_column: int | None = None) -> dict[str, float]:
    """GPTQ every quantized layer, in network order; returns each layer's relative error.
    ``target``: "quantized" (plain GPTQ) or "float" (aim at the float network's output);
    ``regrid``: (weight estimator, its options) to re-fit each grid to the float target's W*;
    ``rows_per_column``: each layer's Hessians from only the first images that give it about that
    many input positions per weight column (``images_for_rows``)."""
    if target not in ("quantized", "float"):
        raise LowbitError(f"gptq: target={target!r}; expected 'quantized' or 'float'")
    if rows_per_column is not None and rows_per_column < 1:
        raise LowbitError(f"gptq: rows_per_column={rows_per_column!r}; expected a positive integer or None")
    if regrid is not None and target != "float":
        raise LowbitError("gptq: regrid re-fits the grid to the float target's refitted weights; "
                          "it needs target: float (plain GPTQ rounds the calibrated weights themselves)")
    if not qm.calibrated:
        raise LowbitError("gptq rounds onto the calibrated grids: put `calibrate` before it")
    if not batches:
        raise LowbitError("gptq needs calibration inputs (its Hessians come from them)")
    x = torch.cat(batches)
    errors: dict[str, float] = {}
    units = split_units(qm)
    bar = tqdm(total=len(qm.layers), desc="gptq", unit="layer", disable=not progress, leave=False)
    to_float = target == "float"
    for step in walk_units(qm, units, x, layer_inputs=to_float, teacher=to_float):
        float_weights = {}
        if to_float:
            with qm.float_reference():
                float_weights = {layer.name: layer.module.weight.detach().clone() for layer in step.unit.layers}
        for layer in step.unit.layers:
            if not layer.quantize_weight:
                bar.update(1)
                continue
            keep = step.q_in.shape[0]
            if rows_per_column is not None:
                first = capture_inputs(step.unit, step.q_in[:1], [layer])[layer.name]
                keep = images_for_rows(layer, first, keep, rows_per_column)
            inputs = capture_inputs(step.unit, step.q_in[:keep], [layer])
            q_in = layer.input_ref[0] if layer.input_ref else None
            seen = inputs[layer.name]
            seen = q_in(seen) if q_in is not None else seen  # what the deployed layer reads
            float_in = step.fp_layer_in.get(layer.name) if to_float else None
            errors[layer.name] = gptq_layer(layer, seen, damp, block_size, act_order,
                                            None if float_in is None else float_in[:keep],
                                            float_weights.get(layer.name), regrid)
            bar.update(1)
    bar.close()
    qm.meta["gptq"] = errors
    return errors
