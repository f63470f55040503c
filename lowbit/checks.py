"""Model and data checked against each other before any work starts.

One forward pass of a single sample through the model, watched by pre- and post-hooks on
every leaf module, turns a shape or dtype mismatch deep inside torch into a message that
names the data (e.g. "calibration batch 0"), its shape, and the layer that refused it
with what that layer expects; when every layer entered also finished, the failure was in
the model's own code (a ``view``, a ``cat``) and the message says so, naming the last
layer that ran and its output shape, rather than blaming a layer that worked.
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


class _Call:
    """One call of a watched layer: its input shape and, once it returned, its output shape."""

    def __init__(self, name: str, module: nn.Module, shape: tuple[int, ...]) -> None:
        self.name, self.module, self.shape = name, module, shape
        self.out: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return getattr(self.module, "name", None) or self.name

    @property
    def kind(self) -> str:
        return type(getattr(self.module, "module", self.module)).__name__


def _parameter_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def probe_forward(model: nn.Module, x: Any, what: str) -> Any:
    """Run ``model`` on the first sample of ``x`` and return its output; any failure becomes a
    DataMismatchError naming ``what``, the shape, and the layer that failed with what it expects."""
    if not isinstance(x, torch.Tensor):
        raise DataMismatchError(f"{what} is a {type(x).__name__}, not a tensor")
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataMismatchError(f"{what} has shape {tuple(x.shape)}: it needs a batch dimension with ≥ 1 sample")
    if not x.is_floating_point():
        raise DataMismatchError(f"{what} has dtype {x.dtype}; the model needs float inputs (normalised images)")
    entered: list[_Call] = []
    finished: list[_Call] = []  # in the order the calls returned (an outer layer after its inner ones)

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            entered.append(_Call(name, module, shape))
        return record

    def done(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = next((c for c in reversed(entered) if c.module is module and c.out is None), None)
        if call is not None:  # (the latest unfinished call of this module: a layer may be called twice)
            call.out = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            finished.append(call)

    param = next(model.parameters(), None)
    # where the data is, is not what this checks: the recipe steps move the batches to the model (run_step)
    sample = x[:1] if param is None or param.device == x.device else x[:1].to(param.device)
    watched = [(n, m) for n, m in model.named_modules()
               if n and (not any(True for _ in m.children()) or hasattr(m, "weight_quantizer"))]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in watched]
    handles += [m.register_forward_hook(done) for _, m in watched]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(sample)
    except LowbitError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here is the data not fitting
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        dtype = _parameter_dtype(model)
        if dtype is not None and x.dtype != dtype:  # the shape message below blamed the (right) shape for it
            fix = ".float()" if dtype == torch.float32 else f".to({dtype})"
            raise DataMismatchError(f"{what} has dtype {x.dtype}, but the model's parameters are {dtype}: convert "
                                    f"the inputs with `{fix}` (or the model to {x.dtype}) ({detail})") from None
        failing = [c for c in entered if c.out is None]  # entered, never returned: the failure is inside
        if failing:
            layers = [c for c in failing if _expects(c.module) != "cannot run it"]
            call = (layers or failing)[-1]
            raise DataMismatchError(f"{what} has shape {tuple(x.shape)}; the model's layer `{call.label}` "
                                    f"({call.kind}) {_expects(call.module)} and got {call.shape} ({detail})") from None
        if finished:  # every layer that ran returned: the model's own code between layers failed
            last = finished[-1]
            raise DataMismatchError(f"{what} has shape {tuple(x.shape)}; the model failed in its own code (not in a "
                                    f"layer) after layer `{last.label}` ({last.kind}), whose output had shape "
                                    f"{last.out}: the input size may not be the one the model was built for "
                                    f"({detail})") from None
        raise DataMismatchError(f"{what} has shape {tuple(x.shape)}; the model cannot run it ({detail})") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return output
