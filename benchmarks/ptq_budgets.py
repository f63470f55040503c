"""Issue 16's side-by-side: lowbit's post-training recipes and the peers' flows, same model,
same calibration images, same threads, interleaved in one run, scored on the full test
split; then the best top-1 each tool reaches within each quantization-time budget.

Rows go to the ptq_methods JSON schema (model, config, method, seed, top1, quant_seconds),
appended as they finish; a rerun skips what is there (resumable). Peers run in their own
venvs through a subprocess (``--peer brevitas=PATH/TO/python``; each script under
``benchmarks/peers/`` says how to make its venv); a peer not given is
skipped and the table says so. Lowbit and peer rows alternate per (seed, config), so a
machine that is busier at one moment slows both.

    python benchmarks/ptq_budgets.py --data-dir ../shared/data --models-dir ../shared/models \
        --peer brevitas=../venv-brevitas/bin/python --peer mct=../venvs/mct/bin/python \
        --peer aimet=../venvs/aimet/bin/python --seeds 0,1,2 --threads 1
    python benchmarks/ptq_budgets.py --models resnet32 --seeds 1 --configs w2a4 --methods "gptq (float target output grid)"
    python benchmarks/ptq_budgets.py --table            # README table (every results/ptq_budgets*.json)
    python benchmarks/ptq_budgets.py --plot figures/ptq_budgets.png   # top-1 against quantize time, one FIG_<model>.png per model
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import ptq_methods as pm  # the lowbit rows: the same recipes and row format as the methods table

RESULTS = Path(__file__).parent / "results" / "ptq_budgets.json"
PEERS = Path(__file__).parent / "peers"
PEER_SCRIPTS = {"brevitas": PEERS / "brevitas_ptq.py", "mct": PEERS / "mct_ptq.py", "aimet": PEERS / "aimet_ptq.py"}
# each tool's plain flow and its best flow within a few minutes (issue 16)
PEER_FLOWS = {"brevitas": ["mse", "gptq+bc"], "mct": ["ptq", "gptq"], "aimet": ["ptq", "adaround"]}
# calibrate's `observe: float` (activation ranges from the float network), on the plain and GPTQ flows
FLOAT_OBSERVED_METHODS = ["bias correction (weights; float-observed ranges)",
                          "bias correction (float inputs; float-observed ranges; peer grid)",
                          "gptq (float-observed ranges)+bias correction",
                          "gptq (float target; float-observed ranges)+bias correction",
                          "gptq (float target output grid; float-observed ranges)"]
# seed 004's USP in folded form (match_moments) on the plain and GPTQ flows
MOMENT_METHODS = ["moment matching (float-observed ranges)", "moment matching (float-observed ranges; peer grid)",
                  "bias correction (float inputs)+moment matching (float-observed ranges; peer grid)",
                  "gptq (float-observed ranges)+moment matching",
                  "gptq (float target; float-observed ranges)+moment matching",
                  "gptq (float target output grid; float-observed ranges)+moment matching"]
# the same flows with the residual stream kept at 8 bits (`shortcut: stream`)
STREAM_METHODS = ["gptq (float-observed ranges; full-range grid; 8-bit residual stream)+bias correction",
                  "gptq (float-observed ranges; full-range grid; 8-bit residual stream)",
                  "gptq (float target; float-observed ranges; 8-bit residual stream)+bias correction",
                  "gptq (float target output grid; float-observed ranges; 8-bit residual stream)",
                  "gptq (float target output grid; float-observed ranges; 8-bit residual stream)+bias correction",
                  "moment matching (float-observed ranges; 8-bit residual stream)",
                  "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 2048 images)+bias correction",
                  "gptq (float-observed ranges; full-range grid; 8-bit residual stream)+moment matching",
                  "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 512 rows per column)",
                  "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 1024 rows per column)",
                  "gptq (float target output grid; float-observed ranges; 8-bit residual stream; 512 rows per column)+bias correction",
                  "gptq (float target output grid; float-observed ranges; adds read real values; 512 rows per column)",
                  "gptq (float-observed ranges; full-range grid; 8-bit residual stream; 512 rows per column)",
                  "gptq (float-observed ranges; full-range grid; 8-bit residual stream; 512 rows per column)+bias correction",
                  "gptq (float target; float-observed ranges; 8-bit residual stream; 512 rows per column)+bias correction",
                  "gptq (float-observed ranges; full-range grid; adds read real values)+bias correction"]
# lowbit's candidates per bit width: the plain built-in, and the methods that fit in minutes
LOWBIT_METHODS = {
    "w4a4": ["bias correction (weights)", "seed002 bn+cosine+teacher-student", "gptq+bias correction", "adaquant",
             "gptq (float-observed ranges; full-range grid)+bias correction",
             "gptq+usp", "gptq (float target)+bias correction", "gptq (float target regridded)",
             "gptq (float target output grid)", *FLOAT_OBSERVED_METHODS, *MOMENT_METHODS, *STREAM_METHODS],
    "w3a3": ["bias correction (weights)", "adaquant", "gptq+usp", "gptq+usp+bias correction",
             "gptq (float target)+bias correction", "gptq (float target regridded)",
             "gptq (float target output grid)", *FLOAT_OBSERVED_METHODS, *MOMENT_METHODS, *STREAM_METHODS],
    "w2a4": ["bias correction (weights)", "adaround+usp", "gptq+usp", "gptq+usp+bias correction",
             "gptq (float target)", "gptq (float target regridded)",
             "gptq (float target output grid)", *FLOAT_OBSERVED_METHODS, *MOMENT_METHODS, *STREAM_METHODS],
}
BUDGETS = (10, 60, 180, 600)  # seconds: "about 5 s, 30 s, 2 min" as ceilings (60 s and 3 min are the goals' limits); 600 s shows the peers' longer flows


def run_peer(tool: str, python: str, args: argparse.Namespace, model: str, config: str, flow: str,
             seed: int) -> dict:
    cmd = [python, str(PEER_SCRIPTS[tool]), "--model", model, "--config", config, "--flow", flow, "--seed", str(seed),
           "--threads", str(args.threads), "--data-dir", args.data_dir, "--models-dir", args.models_dir]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{tool} {flow} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def run(args: argparse.Namespace) -> None:
    peers = dict(p.split("=", 1) for p in args.peer)
    unknown = set(peers) - set(PEER_SCRIPTS)
    if unknown:
        raise SystemExit(f"unknown peer(s) {sorted(unknown)}; known: {sorted(PEER_SCRIPTS)}")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for config in args.configs.split(","):
            # lowbit's rows for this (seed, config) through the methods benchmark's own loop
            methods = [m for m in LOWBIT_METHODS[config] if args.methods is None or m in args.methods]
            ns = argparse.Namespace(threads=args.threads, out=args.out, data_dir=args.data_dir,
                                    models_dir=args.models_dir, models=args.models, seeds=str(seed), configs=config,
                                    methods=",".join(methods))
            if methods:
                pm.run(ns)
            data = pm.load_results(args.out)
            done = {pm.key(r) for r in data["runs"]}
            for model in args.models.split(","):
                for tool, python in peers.items():
                    for flow in PEER_FLOWS[tool]:
                        method = f"{tool} {flow}"
                        if (model, config, method, seed) in done:
                            continue
                        out = run_peer(tool, python, args, model, config, flow, seed)
                        fp = data["float"][model]
                        row = {"model": model, "config": config, "method": method, "seed": seed, "tool": out["tool"],
                               "top1": out["top1"], "drop_pt": 100 * fp - out["top1"],
                               "quant_seconds": out["quant_seconds"], "calibration_images": out["calibration_images"]}
                        data = pm.load_results(args.out)
                        data["runs"].append(row)
                        pm.atomic_write_text(args.out, json.dumps(data, indent=1))
                        print(f"{model} {config:5s} {method:36s} seed {seed}: {row['top1']:.2f} "
                              f"({row['quant_seconds']:.0f} s)", flush=True)


def summaries(data: dict, model: str) -> dict[tuple[str, str], dict]:
    """(config, method) -> mean top-1, its spread, mean seconds, seeds."""
    out: dict[tuple[str, str], dict] = {}
    for r in data["runs"]:
        if r["model"] == model:
            out.setdefault((r["config"], r["method"]), {"top1": [], "s": []})
            out[(r["config"], r["method"])]["top1"].append(r["top1"])
            out[(r["config"], r["method"])]["s"].append(r["quant_seconds"])
    return {k: {"mean": statistics.fmean(v["top1"]), "sd": statistics.stdev(v["top1"]) if len(v["top1"]) > 1 else 0.0,
                "seconds": statistics.fmean(v["s"]), "n": len(v["top1"])} for k, v in out.items()}


def tool_of(method: str) -> str:
    return method.split(" ", 1)[0] if method.split(" ", 1)[0] in PEER_SCRIPTS else "lowbit"


def table(data: dict, model: str) -> str:
    stats = summaries(data, model)
    fp = 100 * data["float"][model]
    tools = ["lowbit", *sorted({tool_of(m) for _, m in stats} - {"lowbit"})]
    lines = [f"{model}, float {fp:.2f}. Best mean top-1 (± std over seeds) within each quantize-time ceiling, "
             "the method that reaches it and its mean time", "",
             "| bits | budget | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    for config in LOWBIT_METHODS:
        for budget in BUDGETS:
            cells = []
            for tool in tools:
                fits = [(v["mean"], m, v) for (c, m), v in stats.items()
                        if c == config and tool_of(m) == tool and v["seconds"] <= budget]
                if not fits:
                    cells.append("—")
                    continue
                most = max(v["n"] for _, _, v in fits)  # a one-seed probe never outranks a 3-seed mean
                mean, m, v = max((f for f in fits if f[2]["n"] == most), key=lambda t: t[0])
                spread = f" ± {v['sd']:.2f} ({v['n']} seeds)" if v["n"] > 1 else " (1 seed)"
                cells.append(f"{mean:.2f}{spread} {m.removeprefix(tool + ' ')}, {v['seconds']:.0f} s")
            best = max((float(c.split()[0]) for c in cells if c != "—"), default=None)
            cells = [f"**{c}**" if c != "—" and best is not None and float(c.split()[0]) == best else c for c in cells]
            lines.append(f"| {config.upper()} | ≤ {budget} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict, model: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summaries(data, model)
    configs = list(LOWBIT_METHODS)
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    markers = {"lowbit": "o", "brevitas": "s", "mct": "D", "aimet": "v"}
    colors = {"lowbit": "tab:blue", "brevitas": "tab:red", "mct": "tab:green", "aimet": "tab:purple"}
    for ax, config in zip(axes[0], configs):
        points = [(m, v) for (c, m), v in sorted(stats.items()) if c == config]
        for m, v in points:
            tool = tool_of(m)
            ax.errorbar(v["seconds"], v["mean"], yerr=v["sd"], fmt=markers.get(tool, "^"),
                        color=colors.get(tool, "tab:grey"), capsize=2)
            # only each tool's front is named (nothing of its own is both faster and better): dozens of labels
            # on one axis were unreadable
            if not any(tool_of(o) == tool and o != m and w["seconds"] <= v["seconds"] and w["mean"] >= v["mean"]
                       for o, w in points):
                ax.annotate(m, (v["seconds"], v["mean"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(100 * data["float"][model], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xticks([t for t in (3, 10, 30, 100, 300, 1000) if t <= 2 * max(v["seconds"] for _, v in points)])
        ax.set_xticklabels([str(t) for t in ax.get_xticks()])
        ax.minorticks_off()
        ax.set_title(f"{model} {config.upper()} (blue lowbit; red Brevitas, green MCT, purple AIMET)", fontsize=8)
        ax.set_xlabel("quantize wall time (s)")
        ax.set_ylabel("top-1 (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default=",".join(LOWBIT_METHODS))
    ap.add_argument("--methods", help="run only these of lowbit's candidates (comma-separated names); default all")
    ap.add_argument("--peer", action="append", default=[], help="TOOL=PYTHON, e.g. brevitas=../venv-brevitas/bin/python")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--models-dir", default="../shared/models")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    if args.table or args.plot:
        data = pm.load_all(sorted(RESULTS.parent.glob("ptq_budgets*.json")))  # parallel lanes write separate files
        for model in sorted({r["model"] for r in data["runs"]}):
            if args.table:
                print(table(data, model) + "\n")
            if args.plot:
                plot(data, model, args.plot.with_name(f"{args.plot.stem}_{model}{args.plot.suffix}"))
        return
    bad = [c for c in args.configs.split(",") if c not in LOWBIT_METHODS]
    if bad:
        raise SystemExit(f"unknown config(s) {bad}; known: {list(LOWBIT_METHODS)}")
    known = {m for ms in LOWBIT_METHODS.values() for m in ms}
    args.methods = None if args.methods is None else [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods or [] if m not in known]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; known: {sorted(known)}")
    run(args)


if __name__ == "__main__":
    sys.exit(main())
