"""TotalSegmentator as an optional mask source: its classes mapped onto the 10 regions.

The ``totalsegmentator`` package and its weights are never required: the package is imported only when this
backend runs, and a missing package or missing weights is a clear :class:`RRG3DError` (the ``rules`` backend needs
neither). What is always available is the mapping: :data:`TOTAL_CLASSES` is the class table of TotalSegmentator's
``total`` task (v2, 117 classes, ``totalsegmentator.map_to_binary.class_map["total"]``), :func:`region_of_class`
sends a class name to one of our regions, and :func:`convert_label_map` turns a TotalSegmentator label map into our
10-region map.

What maps where (every other class → 0, outside every region):

* lung: the five lobes (``lung_upper_lobe_left`` ... ``lung_lower_lobe_right``);
* trachea and bronchi: ``trachea``;
* mediastinum: the thoracic great vessels — ``aorta``, ``pulmonary_vein``, ``pulmonary_artery`` (v1),
  ``superior_vena_cava``, ``brachiocephalic_trunk``, ``brachiocephalic_vein_left/right``, ``subclavian_artery_*``,
  ``common_carotid_artery_*``; the aorta below the lung bases is abdominal aorta and goes to abdomen (see
  :func:`convert_label_map`);
* heart: ``heart``, ``atrial_appendage_left`` and the v1 chambers (``heart_myocardium``, ``heart_atrium_*``,
  ``heart_ventricle_*``);
* esophagus: ``esophagus``;
* bone: ``vertebrae_*``, ``sacrum``, ``rib_*``, ``sternum``, ``costal_cartilages``, ``scapula_*``,
  ``clavicula_*``, ``humerus_*``, ``hip_*``, ``femur_*``, ``skull``;
* thyroid: ``thyroid_gland``;
* breast: ``breast`` (TotalSegmentator's ``breasts`` task; the ``total`` task has no breast class);
* abdomen: the abdominal and pelvic organs and vessels — ``liver``, ``spleen``, ``kidney_*``, ``kidney_cyst_*``,
  ``gallbladder``, ``stomach``, ``pancreas``, ``adrenal_gland_*``, ``small_bowel``, ``duodenum``, ``colon``,
  ``urinary_bladder``, ``prostate``, ``inferior_vena_cava``, ``portal_vein_and_splenic_vein``, ``iliac_artery_*``,
  ``iliac_vena_*``;
* unmapped (0): ``spinal_cord``, muscles (``autochthon_*``, ``iliopsoas_*``, ``gluteus_*``), ``brain``, ``face``.

TotalSegmentator has no pleura class: converted maps never contain pleura.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rrg3d.data.adapters.radgenome import RADGENOME_REGIONS
from rrg3d.errors import RRG3DError
from rrg3d.io.volume import Volume

REGION_ID: dict[str, int] = {name: index + 1 for index, name in enumerate(RADGENOME_REGIONS)}

#: TotalSegmentator's ``total`` task (v2): class id → name, as ``totalsegmentator.map_to_binary.class_map["total"]``.
TOTAL_CLASSES: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus",
    16: "trachea", 17: "thyroid_gland", 18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder",
    22: "prostate", 23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum", 26: "vertebrae_S1",
    27: "vertebrae_L5", 28: "vertebrae_L4", 29: "vertebrae_L3", 30: "vertebrae_L2", 31: "vertebrae_L1",
    32: "vertebrae_T12", 33: "vertebrae_T11", 34: "vertebrae_T10", 35: "vertebrae_T9", 36: "vertebrae_T8",
    37: "vertebrae_T7", 38: "vertebrae_T6", 39: "vertebrae_T5", 40: "vertebrae_T4", 41: "vertebrae_T3",
    42: "vertebrae_T2", 43: "vertebrae_T1", 44: "vertebrae_C7", 45: "vertebrae_C6", 46: "vertebrae_C5",
    47: "vertebrae_C4", 48: "vertebrae_C3", 49: "vertebrae_C2", 50: "vertebrae_C1", 51: "heart", 52: "aorta",
    53: "pulmonary_vein", 54: "brachiocephalic_trunk", 55: "subclavian_artery_right", 56: "subclavian_artery_left",
    57: "common_carotid_artery_right", 58: "common_carotid_artery_left", 59: "brachiocephalic_vein_left",
    60: "brachiocephalic_vein_right", 61: "atrial_appendage_left", 62: "superior_vena_cava",
    63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 65: "iliac_artery_left", 66: "iliac_artery_right",
    67: "iliac_vena_left", 68: "iliac_vena_right", 69: "humerus_left", 70: "humerus_right", 71: "scapula_left",
    72: "scapula_right", 73: "clavicula_left", 74: "clavicula_right", 75: "femur_left", 76: "femur_right",
    77: "hip_left", 78: "hip_right", 79: "spinal_cord", 80: "gluteus_maximus_left", 81: "gluteus_maximus_right",
    82: "gluteus_medius_left", 83: "gluteus_medius_right", 84: "gluteus_minimus_left", 85: "gluteus_minimus_right",
    86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right", 90: "brain",
    91: "skull", 92: "rib_left_1", 93: "rib_left_2", 94: "rib_left_3", 95: "rib_left_4", 96: "rib_left_5",
    97: "rib_left_6", 98: "rib_left_7", 99: "rib_left_8", 100: "rib_left_9", 101: "rib_left_10", 102: "rib_left_11",
    103: "rib_left_12", 104: "rib_right_1", 105: "rib_right_2", 106: "rib_right_3", 107: "rib_right_4",
    108: "rib_right_5", 109: "rib_right_6", 110: "rib_right_7", 111: "rib_right_8", 112: "rib_right_9",
    113: "rib_right_10", 114: "rib_right_11", 115: "rib_right_12", 116: "sternum", 117: "costal_cartilages",
}

#: Exact class names → region (everything not matched here or by :data:`REGION_PATTERNS` is unmapped).
REGION_OF_NAME: dict[str, str] = {
    "trachea": "trachea and bronchi",
    "esophagus": "esophagus",
    "thyroid_gland": "thyroid",
    "heart": "heart",
    "atrial_appendage_left": "heart",
    "heart_myocardium": "heart",
    "aorta": "mediastinum",
    "pulmonary_vein": "mediastinum",
    "pulmonary_artery": "mediastinum",
    "superior_vena_cava": "mediastinum",
    "brachiocephalic_trunk": "mediastinum",
    "sternum": "bone",
    "costal_cartilages": "bone",
    "sacrum": "bone",
    "skull": "bone",
    "breast": "breast",
    "liver": "abdomen",
    "spleen": "abdomen",
    "gallbladder": "abdomen",
    "stomach": "abdomen",
    "pancreas": "abdomen",
    "small_bowel": "abdomen",
    "duodenum": "abdomen",
    "colon": "abdomen",
    "urinary_bladder": "abdomen",
    "prostate": "abdomen",
    "inferior_vena_cava": "abdomen",
    "portal_vein_and_splenic_vein": "abdomen",
}

#: Name patterns (full match) → region, for the numbered and sided families.
REGION_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"lung_(upper|middle|lower)_lobe_(left|right)", "lung"),
    (r"heart_(atrium|ventricle)_(left|right)", "heart"),
    (r"(brachiocephalic_vein|subclavian_artery|common_carotid_artery)_(left|right)", "mediastinum"),
    (r"vertebrae_[CTLS]\d+", "bone"),
    (r"rib_(left|right)_\d+", "bone"),
    (r"(scapula|clavicula|humerus|hip|femur)_(left|right)", "bone"),
    (r"(kidney|kidney_cyst|adrenal_gland)_(left|right)", "abdomen"),
    (r"(iliac_artery|iliac_vena)_(left|right)", "abdomen"),
)

#: Mediastinal classes that continue into the abdomen: below the lung bases they are counted as abdomen.
CROSSING_DIAPHRAGM = ("aorta",)


def region_of_class(name: str) -> str | None:
    """The region a TotalSegmentator class belongs to, or ``None`` when it maps to no region."""
    if name in REGION_OF_NAME:
        return REGION_OF_NAME[name]
    for pattern, region in REGION_PATTERNS:
        if re.fullmatch(pattern, name):
            return region
    return None


def class_lookup(classes: Mapping[int, str] | None = None) -> np.ndarray:
    """A uint8 table indexed by TotalSegmentator class id giving our region label (0 = none)."""
    classes = TOTAL_CLASSES if classes is None else classes
    table = np.zeros(max(classes, default=0) + 1, dtype=np.uint8)
    for index, name in classes.items():
        region = region_of_class(name)
        if region is not None:
            table[index] = REGION_ID[region]
    return table


def convert_label_map(array: np.ndarray, classes: Mapping[int, str] | None = None,
                      split_at_diaphragm: bool = True) -> np.ndarray:
    """Map a TotalSegmentator label map (canonical ``[D, H, W]``, ids of ``classes``) onto the 10 regions.

    With ``split_at_diaphragm``, the voxels of :data:`CROSSING_DIAPHRAGM` classes in axial slices below the lowest
    lung voxel become abdomen (where the scan has no lung at all, those below the top of the abdominal organs).
    Ids beyond the class table are an error.
    """
    classes = TOTAL_CLASSES if classes is None else classes
    array = np.asarray(array)
    if array.dtype.kind not in "iub":
        if not np.all(np.mod(array, 1) == 0):
            raise RRG3DError("TotalSegmentator label map holds non-integer values")
        array = array.astype(np.int64)
    table = class_lookup(classes)
    if array.size and (int(array.min()) < 0 or int(array.max()) >= len(table)):
        raise RRG3DError(f"TotalSegmentator label map holds ids outside 0..{len(table) - 1} "
                         f"(found {int(array.min())}..{int(array.max())}); is it the 'total' task's map?")
    regions = table[array]
    if split_at_diaphragm and array.ndim == 3:
        crossing = [i for i, name in classes.items() if name in CROSSING_DIAPHRAGM]
        if crossing:
            lung_slices = np.flatnonzero((regions == REGION_ID["lung"]).any(axis=(1, 2)))
            if lung_slices.size:
                limit = int(lung_slices[0])  # slices strictly below the lowest lung voxel
            else:
                abdominal = np.flatnonzero((regions == REGION_ID["abdomen"]).any(axis=(1, 2)))
                limit = int(abdominal[-1]) + 1 if abdominal.size else 0
            if limit > 0:
                below = np.isin(array[:limit], crossing)
                regions[:limit][below] = REGION_ID["abdomen"]
    return regions


# ---------------------------------------------------------------------------------------------------------
# the optional backend
# ---------------------------------------------------------------------------------------------------------


def _import_totalsegmentator():
    try:
        from totalsegmentator.python_api import totalsegmentator  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RRG3DError("the totalsegmentator backend needs the optional 'totalsegmentator' package and its "
                         f"weights ({exc}); install it where its weights can be downloaded, or use --backend "
                         "rules") from None
    return totalsegmentator


def weights_present() -> bool:
    """Whether TotalSegmentator's ``total`` task weights are on this machine (never downloads anything)."""
    try:
        from totalsegmentator.config import get_weights_dir  # type: ignore[import-not-found]
    except ImportError:
        return False
    folder = Path(get_weights_dir())
    return folder.is_dir() and any(folder.glob("Dataset29[1-7]_*"))


def segment_totalsegmentator(volume: Volume, device: str | None = None) -> np.ndarray:
    """Run TotalSegmentator's ``total`` task on ``volume`` and return our 10-region map on the volume's grid."""
    run = _import_totalsegmentator()
    if not weights_present():
        raise RRG3DError("TotalSegmentator's weights for the 'total' task are not installed (they cannot be "
                         "downloaded here); set TOTALSEG_WEIGHTS_PATH or TOTALSEG_HOME_DIR to a folder holding "
                         "them, or use --backend rules")
    if device is None:
        try:
            import torch

            device = "gpu" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    from rrg3d.io.readers import read_volume, write_volume

    canonical = volume.to_canonical()
    with tempfile.TemporaryDirectory(prefix="rrg3d-totalseg-") as tmp:
        source = Path(tmp) / "ct.nii.gz"
        write_volume(canonical, source)
        target = Path(tmp) / "seg.nii.gz"
        try:
            image = run(str(source), None, ml=True, task="total", device=device, quiet=True)
        except Exception as exc:  # the package raises many kinds; report them as ours
            raise RRG3DError(f"TotalSegmentator failed: {type(exc).__name__}: {exc}") from None
        import nibabel as nib

        nib.save(image, str(target))
        labels = read_volume(target, modality="SEG")
    if labels.shape != canonical.shape or not np.allclose(labels.affine, canonical.affine, atol=1e-3):
        raise RRG3DError("TotalSegmentator returned a label map on another grid than its input")
    regions = convert_label_map(labels.array)
    from rrg3d.segment import from_canonical

    return from_canonical(regions, volume.affine)
