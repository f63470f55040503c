"""Quantizer kinds by name: what ``weights.quantizer`` / ``activations.quantizer`` in a
recipe select. Adding a kind is one module under lowbit.quant.learned plus one line here.

"uniform" is the fixed-grid quantizer PTQ calibrates; the others train with QAT and are
built from a calibrated uniform one (see lowbit.quant.learned.base.TrainableQuantizer).
"""
from __future__ import annotations

from typing import Any

from lowbit.errors import RecipeError
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.learned.binary import (BinaryConnectQuantizer, BNNActivationQuantizer, IRNetWeightQuantizer,
                                         XNORWeightQuantizer)
from lowbit.quant.learned.codebook_kinds import KMeansFineTuneQuantizer, TTQQuantizer
from lowbit.quant.learned.dorefa import DoReFaWeightQuantizer
from lowbit.quant.learned.hwgq import HWGQQuantizer
from lowbit.quant.learned.inq import INQQuantizer
from lowbit.quant.learned.lqnet import LQNetQuantizer
from lowbit.quant.learned.lsq import FixedGridWeightQuantizer, LSQPlusQuantizer, LSQQuantizer
from lowbit.quant.learned.pact import PACTQuantizer
from lowbit.quant.learned.ternary import TWNQuantizer
from lowbit.quant.learned.ul2q import MuL2QQuantizer
from lowbit.quant.quantizer import UniformQuantizer

TRAINABLE: dict[str, type[TrainableQuantizer]] = {
    "lsq": LSQQuantizer,
    "lsq+": LSQPlusQuantizer,
    "pact": PACTQuantizer,
    "dorefa": DoReFaWeightQuantizer,
    "ul2q": MuL2QQuantizer,
    "binaryconnect": BinaryConnectQuantizer,
    "xnor": XNORWeightQuantizer,
    "irnet": IRNetWeightQuantizer,
    "bnn": BNNActivationQuantizer,
    "twn": TWNQuantizer,
    "hwgq": HWGQQuantizer,
    "kmeans": KMeansFineTuneQuantizer,
    "ttq": TTQQuantizer,
    "inq": INQQuantizer,
    "lqnet": LQNetQuantizer,
}
KINDS = ("uniform", *TRAINABLE)


def check_kind(kind: Any, role: str, where: str | None = None) -> str:
    """The recipe's quantizer name for ``role`` ("weights"/"activations"), checked; errors
    name ``where`` (e.g. "overrides[0].weights"), by default the role."""
    where = where or role
    if not isinstance(kind, str) or kind not in KINDS:
        raise RecipeError(f"{where}.quantizer must be one of {list(KINDS)}, got {kind!r}")
    if kind != "uniform" and role not in TRAINABLE[kind].roles:
        raise RecipeError(f"{where}.quantizer {kind!r} quantizes {' and '.join(TRAINABLE[kind].roles)} only; "
                          f"pair it with e.g. {where}.quantizer lsq")
    return kind


def check_kind_grid(kind: str, spec: Any, where: str) -> None:
    """Binary and ternary kinds have one grid: a recipe asking for another is an error (the
    layers the recipe keeps at other bits, e.g. first/last at 8, train with LSQ instead)."""
    cls = TRAINABLE.get(kind)
    need = getattr(cls, "grid_required", None)
    if need is not None and (spec.bits, spec.grid) != need:
        raise RecipeError(f"{where}.quantizer {kind!r} needs {where}: {{bits: {need[0]}, grid: {need[1]}}}, "
                          f"got {spec.bits}-bit {spec.grid}")
    if getattr(cls, "per_tensor_only", False) and spec.per_channel:
        raise RecipeError(f"{where}.quantizer {kind!r} has one set of levels per layer: set {where}.per_channel: false")


def required_bits(kind: str | None) -> int | None:
    """The one width a binary/ternary kind quantizes to (None: any width)."""
    need = getattr(TRAINABLE.get(kind or "uniform"), "grid_required", None)
    return need[0] if need else None


def spec_for_kind(kind: str | None, spec: Any) -> Any:
    """``spec`` as ``kind`` needs it for one layer: the kind's own grid (binary, ternary;
    bits already checked against required_bits) and per tensor for kinds with one set of
    levels per layer (TTQ, INQ)."""
    cls = TRAINABLE.get(kind or "uniform")
    need = getattr(cls, "grid_required", None)
    if need is not None:  # (narrow: a ternary grid has codes −1, 0, 1 only, whatever the recipe's narrow_range)
        spec = spec.with_(grid=need[1], signed=True, symmetric=True, narrow_range=True)
    if getattr(cls, "per_tensor_only", False):
        spec = spec.with_(per_channel=False)
    return spec


def check_codebook_source(source: UniformQuantizer, kind: str, role: str) -> None:
    """Refuse to train a codebook weight (a `kmeans` step's) as any kind but kmeans: the others start from
    a uniform grid, and a codebook's is a placeholder of step 1, so its centroids would be silently replaced
    by a step-1 grid. (lowbit.qat.convert checks this before falling back to LSQ, which would do the same.)"""
    if role == "weights" and kind != "kmeans" and isinstance(source, CodebookQuantizer):
        layer = source.name.removesuffix(".weight")
        what = f"layer {layer!r} has a {source.method} codebook ({source.centroids.shape[-1]} centroids)"
        if source.method != "kmeans":  # the deployed form of a finished TTQ / INQ / LQ-Nets run
            raise RecipeError(f"{what}: the deployed form of a finished {source.method} run, which "
                              f"weights.quantizer {kind!r} cannot restart from (it starts from a calibrated uniform "
                              f"grid): to train it further, rerun that run with its qat checkpoint folder and more "
                              "epochs (it resumes), or fine-tune these centroids with `weights.quantizer: kmeans`")
        raise RecipeError(f"{what} that weights.quantizer {kind!r} would replace with a uniform grid: use "
                          "`weights.quantizer: kmeans` to fine-tune its centroids, or put `qat` before `kmeans`")


def make_trainable(source: UniformQuantizer, kind: str, role: str, weight: Any = None,
                   **options: Any) -> UniformQuantizer:
    """The quantizer of ``kind`` that starts where ``source`` (calibrated) is; "uniform"
    keeps ``source``'s grid fixed (e.g. min-max STE training). Kinds that start
    from the weight itself (k-means assignments, TTQ's scales) get it as ``weight``."""
    check_kind(kind, role)
    check_codebook_source(source, kind, role)
    if kind == "uniform":  # a fixed grid: activations keep it as it is; weights follow their BN (see the class)
        return FixedGridWeightQuantizer(source, role) if role == "weights" else source
    cls = TRAINABLE[kind]
    if getattr(cls, "needs_weight", False):
        if weight is None:
            raise RecipeError(f"quantizer {kind!r} starts from the layer's weight; none was given")
        options = {**options, "weight": weight}
    elif getattr(cls, "takes_weight", False) and role == "weights" and weight is not None:  # optional for it
        options = {**options, "weight": weight}
    return cls.from_uniform(source, role, **options)


def kind_options_schema(kind: str, role: str = "weights") -> list[Any]:
    """The options each kind accepts under ``quantizer_options`` for ``role`` (typed, with defaults)."""
    from lowbit.recipes.schema import Param

    lsq = [Param("grad_scale", "bool", True, doc="scale the step's gradient by 1/sqrt(N*Qp) (LSQ 2.2)")]
    approx = Param("approx_sign", "bool", False, doc="activations: Bi-Real's ApproxSign gradient 2-2|x| (eq. 8)")
    ede = Param("ede", "bool", False, doc="activations: IR-Net's EDE gradient k*t*(1 - tanh^2(t*x)), t 0.1 -> 10")
    return {
        "lsq": lsq,
        "lsq+": lsq,
        "pact": [Param("alpha_decay", "float", 5e-4, low=0, doc="L2 penalty on the clipping level alpha")],
        "binaryconnect": [Param("stochastic", "bool", False, doc="sample +1 with probability hard_sigmoid(w) in training")],
        "irnet": [Param("balance", "bool", True, doc="Libra-PB: sign of each channel's (W - mean)/std (IR-Net eq. 8)"),
                  Param("ede", "bool", True, doc="EDE backward k*t*(1 - tanh^2(t*x)), t annealed (IR-Net eq. 10-11)"),
                  Param("t_min", "float", 0.1, low=0, open_low=True, doc="EDE's t at the start of training"),
                  Param("t_max", "float", 10.0, low=0, open_low=True, doc="EDE's t at the end of training")],
        "bnn": [approx, ede],
        "xnor": [approx, ede] if role == "activations" else [],
        "hwgq": [Param("momentum", "float", 0.1, low=0, high=1, doc="running average of the half-wave sigma")],
        "lqnet": [Param("momentum", "float", 0.1, low=0, high=1, doc="moving average of the least-squares basis")]
        + ([Param("fit_fraction", "float", 0.25, low=0, open_low=True, high=1,
                  doc="share of a batch's images the basis is fitted on (1: the whole batch, as Algorithm 1)")]
           if role == "activations" else []),
        "inq": [Param("top_level", "str", "max", choices=("max", "mse"),
                      doc="largest level 2^n1: from max|W| (INQ eq. 2) or the n1 with the least squared error")],
        "ttq": [Param("threshold", "float", 0.05, low=0, high=1, doc="t: zero where |w| <= t*max|w| (TTQ eq. 6)")],
    }.get(kind, [])


def explain_kind(kind: str) -> list[dict[str, Any]]:
    """Rows for ``lowbit recipes --explain KIND``: each option of a quantizer kind, per role it quantizes
    (set under ``weights.quantizer_options`` or ``activations.quantizer_options``)."""
    roles = TRAINABLE[kind].roles if kind in TRAINABLE else ()
    return [{"role": role, "option": p.name, "expects": p.expected(), "default": p.default, "meaning": p.doc}
            for role in roles for p in kind_options_schema(kind, role)]


def check_kind_options(kind: str, options: Any, role: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise RecipeError(f"{role}.quantizer_options must be a mapping, got {options!r}")
    by_name = {p.name: p for p in kind_options_schema(kind, "activations" if role.endswith("activations") else "weights")}
    unknown = sorted(set(options) - set(by_name), key=str)
    if unknown:
        raise RecipeError(f"{role}.quantizer_options: {unknown} are not options of quantizer {kind!r}; "
                          f"known: {sorted(by_name) or 'none'}")
    return {k: by_name[k].check(f"{role}.quantizer {kind}", v) for k, v in options.items()}
