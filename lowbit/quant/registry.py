"""Quantizer kinds by name: what ``weights.quantizer`` / ``activations.quantizer`` in a
recipe select. Adding a kind is one module under lowbit.quant.learned plus one line here.

"uniform" is the fixed-grid quantizer PTQ calibrates; the others train with QAT and are
built from a calibrated uniform one (see lowbit.quant.learned.base.TrainableQuantizer).
"""
from __future__ import annotations

from typing import Any

from lowbit.errors import RecipeError
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.learned.dorefa import DoReFaWeightQuantizer
from lowbit.quant.learned.lsq import LSQPlusQuantizer, LSQQuantizer
from lowbit.quant.learned.pact import PACTQuantizer
from lowbit.quant.learned.ul2q import MuL2QQuantizer
from lowbit.quant.quantizer import UniformQuantizer

TRAINABLE: dict[str, type[TrainableQuantizer]] = {
    "lsq": LSQQuantizer,
    "lsq+": LSQPlusQuantizer,
    "pact": PACTQuantizer,
    "dorefa": DoReFaWeightQuantizer,
    "ul2q": MuL2QQuantizer,
}
KINDS = ("uniform", *TRAINABLE)


def check_kind(kind: Any, role: str) -> str:
    """The recipe's quantizer name for ``role`` ("weights"/"activations"), checked."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise RecipeError(f"{role}.quantizer must be one of {list(KINDS)}, got {kind!r}")
    if kind != "uniform" and role not in TRAINABLE[kind].roles:
        raise RecipeError(f"{role}.quantizer {kind!r} quantizes {' and '.join(TRAINABLE[kind].roles)} only; "
                          f"pair it with e.g. {role}.quantizer lsq")
    return kind


def make_trainable(source: UniformQuantizer, kind: str, role: str, **options: Any) -> UniformQuantizer:
    """The quantizer of ``kind`` that starts where ``source`` (calibrated) is; "uniform"
    keeps ``source`` itself (a fixed grid, e.g. float-range STE training)."""
    check_kind(kind, role)
    if kind == "uniform":
        return source
    return TRAINABLE[kind].from_uniform(source, role, **options)


def kind_options_schema(kind: str) -> list[Any]:
    """The options each kind accepts under ``quantizer_options`` (typed, with defaults)."""
    from lowbit.recipes.schema import Param

    lsq = [Param("grad_scale", "bool", True, doc="scale the step's gradient by 1/sqrt(N*Qp) (LSQ 2.2)")]
    return {
        "lsq": lsq,
        "lsq+": lsq,
        "pact": [Param("alpha_decay", "float", 5e-4, low=0, doc="L2 penalty on the clipping level alpha")],
    }.get(kind, [])


def check_kind_options(kind: str, options: Any, role: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise RecipeError(f"{role}.quantizer_options must be a mapping, got {options!r}")
    by_name = {p.name: p for p in kind_options_schema(kind)}
    unknown = sorted(set(options) - set(by_name), key=str)
    if unknown:
        raise RecipeError(f"{role}.quantizer_options: {unknown} are not options of quantizer {kind!r}; "
                          f"known: {sorted(by_name) or 'none'}")
    return {k: by_name[k].check(f"{role}.quantizer {kind}", v) for k, v in options.items()}
