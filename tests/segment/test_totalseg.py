"""The TotalSegmentator mapping (always available) and the optional backend's clear failure without it."""

from __future__ import annotations

import numpy as np
import pytest

from rrg3d.errors import RRG3DError
from rrg3d.io import Volume, read_volume
from rrg3d.segment import REGIONS, segment_volume
from rrg3d.segment.totalseg import (
    TOTAL_CLASSES,
    class_lookup,
    convert_label_map,
    region_of_class,
    weights_present,
)

ID = {name: index + 1 for index, name in enumerate(REGIONS)}
CLASS_ID = {name: index for index, name in TOTAL_CLASSES.items()}


def test_class_table_is_the_v2_total_task():
    assert sorted(TOTAL_CLASSES) == list(range(1, 118))
    assert len(set(TOTAL_CLASSES.values())) == 117
    assert TOTAL_CLASSES[1] == "spleen" and TOTAL_CLASSES[16] == "trachea" and TOTAL_CLASSES[51] == "heart"
    assert TOTAL_CLASSES[117] == "costal_cartilages"


@pytest.mark.parametrize(("name", "region"), [
    ("lung_upper_lobe_left", "lung"), ("lung_middle_lobe_right", "lung"), ("trachea", "trachea and bronchi"),
    ("aorta", "mediastinum"), ("pulmonary_vein", "mediastinum"), ("superior_vena_cava", "mediastinum"),
    ("brachiocephalic_vein_left", "mediastinum"), ("common_carotid_artery_right", "mediastinum"),
    ("heart", "heart"), ("atrial_appendage_left", "heart"), ("heart_ventricle_left", "heart"),
    ("esophagus", "esophagus"), ("vertebrae_T5", "bone"), ("vertebrae_S1", "bone"), ("rib_left_3", "bone"),
    ("rib_right_12", "bone"), ("sternum", "bone"), ("scapula_left", "bone"), ("clavicula_right", "bone"),
    ("humerus_left", "bone"), ("costal_cartilages", "bone"), ("thyroid_gland", "thyroid"), ("breast", "breast"),
    ("liver", "abdomen"), ("spleen", "abdomen"), ("kidney_left", "abdomen"), ("stomach", "abdomen"),
    ("pancreas", "abdomen"), ("gallbladder", "abdomen"), ("adrenal_gland_right", "abdomen"),
    ("small_bowel", "abdomen"), ("colon", "abdomen"), ("inferior_vena_cava", "abdomen"),
    ("spinal_cord", None), ("autochthon_left", None), ("iliopsoas_right", None), ("gluteus_maximus_left", None),
    ("brain", None), ("vertebrae_T55x", None),
])
def test_region_of_class(name, region):
    assert region_of_class(name) == region


def test_every_total_class_is_decided_and_most_map():
    table = class_lookup()
    assert table.shape == (118,) and table[0] == 0
    mapped = {TOTAL_CLASSES[i] for i in range(1, 118) if table[i]}
    assert len(mapped) >= 100
    assert table[CLASS_ID["heart"]] == ID["heart"] and table[CLASS_ID["rib_left_1"]] == ID["bone"]
    assert not (set(table.tolist()) - set(range(11))) and ID["pleura"] not in table


def test_convert_splits_the_aorta_at_the_lung_bases():
    seg = np.zeros((6, 4, 4), dtype=np.uint8)
    seg[3:, 0, 0] = CLASS_ID["lung_lower_lobe_right"]
    seg[:, 1, 1] = CLASS_ID["aorta"]
    seg[:, 2, 2] = CLASS_ID["vertebrae_T12"]
    seg[0, 3, 3] = CLASS_ID["spinal_cord"]
    regions = convert_label_map(seg)
    assert regions.dtype == np.uint8
    assert regions[:3, 1, 1].tolist() == [ID["abdomen"]] * 3 and regions[3:, 1, 1].tolist() == [ID["mediastinum"]] * 3
    assert (regions[:, 2, 2] == ID["bone"]).all() and regions[0, 3, 3] == 0
    assert (convert_label_map(seg, split_at_diaphragm=False)[:, 1, 1] == ID["mediastinum"]).all()
    no_lung = np.where(seg == CLASS_ID["lung_lower_lobe_right"], 0, seg)
    no_lung[:2, 0, 0] = CLASS_ID["liver"]  # abdominal organs up to slice 1: the aorta there is abdominal
    assert convert_label_map(no_lung)[:, 1, 1].tolist() == [ID["abdomen"]] * 2 + [ID["mediastinum"]] * 4
    with pytest.raises(RRG3DError, match=r"outside 0\.\.117"):
        convert_label_map(np.full((2, 2, 2), 140, dtype=np.uint8))


def test_example_label_map(shared_data):
    seg = read_volume(shared_data / "ct" / "totalseg_example" / "example_seg.nii.gz").array
    regions = convert_label_map(seg)
    assert regions.shape == seg.shape
    lobes = [CLASS_ID[n] for n in TOTAL_CLASSES.values() if n.startswith("lung_")]
    assert (regions == ID["lung"]).sum() == np.isin(seg, lobes).sum() > 0
    bones = [i for i, n in TOTAL_CLASSES.items() if region_of_class(n) == "bone"]
    assert (regions == ID["bone"]).sum() == np.isin(seg, bones).sum() > 0
    assert (regions == ID["abdomen"]).sum() > (seg == CLASS_ID["liver"]).sum() > 0
    assert (regions[seg == CLASS_ID["spinal_cord"]] == 0).all()
    present = {REGIONS[v - 1] for v in np.unique(regions) if v}
    assert {"lung", "bone", "abdomen", "mediastinum"} <= present
    assert "heart" not in present and "pleura" not in present


def test_package_class_map_matches_when_installed():
    try:
        from totalsegmentator.map_to_binary import class_map  # type: ignore[import-not-found]
    except Exception as exc:  # not installed, or its imports break beside this torch
        pytest.skip(f"the optional totalsegmentator package is not importable here ({type(exc).__name__})")
    assert dict(class_map["total"]) == TOTAL_CLASSES


def test_backend_without_package_or_weights_is_a_clear_error():
    if weights_present():
        pytest.skip("TotalSegmentator and its weights are installed here")
    volume = Volume.from_spacing(np.zeros((4, 8, 8), dtype=np.int16), (1.0, 1.0, 1.0))
    with pytest.raises(RRG3DError, match=r"(?i)totalsegmentator.*--backend rules"):
        segment_volume(volume, backend="totalsegmentator")
