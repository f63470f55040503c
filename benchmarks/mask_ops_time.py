"""ms per op for the masks QDrop and the fused fake-quant use (one thread, a 32x16x32x32 tensor,
the size of a ResNet-20 reconstruction batch's activation): bool masks against 0/1 float masks,
and lowbit.ptq.drop's keep_mask / select against torch.rand / torch.where.

    python benchmarks/mask_ops_time.py --out benchmarks/results/mask_ops_time.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def ms(fn, n: int = 40) -> float:  # noqa: ANN001
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - start) / n * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from lowbit.ptq.drop import keep_mask, select
    from lowbit.quant.functional import float_mask

    g = torch.Generator().manual_seed(0)
    shape = (32, 16, 32, 32)
    a, b, grad = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    mask = torch.rand(shape, generator=g) < 0.5
    fmask = float_mask(mask, torch.float32)
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()

    def where_fwd_bwd() -> None:
        torch.where(mask, ag, bg).backward(grad)

    def select_fwd_bwd() -> None:
        select(mask, ag, bg).backward(grad)

    rows = {
        "where (bool mask)": ms(lambda: torch.where(mask, a, b)),
        "lerp (0/1 float mask)": ms(lambda: torch.lerp(b, a, fmask)),
        "multiply by bool mask": ms(lambda: grad * mask),
        "multiply by float mask": ms(lambda: grad * fmask),
        "float_mask conversion": ms(lambda: float_mask(mask, torch.float32)),
        "torch.rand(shape) < 0.5": ms(lambda: torch.rand(shape, generator=g) < 0.5),
        "keep_mask(shape, 0.5)": ms(lambda: keep_mask(shape, 0.5, g)),
        "torch.where forward+backward": ms(where_fwd_bwd),
        "select forward+backward": ms(select_fwd_bwd),
    }
    for k, v in rows.items():
        print(f"{k:32s} {v:8.3f} ms")
    Path(args.out).write_text(json.dumps({"shape": shape, "threads": 1, "ms": rows}, indent=1))


if __name__ == "__main__":
    main()
