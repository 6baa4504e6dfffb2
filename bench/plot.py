#!/usr/bin/python3
"""Plot bench_cpu's CSV: ns per token against the number of experts (T = 16384, k = 8).

usage: /usr/bin/python3 bench/plot.py bench_cpu.csv [out.png]

One panel per logit type (fp32, bf16); forward of moeroute (1 and all threads), libtorch
(1 and all threads), the naive router and the memory-read floor, and both backwards.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else "bench_cpu.png"
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"{src}: no rows")
        return 1
    T, k = "16384", "8"
    threads = sorted({int(r["threads"]) for r in rows})
    nt = max(threads)
    series = [
        ("forward", "moeroute", 1, "moeroute forward, 1 thread", "C0", "-o"),
        ("forward", "moeroute", nt, f"moeroute forward, {nt} threads", "C0", "--o"),
        ("backward", "moeroute", 1, "moeroute backward, 1 thread", "C2", "-s"),
        ("forward", "libtorch", 1, "libtorch forward, 1 thread", "C3", "-^"),
        ("forward", "libtorch", nt, f"libtorch forward, {nt} threads", "C3", "--^"),
        ("backward", "libtorch", 1, "libtorch backward, 1 thread", "C1", "-v"),
        ("forward", "naive", 1, "naive C++ forward, 1 thread", "C4", "-d"),
        ("floor", "read", 1, "memory-read floor, 1 thread", "k", ":x"),
    ]
    dtypes = [d for d in ("fp32", "bf16") if any(r["dtype"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for pas, impl, th, label, color, style in series:
            pts = sorted(
                (int(r["E"]), float(r["ns_per_token"]))
                for r in rows
                if r["T"] == T and r["k"] == k and r["dtype"] == dtype and r["pass"] == pas
                and r["impl"] == impl and int(r["threads"]) == th
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("experts E")
        ax.set_ylabel("ns per token (log scale)")
        ax.set_title(f"routing, T = {T}, top-{k}, {dtype} logits")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
