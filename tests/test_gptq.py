"""GPTQ: the rounding against its closed forms and a brute-force optimum, and as a recipe step."""
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError, RecipeError
from lowbit.ptq.calibrate import calibrate_weight_quantizer
import lowbit.ptq.gptq as gptq_module
from lowbit.ptq.gptq import gptq_layer, gptq_round, images_for_rows, layer_hessians, retarget
from lowbit.recipes.recipe import load_recipe
from tests.conftest import batches


def _problem(seed, cols=6):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(200, 2, generator=g)
    x = torch.cat([base @ torch.randn(2, cols, generator=g), 0.3 * torch.randn(200, cols, generator=g)]).double()
    return torch.randn(1, cols, generator=g).double() * 0.8, 2 * x.T @ x / x.shape[0]


def _objective(w, q, h):
    d = w - q
    return float(((d @ h) * d).sum())


S, Z, QMIN, QMAX = torch.tensor([0.3]).double(), torch.zeros(1).double(), -4, 3


def test_gptq_is_nearer_the_brute_force_optimum_than_rounding():
    levels = torch.arange(QMIN, QMAX + 1).double() * S
    grid = torch.cartesian_prod(*[levels] * 6)  # all 8^6 assignments of a 6-column, 3-bit row
    gaps = {"rtn": [], False: [], True: []}  # distance to the optimum: rounding, GPTQ, GPTQ act-order
    for seed in range(20):
        w, h = _problem(seed)
        d = w - grid
        best = float(((d @ h) * d).sum(1).min())
        gaps["rtn"].append(_objective(w, torch.clamp(torch.round(w / S), QMIN, QMAX) * S, h) - best)
        for act_order in (False, True):
            q = gptq_round(w, h, S, Z, QMIN, QMAX, damp=1e-9, act_order=act_order)
            assert torch.equal(q, torch.clamp(torch.round(q / S), QMIN, QMAX) * S)  # on the grid
            gaps[act_order].append(_objective(w, q, h) - best)
    # GPTQ is greedy, so a single row can come out worse than rounding; in aggregate it is far
    # nearer the optimum (measured: 0.59 of rounding's total gap, 0.22 with act order; 19 of
    # 20 rows no worse than rounding).
    for act_order, share in ((False, 0.7), (True, 0.35)):
        assert sum(gaps[act_order]) <= share * sum(gaps["rtn"])
        assert sum(g <= r + 1e-12 for g, r in zip(gaps[act_order], gaps["rtn"])) >= 17


def test_gptq_is_invariant_to_the_input_scale_with_a_dead_column():
    """Scaling the inputs by c scales H by c², and GPTQ's answer must not move; a dead (always-zero) input column's
    placeholder 1 on the diagonal entered the dampening, which then grew with 1/c² relative to the live curvature."""
    w, h = _problem(0)
    w, h = torch.cat([w, torch.tensor([[0.5]]).double()], 1), torch.block_diag(h, torch.zeros(1, 1).double())
    answers = [gptq_round(w, h * c * c, S, Z, QMIN, QMAX, damp=0.01) for c in (1.0, 1e-2, 1e-3)]
    assert all(torch.equal(a, answers[0]) for a in answers[1:])
    assert float(answers[0][0, -1]) == 0.0  # the dead column's weight is zero (its input always is)


def test_gptq_matches_its_closed_forms():
    # Uncorrelated inputs (diagonal H): no error to move, so GPTQ is round-to-nearest.
    w = torch.tensor([[0.44, -0.16, 0.95, -1.3]]).double()
    h = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0])).double()
    rtn = torch.clamp(torch.round(w / S), QMIN, QMAX) * S
    assert torch.equal(gptq_round(w, h, S, Z, QMIN, QMAX, damp=1e-9), rtn)
    # Two columns: after rounding w1, the best real w2 is w2 + (w1 − q1)·H12/H22 (the OBS
    # update); GPTQ rounds that.
    w = torch.tensor([[0.40, 0.20]]).double()
    h = torch.tensor([[2.0, 1.2], [1.2, 1.0]]).double()
    q1 = torch.round(w[0, 0] / S) * S
    moved = w[0, 1] + (w[0, 0] - q1) * h[0, 1] / h[1, 1]
    q = gptq_round(w, h, S, Z, QMIN, QMAX, damp=1e-12)
    assert torch.allclose(q, torch.stack([q1, torch.round(moved / S) * S]).reshape(1, 2))
    # A column no input drives is set to zero, and the rest is still rounded.
    h = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).double()
    assert torch.equal(gptq_round(torch.tensor([[0.31, 0.9]]).double(), h, S, Z, QMIN, QMAX)[0, 1],
                       torch.tensor(0.0).double())


def test_conv_hessian_is_the_im2col_gram_matrix():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
    layer = lowbit.model.quant_layer.QuantLayer(conv, lowbit.quant.spec.QuantSpec(bits=4), "c")
    x = torch.randn(3, 4, 5, 5)
    hs = layer_hessians(layer, x)
    assert len(hs) == 2 and hs[0].shape == (18, 18)
    cols = torch.nn.functional.unfold(x[:, 2:], 3, padding=1).transpose(1, 2).reshape(-1, 18).double()
    # float32 products per chunk (summed in float64): within float32 rounding of the float64 answer
    assert torch.allclose(hs[1], 2 * cols.T @ cols / cols.shape[0], atol=1e-6)
    # its columns line up with the weight: W·col reproduces the conv output
    out = torch.nn.functional.conv2d(x, conv.weight, padding=1, groups=2)[:, 3:].permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(cols.float() @ conv.weight[3:].reshape(3, -1).T, out, atol=1e-5)
    # fewer positions than columns (the other product path): the same Gram matrix
    small = lowbit.model.quant_layer.QuantLayer(torch.nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False),
                                                lowbit.quant.spec.QuantSpec(bits=4), "s")
    x = torch.randn(3, 8, 4, 4)
    cols = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 72).double()
    assert cols.shape[0] == 12 and torch.allclose(layer_hessians(small, x)[0], 2 * cols.T @ cols / 12, atol=1e-5)
    # dilation with an uneven kernel and stride, and a Conv1d: still the unfold Gram matrix
    odd = lowbit.model.quant_layer.QuantLayer(torch.nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 2),
                                                              dilation=(1, 2), bias=False),
                                              lowbit.quant.spec.QuantSpec(bits=4), "d")
    x = torch.randn(2, 3, 7, 6)
    cols = torch.nn.functional.unfold(x, (2, 3), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    cols = cols.transpose(1, 2).reshape(-1, 18).double()
    assert torch.allclose(layer_hessians(odd, x)[0], 2 * cols.T @ cols / cols.shape[0], atol=1e-5)
    line = lowbit.model.quant_layer.QuantLayer(torch.nn.Conv1d(2, 3, 3, padding=1, bias=False),
                                               lowbit.quant.spec.QuantSpec(bits=4), "l")
    x = torch.randn(2, 2, 5)
    cols = torch.nn.functional.unfold(x.unsqueeze(2), (1, 3), padding=(0, 1)).transpose(1, 2).reshape(-1, 6).double()
    assert torch.allclose(layer_hessians(line, x)[0], 2 * cols.T @ cols / cols.shape[0], atol=1e-5)


def test_gptq_step_beats_rounding_and_deploys(mnist_cnn, tmp_path):
    model, calib, test = mnist_cnn
    base = {"extends": "w4a4", "weights": {"bits": 3}, "first_last_bits": None}
    rtn = lowbit.quantize(model, base, calib=calib, progress=False)
    qm = lowbit.quantize(model, {**base, "steps": ["calibrate", "gptq"]}, calib=calib, progress=False)
    errors = qm.meta["gptq"]
    assert set(errors) == set(qm.layers.names()) and all(0 <= e < 1 for e in errors.values())
    for r in qm.layers:  # the baked weights sit on the unchanged grids
        assert torch.equal(r.layer.weight_quantizer(r.layer.weight), r.layer.weight)
    assert lowbit.evaluate(qm, batches(test)) >= lowbit.evaluate(rtn, batches(test))
    back = lowbit.load(lowbit.save(qm, tmp_path / "gptq.lowbit"), model=type(model)())
    assert torch.equal(back(test[0][:100]), qm(test[0][:100]))
    both = lowbit.quantize(model, {**base, "steps": ["calibrate", {"gptq": {"act_order": True}}, "bias_correction"]},
                           calib=calib, progress=False)
    assert "bias_correction" in both.meta and "gptq" in both.meta
    with pytest.raises(RecipeError, match="damp"):
        load_recipe({**base, "steps": ["calibrate", {"gptq": {"damp": 0}}]})
    with pytest.raises(LowbitError, match="put `calibrate` before it"):
        lowbit.quantize(model, {**base, "steps": ["gptq", "calibrate"]}, calib=calib, progress=False)


def test_rows_per_column_takes_each_layers_first_images(mnist_cnn, monkeypatch):
    conv = lowbit.model.quant_layer.QuantLayer(torch.nn.Conv2d(16, 8, 3, padding=1), lowbit.quant.spec.QuantSpec(bits=4),
                                               "c")
    one = torch.zeros(1, 16, 32, 32)  # 144 columns, 1,024 positions per image
    assert images_for_rows(conv, one, 1024, 512) == 72 and images_for_rows(conv, one, 50, 512) == 50
    assert images_for_rows(conv, one, 1024, None) == 1024 and images_for_rows(conv, one, 1024, 1) == 1
    same = lowbit.model.quant_layer.QuantLayer(torch.nn.Conv2d(16, 8, 3, padding="same"),
                                               lowbit.quant.spec.QuantSpec(bits=4), "same")
    with pytest.raises(LowbitError, match="'same' uses padding='same'.*only explicit zero padding"):
        images_for_rows(same, one, 1024, 512)  # named, not a shape error from building its columns
    model, calib, _ = mnist_cnn
    seen: dict[str, tuple[int, int | None]] = {}
    real = gptq_module.gptq_layer

    def spy(layer, x, *args):
        seen[layer.name] = (x.shape[0], None if args[3] is None else args[3].shape[0])
        return real(layer, x, *args)

    monkeypatch.setattr(gptq_module, "gptq_layer", spy)
    base = {"extends": "w4a4", "calibration": {"samples": 64}}
    step = {"target": "float", "regrid": True, "grid_objective": "output"}
    every = lowbit.quantize(model, {**base, "steps": ["calibrate", {"gptq": step}]}, calib=calib, progress=False)
    assert set(seen.values()) == {(64, 64)}  # no cap: every calibration image, float and quantized alike
    capped = lowbit.quantize(model, {**base, "steps": ["calibrate", {"gptq": {**step, "rows_per_column": 20}}]},
                             calib=calib, progress=False)
    # the wide early maps take few images, layers with few positions per column every one
    assert all(q == f for q, f in seen.values()) and seen["conv1"][0] < seen["conv2"][0] < 64 == seen["linear"][0]
    assert any(not torch.equal(a, b) for a, b in zip(every.parameters(), capped.parameters()))
    huge = lowbit.quantize(model, {**base, "steps": ["calibrate", {"gptq": {**step, "rows_per_column": 10**9}}]},
                           calib=calib, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(every.parameters(), huge.parameters()))
    with pytest.raises(RecipeError, match="rows_per_column"):
        load_recipe({**base, "steps": ["calibrate", {"gptq": {"rows_per_column": 0}}]})


def test_float_target_retargets_to_the_least_squares_weights():
    g = torch.Generator().manual_seed(3)
    xf = torch.randn(400, 5, generator=g).double()
    xq = xf + 0.3 * torch.randn(400, 5, generator=g).double()  # upstream quantization error
    w = torch.randn(3, 5, generator=g).double()
    h, c = 2 * xq.T @ xq / 400, 2 * xf.T @ xq / 400
    # undamped, W* is the least-squares fit of W·X_f from X_q
    lstsq = torch.linalg.lstsq(xq, xf @ w.T).solution.T
    assert torch.allclose(retarget(w, h, c, damp=1e-12), lstsq, atol=1e-8)
    # no upstream error (C = H): W back, at any dampening
    assert torch.allclose(retarget(w, h, h, damp=0.1), w, atol=1e-10)
    # dampening pulls W* towards W
    far, near = (float((retarget(w, h, c, d) - w).norm()) for d in (1e-6, 10.0))
    assert near < 0.2 * far


def test_float_target_gptq_lowers_the_error_against_the_float_output():
    layer = lowbit.model.quant_layer.QuantLayer(torch.nn.Linear(16, 8, bias=False), lowbit.quant.spec.QuantSpec(bits=6), "fc")
    g = torch.Generator().manual_seed(5)
    xf = torch.randn(512, 16, generator=g)
    gain = 0.8 + 0.4 * torch.rand(16, generator=g)  # upstream error a later layer can undo (per-channel gains) ...
    xq = xf * gain + 0.05 * torch.randn(512, 16, generator=g)  # ... and noise it cannot
    wmax = layer.module.weight.detach().abs().amax()
    layer.weight_quantizer.set_range(-wmax, wmax)  # one calibrated per-tensor grid
    w = layer.module.weight.detach().clone()
    errors = {}
    for name, inputs in (("plain", None), ("float", xf)):
        layer.module.weight.data.copy_(w)
        gptq_layer(layer, xq, float_inputs=inputs, float_weight=w)
        q = layer.module.weight.detach()
        assert torch.equal(layer.weight_quantizer(q), q)  # on the calibrated grid either way
        errors[name] = float((xf @ w.T - xq @ q.T).norm())
    assert errors["float"] < 0.6 * errors["plain"]
    with pytest.raises(LowbitError, match="differ in shape"):
        gptq_layer(layer, xq, float_inputs=xf[:10], float_weight=w)


def test_float_target_is_a_recipe_option(mnist_cnn):
    model, calib, test = mnist_cnn
    base = {"extends": "w4a4", "weights": {"bits": 3}, "first_last_bits": None}
    qm = lowbit.quantize(model, {**base, "steps": ["calibrate", {"gptq": {"target": "float"}}]}, calib=calib,
                         progress=False)
    rtn = lowbit.quantize(model, base, calib=calib, progress=False)
    assert lowbit.evaluate(qm, batches(test)) >= lowbit.evaluate(rtn, batches(test))
    with pytest.raises(RecipeError, match="target"):
        load_recipe({**base, "steps": ["calibrate", {"gptq": {"target": "teacher"}}]})
    steps = load_recipe("w3a3-gptq").steps  # the built-ins that ship it
    assert [n for n, _ in steps] == ["calibrate", "gptq"] and steps[1][1]["target"] == "float" and steps[1][1]["regrid"]
    w2a4 = load_recipe("w2a4-gptq")
    assert w2a4.steps[1][1]["target"] == "float" and w2a4.steps[1][1]["regrid"] and not w2a4.weights.spec.symmetric
    assert w2a4.steps[1][1]["grid_objective"] == "output"
    affine = load_recipe("w3a3-gptq-affine")  # the 3-minute W3A3 leader of benchmarks/ptq_budgets.py
    assert [n for n, _ in affine.steps] == ["calibrate", "gptq", "bias_correction"]
    assert affine.steps[1][1] == {"target": "float"} and not affine.weights.spec.symmetric
    for name in ("w3a3-gptq-moments", "w2a4-gptq-moments"):  # the 60 s leaders of W3A3 and W2A4
        fast = load_recipe(name)
        assert [n for n, _ in fast.steps] == ["calibrate", "gptq", "match_moments"], name
        assert fast.steps[1][1] == {"target": "float", "regrid": True, "grid_objective": "output"}, name
        assert fast.steps[0][1] == {"observe": "float"} and not fast.weights.spec.symmetric, name


def test_regrid_fits_the_grid_to_the_refitted_weights():
    torch.manual_seed(0)  # the layer's initial weights
    layer = lowbit.model.quant_layer.QuantLayer(torch.nn.Linear(16, 8, bias=False), lowbit.quant.spec.QuantSpec(bits=4), "fc")
    g = torch.Generator().manual_seed(7)
    xq = torch.randn(1024, 16, generator=g)
    xf = 2 * xq  # the float network's input is twice what the layer reads: W* = 2W exactly
    w = layer.module.weight.detach().clone()
    q = layer.weight_quantizer
    calibrate_weight_quantizer(q, w, "minmax")
    before = q.scale.clone()
    gptq_layer(layer, xq, damp=1e-9, float_inputs=xf, float_weight=w, regrid=("minmax", {}))
    assert torch.allclose(q.scale, 2 * before, rtol=1e-4)  # the range of 2W, not W's
    assert torch.equal(q(layer.module.weight.detach()), layer.module.weight.detach())  # rounded onto the new grid
    # error feedback may move a weight past its nearest level, never by more than a step or two
    assert torch.allclose(layer.module.weight.detach(), 2 * w, atol=2 * float(q.scale))


def test_regrid_needs_the_float_target(mnist_cnn):
    model, calib, _ = mnist_cnn
    base = {"extends": "w4a4", "weights": {"bits": 3}, "first_last_bits": None}
    with pytest.raises(LowbitError, match="needs target: float"):
        lowbit.quantize(model, {**base, "steps": ["calibrate", {"gptq": {"regrid": True}}]}, calib=calib,
                        progress=False)
    with pytest.raises(RecipeError, match="needs target: float"):  # refused when the recipe loads, before calibrating
        load_recipe({**base, "steps": ["calibrate", {"gptq": {"regrid": True}}]})
    qm = lowbit.quantize(model, {**base, "steps": ["calibrate", {"gptq": {"target": "float", "regrid": True}}]},
                         calib=calib, progress=False)
    assert qm.meta["gptq"]


def _rounded(w, lo, hi, spec):
    """w rounded onto the per-row grids [lo, hi]."""
    from lowbit.quant import functional as F
    s, z = F.range_to_scale_zero_point(lo, hi, spec, True)
    return F.fake_quantize_broadcast(w, s[:, None], z[:, None], *spec.code_range(True), spec.grid)


def test_output_grid_with_isotropic_inputs_is_the_mse_grid():
    from lowbit.ptq.gptq import output_weighted_range
    from lowbit.quant.estimators import mse
    w = torch.randn(8, 20, generator=torch.Generator().manual_seed(3))
    for per_channel in (True, False):
        spec = lowbit.quant.spec.QuantSpec(bits=2, symmetric=False, per_channel=per_channel)
        lo, hi = output_weighted_range(w.double(), [3.0 * torch.eye(20, dtype=torch.float64)], spec, True)
        lo_m, hi_m = mse(w if per_channel else w.reshape(1, -1), spec, True)
        assert lo.shape == (8 if per_channel else 1,)
        assert torch.allclose(lo, lo_m) and torch.allclose(hi, hi_m)


def test_output_grid_fits_the_weight_the_inputs_drive():
    from lowbit.ptq.gptq import output_weighted_range
    from lowbit.quant.estimators import mse
    spec = lowbit.quant.spec.QuantSpec(bits=2, per_channel=True)  # symmetric: codes -2..1 times the scale
    w = torch.tensor([[0.37, 1.0, -0.9, 0.55, -0.6, 0.2]])
    h = torch.diag(torch.tensor([1e4, 1, 1, 1, 1, 1], dtype=torch.float64))  # only column 0's input is large

    def col0_error(lo, hi):
        q = _rounded(w, lo, hi, spec)
        return float((q - w)[0, 0].abs()), float((((q - w).double() @ h) * (q - w)).sum())

    err_out, obj_out = col0_error(*output_weighted_range(w.double(), [h], spec, True))
    err_mse, obj_mse = col0_error(*mse(w, spec, True))
    assert err_mse > 0.05  # the weight-MSE grid leaves column 0 far from a level
    assert err_out < 0.1 * err_mse and obj_out < 0.5 * obj_mse


def test_grid_objective_is_a_recipe_option(mnist_cnn):
    model, calib, _ = mnist_cnn
    base = {"extends": "w4a4", "weights": {"bits": 3}, "first_last_bits": None}
    with pytest.raises(RecipeError, match="needs regrid: true"):
        load_recipe({**base, "steps": ["calibrate", {"gptq": {"target": "float", "grid_objective": "output"}}]})
    with pytest.raises(RecipeError, match="grid_objective"):
        load_recipe({**base, "steps": ["calibrate", {"gptq": {"target": "float", "regrid": True,
                                                               "grid_objective": "hessian"}}]})
    steps = ["calibrate", {"gptq": {"target": "float", "regrid": True, "grid_objective": "output"}}]
    qm = lowbit.quantize(model, {**base, "steps": steps}, calib=calib, progress=False)
    layer = qm.layers[1].layer
    q = layer.weight_quantizer
    assert torch.equal(q(layer.module.weight.detach()), layer.module.weight.detach())  # codes on the searched grid


def test_output_grid_uses_each_groups_own_hessian():
    from lowbit.model.quant_layer import QuantLayer
    from lowbit.ptq.gptq import output_weighted_range
    from lowbit.quant.estimators import mse
    torch.manual_seed(1)
    layer = QuantLayer(torch.nn.Conv2d(4, 6, 3, groups=2, bias=False),
                       lowbit.quant.spec.QuantSpec(bits=2, per_channel=True, symmetric=False), "c")
    x = torch.randn(32, 4, 6, 6) * torch.tensor([4.0, 0.1, 0.1, 4.0])[None, :, None, None]  # groups see unlike inputs
    hs = layer_hessians(layer, x)
    w = layer.module.weight.detach().reshape(6, -1)
    spec = layer.weight_quantizer.spec

    def row_errors(lo, hi):
        d = (_rounded(w, lo, hi, spec) - w).double()
        return torch.cat([((d[g * 3:(g + 1) * 3] @ h) * d[g * 3:(g + 1) * 3]).sum(1) for g, h in enumerate(hs)])

    out, ref = row_errors(*output_weighted_range(w.double(), hs, spec, True)), row_errors(*mse(w, spec, True))
    assert bool((out <= ref * (1 + 1e-5) + 1e-12).all()) and float(out.sum()) < float(ref.sum())
