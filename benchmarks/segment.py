"""Dice of the weight-free ``rules`` segmenter against every reference available here.

Sources:

* ``phantom``: N phantoms (default 20 at 64×128×128) generated into ``--work``; per region, the mean Dice over the
  cases whose truth holds the region (and how often a region absent from the truth was wrongly found);
* ``chest_cta``: ``ct/totalseg_chest_cta/ct_cropped.nii.gz`` (a cropped CT angiogram) against its ``heart`` mask
  (resampled onto the crop by world position), plus the share of the ``pulmonary_artery`` mask labelled
  mediastinum or heart (the artery is mediastinum in our regions);
* ``totalseg_example``: ``ct/totalseg_example/example_ct_sm.nii.gz`` (abdomen with lung bases) against its
  TotalSegmentator map converted to the 10 regions (:func:`rrg3d.segment.totalseg.convert_label_map`), for the
  regions present in that reference;
* ``speed``: one phantom at 150×256×256 upsampled to 300×512×512 (0.67 mm in-plane), seconds on one core.

The shared-data sources are skipped when ../shared/data is absent. Prints a table and writes
benchmarks/results/segment.json.

    OMP_NUM_THREADS=1 python benchmarks/segment.py [--n 20] [--work /tmp/segment_bench] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rrg3d.data.phantom import PhantomConfig, generate_phantoms
from rrg3d.io import Volume, read_volume
from rrg3d.segment import REGIONS, segment_volume
from rrg3d.segment.totalseg import convert_label_map

REPO = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; ``None`` when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def resample_nearest(source: Volume, target: Volume) -> np.ndarray:
    """``source`` sampled at ``target``'s voxel centres (nearest neighbour, 0 outside), by world position."""
    index = np.indices(target.shape).reshape(3, -1).T
    world = target.index_to_world(index)
    inverse = np.linalg.inv(source.affine[:3, :3])
    src = np.rint((world - source.affine[:3, 3]) @ inverse.T).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.array(source.shape)), axis=1)
    out = np.zeros(len(index), dtype=source.array.dtype)
    out[inside] = source.array[src[inside, 0], src[inside, 1], src[inside, 2]]
    return out.reshape(target.shape)


def region_dice(pred: np.ndarray, ref: np.ndarray, regions: list[str] | None = None) -> dict[str, float | None]:
    names = REGIONS if regions is None else regions
    return {name: dice(pred == REGIONS.index(name) + 1, ref == REGIONS.index(name) + 1) for name in names}


def phantom_source(n: int, work: Path, shape: tuple[int, int, int]) -> dict:
    generate_phantoms(PhantomConfig(n=n, seed=0, shape=shape), work, workers=1, progress=False)
    per_region: dict[str, list[float]] = {name: [] for name in REGIONS}
    false_found = {name: 0 for name in REGIONS}
    absent = {name: 0 for name in REGIONS}
    seconds = []
    for index in range(n):
        ct = read_volume(work / "vols" / f"phantom_{index:05d}.nii.gz")
        truth = read_volume(work / "seg" / f"phantom_{index:05d}.nii.gz").array
        result = segment_volume(ct)
        seconds.append(result.seconds)
        for name, value in region_dice(result.label_map.array, truth).items():
            in_truth = bool((truth == REGIONS.index(name) + 1).any())
            if in_truth:
                per_region[name].append(value or 0.0)
            else:
                absent[name] += 1
                false_found[name] += int(value is not None)
    return {
        "n": n, "shape": list(shape),
        "dice": {k: round(statistics.mean(v), 3) if v else None for k, v in per_region.items()},
        "dice_min": {k: round(min(v), 3) if v else None for k, v in per_region.items()},
        "cases_with_region": {k: len(v) for k, v in per_region.items()},
        "found_when_absent": {k: f"{false_found[k]}/{absent[k]}" for k in REGIONS if absent[k]},
        "seconds_per_scan": round(statistics.mean(seconds), 3),
    }


def cta_source(data: Path) -> dict:
    folder = data / "ct" / "totalseg_chest_cta"
    ct = read_volume(folder / "ct_cropped.nii.gz")
    result = segment_volume(ct)
    pred = result.label_map.array
    heart = resample_nearest(read_volume(folder / "heart.nii.gz"), ct) > 0
    artery = resample_nearest(read_volume(folder / "pulmonary_artery.nii.gz"), ct) > 0
    in_mediastinum = np.isin(pred[artery], [REGIONS.index("mediastinum") + 1, REGIONS.index("heart") + 1])
    return {
        "scan": "ct/totalseg_chest_cta/ct_cropped.nii.gz", "shape": list(ct.shape),
        "dice": {"heart": round(dice(pred == REGIONS.index("heart") + 1, heart) or 0.0, 3)},
        "pulmonary_artery_in_mediastinum_or_heart": round(float(in_mediastinum.mean()), 3),
        "seconds_per_scan": result.seconds,
    }


def example_source(data: Path) -> dict:
    folder = data / "ct" / "totalseg_example"
    ct = read_volume(folder / "example_ct_sm.nii.gz")
    ref = convert_label_map(read_volume(folder / "example_seg.nii.gz").array)
    result = segment_volume(ct)
    present = [name for name in REGIONS if (ref == REGIONS.index(name) + 1).any()]
    values = region_dice(result.label_map.array, ref, present)
    return {
        "scan": "ct/totalseg_example/example_ct_sm.nii.gz", "shape": list(ct.shape),
        "dice": {k: round(v or 0.0, 3) for k, v in values.items()},
        "found_not_in_reference": [name for name in result.labels.values() if name not in present],
        "seconds_per_scan": result.seconds,
    }


def speed_source(work: Path) -> dict:
    generate_phantoms(PhantomConfig(n=1, seed=1, shape=(150, 256, 256)), work, workers=1, progress=False)
    small = read_volume(work / "vols" / "phantom_00000.nii.gz")
    array = small.array
    for axis in range(3):
        array = np.repeat(array, 2, axis=axis)
    big = Volume.from_spacing(array, tuple(s / 2 for s in small.spacing), modality="CT")
    start = time.perf_counter()
    result = segment_volume(big)
    return {"shape": list(big.shape), "spacing_mm": [round(s, 3) for s in big.spacing],
            "seconds": round(time.perf_counter() - start, 2), "regions_found": len(result.labels)}


def _cell(value: float | None) -> str:
    return "   -" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="phantom cases (default 20)")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"))
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated phantoms (default: temp)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder")
    parser.add_argument("--no-speed", action="store_true", help="skip the 300×512×512 timing")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "segment.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: dict = {"backend": "rules"}
    with tempfile.TemporaryDirectory(prefix="rrg3d-segment-bench-") as tmp:
        work = args.work or Path(tmp)
        results["phantom"] = phantom_source(args.n, work / "phantoms", tuple(args.shape))
        if (args.data / "ct").is_dir():
            results["chest_cta"] = cta_source(args.data)
            results["totalseg_example"] = example_source(args.data)
        else:
            print(f"shared data not found at {args.data}: skipping the real-CT references")
        if not args.no_speed:
            results["speed"] = speed_source(work / "speed")
    sources = [k for k in ("phantom", "chest_cta", "totalseg_example") if k in results]
    print(f"{'region':<22}" + "".join(f"{k:>18}" for k in sources))
    for name in REGIONS:
        print(f"{name:<22}" + "".join(f"{_cell(results[k]['dice'].get(name)):>18}" for k in sources))
    print(f"{'seconds per scan':<22}" + "".join(f"{results[k]['seconds_per_scan']:>18.2f}" for k in sources))
    if "chest_cta" in results:
        print(f"pulmonary artery labelled mediastinum/heart: "
              f"{results['chest_cta']['pulmonary_artery_in_mediastinum_or_heart']:.2f}")
    if "speed" in results:
        print(f"speed: {results['speed']['shape']} in {results['speed']['seconds']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
