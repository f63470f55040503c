"""Does ``torch.compile`` make QAT's own passes faster on this CPU? (issue 11 part 8)

Times, interleaved round by round on the same tensors, the hand-fused ops lowbit trains with
against the same arithmetic written plainly and compiled by TorchInductor (C++ on the CPU):

- LSQ's fake-quant, forward and backward (``functional._FakeQuantSTE``, clip decided on
  x/s + z as LSQ eq. 3), per-tensor and per-channel step, on one activation batch;
- LQ-Nets' encoding, each value's count of level midpoints below it (``codebook.count_below``,
  7 midpoints: 3 bits);
- a whole QAT training step of the model compiled with ``torch.compile(model)`` (the error is
  recorded if it does not compile).

Each result is checked equal to the eager op before it is timed.

    python benchmarks/compile_probe.py --data-dir ../shared/data --models-dir ../shared/models \
        --out benchmarks/results/compile_probe.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from lowbit.quant import functional as F
from lowbit.quant.codebook import count_below
from lowbit.state_io import atomic_write_text


def lsq_forward(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: float, qmax: float):  # noqa: ANN201
    u = x / s
    v = u + z
    inside = (v >= qmin) & (v <= qmax)
    q = torch.round(v.clamp(qmin, qmax)) - z
    return q * s, inside, torch.where(inside, q - u, q)


def lsq_backward(grad: torch.Tensor, inside: torch.Tensor, step_grad: torch.Tensor, dims: list[int]):  # noqa: ANN201
    return torch.where(inside, grad, torch.zeros_like(grad)), (step_grad * grad).sum(dims, keepdim=True)


def compiled_lsq() -> Callable:
    forward, backward = torch.compile(lsq_forward, dynamic=True), torch.compile(lsq_backward, dynamic=True)

    class CompiledLSQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, s, z, qmin, qmax):  # noqa: ANN001, ANN205
            out, inside, step_grad = forward(x, s, z, float(qmin), float(qmax))
            ctx.save_for_backward(inside, step_grad)
            ctx.s_shape = s.shape
            return out

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            inside, step_grad = ctx.saved_tensors
            dims = [i for i, n in enumerate(ctx.s_shape) if n == 1] if len(ctx.s_shape) else list(range(grad.dim()))
            gx, gs = backward(grad, inside, step_grad, dims)
            return gx, gs.reshape(ctx.s_shape), None, None, None

    return CompiledLSQ.apply


def count_below_plain(x: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    acc = (x > midpoints[0]).to(torch.uint8)
    for i in range(1, midpoints.numel()):
        acc = acc + (x > midpoints[i]).to(torch.uint8)
    return acc


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (compiles)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - start) / repeat)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def lsq_rows(x: torch.Tensor, rounds: int) -> list[dict]:
    rows = []
    compiled = compiled_lsq()
    for label, shape in (("per-tensor step", ()), ("per-channel step", (1, x.shape[1], 1, 1))):
        s0, z = torch.full(shape, 0.1), torch.zeros(shape)
        grad = torch.full_like(x, 0.01)

        def run(apply: Callable) -> tuple[torch.Tensor, ...]:
            xx, s = x.clone().requires_grad_(True), s0.clone().requires_grad_(True)
            out = apply(xx, s)
            out.backward(grad)
            return out.detach(), xx.grad, s.grad

        eager = lambda xx, s: F._FakeQuantSTE.apply(xx, s, z, 0, 15, False, True)  # noqa: E731
        plain = lambda xx, s: compiled(xx, s, z, 0, 15)  # noqa: E731
        a, b = run(eager), run(plain)
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.allclose(a[2], b[2], rtol=1e-4)):
            raise AssertionError(f"compiled LSQ differs from the fused op ({label})")
        ms = interleaved({"eager": lambda: run(eager), "compiled": lambda: run(plain)}, rounds, 5)
        rows.append({"op": f"LSQ fake-quant forward+backward, {label}, 4-bit", "shape": list(x.shape),
                     "eager_ms": ms["eager"], "compiled_ms": ms["compiled"], "compiled_over_eager": ms["compiled"] / ms["eager"]})
    return rows


def count_below_row(x: torch.Tensor, rounds: int) -> dict:
    midpoints = torch.linspace(0.1, 2.0, 7)
    compiled = torch.compile(count_below_plain, dynamic=True)
    if not torch.equal(compiled(x, midpoints), count_below(x, midpoints, compact=True)):
        raise AssertionError("compiled count_below differs")
    ms = interleaved({"eager": lambda: count_below(x, midpoints, compact=True),
                      "compiled": lambda: compiled(x, midpoints)}, rounds, 10)
    return {"op": "LQ-Nets encoding, 7 midpoints (count_below, uint8)", "shape": list(x.shape),
            "eager_ms": ms["eager"], "compiled_ms": ms["compiled"], "compiled_over_eager": ms["compiled"] / ms["eager"]}


def model_step_row(args: argparse.Namespace) -> dict:
    from qat_step_time import step_timer, training_form  # benchmarks/ is on sys.path when this script runs

    _, qm, x, y = training_form(args.model, args.recipe, args.data_dir, args.models_dir, 128)
    row = {"op": f"whole QAT step, {args.model} {args.recipe}, batch 128", "recipe": args.recipe}
    eager = step_timer(qm, x, y)
    try:
        compiled = step_timer(torch.compile(copy.deepcopy(qm)), x, y)
        ms = interleaved({"eager": eager, "compiled": compiled}, max(args.rounds // 2, 2), 1)
        row.update(eager_ms=ms["eager"], compiled_ms=ms["compiled"], compiled_over_eager=ms["compiled"] / ms["eager"])
    except Exception as err:  # noqa: BLE001  the finding is that it fails; keep its first line
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipe", default="w4a4-lsq")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(128, 16, 32, 32).relu_()  # one ResNet-20 stage-1 activation batch
    rows = lsq_rows(x, args.rounds) + [count_below_row(x, args.rounds), model_step_row(args)]
    result = {"torch": torch.__version__, "threads": args.threads, "rows": rows}
    for row in rows:
        print(json.dumps(row))
    atomic_write_text(Path(args.out), json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
