"""One reconstruction loop for every output-matching method.

The quantized network is rebuilt unit by unit (a layer, or a residual block) so that its
output matches the float network's on calibration data. Methods differ only in what is
learned and how the loss is formed, so each is a preset of :class:`ReconConfig`:

- AdaRound: layer-wise, learned rounding (rectified sigmoid + annealed regulariser).
- BRECQ: block-wise AdaRound plus learned activation step sizes (LSQ-style gradient).
- QDrop: BRECQ with activation quantization randomly dropped (per element, p = 0.5) and
  the block input drawn element-wise from the float or the quantized network.
- PD-Quant: QDrop plus the prediction-difference loss (KL between the float network's
  logits and those obtained by running the quantized block's output through the rest of
  the float network) and distribution correction of the block input.
- AdaQuant: layer-wise, continuous weights (STE), bias and both step sizes learned.
- Teacher-student (seed 002, section 3.3.2): layer-wise, the quantized layer's latent
  float weights are refined through the STE so its output matches the float teacher's
  layer output; scales stay as initialised (e.g. by the cosine estimator).

Progress is shown per unit; with ``checkpoint`` set, the model state is saved after every
unit and a rerun of the same recipe continues after the last finished unit.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from lowbit.errors import LowbitError, RecipeError, UnsupportedModelError
from lowbit.model.quant_layer import QuantLayer
from lowbit.ptq.adaround import AdaRoundWeight, beta_schedule
from lowbit.ptq.cache import capture_inputs, run_chunked, walk_units
from lowbit.ptq.channels import channel_dim, channels_first
from lowbit.ptq.distribution import correct_block_input
from lowbit.ptq.drop import keep_mask, select
from lowbit.ptq.units import Unit, quantization_off, split_units
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.state_io import commit_state, committed_tensors


@dataclass(frozen=True)
class ReconConfig:
    granularity: str = "layer"        # "layer" | "block" | "network"
    rounding: str = "adaround"        # "adaround" | "ste" (learn latent float weights)
    iters: int = 500
    batch_size: int = 32
    lr_round: float = 1e-3            # AdaRound's V
    lr_weight: float = 1e-5           # latent weights / biases (ste rounding)
    lr_scale: float = 4e-5            # activation and weight step sizes
    learn_act_scale: bool = False
    learn_weight_scale: bool = False
    learn_bias: bool = False
    reg_weight: float = 0.01          # λ of AdaRound's f_reg
    warmup: float = 0.2
    keep_prob: float = 1.0            # QDrop: chance an activation stays quantized
    input_quant_prob: float = 1.0     # QDrop: chance a block-input element comes from the quantized net
    pd_weight: float = 0.0            # PD-Quant: weight of the KL prediction-difference loss
    pd_temperature: float = 4.0
    rec_weight: float = 1.0           # weight of the local reconstruction loss
    dc_iters: int = 0                 # PD-Quant distribution correction steps per block
    dc_lr: float = 0.01
    dc_reg: float = 1.0
    augment_repeats: int = 0          # network-wise only: crop-and-flip copies added to the calibration set


PRESETS: dict[str, ReconConfig] = {
    "adaround": ReconConfig(granularity="layer", rounding="adaround"),
    "brecq": ReconConfig(granularity="block", rounding="adaround", learn_act_scale=True),
    "qdrop": ReconConfig(granularity="block", rounding="adaround", learn_act_scale=True,
                         keep_prob=0.5, input_quant_prob=0.5),
    "pdquant": ReconConfig(granularity="block", rounding="adaround", learn_act_scale=True,
                           keep_prob=0.5, input_quant_prob=0.5, pd_weight=1.0, rec_weight=0.1,
                           dc_iters=50),
    "adaquant": ReconConfig(granularity="layer", rounding="ste", learn_bias=True, learn_weight_scale=True,
                            learn_act_scale=True, lr_weight=1e-4, lr_scale=1e-4),
    "teacher_student": ReconConfig(granularity="layer", rounding="ste", lr_weight=1e-4),
}


def make_config(method: str, overrides: dict[str, Any]) -> ReconConfig:
    if method not in PRESETS:
        raise RecipeError(f"unknown reconstruction method {method!r}; known: {sorted(PRESETS)}")
    from lowbit.recipes.schema import check_params

    known = {f.name for f in fields(ReconConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise RecipeError(f"step {method!r}: unknown parameter(s) {bad}; known: {sorted(known)}")
    # the same typed schema a recipe goes through, for callers of the Python API
    # (types, choices and ranges included: granularity, rounding, iters, keep_prob, ...)
    cfg = replace(PRESETS[method], **check_params(method, overrides))
    if cfg.rounding == "adaround" and cfg.learn_weight_scale:
        raise RecipeError(f"step {method!r}: learn_weight_scale needs rounding: ste; learned rounding decides each "
                          "weight's code on the calibrated step, and a step that moves after it re-rounds the codes")
    if cfg.pd_weight > 0 and cfg.granularity == "layer":
        raise RecipeError(f"step {method!r}: pd_weight (PD-Quant's prediction difference) needs granularity block or "
                          "network; a layer-wise run has no network output to compare (set pd_weight: 0)")
    if cfg.dc_iters > 0 and cfg.granularity != "block":
        raise RecipeError(f"step {method!r}: dc_iters (PD-Quant's distribution correction of each block's input) "
                          "needs granularity block (set dc_iters: 0)")
    for key in overrides:  # an option given but never read (e.g. lr_round under rounding: ste) was silently dropped
        why = _unread(cfg, key)
        if why:
            raise RecipeError(f"step {method!r}: {key} is not used here: {why}; drop it")
    return cfg


def _unread(cfg: ReconConfig, key: str) -> str | None:
    """Why option ``key`` has no effect under ``cfg`` (None: it is read)."""
    if key in ("lr_round", "reg_weight", "warmup") and cfg.rounding != "adaround":
        return "it drives AdaRound's learned rounding (its rate, regulariser and annealing), and rounding is ste"
    if key == "lr_weight" and cfg.rounding == "adaround" and not cfg.learn_bias:
        return ("it is the rate of the latent float weights (rounding: ste) and of the biases (learn_bias), and "
                "here rounding is adaround with learn_bias off")
    if key == "lr_scale" and not (cfg.learn_act_scale or cfg.learn_weight_scale):
        return "it is the rate of learned step sizes, and learn_act_scale and learn_weight_scale are off"
    if key == "pd_temperature" and cfg.pd_weight <= 0:
        return "it tempers PD-Quant's prediction-difference loss, and pd_weight is 0"
    if key in ("dc_lr", "dc_reg") and cfg.dc_iters <= 0:
        return "it drives PD-Quant's distribution correction, and dc_iters is 0"
    if key == "input_quant_prob" and cfg.granularity == "network":
        return "a network-wise run feeds the network input itself, the same in the float and quantized networks"
    return None


def reconstruct(qm, batches: list[torch.Tensor], method: str = "adaround", progress: bool = True,
                seed: int = 0, checkpoint: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run a reconstruction method over the whole model; returns per-unit final losses."""
    cfg = make_config(method, overrides)
    if not qm.calibrated:
        raise LowbitError(f"{method} starts from calibrated scales: run the calibrate step first")
    units = split_units(qm)
    x = torch.cat(batches)
    if cfg.augment_repeats and x.dim() != 4:  # only known now: the inputs were skipped, not augmented
        raise RecipeError(f"{method}: augment_repeats adds crop-and-flip copies of NCHW images, but the calibration "
                          f"inputs have shape {tuple(x.shape)}; set augment_repeats: 0")
    _check_reconstructable(qm, units, cfg, method, x)
    gen = torch.Generator().manual_seed(seed)
    if cfg.augment_repeats and cfg.granularity != "network":
        raise RecipeError(f"{method}: augment_repeats needs granularity: network (the unit-wise loops cache "
                          "each unit's inputs for the calibration images as they are)")
    if cfg.granularity == "network":
        if checkpoint:
            raise RecipeError(f"{method}: a network-wise run is one optimisation with no unit boundary to "
                              "resume from; drop `checkpoint`")
        with requires_grad(list(qm.parameters()), False):
            losses = {"network": _network(qm, cfg, units, x, gen, progress, method)}
        qm.meta.setdefault("reconstruction", []).append({"method": method, **asdict(cfg), "seed": seed,
                                                         "final_losses": losses})
        return losses
    state = _Checkpoint(checkpoint, method, cfg, [u.name for u in units], start_summary(qm, x, seed)) \
        if checkpoint else None
    done = state.load(qm, gen) if state else 0
    fp_logits = None
    if cfg.pd_weight > 0:
        with qm.float_reference():
            fp_logits = run_chunked(qm, x)
    losses: dict[str, float] = {}
    with requires_grad(list(qm.parameters()), False):
        _run_units(qm, cfg, units, x, done, state, fp_logits, gen, progress, method, losses)
    qm.meta.setdefault("reconstruction", []).append({"method": method, **asdict(cfg), "seed": seed,
                                                     "final_losses": losses})
    return losses


def _check_reconstructable(qm, units: list[Unit], cfg: ReconConfig, method: str, x: torch.Tensor) -> None:
    """Refuse, before any work, what reconstruction would get wrong or fail on deep inside torch."""
    if cfg.rounding == "adaround":
        for layer in (layer for u in units for layer in u.layers if layer.quantize_weight):
            if type(layer.weight_quantizer) is not UniformQuantizer:  # its scale and codes are not a uniform grid's
                raise RecipeError(f"{method} learns the rounding of a uniform grid; layer {layer.name!r} has "
                                  f"{type(layer.weight_quantizer).__name__} weights (e.g. k-means codebooks): put "
                                  "the learned rounding before that step, or use rounding: ste")
    with torch.no_grad():
        out = qm(x[:1])
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(f"{method} compares the network's output tensors; this model returns a "
                                    f"{type(out).__name__}. Wrap it so that forward returns one tensor")


def _run_units(qm, cfg, units, x, done, state, fp_logits, gen, progress, method, losses) -> None:
    layerwise = cfg.granularity == "layer"
    bar = tqdm(total=len(units), desc=method, unit="unit", disable=not progress, leave=False)
    for step in walk_units(qm, units, x, layer_inputs=layerwise, layer_outputs=layerwise):
        unit, k = step.unit, step.index
        if k >= done:
            bar.set_postfix_str(unit.name)
            if layerwise:
                for layer in unit.layers:
                    q_lin = capture_inputs(unit, step.q_in, [layer])
                    losses[layer.name] = _layer(cfg, layer, q_lin[layer.name], step.fp_layer_in[layer.name],
                                                step.fp_layer_out[layer.name], gen, progress)
            else:
                losses[unit.name] = _block(qm, cfg, unit, step.fp_in, step.q_in, step.fp_out, units[k + 1:],
                                           fp_logits, gen, progress)
            if state:
                state.save(qm, k + 1, gen)
        bar.update(1)
    bar.close()


# -- one unit ----------------------------------------------------------------------------
def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over samples and positions, the
    normalisation AdaRound's λ = 0.01 was tuned for. The channels are at dim 1: ``_channels_first``
    puts them there for the unit-wise loops."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def _channels_first(module: nn.Module | None, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    target: torch.Tensor, extra: Callable | None):
    """``forward``, ``target`` and ``extra`` with the output's channels (those of ``module``, the layer that
    made it) at dim 1, where ``_rec_loss`` sums them: a Linear on [B, T, F] has them last, and the tokens were
    summed instead. ``extra`` (PD-Quant's term, which runs the output on through the network) gets it back in
    its own layout. A convolution's channels are at dim 1 already (the same tensors, as views)."""
    if module is None:
        return forward, target, extra

    def fwd(xq: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
        return channels_first(module, forward(xq, xf))

    def back(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return extra(out.movedim(1, channel_dim(module, out)) if out.dim() > 2 else out, idx)

    return fwd, channels_first(module, target), (back if extra is not None else None)


def _layer(cfg, layer: QuantLayer, q_in, fp_in, fp_out, gen, progress) -> float:
    quantizer = layer.input_ref[0] if layer.input_ref else None
    quantizers = [quantizer] if quantizer is not None and quantizer.enabled else []

    def forward(xq: torch.Tensor, _xf: torch.Tensor) -> torch.Tensor:
        return layer(quantizer(xq) if quantizers else xq)

    forward, fp_out, _ = _channels_first(layer.module, forward, fp_out, None)
    return _optimize(cfg, [layer], quantizers, forward, q_in, fp_in, fp_out, None, gen, progress, layer.name)


def _block(qm, cfg, unit: Unit, fp_in, q_in, fp_out, rest: list[Unit], fp_logits, gen, progress) -> float:
    if cfg.dc_iters > 0:
        q_in = correct_block_input(qm, unit, q_in, cfg.dc_iters, cfg.dc_lr, cfg.dc_reg, gen)
    extra = None
    if cfg.pd_weight > 0:
        def extra(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            z = out
            for u in rest:
                z = u(z)
            t = cfg.pd_temperature
            return cfg.pd_weight * F.kl_div(F.log_softmax(z / t, 1), F.softmax(fp_logits[idx] / t, 1),
                                            reduction="batchmean")
    # the rest of the network as the float one (PD-Quant's prediction difference): quantization off and the
    # original float weights, not those an earlier step (GPTQ, bias correction) edited
    float_rest = qm.float_weights([u.module for u in rest]) if extra is not None else contextlib.nullcontext()
    with quantization_off(rest), float_rest:
        # a block's output holds its last layer's channels (after its activation and pooling)
        forward, fp_out, extra = _channels_first(unit.layers[-1].module if unit.layers else None,
                                                 lambda xq, xf: unit(xq), fp_out, extra)
        return _optimize(cfg, unit.layers, [q for q in unit.quantizers if q.enabled],
                         forward, q_in, fp_in, fp_out, extra, gen, progress, unit.name)


def _network(qm, cfg: ReconConfig, units: list[Unit], x: torch.Tensor, gen: torch.Generator, progress: bool,
             name: str) -> float:
    """Every layer at once against the float network's logits on the calibration set
    (network-wise reconstruction): what layer- and block-wise losses cannot see, how one
    layer's error is amplified or cancelled by the rest of the network, is in this loss.
    The local term compares logits (squared error); ``pd_weight`` adds their tempered KL.
    With ``augment_repeats``, crop-and-flip copies of 4-D image inputs join the set, so a
    network fitted to 1,024 images sees more than those exact pixels."""
    if cfg.augment_repeats:  # 4-D images (reconstruct refuses other inputs)
        from lowbit.data.augment import random_crop_flip

        x = torch.cat([x] + [random_crop_flip(x, 4, True, gen) for _ in range(cfg.augment_repeats)])
    with qm.float_reference():
        fp_logits = run_chunked(qm, x)
    extra = None
    if cfg.pd_weight > 0:
        def extra(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            t = cfg.pd_temperature
            return cfg.pd_weight * t * t * F.kl_div(F.log_softmax(out / t, 1), F.softmax(fp_logits[idx] / t, 1),
                                                    reduction="batchmean")
    layers = [layer for u in units for layer in u.layers]
    quantizers = list({id(q): q for u in units for q in u.quantizers if q.enabled}.values())
    return _optimize(cfg, layers, quantizers, lambda xq, _xf: qm(xq), x, x, fp_logits, extra, gen, progress, name)


@contextlib.contextmanager
def requires_grad(tensors: list[torch.Tensor], flag: bool) -> Iterator[None]:
    """Set ``requires_grad`` on these tensors for the duration, then restore it."""
    saved = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(flag)
        yield
    finally:
        for t, s in zip(tensors, saved):
            t.requires_grad_(s)


@contextlib.contextmanager
def _dropped(quantizers: list[UniformQuantizer], keep_prob: float, gen: torch.Generator) -> Iterator[None]:
    """QDrop: each quantized activation element falls back to its float value with
    probability 1 − keep_prob (forward hooks, so the quantizer class stays unaware)."""
    if keep_prob >= 1:
        yield
        return

    def hook(_m, args, out):
        return select(keep_mask(out.shape, keep_prob, gen, out.device), out, args[0])

    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _learnable_scale(q: UniformQuantizer) -> torch.Tensor:
    q.scale = q.scale.detach().clone().requires_grad_(True)
    return q.scale


def _optimize(cfg: ReconConfig, layers: list[QuantLayer], quantizers: list[UniformQuantizer],
              forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], q_in, fp_in, target,
              extra: Callable | None, gen: torch.Generator, progress: bool, name: str) -> float:
    layers = [layer for layer in layers if layer.quantize_weight]
    rounders = {layer.name: AdaRoundWeight(layer) for layer in layers} if cfg.rounding == "adaround" else {}
    groups: list[dict[str, Any]] = []
    if rounders:
        groups.append({"params": [r.v for r in rounders.values()], "lr": cfg.lr_round})
    else:
        groups.append({"params": [layer.module.weight for layer in layers], "lr": cfg.lr_weight})
    if cfg.learn_bias:
        biases = [layer.module.bias for layer in layers if layer.module.bias is not None]
        if biases:
            groups.append({"params": biases, "lr": cfg.lr_weight})
    scales = []
    if cfg.learn_weight_scale:
        scales += [_learnable_scale(layer.weight_quantizer) for layer in layers]
    if cfg.learn_act_scale:
        scales += [_learnable_scale(q) for q in quantizers]
    if scales:
        groups.append({"params": scales, "lr": cfg.lr_scale, "cosine": True})
    groups = [g for g in groups if g["params"]]
    trainable = [p for g in groups for p in g["params"]]
    if not trainable:  # every layer here stays float (w_bits 32) and no step is learned: nothing to fit
        return float("nan")
    opt = torch.optim.Adam([{k: v for k, v in g.items() if k != "cosine"} for g in groups])
    for layer in layers:
        if layer.name in rounders:
            layer.weight_fn = rounders[layer.name]
    n = q_in.shape[0]
    loss_value = float("nan")
    bar = tqdm(range(cfg.iters), desc=f"  {name}", leave=False, disable=not progress, mininterval=1.0)
    try:
        with requires_grad(trainable, True), _dropped(quantizers, cfg.keep_prob, gen):
            for step in bar:
                idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
                xq, xf = q_in[idx], fp_in[idx]
                if cfg.input_quant_prob < 1:
                    xq = select(keep_mask(xq.shape, cfg.input_quant_prob, gen, xq.device), xq, xf)
                out = forward(xq, xf)
                rec = _rec_loss(out, target[idx])
                loss = cfg.rec_weight * rec
                if extra is not None:
                    loss = loss + extra(out, idx)
                beta = beta_schedule(step, cfg.iters, cfg.warmup)
                if rounders and beta is not None:
                    loss = loss + cfg.reg_weight * sum(r.regularizer(beta) for r in rounders.values())
                if not torch.isfinite(loss):
                    raise LowbitError(f"reconstruction of {name} diverged (loss {float(loss)}); lower the learning rates")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _cosine_lr(opt, groups, step, cfg.iters)
                opt.step()
                with torch.no_grad():
                    for s in scales:
                        s.clamp_(min=1e-8)
                loss_value = float(rec.detach())
                if step % 50 == 0:
                    bar.set_postfix(rec=f"{loss_value:.4g}")
    finally:
        for layer in layers:
            layer.weight_fn = None
        for r_name, r in rounders.items():
            r.bake(next(layer for layer in layers if layer.name == r_name))
        for q in [layer.weight_quantizer for layer in layers] + quantizers:
            q.scale = q.scale.detach()
    return loss_value


def _cosine_lr(opt: torch.optim.Optimizer, groups: list[dict[str, Any]], step: int, total: int) -> None:
    """Step sizes follow a cosine decay to zero (as in BRECQ/QDrop's activation step
    learning); rounding variables keep a constant rate."""
    for pg, g in zip(opt.param_groups, groups):
        if g.get("cosine"):
            pg["lr"] = g["lr"] * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


# -- resumable state ---------------------------------------------------------------------
GENERATOR_KEY = "rng/generator"  # the batch sampler's state beside the model's tensors


def start_summary(qm, x: torch.Tensor, seed: int) -> dict[str, Any]:
    """What the reconstruction starts from: each tensor of the model's state (weights, biases,
    quantizer parameters the steps before it left: bits show in the ranges) and the calibration
    inputs as (shape, sum, sum of |.|), and the seed. A checkpoint resumes only onto the same
    start: another model, other bits or other data would otherwise load the first run's weights
    without a word. Sums, not a hash: a resumed process with another thread count may calibrate
    to the last bit differently, which must not refuse the resume (see :func:`same_start`)."""
    def stats(t: torch.Tensor) -> list[Any]:
        t = t.detach().double()
        return [list(t.shape), float(t.sum()), float(t.abs().sum())]

    return {"seed": seed, "inputs": stats(x),
            "state": {name: stats(t) for name, t in qm.state_dict().items() if t.is_floating_point()}}


def same_start(saved: dict[str, Any], now: dict[str, Any], rtol: float = 1e-4) -> bool:
    """Whether two :func:`start_summary` results describe one start, to float noise."""
    if saved.get("seed") != now["seed"] or set(saved.get("state", {})) != set(now["state"]):
        return False
    pairs = [(saved["inputs"], now["inputs"])] + [(saved["state"][k], v) for k, v in now["state"].items()]
    return all(a[0] == b[0] and all(math.isclose(p, q, rel_tol=rtol, abs_tol=1e-6) for p, q in zip(a[1:], b[1:]))
               for a, b in pairs)


class _Checkpoint:
    """Model state after each finished unit (safetensors) + what produced it (JSON)."""

    def __init__(self, path: str | Path, method: str, cfg: ReconConfig, unit_names: list[str],
                 start: dict[str, Any]) -> None:
        self.dir = Path(path)
        if self.dir.exists() and not self.dir.is_dir():  # found now, not after the first unit's work
            raise RecipeError(f"{method}: checkpoint {self.dir} is a file; give a folder (it is created if missing)")
        self.info = {"method": method, "config": asdict(cfg), "units": unit_names}
        self.start = start

    def load(self, qm, gen: torch.Generator) -> int:
        """Units already done (0 without a checkpoint), their result loaded into ``qm`` and the
        batch sampler ``gen`` put where the interrupted run had it, so the rest draws the same batches."""
        meta = self.dir / "progress.json"
        if not meta.exists():
            return 0
        problem = f"cannot read reconstruction checkpoint {self.dir}"
        try:
            saved = json.loads(meta.read_text())
            if not isinstance(saved, dict):
                raise ValueError("progress.json is not a JSON object")
            weights = committed_tensors(self.dir, saved, "state.safetensors")
        except (OSError, ValueError) as e:
            raise LowbitError(f"{problem}: {e}; delete the directory") from e
        if {k: saved.get(k) for k in self.info} != self.info:
            raise LowbitError(f"checkpoint {self.dir} was written by a different reconstruction "
                              f"({saved.get('method')}, other settings); delete it or pick another directory")
        if "start" in saved and not same_start(saved["start"], self.start):  # (older checkpoints do not say)
            raise LowbitError(f"checkpoint {self.dir} was written from another starting point (another model, "
                              "recipe, bits, earlier steps or calibration data); delete it or pick another directory")
        if not weights.exists():
            raise LowbitError(f"checkpoint {self.dir}: progress.json without {weights.name}; delete the directory")
        try:
            tensors = load_file(str(weights))
            generator = tensors.pop(GENERATOR_KEY, None)
            qm.load_state_dict(tensors)
            done = int(saved["units_done"])
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            raise LowbitError(f"{problem}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                              "delete the directory") from e
        if generator is not None:
            gen.set_state(generator)
        return done

    def save(self, qm, units_done: int, gen: torch.Generator) -> None:
        """The model after ``units_done`` units, the sampler's state and the progress naming them, as one commit."""
        self.dir.mkdir(parents=True, exist_ok=True)
        commit_state(self.dir, "state", units_done, {**qm.state_dict(), GENERATOR_KEY: gen.get_state()},
                     "progress.json", {**self.info, "start": self.start, "units_done": units_done})
