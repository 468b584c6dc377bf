"""Time the ``ctrate`` preset against a reference MONAI Compose pipeline on the same scan.

Makes a 512×512×300 int16 chest-like NIfTI (0.703 mm in-plane, 1.2 mm slices: a 360 mm field of view that
both pipelines map onto 240×480×480), then times, in the same process and alternating runs:

* rrg3d: ``read_volume`` + ``load_preset("ctrate").apply``;
* MONAI: LoadImaged, Orientationd, Spacingd, ScaleIntensityRanged, Resized (the usual reference recipe).

Reports median wall time, the speed ratio, peak resident memory of each pipeline (measured in a fresh child
process), and the max/mean absolute difference of the two outputs (in the [0, 1] output range).

    python benchmarks/preprocess.py [--repeats 3] [--out benchmarks/results/preprocess.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_scan(path: Path, shape_xyz: tuple[int, int, int] = (512, 512, 300), seed: int = 0) -> None:
    """A synthetic chest-like CT: air, body ellipse (soft tissue), two lungs, spine; int16 HU; RAS NIfTI."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape_xyz
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :]
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1
    lung_r = ((x + 0.38) / 0.3) ** 2 + ((y + 0.05) / 0.42) ** 2 < 1
    lung_l = ((x - 0.38) / 0.3) ** 2 + ((y + 0.05) / 0.42) ** 2 < 1
    spine = (x / 0.09) ** 2 + ((y - 0.45) / 0.09) ** 2 < 1
    plane = np.full((nx, ny), -1000, dtype=np.int16)
    plane[body] = 40
    plane[lung_r | lung_l] = -850
    plane[spine] = 700
    volume = np.repeat(plane[:, :, None], nz, axis=2)
    volume += rng.normal(0, 20, size=volume.shape).astype(np.int16)
    affine = np.diag([0.703125, 0.703125, 1.2, 1.0])
    affine[:3, 3] = [-180.0, -180.0, -180.0]
    nib.save(nib.Nifti1Image(volume, affine), str(path))


def run_rrg3d(path: str) -> np.ndarray:
    from rrg3d.io import read_volume
    from rrg3d.preprocess import load_preset

    return load_preset("ctrate").apply(read_volume(path)).array


def build_monai():
    from monai.transforms import Compose, LoadImaged, Orientationd, Resized, ScaleIntensityRanged, Spacingd

    return Compose([
        LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(0.75, 0.75, 1.5), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=200, b_min=0.0, b_max=1.0, clip=True),
        Resized(keys="image", spatial_size=(480, 480, 240), mode="trilinear"),
    ])


def run_monai(path: str, pipeline=None) -> np.ndarray:
    pipeline = pipeline or build_monai()
    out = pipeline({"image": path})["image"]
    array = np.asarray(out)[0]  # indexed (x, y, z) in RAS
    # MONAI RAS (i→R, j→A, k→S); rrg3d canonical [D, H, W] = (S, P, L): reverse the axes, flip H and W.
    return np.ascontiguousarray(np.transpose(array, (2, 1, 0))[:, ::-1, ::-1])


def _vm_hwm_kib() -> int:
    """Peak resident memory of this process (Linux VmHWM; ru_maxrss would include the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_child(kind: str, path: str, queue) -> None:
    import torch

    torch.set_num_threads(2)
    if kind == "monai":
        build_monai()  # import MONAI before the baseline reading
    else:
        import rrg3d.preprocess  # noqa: F401
    before = _vm_hwm_kib()
    (run_rrg3d if kind == "rrg3d" else run_monai)(path)
    queue.put((before, _vm_hwm_kib()))


def peak_memory_mb(kind: str, path: str) -> float:
    """Extra peak memory of one run in a fresh process, above that process's footprint after imports."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(kind, path, queue))
    proc.start()
    before, after = queue.get()
    proc.join()
    return (after - before) / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preprocess.json")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "scan_512x512x300.nii")
        make_scan(Path(path))
        pipeline = build_monai()
        ours, theirs = run_rrg3d(path), run_monai(path, pipeline)  # warm-up (imports, thread pools)
        times: dict[str, list[float]] = {"rrg3d": [], "monai": []}
        for _ in range(args.repeats):
            for name, fn in (("rrg3d", lambda: run_rrg3d(path)), ("monai", lambda: run_monai(path, pipeline))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        memory = {name: peak_memory_mb(name, path) for name in ("rrg3d", "monai")}

    if ours.shape != theirs.shape:
        print(f"shape mismatch: rrg3d {ours.shape} vs monai {theirs.shape}", file=sys.stderr)
        return 1
    diff = np.abs(ours.astype(np.float32) - theirs.astype(np.float32))
    interior = diff[8:-8, 8:-8, 8:-8]
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "input": "512x512x300 int16 NIfTI, 0.703x0.703x1.2 mm",
        "output_shape": list(ours.shape),
        "repeats": args.repeats,
        "seconds_median": median,
        "seconds_all": times,
        "speedup_vs_monai": median["monai"] / median["rrg3d"],
        "peak_extra_rss_mb": memory,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff_interior": float(interior.max()),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"{'pipeline':<10}{'median s':>10}{'peak extra RSS MB':>19}")
    for name in ("rrg3d", "monai"):
        print(f"{name:<10}{median[name]:>10.2f}{memory[name]:>19.0f}")
    print(f"speed-up rrg3d vs MONAI: {result['speedup_vs_monai']:.2f}x")
    print(f"output difference: max {result['max_abs_diff']:.4f}, mean {result['mean_abs_diff']:.5f} "
          f"(interior max {result['max_abs_diff_interior']:.4f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
