"""Model and data checked against each other before any work starts.

One forward pass of a single sample through the model, watched by pre-hooks on every
leaf module, turns a shape or dtype mismatch deep inside torch into a message that
names the data (e.g. "calibration batch 0"), its shape, and the layer that refused it
with what that layer expects.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.errors import DataMismatchError, LowbitError


def _expects(module: nn.Module) -> str:
    """What a layer needs of its input, in words."""
    m = getattr(module, "module", module)  # a QuantLayer wraps the float layer
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        dims = "3-D (N, C, L)" if isinstance(m, nn.Conv1d) else "4-D (N, C, H, W)"
        return f"expects a {dims} input with {m.in_channels} channels"
    if isinstance(m, nn.Linear):
        return f"expects {m.in_features} input features"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"expects {m.num_features} channels"
    return "cannot run it"


def _parameter_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def probe_forward(model: nn.Module, x: Any, what: str) -> None:
    """Run ``model`` on the first sample of ``x``; any failure becomes a DataMismatchError
    naming ``what``, the shape, and the layer that failed with what it expects."""
    if not isinstance(x, torch.Tensor):
        raise DataMismatchError(f"{what} is a {type(x).__name__}, not a tensor")
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataMismatchError(f"{what} has shape {tuple(x.shape)}: it needs a batch dimension with ≥ 1 sample")
    if not x.is_floating_point():
        raise DataMismatchError(f"{what} has dtype {x.dtype}; the model needs float inputs (normalised images)")
    entered: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            entered.append((name, module, shape))
        return record

    param = next(model.parameters(), None)
    # where the data is, is not what this checks: the recipe steps move the batches to the model (run_step)
    sample = x[:1] if param is None or param.device == x.device else x[:1].to(param.device)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if n and (not any(True for _ in m.children()) or hasattr(m, "weight_quantizer"))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except LowbitError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here is the data not fitting
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        dtype = _parameter_dtype(model)
        if dtype is not None and x.dtype != dtype:  # the shape message below blamed the (right) shape for it
            fix = ".float()" if dtype == torch.float32 else f".to({dtype})"
            raise DataMismatchError(f"{what} has dtype {x.dtype}, but the model's parameters are {dtype}: convert "
                                    f"the inputs with `{fix}` (or the model to {x.dtype}) ({detail})") from None
        if entered:
            layers = [e for e in entered if _expects(e[1]) != "cannot run it"]
            name, module, shape = (layers or entered)[-1]
            layer = getattr(module, "name", None) or name
            kind = type(getattr(module, "module", module)).__name__
            raise DataMismatchError(f"{what} has shape {tuple(x.shape)}; the model's layer `{layer}` ({kind}) "
                                    f"{_expects(module)} and got {shape} ({detail})") from None
        raise DataMismatchError(f"{what} has shape {tuple(x.shape)}; the model cannot run it ({detail})") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
