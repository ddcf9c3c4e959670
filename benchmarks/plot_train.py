"""Plot tokens/s and peak memory, stock vs unsloth_ext, from bench_train.py's results.

    python benchmarks/plot_train.py [--gpu h200]

Reads benchmarks/results/train_<preset>_<gpu>.json for every preset present and writes
benchmarks/results/train_<gpu>.png (needs matplotlib).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = {"stock": ("stock transformers + PEFT", "#9e9e9e"),
         "stock_kbit": ("stock, prepare_model_for_kbit_training", "#616161"),
         "unsloth_ext": ("unsloth_ext", "#d9480f")}


def load(gpu: str) -> dict[str, dict]:
    """{preset: results json} for the presets measured on `gpu`, smallest model first."""
    found = {}
    for path in sorted(RESULTS_DIR.glob(f"train_*_{gpu}.json")):
        payload = json.loads(path.read_text())
        found[payload["args"]["preset"]] = payload
    return dict(sorted(found.items(), key=lambda kv: kv[1]["results"]["stock"]["peak_gib"]))


def plot(runs: dict[str, dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(runs)
    modes = [m for m in MODES if all(m in runs[p]["results"] for p in presets)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("tokens_per_s", "tokens / s (higher is better)"),
              ("peak_gib", "peak allocated GiB (lower is better)")]
    width = 0.8 / len(modes)
    for ax, (key, title) in zip(axes, panels):
        for i, mode in enumerate(modes):
            label, color = MODES[mode]
            values = [runs[p]["results"][mode][key] for p in presets]
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(presets))]
            bars = ax.bar(xs, values, width, label=label, color=color)
            ax.bar_label(bars, fmt="{:,.0f}" if key == "tokens_per_s" else "{:.1f}", fontsize=8)
        ax.set_xticks(range(len(presets)), presets)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(fontsize=8, frameon=False, loc="upper right")
    first = next(iter(runs.values()))
    env, args = first["environment"], first["args"]
    fig.suptitle(f"QLoRA training step, seq {args['seq']} x batch {args['batch']}, "
                 f"{env['gpu']}, git {env['git_sha'][:8]}", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h200", help="the GPU part of the results' file names")
    args = parser.parse_args()
    runs = load(args.gpu)
    if not runs:
        print(f"no benchmarks/results/train_*_{args.gpu}.json; run bench_train.py first",
              file=sys.stderr)
        return 1
    out = RESULTS_DIR / f"train_{args.gpu}.png"
    plot(runs, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
