#!/usr/bin/env python3
"""PyTorch on the GPU against moeroute's CUDA backend, on the same routing work.

The work (the forward of bench_cuda): softmax over E experts -> top-k -> gather the gate
weights -> renormalise -> per-expert counts (bincount) and probability sums, for fp32 and
bf16 logits [T, E], k = 8. Timed in PyTorch eager and torch.compile (default mode), with CUDA
events over back-to-back calls. The memory
floor is the compulsory traffic (logits read once, ids + gates written once) divided by the
device-to-device copy bandwidth measured here with torch.

With --ours PATH (the bench_cuda executable) it runs it in the same script run and prints,
per case, ours vs eager, ours vs torch.compile and each against the floor.

Usage: python3 bench/torch_gpu_bench.py --ours build-cuda/bench/bench_cuda [--quick] [--csv FILE]
"""
import argparse
import csv
import io
import subprocess
import sys

import torch


def route(x, k):
    """Softmax top-k routing with renormalised gates, counts and probability sums."""
    p = torch.softmax(x.float(), dim=-1)
    gates, ids = torch.topk(p, k, dim=-1)
    gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    counts = torch.bincount(ids.flatten(), minlength=x.shape[1])
    prob_sums = p.sum(dim=0)
    return ids.int(), gates, counts, prob_sums


def time_us(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return 1000.0 * a.elapsed_time(b) / reps


def copy_bandwidth():
    n = 512 << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), 10)
    return 2.0 * n / (us * 1e-6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="path to the bench_cuda executable")
    ap.add_argument("--quick", action="store_true", help="T in {4096, 65536}, E = 256 only")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--csv", help="also write the table (and bench_cuda's own rows) to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0

    Ts = [4096, 65536] if args.quick else [1024, 4096, 16384, 65536]
    Es = [256] if args.quick else [64, 128, 256, 384]
    k = 8
    bw = copy_bandwidth()
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")

    ours = {}
    ours_text = ""
    if args.ours:
        cmd = [args.ours] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        ours_text = out
        print(out, end="")
        rows = [l for l in out.splitlines() if l and not l.startswith("#")]
        for r in csv.DictReader(io.StringIO("\n".join(rows))):
            ours[(r["dtype"], int(r["T"]), int(r["E"]), r["op"])] = float(r["us"])

    compiled = None if args.no_compile else torch.compile(route)
    header = ("dtype,T,E,k,floor_us,eager_us,compile_us,ours_us,ours_graph_us,"
              "eager/ours,compile/ours,ours/floor,compile/floor")
    table = [header]
    print(header)
    for T in Ts:
        for E in Es:
            for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                x = (2.0 * torch.randn(T, E, device="cuda")).to(dtype)
                reps = 50 if T >= 16384 else 200
                eager = time_us(lambda: route(x, k), reps)
                comp = time_us(lambda: compiled(x, k), reps) if compiled else float("nan")
                floor = (T * E * x.element_size() + T * k * 8) / bw * 1e6
                o = ours.get((name, T, E, "forward"), float("nan"))
                og = ours.get((name, T, E, "forward_graph"), float("nan"))
                row = (f"{name},{T},{E},{k},{floor:.2f},{eager:.2f},{comp:.2f},{o:.2f},{og:.2f},"
                       f"{eager / o:.2f},{comp / o:.2f},{o / floor:.2f},{comp / floor:.2f}")
                table.append(row)
                print(row)
                sys.stdout.flush()
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("\n".join(table) + "\n")
            if ours_text:
                f.write("\n# bench_cuda\n" + ours_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
