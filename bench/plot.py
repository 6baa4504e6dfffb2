#!/usr/bin/python3
"""Plot bench_cpu's CSV: ns per token against the number of experts (T = 16384, k = 8).

usage: /usr/bin/python3 bench/plot.py bench_cpu.csv [out.png]

One panel per logit type (fp32, bf16); forward of moeroute (1 and all threads), libtorch
(1 and all threads), the naive router and the memory-read floor, and both backwards. Also
prints the whole CSV as a Markdown table (the README's benchmark table).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def markdown(rows):
    """The CSV as a Markdown table: one line per case, ns per token and ratios."""
    def get(case, pas, impl, th):
        for r in rows:
            if (r["T"], r["E"], r["k"], r["dtype"]) == case and r["pass"] == pas and r["impl"] == impl \
                    and int(r["threads"]) == th:
                return float(r["ns_per_token"])
        return float("nan")

    nt = max(int(r["threads"]) for r in rows)
    cases = []
    for r in rows:
        c = (r["T"], r["E"], r["k"], r["dtype"])
        if c not in cases:
            cases.append(c)
    head = ["T", "E", "k", "logits", "fwd 1 thr", f"fwd {nt} thr", "floor", "libtorch fwd 1 thr",
            "naive fwd", "× libtorch", "× naive", "fwd / floor", f"{nt} thr speed-up (wall)",
            f"{nt} thr work", "bwd 1 thr",
            "libtorch bwd 1 thr", "plan", "plan / fwd"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        f1, fn = get(c, "forward", "moeroute", 1), get(c, "forward", "moeroute", nt)
        fl, tf = get(c, "floor", "read", 1), get(c, "forward", "libtorch", 1)
        nv, b1 = get(c, "forward", "naive", 1), get(c, "backward", "moeroute", 1)
        tb, pl = get(c, "backward", "libtorch", 1), get(c, "plan", "moeroute", 1)
        work = get(c, "forward", "moeroute-cpu-time", nt) / f1
        vals = [f"{f1:.0f}", f"{fn:.0f}", f"{fl:.0f}", f"{tf:.0f}", f"{nv:.0f}", f"{tf / f1:.1f}",
                f"{nv / f1:.1f}", f"{f1 / fl:.1f}", f"{f1 / fn:.2f}", f"{work:.2f}", f"{b1:.0f}", f"{tb:.0f}", f"{pl:.0f}",
                f"{pl / f1:.2f}"]
        out.append("| " + " | ".join(list(c) + vals) + " |")
    return "\n".join(out)


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
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 6.0), squeeze=False)
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
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(markdown(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
