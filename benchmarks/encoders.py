"""Cost of the 3D vision encoders at their full-size default configs, batch 1 inference on CPU.

For each encoder (``vit3d``, ``ctvit``, ``ctvit_v``, ``resnet3d``, each with its ``Config`` defaults) and each
input size (D×H×W) reports: parameters, output grid and token count, FLOPs of one forward (matmul and
convolution FLOPs from ``torch.utils.flop_counter.FlopCounterMode``, counted on the meta device so nothing is
computed; softmax, norms and activations are not counted), CPU latency under ``torch.inference_mode`` and
the peak resident memory of the whole process (Linux VmHWM of a fresh child process per encoder and size:
Python + torch + weights + activations). The issue's target: every encoder peaks below 12 GB at 256×512×512.

Each (encoder, size) runs in its own spawned process: build the model, one warm-up forward, then ``--repeats``
timed forwards; latency is their median. The warm-up is skipped (latency = one cold forward, marked ``*``) with
``--quick`` and for rows above ``--warmup-max-gflops`` (default 1000: minutes-long forwards, where one-time
start-up costs are negligible), so the default run of all encoders and sizes takes about 15 minutes on 2 cores.
Prints a table and writes JSON.

    python benchmarks/encoders.py [--encoders vit3d ctvit ctvit_v resnet3d] [--sizes 64x256x256 256x512x512]
                                  [--repeats 1] [--threads 2] [--quick] [--out benchmarks/results/encoders.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path

from _common import parse_size, vm_hwm_gb

ENCODER_NAMES = ("vit3d", "ctvit", "ctvit_v", "resnet3d")
SIZES = ("64x256x256", "240x480x480", "256x512x512")
TARGET_GB = 12.0
TARGET_SIZE = (256, 512, 512)


def static_costs(name: str, sizes: list[tuple[int, int, int]]) -> dict:
    """Parameters, grids and FLOPs of the default config, counted on the meta device (nothing is computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rrg3d.models.encoders import ENCODERS
    from rrg3d.models.registry import config_to_dict

    with torch.device("meta"):
        model = ENCODERS.build({"name": name}).eval()
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "out_dim": model.out_dim,
        "config": config_to_dict(model.config),
        "sizes": {},
    }
    for size in sizes:
        x = torch.empty(1, model.in_channels, *size, device="meta")
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            out = model(x)
        grid = tuple(out.shape[1:4])
        assert grid == model.grid_shape(size), (name, size, grid)
        result["sizes"]["x".join(map(str, size))] = {
            "grid": list(grid),
            "tokens": grid[0] * grid[1] * grid[2],
            "gflops": counter.get_total_flops() / 1e9,
        }
    return result


def _measure_child(name: str, size: tuple[int, int, int], threads: int, warmup: int, repeats: int, queue) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        from rrg3d.models.encoders import ENCODERS

        torch.manual_seed(0)
        start = time.perf_counter()
        model = ENCODERS.build({"name": name}).eval()
        build_s = time.perf_counter() - start
        x = torch.randn(1, model.in_channels, *size)
        rss_ready = vm_hwm_gb()
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                out = model(x)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times.append(elapsed)
                finite = bool(torch.isfinite(out).all())
                del out
        queue.put({
            "build_s": build_s,
            "seconds": times,
            "latency_s": statistics.median(times),
            "rss_ready_gb": rss_ready,
            "peak_rss_gb": vm_hwm_gb(),
            "finite": finite,
        })
    except Exception as exc:  # reported in the table, not a crash of the whole benchmark
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure(name: str, size: tuple[int, int, int], threads: int, warmup: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_child, args=(name, size, threads, warmup, repeats, queue))
    proc.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=5)
        except Exception:
            if not proc.is_alive():  # killed (for example by the OOM killer) before reporting
                result = {"error": f"child exited with code {proc.exitcode}"}
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODER_NAMES), choices=ENCODER_NAMES)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size(s) for s in SIZES],
                        help="input sizes DxHxW (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards after the warm-up (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="no warm-up: time one cold forward per row")
    parser.add_argument("--warmup-max-gflops", type=float, default=1000.0,
                        help="skip the warm-up forward for rows above this many GFLOPs (default %(default)s)")
    parser.add_argument("--flops-only", action="store_true", help="parameters and FLOPs only, no forward runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoders.json")
    args = parser.parse_args(argv)
    repeats = max(1, args.repeats)

    import torch

    rows, static = [], {}
    header = (f"{'encoder':<9}{'input':>13}{'grid':>11}{'tokens':>8}{'params M':>10}{'GFLOPs':>9}"
              f"{'latency s':>11}{'peak GB':>9}  target<{TARGET_GB:g}GB")
    print(header)
    print("-" * len(header))
    for name in args.encoders:
        static[name] = static_costs(name, args.sizes)
        for size in args.sizes:
            key = "x".join(map(str, size))
            costs = static[name]["sizes"][key]
            warmup = 0 if args.quick or costs["gflops"] > args.warmup_max_gflops else 1
            row = {"encoder": name, "input": list(size), **costs, "params": static[name]["params"], "warmup": warmup}
            if not args.flops_only:
                row.update(measure(name, size, args.threads, warmup, repeats))
            if "peak_rss_gb" in row:
                row["pass"] = row["peak_rss_gb"] < TARGET_GB
                verdict = "PASS" if row["pass"] else "FAIL"
                latency = f"{row['latency_s']:>10.2f}{'*' if not warmup else ' '}"
                peak = f"{row['peak_rss_gb']:>9.2f}"
            else:
                verdict = row.get("error", "not run")
                latency, peak = f"{'-':>11}", f"{'-':>9}"
            if tuple(size) == TARGET_SIZE:
                verdict += " (issue target size)"
            rows.append(row)
            grid = "x".join(map(str, costs["grid"]))
            print(f"{name:<9}{key:>13}{grid:>11}{costs['tokens']:>8}{row['params'] / 1e6:>10.1f}"
                  f"{costs['gflops']:>9.0f}{latency}{peak}  {verdict}", flush=True)

    print("* cold forward, no warm-up")
    at_target = [r for r in rows if tuple(r["input"]) == TARGET_SIZE and "pass" in r]
    if at_target:
        ok = all(r["pass"] for r in at_target)
        print(f"\n256x512x512 peak memory below {TARGET_GB:g} GB for every measured encoder: {'yes' if ok else 'NO'}")
    result = {
        "description": "batch-1 CPU inference of the full-size default encoder configs",
        "target_peak_gb": TARGET_GB,
        "target_size": list(TARGET_SIZE),
        "threads": args.threads,
        "warmup_max_gflops": None if args.quick else args.warmup_max_gflops,
        "repeats": repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "flops_note": "matmul + convolution FLOPs (2 per multiply-add) from FlopCounterMode on the meta device",
        "memory_note": "peak resident memory (VmHWM) of a fresh process: interpreter, torch, weights, activations",
        "encoders": static,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
