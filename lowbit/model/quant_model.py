"""QuantModel: a float network with quantized layers, the object every algorithm edits."""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

from lowbit.errors import LowbitError, NumericalError, RecipeError, UnsupportedModelError
from lowbit.model import graph as G
from lowbit.model.fold_bn import BNPrior, fold_batchnorms
from lowbit.model.layer_table import LayerRecord, LayerTable
from lowbit.model import shortcuts as S
from lowbit.model.quant_layer import QUANTIZABLE, QuantLayer, custom_op
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.spec import QuantSpec
from lowbit.recipes.recipe import SHORTCUT_KINDS

# Layers whose parameters stay float by design (they fold away or are cheap).
FLOAT_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.PReLU)


def _hook_name(hook: object) -> str:
    """A hook as a message names it: its function, or the class of a hook object (WeightNorm, L1Unstructured)."""
    return getattr(hook, "__name__", type(hook).__name__)


def check_layer_state(model: nn.Module, keep_float: list[str]) -> None:
    """Refuse layers whose weight is not yet, or not only, the parameter lowbit reads.

    Lazy layers have no weight before their first forward pass (torch's own error named no layer).
    A forward pre-hook (old-style ``torch.nn.utils.weight_norm``, ``torch.nn.utils.prune``) recomputes
    ``weight`` before each call; a quantized layer reads ``weight`` directly and never runs it, so it
    quantized a stale weight, or failed to copy the model at all."""
    lazy = [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules()
            if any(nn.parameter.is_lazy(t) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]
    if lazy:
        raise UnsupportedModelError(f"layers {', '.join(lazy)} are not initialised yet (lazy parameters have no "
                                    "shape or values): run one forward pass first to initialise lazy layers, "
                                    "then quantize the model")
    hooked = [f"{n or '<root>'} ({type(m).__name__}, hook {', '.join(map(_hook_name, m._forward_pre_hooks.values()))})"
              for n, m in model.named_modules()
              if isinstance(m, QUANTIZABLE) and m._forward_pre_hooks
              and not any(fnmatch.fnmatchcase(n, p) for p in keep_float)]
    if hooked:
        raise UnsupportedModelError(
            f"layers {', '.join(hooked)} have a forward pre-hook, which recomputes their weight before each call; a "
            "quantized layer reads the weight itself and never runs it. Make the weight a plain parameter first: "
            "torch.nn.utils.remove_weight_norm(module) after weight_norm, torch.nn.utils.prune.remove(module, "
            "'weight') after pruning (torch.nn.utils.parametrize is not supported either: "
            "parametrize.remove_parametrizations(module, 'weight', leave_parametrized=True)); or list the layers "
            "under `keep_float` to keep them float")


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, or an error naming the tensors that stop it: torch copies only leaf tensors,
    and a module holding one computed with autograd (e.g. a pruned weight) raised torch's RuntimeError."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as err:
        computed = [f"{n + '.' if n else ''}{k}" for n, m in model.named_modules() for k, v in vars(m).items()
                    if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.grad_fn is not None]
        raise UnsupportedModelError(
            f"cannot copy {type(model).__name__}: "
            + (f"{', '.join(computed)} are tensors computed with autograd (not parameters or buffers), which torch "
               "cannot copy: compute them in forward or detach them (after torch.nn.utils.prune, call "
               "prune.remove(module, 'weight'))" if computed else str(err).splitlines()[0])
        ) from None


def check_supported(model: nn.Module, keep_float: list[str]) -> None:
    """Refuse models with weights lowbit cannot quantize, instead of leaving them float."""
    check_layer_state(model, keep_float)
    weighted = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    names = [n for n, _ in weighted if n]
    for pattern in keep_float:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise RecipeError(f"keep_float pattern {pattern!r} matches no layer with weights; layers: "
                              + ", ".join(names[:12]) + (" ..." if len(names) > 12 else ""))
    unknown, custom = [], []
    for name, module in weighted:
        if isinstance(module, FLOAT_LAYERS) or (isinstance(module, QUANTIZABLE) and custom_op(module) is None):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in keep_float):
            continue
        if isinstance(module, QUANTIZABLE):  # a quantized layer would run the base op and drop the subclass's
            custom.append(f"{name or '<root>'} ({type(module).__name__} overrides {custom_op(module)})")
        else:
            unknown.append(f"{name or '<root>'} ({type(module).__name__})")
    if unknown or custom:
        raise UnsupportedModelError(
            "lowbit cannot quantize these layers' weights: " + ", ".join(unknown + custom)
            + ". Supported: Conv1d, Conv2d (grouped/depthwise too), Linear"
            + (": a subclass that overrides their op (weight standardisation, ...) is not, since a quantized "
               "layer runs the base class's op and would drop the subclass's computation" if custom else "")
            + ". To keep them in float deliberately, list their names under `keep_float` in the recipe."
        )
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NumericalError(f"parameter {name!r} holds NaN/Inf; fix the checkpoint before quantizing")
    for name, b in model.named_buffers():  # BN running statistics are folded into weights
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise NumericalError(f"buffer {name!r} holds NaN/Inf (a broken BatchNorm statistic); fix the checkpoint "
                                 "or re-estimate it before quantizing")
        if name.endswith("running_var") and (b < 0).any():
            raise NumericalError(f"buffer {name!r} holds a negative variance; the checkpoint is corrupt")


class QuantModel(nn.Module):
    """Wraps a copy of a float model (the original is never modified).

    ``mode`` is "graph" when torch.fx could trace the model (activation quantizers on
    tensors, BN folding available) or "hooks" as the documented fallback for untraceable
    models (each quantized layer quantizes its own input; BN stays unfolded).
    """

    def __init__(
        self, model: nn.Module, weights: QuantSpec, activations: QuantSpec,
        fold_bn: bool = True, keep_float: list[str] | None = None, trace: bool = True,
        quantize_adds: bool = False, relu: str = "keep", shortcut: str = "shared",
    ) -> None:
        super().__init__()
        keep_float = list(keep_float or [])
        check_supported(model, keep_float)
        net = copy_model(model).eval()
        self.bn_priors: dict[str, tuple[BNPrior, bool]] = {}
        self.fold_bn = fold_bn
        self.trace_error: str | None = None
        self.tensor_quantizers: list[str] = []  # quantizers on add inputs (not layer inputs)
        gm = None
        if trace:
            try:
                gm = G.trace(net)
            except Exception as err:  # noqa: BLE001 - any tracer failure takes the fallback
                self.trace_error = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"torch.fx could not trace {type(model).__name__} ({self.trace_error}); using the "
                    "hook fallback: each layer quantizes its own input and BatchNorm is not folded",
                    stacklevel=2,
                )
        functional: list[str] = []
        if gm is not None:
            if G.depends_on_training(net, gm):
                warnings.warn(f"{type(model).__name__}.forward depends on self.training (e.g. F.dropout(x, "
                              "training=self.training) or `if self.training:`): its traced code differs between "
                              "train and eval mode, and lowbit uses the eval-mode graph, so QAT trains without the "
                              "train-mode code. Use modules (nn.Dropout, ...) for what should switch", stacklevel=2)
            functional = [n for n in G.weights_read_not_called(net, gm) if not self._skip(n, keep_float)]
            G.normalize_spellings(gm)
        if relu not in ("keep", "hardtanh"):
            raise RecipeError(f"relu must be 'keep' or 'hardtanh', got {relu!r}")
        if relu == "hardtanh":
            if gm is None:
                raise UnsupportedModelError(f"relu: hardtanh rewrites the traced graph, and {type(model).__name__} "
                                            f"could not be traced ({self.trace_error})")
            G.replace_relus_with_hardtanh(gm)
        if shortcut not in SHORTCUT_KINDS:
            raise RecipeError(f"shortcut must be one of {', '.join(SHORTCUT_KINDS)}, got {shortcut!r}")
        if shortcut == "stream" and not quantize_adds:
            raise RecipeError("shortcut: stream keeps the residual stream on the grid of the add inputs' quantizers, "
                              "which quantize_adds=False leaves out; pass quantize_adds=True, or shortcut='real' "
                              "for float adds")
        if shortcut != "shared" and gm is None:
            raise UnsupportedModelError(f"shortcut: {shortcut} rewrites the traced graph, and {type(model).__name__} "
                                        f"could not be traced ({self.trace_error})")
        # A rewrite that changes the network's function leaves the original as the teacher.
        self.float_model: nn.Module | None = None
        if relu != "keep" or shortcut == "bireal":
            self.__dict__["float_model"] = copy.deepcopy(model).eval()  # not a submodule: no state_dict entries
        if gm is not None:
            self.mode = "graph"
            self.net, records = self._build_graph(gm, weights, activations, fold_bn, keep_float, quantize_adds,
                                                  shortcut)
        else:
            self.mode = "hooks"
            self.fold_bn = False
            self.layer_bn = {}
            self.net, records = self._build_hooks(net, weights, activations, keep_float)
        used_through_weights = (f"{', '.join(functional)} are used through their weights (F.linear(x, self.fc.weight), "
                                "self.fc.forward(x), ...), not called as modules, and lowbit quantizes a layer where "
                                "it is called")
        if not records:
            if functional:
                raise UnsupportedModelError(f"{type(model).__name__} calls no Conv1d/Conv2d/Linear layer: layers "
                                            f"{used_through_weights}. Call them (self.fc(x)) to quantize them")
            raise UnsupportedModelError(
                f"{type(model).__name__} has no Conv1d/Conv2d/Linear layer to quantize"
                + (" outside `keep_float`" if keep_float else "")
            )
        if functional:
            warnings.warn(f"layers {used_through_weights}: they stay float. Call them (self.fc(x)) to quantize them, "
                          "or list them under `keep_float` to keep them float without this warning", stacklevel=2)
        self.layers = LayerTable(records)
        self.meta: dict[str, Any] = {}
        # The float network as built (BN folded), kept so algorithms that edit weights or
        # biases (bias correction, AdaQuant, refinement) can still run the true teacher.
        quantizer_buffers = {id(b) for m in self.net.modules() if isinstance(m, UniformQuantizer) for b in m.buffers()}
        tensors = list(self.net.parameters()) + [b for b in self.net.buffers()
                                                 if b.is_floating_point() and id(b) not in quantizer_buffers]
        self._float_copy: list[tuple[torch.Tensor, torch.Tensor]] = [(t, t.detach().clone()) for t in tensors]
        # why float_reference cannot run, when the float weights are not known (an artifact loaded
        # without its float model stores only the quantized weights); None: they are known
        self.no_float_reference: str | None = None
        # In eval mode like the network inside it: a wrapper left in training mode (nn.Module's default) handed
        # its flag to the network at the first ``train(was_training)`` (lowbit.evaluate), after which BN used
        # batch statistics and updated its running ones during calibration and plain inference
        self.eval()

    # -- construction -------------------------------------------------------------------
    def _skip(self, name: str, keep_float: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in keep_float)

    def _build_graph(self, gm, weights, activations, fold_bn, keep_float, quantize_adds=False, shortcut="shared"):
        folded = fold_batchnorms(gm, QUANTIZABLE) if fold_bn else {}
        # Folded BN statistics per layer name: the distribution each layer's float output
        # should have (ZeroQ and PD-Quant's distribution correction match it).
        self.layer_bn: dict[str, BNPrior] = {str(n.target): folded[n.name] for n in gm.graph.nodes if n.name in folded}
        modules = dict(gm.named_modules())
        layer_nodes = [n for n in G.quantizable_nodes(gm) if not self._skip(str(n.target), keep_float)]
        inputs = {node: self._layer_input(node) for node in layer_nodes}
        group = self._input_groups(layer_nodes, inputs)
        names = self._free_names(gm)
        act_for: dict[fx.Node, UniformQuantizer] = {}
        group_quantizer: dict[fx.Node, tuple[str, UniformQuantizer]] = {}
        quant_source: dict[fx.Node, fx.Node] = {}
        records: dict[str, LayerRecord] = {}
        for node in layer_nodes:
            name = str(node.target)
            module = gm.get_submodule(name)
            if isinstance(module, QuantLayer):  # a layer called twice: wrapped once, one row
                layer = module
            else:
                layer = QuantLayer(module, weights, name)
                G.set_submodule(gm, name, layer)
            inp = inputs[node]
            if inp not in act_for:
                root = group[inp]
                if root not in group_quantizer:
                    key = next(names)
                    q = UniformQuantizer(activations, name=f"input of {name}")
                    gm.add_submodule(key, q)
                    group_quantizer[root] = (key, q)
                    prior = G.find_bn_prior(inp, modules, folded)
                    if prior is not None:
                        self.bn_priors[key] = prior
                else:  # a second tensor on this quantizer: one BN no longer describes what it sees
                    key, q = group_quantizer[root]
                    self.bn_priors.pop(key, None)
                with gm.graph.inserting_after(G.insertion_point(gm.graph, inp)):
                    qnode = gm.graph.call_module(key, (inp,))
                inp.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode: user is not q)
                act_for[inp] = q
                quant_source[qnode] = inp
            layer.input_ref = (act_for[inp],)
            if name not in records:
                records[name] = LayerRecord(name=name, layer=layer, input_quantizer=act_for[inp])
        if shortcut != "shared":
            S.read_real_values(gm, quant_source)
        if shortcut == "bireal":
            S.add_bireal_shortcuts(gm, layer_nodes, quant_source)
        if quantize_adds:
            chained = self._quantize_add_inputs(gm, activations, names, set(quant_source), chain=shortcut == "stream")
            for record in records.values():  # the layers whose quantizer requantizes the 8-bit residual stream
                key = chained.get(id(record.input_quantizer))
                if key is not None:
                    record.stream_quantizer = gm.get_submodule(key)
        gm.graph.lint()
        gm.recompile()
        return gm, list(records.values())

    @staticmethod
    def _free_names(gm: fx.GraphModule) -> Iterator[str]:
        """``act_quant_0``, ``act_quant_1``, ...: names for new activation quantizers, skipping any the
        model already uses (the first quantizer replaced a user's submodule called ``act_quant_0``)."""
        for i in itertools.count():
            if not hasattr(gm, f"act_quant_{i}"):
                yield f"act_quant_{i}"

    @staticmethod
    def _layer_input(node: fx.Node) -> fx.Node:
        """The tensor a layer call reads (by position or as ``input=``), or an error naming the layer."""
        inp = G.layer_input(node)
        if inp is None:
            raise UnsupportedModelError(f"layer {node.target!r} is called with {node.args!r} {node.kwargs!r}: "
                                        "lowbit quantizes a Conv/Linear call on one input tensor")
        return inp

    @staticmethod
    def _input_groups(layer_nodes: list[fx.Node], inputs: dict[fx.Node, fx.Node]) -> dict[fx.Node, fx.Node]:
        """Each layer input tensor → one tensor of its group. A layer called on several tensors gives them
        one quantizer: a layer has one activation bit width in the table and one int32 bias grid."""
        parent = {t: t for t in inputs.values()}

        def root(t: fx.Node) -> fx.Node:
            while parent[t] is not t:
                t = parent[t]
            return t

        first: dict[str, fx.Node] = {}
        for node in layer_nodes:
            parent[root(inputs[node])] = root(first.setdefault(str(node.target), inputs[node]))
        return {t: root(t) for t in parent}

    def _quantize_add_inputs(self, gm: fx.GraphModule, activations: QuantSpec, names: Iterator[str],
                             quantized: set[fx.Node], chain: bool = False) -> dict[int, str]:
        """Put a quantizer on every input of a residual add or a pooling op that is not
        already a quantized tensor, so an integer runtime can run the add, the pooling and
        the conv before them in int8 instead of falling back to float around them. Returns,
        with ``chain``, id(layer input quantizer) -> the key of the add quantizer it now reads."""
        chained: dict[int, str] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in G.ADD_FUNCTIONS:
                args = node.args[:2]
            elif node.target in G.POOL_FUNCTIONS:
                args = node.args[:1]
                if isinstance(args[0], fx.Node) and args[0].meta.get(S.SHORTCUT_PAD):
                    args = args[0].args[:1]  # a Bi-Real shortcut pads its input: quantize that input, the padded
                    # zeros stay exact (where the quantizer sat before the pad was added, the same numbers)
            else:
                continue
            for arg in args:
                if not isinstance(arg, fx.Node) or G.quantized_through_grid_ops(arg, quantized):
                    continue
                key = next(names)
                gm.add_submodule(key, UniformQuantizer(activations, name=f"add input {arg.name}"))
                with gm.graph.inserting_after(G.insertion_point(gm.graph, arg)):
                    qnode = gm.graph.call_module(key, (arg,))
                # Another quantizer reading ``arg`` (a layer's input, where adds read real values)
                # keeps reading it under ``real``: rewired, it would round the 8-bit values again, a
                # double rounding whose exact ties a runtime may break differently from torch.
                # ``stream`` (``chain``) rewires it: the layer requantizes the 8-bit residual stream,
                # so the add runs on the integer tensor the conv reads too (one QLinearAdd per block).
                readers = {u for u in arg.users if u is not qnode and u.op == "call_module"
                           and isinstance(gm.get_submodule(str(u.target)), UniformQuantizer)}
                arg.replace_all_uses_with(qnode, delete_user_cb=lambda user, q=qnode, keep=readers: user is not q and (
                    chain or user not in keep))
                if chain:
                    chained.update({id(gm.get_submodule(str(u.target))): key for u in readers})
                quantized.add(qnode)
                self.tensor_quantizers.append(key)
        return chained

    def _build_hooks(self, net, weights, activations, keep_float):
        records: list[LayerRecord] = []
        targets = [(n, m) for n, m in net.named_modules() if isinstance(m, QUANTIZABLE) and not self._skip(n, keep_float)]
        # every attribute holding a layer (``self.b = self.a``) gets its one quantized layer
        paths: dict[int, list[str]] = {}
        for n, m in net.named_modules(remove_duplicate=False):
            paths.setdefault(id(m), []).append(n)
        for name, module in targets:
            layer = QuantLayer(module, weights, name)
            layer.input_quantizer = UniformQuantizer(activations, name=f"input of {name}")
            layer.input_ref = (layer.input_quantizer,)
            for path in paths[id(module)]:
                G.set_submodule(net, path, layer)
            records.append(LayerRecord(name=name, layer=layer, input_quantizer=layer.input_quantizer))
        return net, records

    # -- running -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        pending = [r.layer for r in self.layers if r.layer.macs is None]
        if not pending:
            return self.net(*args, **kwargs)
        # The first pass counts each layer's MACs over all its calls (a layer called twice does its work twice).
        for layer in pending:
            layer.macs_pass = 0
        try:
            out = self.net(*args, **kwargs)
            for layer in pending:
                if layer.macs_pass:  # a layer this pass did not reach stays unknown
                    layer.macs = layer.macs_pass
        finally:
            for layer in pending:
                layer.macs_pass = None
        return out

    def weight_quantizers(self) -> list[UniformQuantizer]:
        return [r.layer.weight_quantizer for r in self.layers]

    def act_quantizers(self) -> dict[str, UniformQuantizer]:
        """Distinct activation quantizers by module name, in first-use order."""
        out: dict[str, UniformQuantizer] = {}
        names = {id(m): n for n, m in self.net.named_modules()}
        for r in self.layers:
            q = r.input_quantizer
            if q is not None and names[id(q)] not in out:
                out[names[id(q)]] = q
        for key in self.tensor_quantizers:
            out[key] = self.net.get_submodule(key)
        return out

    def replace_quantizer(self, old: UniformQuantizer, new: UniformQuantizer) -> None:
        """Put ``new`` wherever ``old`` is used (graph module, layer input references, the
        layer table, weight slots): how QAT swaps in trainable kinds and back."""
        if old is new:
            return
        for name, m in list(self.net.named_modules()):
            if m is old and name:
                G.set_submodule(self.net, name, new)
        for r in self.layers:
            layer = r.layer
            if layer.weight_quantizer is old:
                layer.weight_quantizer = new
            if layer.input_quantizer is old:
                layer.input_quantizer = new
            if layer.input_ref and layer.input_ref[0] is old:
                layer.input_ref = (new,)
            if r.input_quantizer is old:
                r.input_quantizer = new

    @contextlib.contextmanager
    def quantization(self, weights: bool = True, activations: bool = True) -> Iterator[None]:
        """Temporarily switch weight and/or activation quantization off (float runs)."""
        saved_w = [r.layer.quantize_weight for r in self.layers]
        saved_a = {n: q.enabled for n, q in self.act_quantizers().items()}
        try:
            for r, s in zip(self.layers, saved_w):
                r.layer.quantize_weight = s and weights
            for n, q in self.act_quantizers().items():
                q.enabled = saved_a[n] and activations
            yield
        finally:
            for r, s in zip(self.layers, saved_w):
                r.layer.quantize_weight = s
            for n, q in self.act_quantizers().items():
                q.enabled = saved_a[n]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantModel":
        """``.to()``, ``.double()``, ``.cuda()`` ... convert the float copy too: it is a plain list, so nn.Module left
        it behind, and a float reference then put float32 CPU tensors back into a float64 (or GPU) network. A buffer
        that nn.Module replaces by a new tensor keeps its pair, looked up again by where it lives."""
        pairs = getattr(self, "_float_copy", None)
        where: dict[int, tuple[nn.Module, str]] = {}
        if pairs:
            for module in self.modules():
                for name, t in [*module._parameters.items(), *module._buffers.items()]:
                    if t is not None:
                        where.setdefault(id(t), (module, name))
        located = [where.get(id(t)) for t, _ in pairs or []]
        super()._apply(fn, recurse)
        if pairs:
            moved = []
            for (t, f), place in zip(pairs, located):
                if place is not None:
                    module, name = place
                    t = module._parameters[name] if name in module._parameters else module._buffers[name]
                moved.append((t, fn(f)))
            self._float_copy = moved
        teacher = getattr(self, "float_model", None)
        if teacher is not None:  # the original network kept as the teacher (not a submodule) goes along too
            teacher._apply(fn)
        return self

    def register_float_param(self, param: torch.Tensor, float_value: torch.Tensor) -> None:
        """Record the float value of a parameter an algorithm adds (e.g. a new bias)."""
        self._float_copy.append((param, float_value.detach().clone()))

    @contextlib.contextmanager
    def float_reference(self, activations: bool = False) -> Iterator[None]:
        """Run as the original float network: quantization off and every parameter back
        at its value from before any algorithm edited it (the teacher of reconstruction).
        ``activations=True`` keeps the activation quantizers as they are: the float weights
        as built behind quantized activations (the analyzer's activations-only network)."""
        with self.float_weights(), self.quantization(weights=False, activations=activations):
            yield

    @contextlib.contextmanager
    def float_weights(self, modules: list[nn.Module] | None = None) -> Iterator[None]:
        """Every parameter and float buffer (of ``modules`` only, when given) back at its value from before any
        algorithm edited it, quantization left as it is; restored after. (PD-Quant runs the rest of the network
        this way behind the block it reconstructs.)"""
        if self.no_float_reference is not None:
            raise LowbitError(f"this step compares with the float network, which is not known here: "
                              f"{self.no_float_reference}")
        owned = None if modules is None else {id(t) for m in modules for t in [*m.parameters(), *m.buffers()]}
        pairs = [(p, f) for p, f in self._float_copy if owned is None or id(p) in owned]
        saved = [p.data for p, _ in pairs]
        try:
            for p, f in pairs:
                p.data = f
            yield
        finally:
            for (p, _), d in zip(pairs, saved):
                p.data = d

    @property
    def calibrated(self) -> bool:
        ws = all(r.layer.weight_quantizer.calibrated or not r.layer.quantize_weight for r in self.layers)
        acts = all(q.calibrated or not q.enabled for q in self.act_quantizers().values())
        return ws and acts

    # -- size accounting --------------------------------------------------------------------
    def size_bits(self) -> dict[str, int]:
        """Exact stored bits vs the same tensors in float32.

        Stored: weight codes at their bit width + per-channel scales (+ zero points) +
        activation scales + every other float tensor (biases, unfolded BN) at 32 bits.
        """
        quant_ids = {id(r.layer.module.weight) for r in self.layers}
        quantizer_buffers = {id(b) for m in self.net.modules() if isinstance(m, UniformQuantizer) for b in m.buffers()}
        weight_float = weight_stored = other = 0
        for r in self.layers:
            n = r.params
            weight_float += 32 * n
            weight_stored += n * r.w_bits + (r.layer.weight_quantizer.param_bits() if r.layer.quantize_weight else 0)
        for t in list(self.net.parameters()) + list(self.net.buffers()):
            if id(t) in quant_ids or id(t) in quantizer_buffers or not t.is_floating_point():
                continue
            other += 32 * t.numel()
        act = sum(q.param_bits() for q in self.act_quantizers().values() if q.enabled)
        return {
            "float_bits": weight_float + other,
            "stored_bits": weight_stored + other + act,
            "weight_float_bits": weight_float,
            "weight_stored_bits": weight_stored,
        }

    def compression_ratio(self, weights_only: bool = False) -> float:
        """float32 bits / stored bits of the same tensors."""
        s = self.size_bits()
        if weights_only:
            return s["weight_float_bits"] / s["weight_stored_bits"]
        return s["float_bits"] / s["stored_bits"]

    def mean_bits(self) -> dict[str, float]:
        """Parameter-weighted mean weight bits and MAC-weighted mean activation bits."""
        params = sum(r.params for r in self.layers)
        w = sum(r.params * r.w_bits for r in self.layers) / params
        macs = [r.macs or 0 for r in self.layers]
        total = sum(macs)
        a = (sum(m * r.a_bits for m, r in zip(macs, self.layers)) / total) if total else float("nan")
        return {"w_bits": w, "a_bits": a}
