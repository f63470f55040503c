"""ms per reconstruction step (AdaRound, BRECQ, QDrop, AdaQuant) on ResNet-20 W4A4.

Times every ``_optimize`` call of :func:`lowbit.ptq.reconstruct.reconstruct` (the loop over
steps; the one-off caching of float/quantized tensors is reported apart) and divides by
the number of steps it ran. Beside it, the floor: a plain float step of the same units
(forward, squared error, backward, Adam on the conv weights, same batch size), which no
fake-quant loop can beat.

``--lowbit PATH`` imports lowbit from another checkout (e.g. a ``git worktree`` of the
commit before a change), so before and after run through this same script; run them
alternately on the same machine and compare the ratio.

    python benchmarks/recon_step_time.py --data-dir ../shared/data --models-dir ../shared/models \
        --label after --out benchmarks/results/recon_step_time.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--methods", nargs="+", default=["adaround", "brecq", "qdrop", "adaquant"])
    ap.add_argument("--iters", type=int, default=40, help="steps per unit (per layer when layer-wise)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", required=True, help="e.g. before / after")
    ap.add_argument("--lowbit", help="import lowbit from this checkout instead")
    ap.add_argument("--floor", action="store_true", help="also time the float floor")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.lowbit:
        sys.path.insert(0, str(Path(args.lowbit).resolve()))
    import torch

    import lowbit
    import lowbit.ptq.reconstruct as rec
    from lowbit.api import quantize
    from lowbit.data import load_dataset
    from lowbit.evaluation import calibration_batches
    from lowbit.recipes.recipe import load_recipe
    from lowbit.zoo import pretrained

    torch.set_num_threads(args.threads)
    model = pretrained("resnet20", models_dir=args.models_dir, download=False)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir, download=False)
    recipe = load_recipe("w4a4")
    batches = calibration_batches(train, recipe)
    commit = subprocess.run(["git", "-C", str(Path(lowbit.__file__).parent), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()

    timed = {"seconds": 0.0, "steps": 0}
    inner = rec._optimize

    def timed_optimize(cfg, *a, **kw):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        try:
            return inner(cfg, *a, **kw)
        finally:
            timed["seconds"] += time.perf_counter() - start
            timed["steps"] += cfg.iters

    rec._optimize = timed_optimize
    rows = []
    for method in args.methods:
        qm = quantize(model, recipe, batches, progress=False)
        timed.update(seconds=0.0, steps=0)
        start = time.perf_counter()
        rec.reconstruct(qm, batches, method, progress=False, iters=args.iters)
        total = time.perf_counter() - start
        rows.append({"label": args.label, "commit": commit, "method": method, "iters": args.iters,
                     "steps": timed["steps"], "ms_per_step": round(1000 * timed["seconds"] / timed["steps"], 1),
                     "loop_s": round(timed["seconds"], 2), "caching_s": round(total - timed["seconds"], 2),
                     "threads": args.threads})
        print(json.dumps(rows[-1]), flush=True)
    if args.floor:
        rows.append(float_floor(model, batches, args))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    from lowbit.state_io import atomic_write_text
    atomic_write_text(out, json.dumps(old + [{**r, "machine": platform.processor() or platform.machine()}
                                             for r in rows], indent=1))


def float_floor(model, batches, args) -> dict:  # noqa: ANN001
    """Float steps of each residual block (conv weights trained by Adam against a fixed
    target, batch 32): what one step costs with no quantization at all."""
    import copy

    import torch

    net = copy.deepcopy(model).train(False)
    x = torch.cat(batches)
    blocks = [net.conv1] + [b for layer in (net.layer1, net.layer2, net.layer3) for b in layer]
    seconds, steps = 0.0, 0
    with torch.no_grad():
        h = torch.relu(net.bn1(net.conv1(x)))
    inputs = [x] + [None] * (len(blocks) - 1)
    for k, block in enumerate(blocks[1:], 1):
        inputs[k] = h
        with torch.no_grad():
            h = block(h)
    gen = torch.Generator().manual_seed(0)
    for k, block in enumerate(blocks):
        xin = inputs[k]
        with torch.no_grad():
            target = block(xin)
        params = [m.weight for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
        opt = torch.optim.Adam(params, lr=1e-5)
        start = time.perf_counter()
        for _ in range(args.iters):
            idx = torch.randint(xin.shape[0], (32,), generator=gen)
            loss = (block(xin[idx]) - target[idx]).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - start
        steps += args.iters
    return {"label": args.label, "method": "float floor (block steps)", "iters": args.iters, "steps": steps,
            "ms_per_step": round(1000 * seconds / steps, 1), "loop_s": round(seconds, 2), "threads": args.threads}


if __name__ == "__main__":
    main()
