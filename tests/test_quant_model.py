"""QuantModel on a network it has never seen, the layer table, and bad input."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import NumericalError, RecipeError, UnsupportedModelError


class UnseenNet(nn.Module):
    """Residual adds, a depthwise conv, 1×1 shortcut convs, a Linear head and F.pad."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=0, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(32)
        self.shortcut = nn.Conv2d(16, 32, 1, bias=False)
        self.short_bn = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.dw_bn(self.dw(F.pad(x, (1, 1, 1, 1)))))
        y = self.pw_bn(self.pw(y))
        x = F.relu(y + self.short_bn(self.shortcut(x)))
        x = x + F.relu(self.grouped(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def trained_like(model: nn.Module) -> nn.Module:
    """Give BN layers non-trivial statistics, as a trained model has."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 3, 16, 16))
    return model.eval()


@pytest.fixture(scope="module")
def unseen():
    return trained_like(UnseenNet())


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_unseen_model_quantizes_and_runs(unseen, inputs):
    before = {k: v.clone() for k, v in unseen.state_dict().items()}
    qm = lowbit.quantize(unseen, "w8a8", calib=inputs, progress=False)
    assert qm.mode == "graph"
    ref = unseen(inputs)
    out = qm(inputs)
    assert out.shape == ref.shape
    # 8-bit simulation stays close to the float model.
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
    # The float model is left unchanged.
    after = unseen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    names = qm.layers.names()
    assert names == ["stem", "dw", "pw", "shortcut", "grouped", "head"]
    kinds = {r.name: r.kind for r in qm.layers}
    assert kinds["dw"] == "Conv2d-dw" and kinds["grouped"] == "Conv2d-g4"
    # BN folded: no BatchNorm left inside the quantized network.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qm.modules())


def test_bn_folding_is_exact_without_quantization(unseen, inputs):
    qm = lowbit.quantize(unseen, "w8a8", calib=inputs, progress=False)
    with qm.quantization(weights=False, activations=False):
        assert torch.allclose(qm(inputs), unseen(inputs), atol=1e-5)


def test_shared_input_tensor_shares_one_quantizer(unseen, inputs):
    qm = lowbit.quantize(unseen, {"extends": "w4a4", "quantize_adds": False}, calib=inputs, progress=False)
    rec = {r.name: r for r in qm.layers}
    # dw reads pad(x); shortcut reads x: different tensors. pw/shortcut read different ones too;
    # the stem output x feeds pad (then dw) and shortcut: one quantizer for x itself.
    assert rec["shortcut"].input_quantizer is not rec["dw"].input_quantizer
    assert len(qm.act_quantizers()) == 6
    # the integer layout (the default) adds one 8-bit quantizer per add/pool input that is not
    # already quantized, and none where a layer's input quantizer already covers the tensor
    qm = lowbit.quantize(unseen, "w4a4", calib=inputs, progress=False)
    extra = [qm.net.get_submodule(k) for k in qm.tensor_quantizers]
    assert len(qm.act_quantizers()) == 6 + len(extra) and len(extra) == 4
    assert all(q.bits == 8 for q in extra)


def test_layer_table_bits_macs_and_first_last(unseen, inputs):
    qm = lowbit.quantize(unseen, "w4a4", calib=inputs, progress=False)
    rows = {r["name"]: r for r in qm.layers.rows()}
    assert rows["stem"]["w_bits"] == 8 and rows["stem"]["a_bits"] == 8
    assert rows["head"]["w_bits"] == 8 and rows["head"]["a_bits"] == 8
    assert rows["pw"]["w_bits"] == 4 and rows["pw"]["a_bits"] == 4
    assert rows["stem"]["params"] == 16 * 3 * 9
    assert rows["stem"]["macs"] == 16 * 16 * 16 * 3 * 9
    assert rows["dw"]["macs"] == 16 * 16 * 16 * 9
    assert rows["head"]["macs"] == 32 * 10


def test_compression_ratio_counts_exact_bits():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    qm = lowbit.quantize(model, {"weights": {"bits": 4}, "activations": {"bits": 8}, "first_last_bits": None},
                         calib=torch.randn(32, 16), progress=False)
    # weights 4-bit + one float32 scale per output channel; biases stay float32;
    # one float32 scale and one 8-bit zero point per (uint8 affine) activation quantizer.
    stored = (16 * 8 + 8 * 4) * 4 + (8 + 4) * 32 + (8 + 4) * 32 + 2 * (32 + 8)
    float_bits = (16 * 8 + 8 * 4 + 8 + 4) * 32
    sizes = qm.size_bits()
    assert sizes["stored_bits"] == stored and sizes["float_bits"] == float_bits
    assert qm.compression_ratio() == pytest.approx(float_bits / stored)


def test_overrides_by_pattern_and_float_layers(unseen, inputs):
    recipe = {"extends": "w4a4", "overrides": [{"pattern": "p*", "w_bits": 6}, {"pattern": "grouped", "w_bits": 32}]}
    qm = lowbit.quantize(unseen, recipe, calib=inputs, progress=False)
    assert qm.layers["pw"].w_bits == 6
    assert qm.layers["grouped"].w_bits == 32
    assert qm.layers["dw"].w_bits == 4
    with pytest.raises(lowbit.LowbitError, match="matches no layer"):
        lowbit.quantize(unseen, {"overrides": [{"pattern": "nothing*", "w_bits": 4}]}, calib=inputs, progress=False)


def test_same_seed_same_result(unseen, inputs):
    a = lowbit.quantize(unseen, "w4a4", calib=inputs, progress=False)(inputs)
    b = lowbit.quantize(unseen, "w4a4", calib=inputs, progress=False)(inputs)
    assert torch.equal(a, b)


def test_calibration_input_forms_agree(unseen, inputs):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, torch.zeros(64)), batch_size=16)
    from_tensor = lowbit.quantize(unseen, "w4a4", calib=inputs, progress=False)(inputs)
    from_loader = lowbit.quantize(unseen, "w4a4", calib=loader, progress=False)(inputs)
    from_list = lowbit.quantize(unseen, "w4a4", calib=list(torch.split(inputs, 16)), progress=False)(inputs)
    assert torch.equal(from_tensor, from_loader) and torch.equal(from_tensor, from_list)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            x = x * 2
        return self.b(torch.relu(self.a(x)))


def test_untraceable_model_uses_documented_fallback():
    model = Untraceable().eval()
    x = torch.randn(32, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = lowbit.quantize(model, "w8a8", calib=x, progress=False)
    assert qm.mode == "hooks"
    assert any("hook fallback" in str(w.message) for w in caught)
    assert all(r.input_quantizer is not None and r.input_quantizer.calibrated for r in qm.layers)
    assert torch.allclose(qm(x), model(x), atol=0.05)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3)).eval()
    with pytest.raises(UnsupportedModelError, match=r"1 \(ConvTranspose2d\).*keep_float"):
        lowbit.quantize(model, "w8a8", calib=torch.randn(4, 3, 8, 8), progress=False)
    qm = lowbit.quantize(model, {"keep_float": ["1"]}, calib=torch.randn(4, 3, 8, 8), progress=False)
    assert qm.layers.names() == ["0"]


def test_model_without_quantizable_layers():
    with pytest.raises(UnsupportedModelError, match="no Conv1d/Conv2d/Linear"):
        lowbit.quantize(nn.Sequential(nn.ReLU(), nn.Flatten()), "w8a8", calib=torch.randn(2, 3), progress=False)


def test_nan_weights_are_refused():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="'0.weight'.*NaN"):
        lowbit.quantize(model, "w8a8", calib=torch.randn(2, 4), progress=False)


def test_nan_activations_are_refused():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(8, 4)
    x[3, 1] = float("inf")
    with pytest.raises(NumericalError, match="activation"):
        lowbit.quantize(model, "w8a8", calib=x, progress=False)


def test_conv1d_and_linear_model():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).eval()
    x = torch.randn(16, 2, 8)
    qm = lowbit.quantize(model, "w6a6", calib=x, progress=False)
    assert [r.kind for r in qm.layers] == ["Conv1d", "Linear"]
    assert F.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0) > 0.99


@pytest.mark.parametrize("recipe, message", [
    ({"wieghts": {"bits": 4}}, r"unknown key\(s\) \['wieghts'\] in recipe"),
    ({"weights": {"bits": 9}}, "outside 1..8"),
    ({"weights": {"bits": 1}}, "1-bit weights are binary"),
    ({"weights": {"estimator": "magic"}}, "unknown range estimator 'magic'"),
    ({"activations": {"per_channel": True}}, "per-channel activation"),
    ({"steps": ["calibrate", "adarond"]}, "unknown step 'adarond'"),
    ({"overrides": [{"pattern": "x", "wbits": 4}]}, r"unknown key\(s\) \['wbits'\]"),
    ("w5a5+adarond", "unknown word 'adarond'"),
    ("w5a5-fast", "unknown recipe 'w5a5-fast'"),
])
def test_bad_recipes_are_named(unseen, inputs, recipe, message):
    with pytest.raises(RecipeError, match=message):
        lowbit.quantize(unseen, recipe, calib=inputs, progress=False)


def test_evaluate_leaves_a_quantized_model_in_eval_mode(unseen, inputs):
    """The wrapper was built in training mode (nn.Module's default) around an eval-mode network; evaluate's
    ``train(was_training)`` then put the whole network in training mode, so BN (kept with fold_bn: false) used batch
    statistics and moved its running ones on the next call."""
    qm = lowbit.quantize(unseen, {"extends": "w8a8", "fold_bn": False}, calib=inputs, progress=False)
    assert not qm.training and not any(m.training for m in qm.modules())
    labels = torch.zeros(len(inputs), dtype=torch.long)
    lowbit.evaluate(qm, [(inputs, labels)])
    assert not any(m.training for m in qm.modules())
    first, bn = qm(inputs[:4]), next(m for m in qm.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    assert torch.equal(qm(inputs[:4]), first) and torch.equal(bn.running_mean, stats)


class CalledTwice(nn.Module):
    """One conv called twice, each call followed by its own BN (a weight-shared recurrent step)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.b2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c(x)))
        x = F.relu(self.b2(self.c(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def with_bn_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows in the output."""
    g = torch.Generator().manual_seed(3)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 1.8 + 0.2)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) * 1.5 + 0.5)
            bn.bias.data.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
    return model.eval()


def test_layer_called_twice_keeps_its_batchnorms_unfolded():
    """Each call's BN was folded into the one shared weight, so both calls ran with both BN factors."""
    torch.manual_seed(0)
    model = with_bn_statistics(CalledTwice())
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    qm = lowbit.prepare(model, "w8a8")
    with torch.no_grad(), qm.quantization(weights=False, activations=False):
        assert torch.allclose(qm(x), model(x), atol=1e-5)
    assert isinstance(qm.net.get_submodule("b1"), nn.BatchNorm2d) and "c" not in qm.layer_bn


def test_layer_called_twice_is_one_row_of_the_table(tmp_path):
    """The second call wrapped the conv again: two rows, the first one's layer orphaned (its bits had no
    effect, saving raised KeyError) and the MACs of one call only."""
    torch.manual_seed(0)
    model = with_bn_statistics(CalledTwice())
    calib = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    x = calib[:8]
    qm = lowbit.quantize(model, {"extends": "w8a8", "first_last_bits": None}, calib=calib, progress=False)
    assert qm.layers.names() == ["c", "fc"]
    row = qm.layers["c"]
    assert row.layer is qm.net.get_submodule("c")
    assert row.macs == 2 * 8 * 8 * 4 * 4 * 9  # both calls' work
    assert row.params == 4 * 4 * 9 and qm.size_bits()["weight_float_bits"] == 32 * (4 * 4 * 9 + 4 * 3)
    # both calls read their input through the layer's one quantizer: one a_bits, one int32 bias grid
    assert row.layer.input_ref == (row.input_quantizer,)
    assert [str(n.target) for n in qm.net.graph.nodes if n.op == "call_module"].count(
        next(k for k, m in qm.net.named_modules() if m is row.input_quantizer)) == 2
    with torch.no_grad():
        before = qm(x)
        row.w_bits = 2
        lowbit.calibrate(qm, [calib], progress=False)
        assert not torch.equal(qm(x), before)  # the table's bits reach the layer that runs
    path = lowbit.save(qm, tmp_path / "twice.lowbit")
    loaded = lowbit.load(path, model=model)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
    assert loaded.layers.rows() == qm.layers.rows()


def test_batchnorm_fold_leaves_a_tied_weight_alone():
    """The fold multiplied the shared Parameter in place, so the other layer got the BN factor too."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.c2.weight = self.c1.weight
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = with_bn_statistics(Tied())
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    qm = lowbit.prepare(model, "w8a8")
    assert "c1" in qm.layer_bn  # folded, into a weight of its own
    with torch.no_grad(), qm.quantization(weights=False, activations=False):
        assert torch.allclose(qm(x), model(x), atol=1e-5)


class WSConv(nn.Conv2d):
    """Weight-standardised conv: a Conv2d subclass computing its own op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PlainSubclass(nn.Conv2d):
    """A Conv2d subclass that keeps Conv2d's op (only a different class)."""


class WithSubclasses(nn.Module):
    def __init__(self, untraceable: bool = False) -> None:
        super().__init__()
        self.c = WSConv(3, 8, 3, padding=1)
        self.c2 = PlainSubclass(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.untraceable = untraceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c(x))
        if self.untraceable and x.sum() > -1e9:  # data-dependent control flow: the hook fallback
            x = x * 1
        return self.fc(F.relu(self.c2(x)).mean((2, 3)))


@pytest.mark.parametrize("untraceable", [False, True])
def test_conv_subclass_with_its_own_forward_is_refused_or_kept_float(untraceable):
    """Graph mode traced into WSConv (left float, missing from the table); the hook fallback replaced its
    forward by Conv2d's. Now it is refused by name, or kept float as itself under keep_float."""
    torch.manual_seed(0)
    model = WithSubclasses(untraceable).eval()
    calib = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match=r"c \(WSConv overrides Conv2d\.forward\).*keep_float"):
            lowbit.prepare(model, "w8a8")
        qm = lowbit.quantize(model, {"extends": "w8a8", "keep_float": ["c"]}, calib=calib, progress=False)
    assert qm.mode == ("hooks" if untraceable else "graph")
    assert qm.layers.names() == ["c2", "fc"]  # the plain subclass is quantized, as one layer
    assert type(qm.net.get_submodule("c")) is WSConv  # runs as itself, float
    if not untraceable:
        assert not [n for n in qm.net.graph.nodes if n.op == "get_attr"]  # nothing traced into its weight
    with torch.no_grad(), qm.quantization(weights=False, activations=False):
        assert torch.equal(qm(calib), model(calib))


def test_conv_overriding_conv_forward_is_refused():
    class Standardised(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight / weight.norm(), bias)

    model = nn.Sequential(Standardised(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    with pytest.raises(UnsupportedModelError, match=r"0 \(Standardised overrides Conv2d\._conv_forward\)"):
        lowbit.prepare(model, "w8a8")


@pytest.mark.parametrize("untraceable", [False, True])
def test_layer_called_with_keyword_input(untraceable):
    """``self.fc(input=x)`` crashed prepare with a raw IndexError (graph) or TypeError (hooks)."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv1d(4, 6, 3)
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.c(input=x))
            if untraceable and x.sum() > -1e9:
                x = x * 1
            return self.fc(input=x.mean(-1))

    torch.manual_seed(0)
    model = Keyword().eval()
    calib = torch.randn(32, 4, 10, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, "w8a8", calib=calib, progress=False)
    assert qm.mode == ("hooks" if untraceable else "graph")
    assert qm.layers.names() == ["c", "fc"]
    assert all(r.input_quantizer.calibrated for r in qm.layers)
    assert F.cosine_similarity(qm(calib).flatten(), model(calib).flatten(), dim=0) > 0.999


@pytest.mark.parametrize("conv, x, macs", [
    (nn.Conv1d(2, 4, 3), torch.randn(2, 8), 4 * 6 * 2 * 3),
    (nn.Conv2d(2, 4, 3), torch.randn(2, 5, 5), 4 * 3 * 3 * 2 * 9),
    (nn.Conv1d(2, 4, 3), torch.randn(5, 2, 8), 4 * 6 * 2 * 3),
    (nn.Linear(6, 3), torch.randn(6), 18),
])
def test_macs_of_an_unbatched_input(conv, x, macs):
    """An unbatched conv input (C, L) had its channels taken for the batch."""
    from lowbit.model.quant_layer import QuantLayer
    from lowbit.quant.spec import QuantSpec

    layer = QuantLayer(conv, QuantSpec(bits=8), "c")
    layer.quantize_weight = False
    with torch.no_grad():
        layer(x)
    assert layer.macs == macs


def test_batchnorm_after_a_conv_subclass_kept_float_is_not_folded():
    """Traced as one call, WSConv + BN looked foldable; scaling its weight is undone by its standardisation."""
    torch.manual_seed(0)
    model = with_bn_statistics(nn.Sequential(WSConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                             nn.Linear(4 * 36, 2)))
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    qm = lowbit.prepare(model, {"extends": "w8a8", "keep_float": ["0"]})
    assert isinstance(qm.net.get_submodule("1"), nn.BatchNorm2d)
    with torch.no_grad(), qm.quantization(weights=False, activations=False):
        assert torch.allclose(qm(x), model(x), atol=1e-5)


def test_batchnorm_is_not_folded_into_a_weight_the_graph_also_reads():
    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.bn(self.c(x))).mean((2, 3))
            return self.fc(y * self.c.weight.abs().mean())

    torch.manual_seed(0)
    model = with_bn_statistics(ReadsWeight())
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    qm = lowbit.prepare(model, "w8a8")
    assert "c" not in qm.layer_bn
    with torch.no_grad(), qm.quantization(weights=False, activations=False):
        assert torch.allclose(qm(x), model(x), atol=1e-5)


def test_hook_fallback_quantizes_every_attribute_holding_a_layer_and_counts_each_call():
    """``self.b = self.a``: only the first attribute was replaced, so the second call ran the float layer."""

    class Alias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # untraceable: the hook fallback
                x = F.relu(self.b(F.relu(self.a(x))))
            return self.fc(x)

    model = Alias().eval()
    calib = torch.randn(32, 8, generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, {"extends": "w4a4", "first_last_bits": None}, calib=calib, progress=False)
    assert qm.mode == "hooks" and qm.layers.names() == ["a", "fc"]
    assert qm.net.get_submodule("b") is qm.layers["a"].layer
    assert qm.layers["a"].macs == 2 * 64
    with torch.no_grad():
        before = qm(calib)
        qm.layers["a"].w_bits = 32  # the second call's weight now float too
        assert not torch.equal(qm(calib), before)
