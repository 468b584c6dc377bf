"""PETRG truth of a PET phantom: the PET and CT status of each region in the chest field of view, from the Case.

The statuses follow :mod:`rrg3d.text.petrg` (classes, severity order, the SUVmax from which uptake is marked) and are
derived from the :class:`~rrg3d.data.phantom.model.Case` alone, never from its report:

- CT: nodes at mediastinal stations (paratracheal, subcarinal, prevascular, aortopulmonary window) make
  ``mediastinal_nodes`` an enlarged node, hilar stations ``hilar_nodes``, supraclavicular and axillary stations
  (lymphoma-like pattern) their groups; a lung nodule is a focal lesion; emphysema, atelectasis, ground-glass
  opacity, consolidation, fibrotic sequelae, mosaic attenuation and septal thickening are lung parenchymal change;
  peribronchial thickening is (bronchial) wall thickening and bronchiectasis "other" of the lung; pleural effusion
  is "other" of the pleura; cardiomegaly and pericardial effusion "other", coronary and aortic wall calcification
  "calcification" of the heart (with the great vessels); a hiatal hernia is "other" of the esophagus and of the
  stomach. Medical devices are not findings.
- PET: a finding with an SUVmax gives its regions marked (SUVmax >= ``SUV_MARKED``) or mild uptake (per node for
  the lymphoma-like pattern); organs named with physiological uptake (:class:`~rrg3d.data.phantom.model.PetFacts`)
  are physiological unless something more severe is there.

Regions outside the phantom's field of view (brain, abdomen below the upper abdominal organs, pelvis) get no truth:
:data:`PHANTOM_REGIONS` lists those that do.
"""

from __future__ import annotations

from rrg3d.data.phantom.model import Case, Finding
from rrg3d.text.petrg import NORMAL, merge_status, normal_statuses, pet_class_for_suv

__all__ = ["PHANTOM_REGIONS", "STATION_REGION", "petrg_truth"]

#: PETRG regions the chest phantom shows (thyroid only when in view).
PHANTOM_REGIONS: tuple[str, ...] = (
    "supraclavicular_nodes", "axillary_nodes", "mediastinal_nodes", "hilar_nodes", "thyroid", "lung", "pleura",
    "heart", "breast", "esophagus", "liver", "spleen", "gastrointestinal", "bone", "muscle_subcutis",
)
#: The PETRG region of every nodal station the phantom draws.
STATION_REGION: dict[str, str] = {
    "right paratracheal": "mediastinal_nodes", "left paratracheal": "mediastinal_nodes",
    "subcarinal": "mediastinal_nodes", "prevascular": "mediastinal_nodes", "aortopulmonary window": "mediastinal_nodes",
    "right hilar": "hilar_nodes", "left hilar": "hilar_nodes",
    "right supraclavicular": "supraclavicular_nodes", "left supraclavicular": "supraclavicular_nodes",
    "right axillary": "axillary_nodes", "left axillary": "axillary_nodes",
}
#: (regions, CT class) of each abnormality; Lymphadenopathy goes by its stations, Medical material is no finding.
FINDING_CT: dict[str, tuple[tuple[str, ...], str]] = {
    "Arterial wall calcification": (("heart",), "calcification"),
    "Cardiomegaly": (("heart",), "other"),
    "Pericardial effusion": (("heart",), "other"),
    "Coronary artery wall calcification": (("heart",), "calcification"),
    "Hiatal hernia": (("esophagus", "gastrointestinal"), "other"),
    "Emphysema": (("lung",), "lung_parenchymal_change"),
    "Atelectasis": (("lung",), "lung_parenchymal_change"),
    "Lung nodule": (("lung",), "focal_lesion"),
    "Lung opacity": (("lung",), "lung_parenchymal_change"),
    "Pulmonary fibrotic sequela": (("lung",), "lung_parenchymal_change"),
    "Pleural effusion": (("pleura",), "other"),
    "Mosaic attenuation pattern": (("lung",), "lung_parenchymal_change"),
    "Peribronchial thickening": (("lung",), "wall_thickening"),
    "Consolidation": (("lung",), "lung_parenchymal_change"),
    "Bronchiectasis": (("lung",), "other"),
    "Interlobular septal thickening": (("lung",), "lung_parenchymal_change"),
}
#: The PETRG region of each organ a report may name with physiological uptake.
ORGAN_REGION: dict[str, str] = {"myocardium": "heart", "liver": "liver", "stomach": "gastrointestinal",
                                "bone marrow": "bone"}


def _sites(finding: Finding) -> list[tuple[str, float | None]]:
    """(region, SUVmax) of each place a finding occupies."""
    if finding.label == "Lymphadenopathy":
        nodes = finding.detail.get("nodes")
        if nodes:
            return [(STATION_REGION[n["station"]], n.get("suv_max")) for n in nodes]
        return [(STATION_REGION[s], finding.suv_max) for s in finding.detail.get("stations", [])
                if s in STATION_REGION]
    regions, _ = FINDING_CT.get(finding.label, ((), NORMAL))
    return [(region, finding.suv_max) for region in regions]


def petrg_truth(case: Case) -> dict[str, dict[str, str]]:
    """``{region: {"pet": class, "ct": class}}`` for the regions of :data:`PHANTOM_REGIONS` the case shows."""
    regions = [r for r in PHANTOM_REGIONS if r != "thyroid" or case.anatomy.thyroid_in_view]
    truth = normal_statuses(regions)
    if case.pet is not None:
        for organ in case.pet.physiological:
            region = ORGAN_REGION[organ]
            if region in truth:
                truth[region]["pet"] = merge_status("pet", truth[region]["pet"], "physiological")
    for finding in case.findings:
        if finding.label == "Medical material":
            continue
        ct = "enlarged_node" if finding.label == "Lymphadenopathy" else FINDING_CT[finding.label][1]
        for region, suv in _sites(finding):
            if region not in truth:
                continue
            truth[region]["ct"] = merge_status("ct", truth[region]["ct"], ct)
            if suv is not None and case.anatomy.has_pet:
                truth[region]["pet"] = merge_status("pet", truth[region]["pet"], pet_class_for_suv(suv))
    return truth
