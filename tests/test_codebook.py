"""Codebook weights: k-means (plain and Hessian-weighted), centroid fine-tuning, TTQ; deployment."""
import copy
import os

import pytest
import torch

import lowbit
from lowbit.deploy.artifact import theoretical_bytes
from lowbit.errors import RecipeError
from lowbit.quant.codebook import CodebookQuantizer, kmeans_1d
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.registry import make_trainable
from lowbit.quant.spec import QuantSpec
from lowbit.recipes.recipe import load_recipe


def test_kmeans_recovers_the_centres_of_a_known_mixture():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.2, 0.5, 2.0])
    values = torch.cat([c + 0.02 * torch.randn(3000, generator=g) for c in centres])
    found = kmeans_1d(values[torch.randperm(values.numel(), generator=g)], 4)
    assert torch.allclose(found, centres, atol=0.01)


def test_hessian_weighting_pulls_a_centroid_toward_high_curvature_weights():
    values = torch.tensor([0.0, 1.0, 10.0])
    plain = kmeans_1d(values, 2)
    weighted = kmeans_1d(values, 2, importance=torch.tensor([1.0, 99.0, 1.0]))
    assert plain[0] == pytest.approx(0.5)          # the mean of {0, 1}
    assert weighted[0] == pytest.approx(0.99)      # Σ h·w / Σ h: the weight with h = 99 dominates
    assert plain[1] == weighted[1] == pytest.approx(10.0)


def test_codebook_codes_and_values_round_trip():
    q = CodebookQuantizer(QuantSpec(bits=2), torch.tensor([0.3, -1.0, 0.0, 2.0]))
    assert torch.equal(q.centroids, torch.tensor([-1.0, 0.0, 0.3, 2.0]))  # kept sorted
    x = torch.tensor([-5.0, -0.4, 0.1, 0.2, 1.0, 1.2, 9.0])
    codes = q.codes(x)
    assert codes.tolist() == [0, 1, 1, 2, 2, 3, 3]  # the nearest centroid
    assert torch.equal(q.dequantize(codes), q(x))
    assert q.code_range() == (0, 3) and q.param_bits() == 4 * 32
    with pytest.raises(ValueError, match="holds 1..4 centroids"):
        CodebookQuantizer(QuantSpec(bits=2), torch.zeros(5))


def test_centroid_fine_tuning_sums_the_gradients_of_each_cluster():
    w = torch.tensor([[-1.1, -0.9, 0.1], [0.05, 1.0, 1.2]])
    book = CodebookQuantizer(QuantSpec(bits=2), torch.tensor([-1.0, 0.0, 1.1]))
    q = make_trainable(book, "kmeans", "weights", weight=w)
    out = q(w)
    assert torch.allclose(out, torch.tensor([[-1.0, -1.0, 0.0], [0.0, 1.1, 1.1]]))
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out.backward(g)
    assert torch.equal(q.centroids.grad, torch.tensor([3.0, 7.0, 11.0]))  # Deep Compression eq. 3
    with pytest.raises(RecipeError, match="put the `kmeans` step before `qat`"):
        make_trainable(UniformQuantizer(QuantSpec(bits=2)), "kmeans", "weights", weight=w)


def test_ttq_forward_and_gradients_follow_the_paper():
    w = torch.tensor([1.0, -0.5, 0.02, -0.01, 0.3, -2.0]).requires_grad_()
    src = UniformQuantizer(QuantSpec(bits=2, per_channel=False))
    src.signed = True
    src.set_params(torch.tensor(0.1), torch.tensor(0.0))
    q = make_trainable(src, "ttq", "weights", weight=w.detach())
    m, wt = 2.0, w.detach() / 2.0
    pos, neg = wt > 0.05, wt < -0.05
    assert float(q.wp.detach()) == pytest.approx(float(wt[pos].mean()))
    assert float(q.wn.detach()) == pytest.approx(float(-wt[neg].mean()))
    out = q(w)
    expected = m * (q.wp.detach() * pos - q.wn.detach() * neg)
    assert torch.allclose(out, expected)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out.backward(g)
    assert float(q.wp.grad) == pytest.approx(m * float(g[pos].sum()))       # eq. 7
    assert float(q.wn.grad) == pytest.approx(-m * float(g[neg].sum()))
    scale = torch.where(pos, q.wp.detach(), torch.where(neg, q.wn.detach(), torch.ones(())))
    assert torch.allclose(w.grad, g * scale)                               # eq. 8
    levels = q.deploy(w.detach()).centroids
    assert torch.allclose(levels, torch.stack([-q.wn.detach() * m, torch.zeros(()), q.wp.detach() * m]))


def test_codebook_recipes_are_checked():
    with pytest.raises(RecipeError, match="`kmeans` before `qat`"):
        load_recipe({"extends": "w4a4", "weights": {"quantizer": "kmeans"},
                     "steps": ["calibrate", {"qat": {"epochs": 1}}]})
    with pytest.raises(RecipeError, match="one set of levels per layer: set weights.per_channel: false"):
        load_recipe({"extends": "w4a4", "weights": {"bits": 2, "quantizer": "ttq"}})
    with pytest.raises(RecipeError, match="needs hessian: fisher"):
        lowbit.quantize(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)),
                        {"extends": "w4a4", "first_last_bits": None, "steps": ["calibrate", {"kmeans": {"joint": True}}]},
                        calib=torch.randn(8, 4), progress=False)


@pytest.mark.parametrize("hessian", ["none", "fisher"])
def test_kmeans_ptq_saves_at_its_true_size_and_runs_in_onnx(mnist_cnn, tmp_path, hessian):
    model, calib, test = mnist_cnn
    recipe = {"extends": "w4a4", "name": "km", "weights": {"bits": 3},
              "steps": ["calibrate", {"kmeans": {"hessian": hessian}}]}
    qm = lowbit.quantize(model, recipe, calib=calib, progress=False)
    clustered = [r for r in qm.layers if isinstance(r.layer.weight_quantizer, CodebookQuantizer)]
    assert len(clustered) == len(qm.layers) - 2  # the 8-bit first and last layers keep their int8 grid
    for r in clustered:
        assert len(torch.unique(r.layer.quantized_weight().detach())) <= 8
    uniform = lowbit.quantize(model, {**recipe, "steps": ["calibrate"]}, calib=calib, progress=False)
    acc = lambda m: float((m(test[0][:1000]).argmax(1) == test[1][:1000]).float().mean())  # noqa: E731
    assert acc(qm) >= acc(uniform) - 0.01  # free centroids fit at least as well as the uniform grid
    path = lowbit.save(qm, tmp_path / "km.lowbit")
    back = lowbit.load(path, model=type(model)())
    assert torch.equal(back(test[0][:200]), qm(test[0][:200]))
    assert theoretical_bytes(qm) <= os.path.getsize(path) <= theoretical_bytes(qm) + 4096
    # No integer kernel runs a codebook layer (ONNX rebuilds its weight in float), so its bias
    # stays float even behind a 4-bit input: rounding it to s_in·s_w used the codebook's
    # placeholder step 1.0 and moved the logits by 0.3 on average against every runtime.
    for r in clustered:
        assert r.input_quantizer is not None and r.input_quantizer.enabled
        assert torch.equal(r.layer.quantized_bias(), r.layer.bias)
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    path = lowbit.export_onnx(qm, tmp_path / "km.onnx", test[0][:1])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ run as written: float maths
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: test[0][:300].numpy()})[0]
    with torch.no_grad():  # equal up to a rare float-order flip at a 4-bit boundary (it was 0.17-0.3 on average)
        assert float((torch.from_numpy(logits) - qm(test[0][:300])).abs().mean()) < 1e-3
    # Fully optimised (lowbit.OnnxModel: ORT_ENABLE_ALL, fused int8 kernels for the 8-bit first/last layers).
    # ORT folded the codebook's Gather into a float weight and re-quantized it to int8 between the 4-bit
    # DequantizeLinear/QuantizeLinear pair: 0.08 off per logit; the indices now pass a DequantizeLinear.
    optimised = torch.as_tensor(lowbit.OnnxModel(path, threads=1)(test[0][:300]))
    with torch.no_grad():
        reference = qm(test[0][:300])
    assert float((optimised - reference).abs().mean()) < 1e-3
    assert (optimised.argmax(1) == reference.argmax(1)).float().mean() > 0.99


@pytest.mark.parametrize("kind", ["kmeans", "ttq", "inq", "lqnet"])
def test_codebook_qat_trains_and_deploys_bit_exact(mnist_cnn, tmp_path, kind):
    model, calib, test = mnist_cnn
    weights = {"bits": 2, "quantizer": kind, "per_channel": kind == "lqnet"}
    epochs = 2 if kind == "inq" else 1  # INQ: two stages (50%, then 75%), then 100% after the last step
    steps = ["calibrate"] + (["kmeans"] if kind == "kmeans" else []) + [
        {"qat": {"epochs": epochs, "batch_size": 64, "lr": 0.002, "val_samples": 200, "steps_per_epoch": 12 // epochs}}]
    recipe = {"extends": "w4a4", "name": f"test-{kind}", "weights": weights, "quantize_adds": False,
              "overrides": [{"pattern": "*", "a_bits": 32}], "steps": steps}
    qm = lowbit.quantize(model, recipe, calib=calib, train=(test[0][:1000], test[1][:1000]), progress=False)
    assert qm.meta["qat"]["best_epoch"] == epochs  # INQ keeps its last stage, whatever validation said
    inner = qm.layers[1].layer
    assert isinstance(inner.weight_quantizer, CodebookQuantizer)
    rows = inner.quantized_weight().detach().reshape(inner.weight.shape[0], -1)
    assert max(len(torch.unique(r)) for r in rows) <= (3 if kind == "ttq" else 4)
    back = lowbit.load(lowbit.save(qm, tmp_path / f"{kind}.lowbit"), model=type(model)())
    assert torch.equal(back(test[0][:100]), qm(test[0][:100]))
    assert back.layers.rows()[1]["quantizer"] == kind
    if kind == "lqnet":  # the 8-bit first/last layers keep LSQ's integer grid, not 256 float levels per channel
        assert [back.layers.rows()[i]["quantizer"] for i in (0, -1)] == ["lsq", "lsq"]
        assert not isinstance(qm.layers[0].layer.weight_quantizer, CodebookQuantizer)
    if kind == "lqnet":  # per-channel codebooks: ONNX gathers from the flattened tables
        pytest.importorskip("onnxruntime")
        onnx_model = lowbit.OnnxModel(lowbit.export_onnx(qm, tmp_path / "lq.onnx", test[0][:1]), threads=1)
        ours, theirs = qm(test[0][:300]).detach(), onnx_model(test[0][:300])
        assert float((ours - theirs).abs().max()) < 1e-3 * float(ours.abs().max())


def test_lqnet_starts_on_the_uniform_grid_and_fits_its_basis_by_least_squares():
    src = UniformQuantizer(QuantSpec(bits=2, grid="midrise", per_channel=True))
    src.signed = True
    src.set_params(torch.tensor([0.5, 1.0]), torch.zeros(2))
    q = make_trainable(src, "lqnet", "weights", momentum=1.0)
    assert torch.allclose(torch.sort(q.levels(), 1)[0], torch.tensor([[-0.75, -0.25, 0.25, 0.75],
                                                                        [-1.5, -0.5, 0.5, 1.5]]))
    torch.manual_seed(0)
    w = torch.randn(2, 500) * torch.tensor([[0.4], [1.3]])
    before = float((q.deployed_weight(w) - w).pow(2).mean())
    codes = q.encode(w)
    q.train()
    q(w)  # one QEM step with momentum 1: the basis is the least-squares fit of these encodings
    b = q.bits_table[codes]
    for c in range(2):
        expected = torch.linalg.lstsq(b[c], w[c].unsqueeze(-1)).solution.squeeze(-1)
        assert torch.allclose(q.basis[c], expected, atol=1e-4)
    for _ in range(10):
        q(w)
    after = float((q.deployed_weight(w) - w).pow(2).mean())
    assert after < before  # QEM lowers the quantization error
    src.set_bits(8)
    with pytest.raises(RecipeError, match="lqnet weights are for 4 bits or fewer"):
        make_trainable(src, "lqnet", "weights")


@pytest.mark.parametrize("bits", [2, 3])
def test_weights_on_the_midrise_grid_are_a_fixed_point_of_lqnet(bits):
    """Why a GPTQ start works for LQ-Nets weights: the initial basis (s/2, s, 2s, ...) has exactly the
    2^K levels of the mid-rise grid of step s, so weights GPTQ rounded onto that grid are reproduced
    and a QEM step on them gives the basis back (benchmarks/qat_families_e30.sh's GPTQ-start rows)."""
    src = UniformQuantizer(QuantSpec(bits=bits, grid="midrise", per_channel=True))
    src.signed = True
    step = torch.tensor([0.02, 0.3])
    src.set_params(step, torch.zeros(2))
    q = make_trainable(src, "lqnet", "weights", momentum=1.0)
    half = 2 ** (bits - 1)
    grid = (torch.arange(-half, half) + 0.5)[None] * step[:, None]
    torch.testing.assert_close(torch.sort(q.levels(), 1)[0], grid)
    torch.manual_seed(0)
    w = torch.gather(grid, 1, torch.randint(0, 2 * half, (2, 300)))
    basis = q.basis.clone()
    q.train()
    torch.testing.assert_close(q(w), w)
    torch.testing.assert_close(q.basis, basis, rtol=1e-5, atol=1e-7)


def test_qem_basis_from_code_counts_equals_least_squares_on_the_encoding_matrix():
    from lowbit.quant.learned.lqnet import _all_bits, least_squares_basis

    torch.manual_seed(1)
    table = _all_bits(3)
    values, codes = torch.randn(3, 400), torch.randint(0, 8, (3, 400))
    codes[1][codes[1] == 5] = 4  # a level no value uses
    fitted = least_squares_basis(values, codes, table)
    for r in range(3):
        expected = torch.linalg.lstsq(table[codes[r]].double(), values[r].double().unsqueeze(-1)).solution.squeeze(-1)
        assert torch.allclose(fitted[r].double(), expected, atol=1e-5)


def test_inq_levels_and_schedule_freeze_exactly_the_stated_portions():
    from lowbit.quant.learned.inq import power_of_two_levels

    w = torch.linspace(-0.9, 0.9, 200).reshape(20, 10)
    levels = power_of_two_levels(w, 5)  # s = 0.9: n1 = floor(log2(1.2)) = 0, n2 = 0 + 1 - 8 = -7
    assert torch.allclose(levels[levels > 0], torch.tensor([2.0**n for n in range(-7, 1)]))
    assert levels.numel() == 17 and levels[8] == 0  # 2^(b-1) + 1 levels
    src = UniformQuantizer(QuantSpec(bits=5, per_channel=False))
    src.signed = True
    src.set_params(torch.tensor(0.1), torch.tensor(0.0))
    q = make_trainable(src, "inq", "weights", weight=w)
    for epoch, portion in [(0, 0.5), (2, 0.75), (4, 0.875)]:  # 6 epochs: stages at 0, 2, 4
        assert q.portion_at(epoch, 6) == portion
        q.freeze_portion(w, portion)
        assert int(q.frozen.sum()) == round(portion * w.numel())
        assert float(w.abs()[q.frozen].min()) >= float(w.abs()[~q.frozen].max())  # the largest first
    x = w.clone().requires_grad_()
    out = q(x)
    assert torch.equal(out.detach()[~q.frozen], w[~q.frozen])  # the rest still float
    assert set(out.detach()[q.frozen].abs().unique().tolist()) <= set(levels.abs().tolist())
    out.sum().backward()
    assert torch.equal(x.grad, (~q.frozen).float())  # quantized weights are fixed
    assert torch.equal(q.deployed_weight(w), q.project(w))  # the last portion at the end: all of them
    assert float(q.project(torch.tensor([0.70, 0.80, 0.004, 0.0039]))[0]) == 0.5   # 3β/2 = 0.75 splits 0.5 / 1
    assert q.project(torch.tensor([0.80, 0.004, 0.0039])).tolist() == [1.0, 2.0**-7, 0.0]  # β/2 splits 0 / 2^-7


def test_inq_frozen_weights_keep_their_level_while_the_latents_drift():
    """INQ eq. 4 masks the quantized portion's update out: weight decay and momentum still move those
    latents (their task gradient is zero), and the forward and the deployed weight must not follow."""
    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.3
    src = UniformQuantizer(QuantSpec(bits=4, per_channel=False))
    src.signed = True
    src.set_params(torch.tensor(0.1), torch.tensor(0.0))
    q = make_trainable(src, "inq", "weights", weight=w)
    q.freeze_portion(w, 0.5)
    frozen = q.frozen.clone()
    first = q(w).detach()
    assert not q.frozen_codes.is_floating_point()  # so a weight average (lowbit.qat.ema) copies it, never blends
    torch.testing.assert_close(first[frozen], q.project(w)[frozen])
    latent = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([latent], lr=0.1, momentum=0.9, weight_decay=0.05)
    for _ in range(50):  # the frozen entries' only update is the decay: they shrink toward 0
        opt.zero_grad()
        q(latent).pow(2).sum().backward()
        opt.step()
    moved = (q.project(latent.detach()) != q.project(w)) & frozen
    assert int(moved.sum()) > 10  # the latents of frozen weights did cross level boundaries
    after = q(latent).detach()
    assert torch.equal(after[frozen], first[frozen])
    assert torch.equal(q.deployed_weight(latent.detach())[frozen], first[frozen])
    assert torch.equal(q.deployed_weight(latent.detach())[~frozen], q.project(latent.detach())[~frozen])
    q.freeze_portion(latent.detach(), 0.75)  # a later stage takes the newly frozen ones' levels from now on
    newly = q.frozen & ~frozen
    torch.testing.assert_close(q(latent).detach()[newly], q.project(latent.detach())[newly])
    legacy = {k: v for k, v in q.state_dict().items() if k not in ("frozen_codes", "captured")}
    old = make_trainable(src, "inq", "weights", weight=w)
    old.load_state_dict(legacy)  # a checkpoint from before the levels were held: taken again on the next use
    assert torch.equal(old.frozen, q.frozen) and not bool(old.captured.any())
    torch.testing.assert_close(old(latent).detach(), torch.where(q.frozen, q.project(latent.detach()), latent.detach()))


def test_an_inq_checkpoint_from_before_the_held_levels_still_resumes(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowbit.qat.checkpoint import TrainingState, load_state, save_state

    w = torch.linspace(-0.9, 0.9, 200).reshape(20, 10)
    src = UniformQuantizer(QuantSpec(bits=5, per_channel=False))
    src.signed = True
    src.set_params(torch.tensor(0.1), torch.tensor(0.0))
    holder = torch.nn.Module()
    holder.q = make_trainable(src, "inq", "weights", weight=w)
    holder.q.freeze_portion(w, 0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(w.clone())], lr=0.1)
    average = {k: v.clone() for k, v in holder.state_dict().items()}  # a run with a weight average (qat ema)
    save_state(tmp_path, holder, opt, TrainingState(epoch=1, history=[{}], ema=average), {"qat": {}})
    path = tmp_path / "state-1.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not k.endswith(("frozen_codes", "captured"))}, str(path))
    fresh = torch.nn.Module()
    fresh.q = make_trainable(src, "inq", "weights", weight=w)
    state = load_state(tmp_path, fresh, opt, {"qat": {}})
    assert state.epoch == 1
    assert torch.equal(fresh.q.frozen, holder.q.frozen) and not bool(fresh.q.captured.any())
    assert torch.equal(fresh.q(w), holder.q(w))
    assert set(state.ema) == set(fresh.state_dict())  # the average gets the new state too, so it fits the model
    assert torch.equal(state.ema["q.frozen"], holder.q.frozen) and not bool(state.ema["q.captured"].any())


def test_layers_behind_or_with_kinds_that_deploy_to_codebooks_keep_a_float_bias_while_training(mnist_cnn):
    """LQ-Nets inputs, and LQ-Nets / k-means / TTQ / INQ weights, become codebooks at deployment, where no
    integer kernel runs the layer and its bias stays float: in training the bias must not be rounded either
    (it was, to s_in·s_w with a stale step, so the trained and the deployed model differed)."""
    from lowbit.qat.convert import to_training_form

    model, calib, _ = mnist_cnn
    for weight_kind, act_kind, bits in (("lsq", "lqnet", 2), ("lqnet", "lsq+", 1), ("lsq", "lsq+", 2)):
        qm = lowbit.quantize(model, {"extends": "w4a4", "name": "t", "weights": {"bits": bits, "grid": "midrise"},
                                     "activations": {"bits": 2}}, calib=calib, progress=False)
        to_training_form(qm, weight_kind, act_kind, batches=[calib])
        layer = qm.layers[1].layer
        layer.bn = None  # (the folded form: the bias is the layer's own)
        with torch.no_grad():
            layer.module.bias.add_(0.123)
        rounded = not torch.equal(layer.quantized_bias(), layer.bias)
        assert rounded == ((weight_kind, act_kind) == ("lsq", "lsq+")), (weight_kind, act_kind)  # the control rounds


def test_joint_hessian_kmeans_shares_one_codebook_across_layers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 10))
    recipe = {"extends": "w4a4", "weights": {"bits": 3}, "first_last_bits": None,
              "steps": ["calibrate", {"kmeans": {"hessian": "fisher", "joint": True}}]}
    qm = lowbit.quantize(net, recipe, calib=torch.randn(64, 16), progress=False)
    books = [r.layer.weight_quantizer.centroids for r in qm.layers]
    assert len(books) == 3 and all(torch.equal(b, books[0]) for b in books)
    assert books[0].numel() == 8 and qm.meta["kmeans"] == {r.name: 8 for r in qm.layers}


def test_midpoint_count_equals_bucketize_including_ties():
    from lowbit.quant.codebook import count_below

    torch.manual_seed(2)
    for levels in (1, 2, 4, 8, 16, 17, 256):  # 17 and 256: bucketize's own path
        mid = torch.sort(torch.rand(levels - 1) * 3)[0]
        x = torch.cat([torch.randn(5000) * 2 + 1, mid, torch.tensor([-1e9, 1e9])])  # values exactly on a midpoint too
        assert torch.equal(count_below(x, mid), torch.bucketize(x, mid))
        compact = count_below(x, mid, compact=True)  # the uint8 counter where one pass per midpoint ran
        assert compact.dtype == (torch.uint8 if 1 <= mid.numel() <= 15 else torch.int64)
        assert torch.equal(compact.long(), torch.bucketize(x, mid))


def test_lqnet_activations_start_on_the_unsigned_grid_and_fit_their_basis():
    src = UniformQuantizer(QuantSpec(bits=2, signed=False, symmetric=False))
    src.signed = False
    src.set_params(torch.tensor(0.5), torch.tensor(0.0))
    q = make_trainable(src, "lqnet", "activations", momentum=1.0)
    assert torch.allclose(torch.sort(q.levels())[0], torch.tensor([0.0, 0.5, 1.0, 1.5]))  # v = s·[1, 2]
    x = torch.tensor([-0.1, 0.2, 0.3, 0.74, 1.6, 3.0], requires_grad=True)
    q.eval()
    out = q(x)
    assert torch.equal(out.detach(), torch.tensor([0.0, 0.0, 0.5, 0.5, 1.5, 1.5]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 0, 0]))  # clipped-ReLU STE: 1 on [0, top]
    relu_out = torch.tensor([0.0, 0.2, 1.5, 1.6, 3.0], requires_grad=True)  # no value below 0: the one-comparison mask
    q(relu_out).sum().backward()
    assert torch.equal(relu_out.grad, torch.tensor([1.0, 1, 1, 0, 0]))
    assert q(torch.empty(0, requires_grad=True)).shape == (0,)  # an empty tensor has no min to take
    assert torch.equal(q(relu_out.detach()), q(relu_out).detach())  # no gradient asked for: no mask, same values
    torch.manual_seed(0)
    a = torch.relu(torch.randn(4000)) ** 1.5  # skewed: the uniform grid is not its best fit
    before = float((q(a) - a).pow(2).mean())
    codes = q.encode(a)
    q.train()
    q(a)  # QEM with momentum 1: v is the least-squares fit of these {0, 1} encodings
    b = q.bits_table[codes]
    expected = torch.linalg.lstsq(b, a.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(q.basis.reshape(-1), expected, atol=1e-4)
    for _ in range(10):
        q(a)
    q.eval()
    assert float((q(a) - a).pow(2).mean()) < before
    book = q.deploy()
    assert isinstance(book, CodebookQuantizer) and not book.integer_kernel and book.method == "lqnet"
    assert torch.equal(book(a), q(a))
    signed = UniformQuantizer(QuantSpec(bits=2, signed=True))
    signed.signed = True
    signed.set_params(torch.tensor(0.5), torch.tensor(0.0))
    with pytest.raises(RecipeError, match="non-negative .* is signed or offset"):
        make_trainable(signed, "lqnet", "activations")
    src.set_bits(8)
    with pytest.raises(RecipeError, match="4 bits or fewer"):
        make_trainable(src, "lqnet", "activations")


def test_lqnet_activations_give_the_same_answer_in_channels_last_and_keep_that_layout():
    import copy

    src = UniformQuantizer(QuantSpec(bits=3, signed=False, symmetric=False))
    src.signed = False
    src.set_params(torch.tensor(0.25), torch.tensor(0.0))
    plain = make_trainable(src, "lqnet", "activations")
    nhwc = copy.deepcopy(plain)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 5, 6, 7)) ** 1.3
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.clone().requires_grad_(True)
    out, out_cl = plain(x), nhwc(x_cl)  # training mode: each also fits its basis on the batch
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert torch.equal(out, out_cl)
    assert torch.allclose(plain.basis, nhwc.basis, atol=1e-6)  # the fit summed the same values, in another order
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    (out_cl * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    assert torch.equal(x.grad, x_cl.grad)


def test_lqnet_activations_fit_their_basis_on_the_first_share_of_the_batch():
    from lowbit.quant.registry import check_kind_options

    src = UniformQuantizer(QuantSpec(bits=3, signed=False, symmetric=False))
    src.signed = False
    src.set_params(torch.tensor(0.25), torch.tensor(0.0))
    torch.manual_seed(0)
    x = (torch.relu(torch.randn(8, 3, 5, 5)) ** 1.4).contiguous(memory_format=torch.channels_last)
    fits = {}
    for share in (0.25, 1.0):
        q = make_trainable(src, "lqnet", "activations", momentum=1.0, fit_fraction=share)
        codes = q.encode(x)  # the encodings the fit sees (made with the starting basis)
        q.train()
        q(x)
        used = x[:2] if share < 1 else x  # ceil(8 · 0.25) = 2 images
        b = q.bits_table[codes[: used.shape[0]].reshape(-1)]
        expected = torch.linalg.lstsq(b, used.reshape(-1, 1)).solution.squeeze(-1)
        assert torch.allclose(q.basis.reshape(-1), expected, atol=1e-4)
        fits[share] = q.basis.clone()
    assert not torch.allclose(fits[0.25], fits[1.0], atol=1e-4)  # two images are not the whole batch
    one = make_trainable(src, "lqnet", "activations", fit_fraction=0.01)
    assert one.fit_sample(x).shape[0] == 1  # at least one image
    with pytest.raises(RecipeError, match="fit_fraction must be in"):
        make_trainable(src, "lqnet", "activations", fit_fraction=0.0)
    with pytest.raises(RecipeError, match="not options of quantizer 'lqnet'"):
        check_kind_options("lqnet", {"fit_fraction": 0.5}, "weights")  # weights always fit on every weight
    assert check_kind_options("lqnet", {"fit_fraction": 0.5}, "activations") == {"fit_fraction": 0.5}


def test_lqnet_activations_train_save_and_export(mnist_cnn, tmp_path):
    model, calib, test = mnist_cnn
    recipe = {"extends": "w2a2-lqnet", "name": "test-lq-acts", "steps": ["calibrate", {"qat": {
        "epochs": 1, "batch_size": 64, "lr": 0.002, "val_samples": 200, "steps_per_epoch": 12, "kd": {}}}]}
    qm = lowbit.quantize(model, recipe, calib=calib, train=(test[0][:1000], test[1][:1000]), progress=False)
    inner = [r for r in qm.layers if r.a_bits == 2]
    assert inner and all(isinstance(r.input_quantizer, CodebookQuantizer) for r in inner)
    assert all(r.input_quantizer.centroids.numel() == 4 for r in inner)
    assert not isinstance(qm.layers[0].input_quantizer, CodebookQuantizer)  # the 8-bit input: LSQ+ (signed image)
    x = test[0][:200]
    back = lowbit.load(lowbit.save(qm, tmp_path / "lq.lowbit"), model=type(model)())
    assert torch.equal(back(x), qm(x))
    assert [r["a_quantizer"] for r in back.layers.rows()][:2] == ["lsq+", "lqnet"]  # the table says each input's kind
    ort = pytest.importorskip("onnxruntime")
    import onnx

    # The runtime's nearest-level ops give exactly our codebook of the runtime's own input;
    # that input comes from its int8 first conv, which rounds as torch does not, so a value
    # at a level's midpoint may step once and the logits drift a little.
    graph = onnx.load(str(lowbit.export_onnx(qm, tmp_path / "lq.onnx", x[:1])))
    acts = [n.output[0] for n in graph.graph.node if n.output[0].startswith("codebook_act")]
    pre = [n.input[0] for n in graph.graph.node if n.op_type == "Unsqueeze"]
    assert len(acts) == len(pre) == len(inner)
    for name in acts + pre:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString())
    got = [torch.from_numpy(a) for a in sess.run(acts + pre, {sess.get_inputs()[0].name: x.numpy()})]
    for r, out, inp in zip(inner, got[:len(acts)], got[len(acts):]):
        assert torch.equal(r.input_quantizer(inp), out)
    agree = (qm(x).argmax(1) == got[0].new_tensor(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]).argmax(1))
    assert float(agree.float().mean()) >= 0.97


def test_fisher_kmeans_takes_a_frozen_model_and_clusters_a_layer_asked_for_at_8_bits(mnist_cnn):
    """A model its owner froze (requires_grad False) raised inside autograd; a layer given `w_quantizer: kmeans` at
    its first/last 8 bits stayed on the int8 grid while the table said k-means."""
    model, calib, _ = mnist_cnn
    frozen = copy.deepcopy(model).requires_grad_(False)
    recipe = {"extends": "w4a4", "name": "t", "weights": {"bits": 3}, "activations": {"bits": 8},
              "overrides": [{"pattern": "*", "w_quantizer": "kmeans"}],
              "steps": ["calibrate", {"kmeans": {"hessian": "fisher"}}]}
    qm = lowbit.quantize(frozen, recipe, calib=calib[:64], progress=False)
    assert set(qm.meta["kmeans"]) == set(qm.layers.names())  # the 8-bit first and last layers too
    assert qm.meta["kmeans"]["linear"] == 256
    assert not any(p.requires_grad for p in frozen.parameters())


def test_inq_least_squares_top_level_beats_the_max_rule_where_one_weight_sets_it():
    """``top_level: mse`` picks the n1 whose level set rounds the tensor with the least squared error
    (checked against every candidate by brute force); eq. 2's n1 follows the single largest weight."""
    from lowbit.quant.learned.inq import _level_set, nearest_levels, power_of_two_levels

    torch.manual_seed(0)
    w = torch.randn(64, 9) * 0.05
    w[0, 0] = 0.5  # one outlier: eq. 2 gives n1 = floor(log2(2/3)) = -1, levels {0, ±0.25, ±0.5}
    by_max = power_of_two_levels(w, 3, "max")
    assert by_max.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert float((nearest_levels(w, by_max) == 0).float().mean()) > 0.95  # nearly everything rounds to zero
    by_mse = power_of_two_levels(w, 3, "mse")
    errors = {n1: float((nearest_levels(w, _level_set(n1, 3, w.device)) - w).square().sum()) for n1 in range(-13, 0)}
    best = min(errors, key=errors.get)
    assert by_mse.tolist() == _level_set(best, 3, w.device).tolist() and best < -1
    assert errors[best] < 0.5 * errors[-1]
    # the option reaches the quantizer through the recipe's quantizer_options
    src = UniformQuantizer(QuantSpec(bits=3, per_channel=False))
    src.signed = True
    src.set_params(torch.tensor(0.1), torch.tensor(0.0))
    assert torch.equal(make_trainable(src, "inq", "weights", weight=w, top_level="mse").levels, by_mse)
    with pytest.raises(RecipeError, match="top_level"):
        power_of_two_levels(w, 3, "min")
