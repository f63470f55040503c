"""How much does fitting LQ-Nets' activation basis on part of a batch change it, and what does it save?

LQ-Nets' QEM step (Algorithm 1) refits each activation quantizer's basis v by least squares on
every training batch. ``fit_fraction`` fits it on the batch's first share of images instead. This
script runs real CIFAR-10 training batches through ResNet-20 in its W3A3 LQ-Nets training form
and, for every LQ-Nets activation quantizer and batch, fits v on the whole batch and on each
share, from the same encodings. It reports the largest change of any basis element relative to
that element (and to the smallest element, the finest level spacing), beside how far the
whole-batch fits of two different batches are apart (the algorithm's own batch noise), and the
fit's time per step summed over the model's quantizers.

    python benchmarks/lqnet_fit_sample.py --data-dir ../shared/data --models-dir ../shared/models \
        --out benchmarks/results/lqnet_fit_sample.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lowbit.data import calibration_subset, dataset_tensors, load_dataset
from lowbit.quant.learned.lqnet import LQNetActivationQuantizer, least_squares_basis, memory_order_flat
from lowbit.state_io import atomic_write_text

from qat_step_time import training_form  # noqa: E402 (benchmarks/ is the script's folder)


def captured_fits(qm: torch.nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(activations, their codes, the code table) that each LQ-Nets activation quantizer fitted on, per batch."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    quantizers = [m for m in qm.modules() if isinstance(m, LQNetActivationQuantizer)]
    for q in quantizers:
        def keep(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, q=q) -> None:  # noqa: ANN001
            seen.append((x.detach().clone(), codes.clone(), table.clone()))
        q.fit_basis = keep  # record instead of fitting: every batch meets the same starting bases
    qm.train()
    with torch.no_grad():
        for x in batches:
            qm(x)
    return seen


def fit(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, share: float) -> torch.Tensor:
    n = max(1, math.ceil(x.shape[0] * share))  # as LQNetActivationQuantizer.fit_sample
    return least_squares_basis(memory_order_flat(x[:n]).reshape(1, -1), memory_order_flat(codes[:n]).reshape(1, -1),
                               table).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--recipe", default="w3a3-lqnet")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--shares", default="0.125,0.25,0.5")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, qm, _, _ = training_form("resnet20", args.recipe, args.data_dir, args.models_dir, args.batch_size)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    batches = [dataset_tensors(calibration_subset(train, args.batch_size, seed=1 + i))[0] for i in range(args.batches)]
    seen = captured_fits(qm, batches)
    rows = []
    for share in [1.0] + [float(s) for s in args.shares.split(",")]:
        worst_rel, worst_spacing, seconds = 0.0, 0.0, []
        for x, codes, table in seen:
            start = time.perf_counter()
            v = fit(x, codes, table, share)
            seconds.append(time.perf_counter() - start)
            full = fit(x, codes, table, 1.0)
            worst_rel = max(worst_rel, float(((v - full).abs() / full.abs()).max()))
            worst_spacing = max(worst_spacing, float((v - full).abs().max() / full.abs().min()))
        per_step = sum(seconds) / args.batches
        rows.append({"share": share, "max_rel_change": worst_rel, "max_change_over_finest_spacing": worst_spacing,
                     "fit_ms_per_step": 1000 * per_step, "fits": len(seen)})
        print(json.dumps(rows[-1]))
    # the algorithm's own noise: how far one batch's whole-batch fit is from another batch's, same quantizer
    per_quantizer = len(seen) // args.batches
    fulls = [fit(*s, 1.0) for s in seen]
    between = max(float(((fulls[b * per_quantizer + i] - fulls[i]).abs() / fulls[i].abs()).max())
                  for i in range(per_quantizer) for b in range(1, args.batches))
    print(json.dumps({"max_rel_change_between_batches_whole_batch_fit": between}))
    result = {"model": "resnet20", "recipe": args.recipe, "batch_size": args.batch_size, "batches": args.batches,
              "threads": 1, "rows": rows, "max_rel_change_between_batches": between, "median_fit_ms_per_quantizer": 1000 * statistics.median(seconds)}
    atomic_write_text(Path(args.out), json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
