"""Recipe names composed from bit widths and method words: ``w{W}a{A}[+word...]``.

So that every method at every bit width is one word on the command line (``w3a3+adaquant``,
``w4a4+gptq+bias_correction``, ``w2a2+lsq+kd``) without a hand-written file per pair. The
hand-written built-ins stay where they carry measured settings (their descriptions say what
they were measured at); a built-in of the exact name always wins over composition.

- ``w{W}a{A}``: W-bit per-channel weights (1-8), A-bit activations (2-8, or 32 for float
  activations), the layout of the plain built-ins (MSE ranges, BN folded, first/last layer
  8-bit). Alone it runs the steps of the built-in it extends (``w4a4``'s: float-observed calibration,
  float-input bias correction, moment matching).
- post-training words run as steps after ``calibrate``, in the order written (and replace
  the default bias correction): see ``PTQ_WORDS``.
- at most one training word picks the trainable quantizer kinds and adds a ``qat`` step
  with its defaults (5 epochs, lr 0.001): see ``QAT_WORDS``; ``kd`` adds distillation from
  the float model to it (T 4, weight 0.5).
"""
from __future__ import annotations

import re
from typing import Any

from lowbit.errors import RecipeError

NAME = re.compile(r"w(\d+)a(\d+)((?:\+[a-z0-9_]+)*)")

PTQ_WORDS: dict[str, str] = {
    "bias_correction": "undo each layer's output shift from quantization (statistics of the calibration set)",
    "match_moments": "USP for folded BN: match each layer's channel mean and variance to the float network's",
    "usp": "re-estimate BN statistics on the quantized network (seed 004)",
    "gptq": "column-by-column rounding with inverse-Hessian error feedback (Frantar et al. 2022)",
    "adaround": "learned rounding, layer by layer (Nagel et al. 2020)",
    "brecq": "learned rounding and activation steps, block by block (Li et al. 2021)",
    "qdrop": "BRECQ with activation quantization randomly dropped (Wei et al. 2022)",
    "pdquant": "QDrop plus the prediction-difference loss (Liu et al. 2023)",
    "adaquant": "weights, biases and steps learned layer by layer (Hubara et al. 2021)",
    "teacher_student": "layer-wise refinement against the float layer (seed 002)",
    "easyquant": "alternating weight/activation step search on cosine similarity (seed 002's EasyQuant)",
}

# word -> (weights kind, activations kind, what it is)
QAT_WORDS: dict[str, tuple[str, str, str]] = {
    "lsq": ("lsq", "lsq+", "LSQ learned weight steps, LSQ+ activations"),
    "pact": ("lsq", "pact", "PACT learned activation clip, LSQ weights"),
    "dorefa": ("dorefa", "dorefa", "DoReFa weights and activations"),
    "ul2q": ("ul2q", "lsq+", "seed 000's μL2Q weights, LSQ+ activations"),
    "twn": ("twn", "lsq+", "TWN ternary weights (needs w2), LSQ+ activations"),
    "xnor": ("xnor", "lsq+", "XNOR-Net binary weights (needs w1), LSQ+ activations"),
    "binaryconnect": ("binaryconnect", "lsq+", "BinaryConnect sign weights (needs w1), LSQ+ activations"),
    "irnet": ("irnet", "lsq+", "IR-Net balanced sign weights with the EDE gradient (needs w1), LSQ+ activations"),
    "lqnet": ("lqnet", "lqnet", "LQ-Nets learned bases for weights and activations"),
}

OPTION_WORDS = {"kd": "distil the qat step from the float model (temperature 4, weight 0.5)"}

_WEIGHT_BITS = range(1, 9)
_ACT_BITS = (*range(2, 9), 32)


def is_composed(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def _words(name: str, suffix: str) -> tuple[list[str], str | None, bool]:
    ptq: list[str] = []
    qat: str | None = None
    kd = False
    known = sorted([*PTQ_WORDS, *QAT_WORDS, *OPTION_WORDS])
    seen: set[str] = set()
    for word in filter(None, suffix.split("+")):
        if word in seen:  # any kind: a repeated kd or training word is a typo, not a stronger setting
            raise RecipeError(f"recipe {name!r}: {word!r} is written twice")
        seen.add(word)
        if word in PTQ_WORDS:
            ptq.append(word)
        elif word in QAT_WORDS:
            if qat is not None:
                raise RecipeError(f"recipe {name!r}: one training word only, got {qat!r} and {word!r}")
            qat = word
        elif word in OPTION_WORDS:
            kd = True
        else:
            raise RecipeError(f"recipe {name!r}: unknown word {word!r}; known: {', '.join(known)} "
                              "(see `lowbit recipes`)")
    if kd and qat is None:
        raise RecipeError(f"recipe {name!r}: 'kd' distils a training step; add a training word "
                          f"({', '.join(QAT_WORDS)})")
    return ptq, qat, kd


def _check_no_leading_zero(name: str, prefix: str, digits: str) -> None:
    """Refuse ``w04``: one recipe would otherwise have several names (and artifact stems)."""
    if len(digits) > 1 and digits.startswith("0"):
        raise RecipeError(f"recipe {name!r}: {prefix + digits!r} has a leading zero; write "
                          f"{prefix + str(int(digits))!r}")


def compose(name: str, builtins: list[str]) -> dict[str, Any]:
    """The recipe dict a composed name stands for (``Recipe.from_dict`` checks the rest)."""
    m = NAME.fullmatch(name)
    if m is None:
        raise RecipeError(f"{name!r} is not a composed recipe name (w{{W}}a{{A}}[+word...])")
    _check_no_leading_zero(name, "w", m.group(1))
    _check_no_leading_zero(name, "a", m.group(2))
    w_bits, a_bits, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
    if w_bits not in _WEIGHT_BITS:
        raise RecipeError(f"recipe {name!r}: weight bits must be 1-8, got {w_bits}")
    if a_bits not in _ACT_BITS:
        hint = " (1-bit activations: the w1a1-bnn, w1a1-xnor and w1a1-bireal built-ins)" if a_bits == 1 else ""
        raise RecipeError(f"recipe {name!r}: activation bits must be 2-8 or 32 (float), got {a_bits}{hint}")
    ptq, qat, kd = _words(name, suffix)
    base = f"w{w_bits}a{a_bits}"
    recipe: dict[str, Any] = {"name": name, "extends": base if base in builtins else "w4a4"}
    weights: dict[str, Any] = {"bits": w_bits}
    activations: dict[str, Any] = {"bits": 8 if a_bits == 32 else a_bits}
    if a_bits == 32:  # float activations everywhere, adds included (as the w*a32 built-ins)
        recipe["overrides"] = [{"pattern": "*", "a_bits": 32}]
        recipe["quantize_adds"] = False
    if w_bits == 1:
        weights["grid"] = "midrise"  # a 1-bit grid has no zero
    if qat is not None:
        w_kind, a_kind, _ = QAT_WORDS[qat]
        weights["quantizer"] = w_kind
        if a_bits != 32:
            activations["quantizer"] = a_kind
        if w_kind == "twn":
            weights["grid"] = "midtread"
        elif w_kind == "lsq" and w_bits == 2:
            weights["grid"] = "midrise"  # 4 levels: w2a2-lsq's measured choice over the ternary grid
    recipe["weights"], recipe["activations"] = weights, activations
    steps: list[Any] = ["calibrate", *ptq]
    if qat is not None:
        steps.append({"qat": {"kd": {"temperature": 4.0, "weight": 0.5}} if kd else {}})
    if ptq or qat is not None:
        recipe["steps"] = steps  # otherwise the base's own steps (calibration, bias correction)
    if "usp" in ptq:
        recipe["fold_bn"] = False  # USP re-estimates BN statistics: BN must stay a layer of its own
    what = [f"{w_bits}-bit weights", "float activations" if a_bits == 32 else f"{a_bits}-bit activations"]
    what += [f"then {w}" for w in ptq]
    if qat is not None:
        what.append(f"then QAT ({QAT_WORDS[qat][2]}{', distilled' if kd else ''}; 5 epochs at lr 0.001 "
                    "unless overridden)")
    recipe["description"] = "composed: " + ", ".join(what) + "; first/last layer 8-bit"
    return recipe


def grammar_help() -> str:
    """What ``lowbit recipes`` prints about composed names."""
    lines = ["Composed names: w{W}a{A}[+word...]  (W: 1-8 weight bits; A: 2-8 activation bits, 32 = float)",
             "  e.g. w5a5, w3a3+adaquant, w4a4+gptq+bias_correction, w2a2+lsq+kd, w2a32+twn",
             "  post-training words (run after calibrate, in the order written):"]
    lines += [f"    {w:<16} {d}" for w, d in PTQ_WORDS.items()]
    lines.append("  training words (one at most; adds a qat step, 5 epochs at lr 0.001 unless overridden):")
    lines += [f"    {w:<16} {d[2]}" for w, d in QAT_WORDS.items()]
    lines += [f"    {w:<16} {d}" for w, d in OPTION_WORDS.items()]
    lines.append("  A built-in of the same name wins; built-ins carry settings measured at their stated budgets.")
    return "\n".join(lines)
