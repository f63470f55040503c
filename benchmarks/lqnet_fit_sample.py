"""How much does fitting LQ-Nets' activation basis on part of a batch change it, and what does it save?

LQ-Nets' QEM step (Algorithm 1) refits each activation quantizer's basis v by least squares on
every training batch. ``fit_fraction`` fits it on the batch's first share of images instead. This
script runs CIFAR-10 training images (calibration-style subsets of the training split, no
augmentation) through ResNet-20 in its W3A3 LQ-Nets training form, with every basis held at its
starting value (weights and activations: nothing refits while the batches are captured), and for
every LQ-Nets activation quantizer and batch fits v on the whole batch and on each share, from the
same encodings. It reports, per share:

- the largest change of any basis element relative to that element, and of any level relative to
  the smallest gap between two neighbouring levels (the finest spacing), against the whole-batch
  fit of the same batch (a max over quantizers × batches);
- the fit's time per training step summed over the model's quantizers (median of ``--repeats``
  interleaved rounds after a warm-up).

and, as the algorithm's own batch-to-batch noise, the same two figures between the whole-batch fits
of every pair of different batches for the same quantizer.

    python benchmarks/lqnet_fit_sample.py --data-dir ../shared/data --models-dir ../shared/models \
        --out benchmarks/results/lqnet_fit_sample.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lowbit.data import calibration_subset, dataset_tensors, load_dataset
from lowbit.quant.learned.lqnet import LQNetActivationQuantizer, LQNetQuantizer, least_squares_basis, memory_order_flat
from lowbit.state_io import atomic_write_text

from qat_step_time import training_form  # noqa: E402 (benchmarks/ is the script's folder)

Capture = tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]  # quantizer, batch, x, codes, table


def captured_fits(qm: torch.nn.Module, batches: list[torch.Tensor]) -> list[Capture]:
    """What each LQ-Nets activation quantizer would fit on, per batch, with every basis held still."""
    seen: list[Capture] = []
    batch = [0]
    for m in qm.modules():
        if isinstance(m, LQNetQuantizer):
            m.fit_basis = lambda *a, **k: None  # weights: hold the basis (the model must not drift between batches)
    for index, q in enumerate(m for m in qm.modules() if isinstance(m, LQNetActivationQuantizer)):
        def keep(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, index: int = index) -> None:
            seen.append((index, batch[0], x.detach().clone(), codes.clone(), table.clone()))
        q.fit_basis = keep
    qm.train()
    with torch.no_grad():
        for b, x in enumerate(batches):
            batch[0] = b
            qm(x)
    return seen


def fit(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, share: float) -> torch.Tensor:
    n = max(1, math.ceil(x.shape[0] * share))  # as LQNetActivationQuantizer.fit_sample
    return least_squares_basis(memory_order_flat(x[:n]).reshape(1, -1), memory_order_flat(codes[:n]).reshape(1, -1),
                               table).reshape(-1)


def distance(v: torch.Tensor, ref: torch.Tensor, table: torch.Tensor) -> tuple[float, float]:
    """(max relative change of a basis element, max change of a level / the finest level gap of ``ref``)."""
    rel = float(((v - ref).abs() / ref.abs()).max())
    levels, ref_levels = table.float() @ v, table.float() @ ref
    gap = float(torch.sort(ref_levels).values.diff().min())
    return rel, float((levels - ref_levels).abs().max()) / gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--recipe", default="w3a3-lqnet")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--shares", default="0.125,0.25,0.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, qm, _, _ = training_form("resnet20", args.recipe, args.data_dir, args.models_dir, args.batch_size)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    batches = [dataset_tensors(calibration_subset(train, args.batch_size, seed=1 + i))[0] for i in range(args.batches)]
    seen = captured_fits(qm, batches)
    shares = [1.0] + [float(s) for s in args.shares.split(",")]
    full = {(i, b): fit(x, c, t, 1.0) for i, b, x, c, t in seen}
    for i, b, x, c, t in seen[:4]:  # warm-up: allocator and caches
        fit(x, c, t, 0.5)
    step_ms: dict[float, list[float]] = {s: [] for s in shares}
    for _ in range(args.repeats):  # interleaved: a busier moment slows every share alike
        for share in shares:
            start = time.perf_counter()
            for _, _, x, c, t in seen:
                fit(x, c, t, share)
            step_ms[share].append(1000 * (time.perf_counter() - start) / args.batches)
    rows = []
    for share in shares:
        worst = [distance(fit(x, c, t, share), full[i, b], t) for i, b, x, c, t in seen]
        rows.append({"share": share, "max_rel_change": max(w[0] for w in worst),
                     "max_level_change_over_finest_gap": max(w[1] for w in worst),
                     "fit_ms_per_step": statistics.median(step_ms[share]), "fits": len(seen)})
        print(json.dumps(rows[-1]))
    tables = {i: t for i, _, _, _, t in seen}
    between = [distance(full[i, b1], full[i, b0], tables[i])
               for i in tables for b0, b1 in itertools.permutations(range(args.batches), 2)]
    noise = {"max_rel_change": max(w[0] for w in between), "max_level_change_over_finest_gap": max(w[1] for w in between),
             "pairs": len(between)}
    print(json.dumps({"between_batches_whole_batch_fits": noise}))
    result = {"model": "resnet20", "recipe": args.recipe, "batch_size": args.batch_size, "batches": args.batches,
              "threads": 1, "repeats": args.repeats, "rows": rows, "between_batches_whole_batch_fits": noise}
    atomic_write_text(Path(args.out), json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
