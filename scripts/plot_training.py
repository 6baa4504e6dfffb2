#!/usr/bin/python3
"""Plots a train_moe run: training loss, batch MaxVio and Gini over steps, one line per policy.

Usage: /usr/bin/python3 scripts/plot_training.py OUT_DIR [IMG_DIR]
Reads OUT_DIR/steps.csv (written by train_moe) and writes training_loss.png and
training_balance.png to IMG_DIR (default OUT_DIR).
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values, window):
    """Trailing moving average (the per-batch figures are noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    out_dir = sys.argv[1]
    img_dir = sys.argv[2] if len(sys.argv) > 2 else out_dir
    os.makedirs(img_dir, exist_ok=True)
    runs = {}
    with open(os.path.join(out_dir, "steps.csv")) as f:
        for row in csv.DictReader(f):
            r = runs.setdefault(row["run"], {"step": [], "loss": [], "maxvio": [], "gini": []})
            for key in r:
                r[key].append(float(row[key]))
    if not runs:
        print("plot_training: no rows in steps.csv")
        return 1
    steps = max(len(r["step"]) for r in runs.values())
    window = max(1, steps // 40)
    cmap = plt.get_cmap("tab10")
    styles = {name: (cmap(i % 10), "-" if i < 10 else "--") for i, name in enumerate(runs)}

    fig, (ax, ad) = plt.subplots(1, 2, figsize=(12, 4.8))
    smoothed = {name: smooth(r["loss"], window) for name, r in runs.items()}
    for name, r in runs.items():
        color, ls = styles[name]
        ax.plot(r["step"], smoothed[name], label=name, color=color, linestyle=ls, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"nats/byte (moving average of {window} steps)")
    ax.set_title("training loss per balancing policy")
    tail = [min(v[len(v) // 4:]) for v in smoothed.values()]
    first = [v[len(v) // 10] for v in smoothed.values()]
    ax.set_ylim(min(tail) - 0.05, max(first))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # the differences are small next to the fall of the loss: show them against a reference
    ref = "none" if "none" in runs else next(iter(runs))
    n = min(len(v) for v in smoothed.values())
    start = n // 5
    for name, r in runs.items():
        color, ls = styles[name]
        diff = [smoothed[name][i] - smoothed[ref][i] for i in range(start, n)]
        ad.plot(r["step"][start:n], diff, label=name, color=color, linestyle=ls, linewidth=1.2)
    ad.axhline(0.0, color="black", linewidth=0.6)
    ad.set_xlabel("step")
    ad.set_ylabel("nats/byte")
    ad.set_title(f"training loss minus that of '{ref}' (negative = better)")
    ad.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(img_dir, "training_loss.png"), dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, r in runs.items():
        color, ls = styles[name]
        a1.plot(r["step"], smooth(r["maxvio"], window), label=name, color=color, linestyle=ls, linewidth=1.2)
        a2.plot(r["step"], smooth(r["gini"], window), label=name, color=color, linestyle=ls, linewidth=1.2)
    a1.set_title("batch MaxVio (mean over layers)")
    a2.set_title("batch Gini of expert loads (mean over layers)")
    for a in (a1, a2):
        a.set_xlabel("step")
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(img_dir, "training_balance.png"), dpi=110)
    plt.close(fig)
    print(f"plots: {os.path.join(img_dir, 'training_loss.png')}, {os.path.join(img_dir, 'training_balance.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
