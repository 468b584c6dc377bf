"""Draw a phantom case: which abnormalities it has (realistic prevalence and co-occurrence) and their details.

Prevalences are those of manually labelled CT-RATE chest CT reports (rounded). Co-occurrence comes from four
latent conditions shared by related findings — atherosclerotic/age burden, cardiac failure/fluid, infection or
inflammation, and small-airway disease — so that e.g. aortic and coronary calcification, or pleural effusion,
atelectasis and septal thickening, appear together as they do in real reports. PET cases also get
:class:`~rrg3d.data.phantom.model.PetFacts` and, some of them, a lymphoma-like nodal pattern (:func:`add_pet_facts`),
drawn after everything else from a stream of their own.
"""

from __future__ import annotations

import math

import numpy as np

from rrg3d.data.phantom.model import LABEL_REGION, LOBES, PHYSIOLOGICAL_ORGANS, STYLES, Anatomy, Case, Finding, PetFacts
from rrg3d.text.labels import CTRATE_LABELS

#: Fraction of studies with each abnormality (CT-RATE manual labels, rounded).
PREVALENCE: dict[str, float] = {
    "Medical material": 0.15,
    "Arterial wall calcification": 0.28,
    "Cardiomegaly": 0.11,
    "Pericardial effusion": 0.08,
    "Coronary artery wall calcification": 0.22,
    "Hiatal hernia": 0.16,
    "Lymphadenopathy": 0.34,
    "Emphysema": 0.23,
    "Atelectasis": 0.28,
    "Lung nodule": 0.46,
    "Lung opacity": 0.30,
    "Pulmonary fibrotic sequela": 0.27,
    "Pleural effusion": 0.15,
    "Mosaic attenuation pattern": 0.08,
    "Peribronchial thickening": 0.09,
    "Consolidation": 0.16,
    "Bronchiectasis": 0.10,
    "Interlobular septal thickening": 0.08,
}

#: Loadings of each abnormality on the latent conditions (atherosclerosis, cardiac/fluid, infection, airway).
LOADINGS: dict[str, tuple[float, float, float, float]] = {
    "Medical material": (0.6, 0.9, 0.0, 0.0),
    "Arterial wall calcification": (2.0, 0.3, 0.0, 0.0),
    "Cardiomegaly": (0.8, 1.3, 0.0, 0.0),
    "Pericardial effusion": (0.0, 1.3, 0.4, 0.0),
    "Coronary artery wall calcification": (2.0, 0.4, 0.0, 0.0),
    "Hiatal hernia": (0.6, 0.0, 0.0, 0.0),
    "Lymphadenopathy": (0.2, 0.3, 0.9, 0.0),
    "Emphysema": (1.0, 0.0, 0.0, 0.6),
    "Atelectasis": (0.5, 0.9, 0.7, 0.0),
    "Lung nodule": (0.5, 0.0, 0.2, 0.2),
    "Lung opacity": (0.0, 0.5, 1.2, 0.3),
    "Pulmonary fibrotic sequela": (0.7, 0.0, 0.4, 0.3),
    "Pleural effusion": (0.2, 1.5, 0.8, 0.0),
    "Mosaic attenuation pattern": (0.3, 0.6, 0.0, 1.4),
    "Peribronchial thickening": (0.0, 0.2, 0.5, 1.6),
    "Consolidation": (0.0, 0.4, 1.6, 0.0),
    "Bronchiectasis": (0.2, 0.0, 0.3, 1.6),
    "Interlobular septal thickening": (0.0, 1.5, 0.6, 0.0),
}

MATERIAL_KINDS = {"pacemaker": "heart", "sternotomy wires": "bone", "port catheter": "mediastinum",
                  "aortic stent": "mediastinum"}
NODE_STATIONS = ("right paratracheal", "left paratracheal", "subcarinal", "right hilar", "left hilar",
                 "prevascular", "aortopulmonary window")
#: Nodal stations outside the mediastinum that a chest scan still shows (lymphoma-like pattern of PET cases).
OUTER_STATIONS = ("right supraclavicular", "left supraclavicular", "right axillary", "left axillary")
#: Share of PET cases with the lymphoma-like pattern.
LYMPHOMA_RATE = 0.3


def _base_logit(prevalence: float, loadings: tuple[float, ...]) -> float:
    """Intercept giving the wanted marginal for a logistic-normal model (probit-style approximation)."""
    variance = sum(w * w for w in loadings)
    return math.log(prevalence / (1 - prevalence)) * math.sqrt(1 + math.pi * variance / 8)


_BASE = {label: _base_logit(PREVALENCE[label], LOADINGS[label]) for label in CTRATE_LABELS}


def sample_labels(rng: np.random.Generator) -> list[str]:
    """The abnormalities of one case, in CT-RATE label order."""
    latent = rng.standard_normal(4)
    present = []
    for label in CTRATE_LABELS:
        logit = _BASE[label] + float(np.dot(LOADINGS[label], latent))
        if rng.random() < 1.0 / (1.0 + math.exp(-logit)):
            present.append(label)
    return present


def _severity(rng: np.random.Generator) -> str:
    return str(rng.choice(["mild", "moderate", "severe"], p=[0.5, 0.35, 0.15]))


def _side(rng: np.random.Generator, bilateral: float = 0.3) -> str:
    roll = rng.random()
    return "bilateral" if roll < bilateral else ("right" if roll < bilateral + (1 - bilateral) / 2 else "left")


def _lobes_for(rng: np.random.Generator, side: str, prefer_lower: bool = False, k: int = 1) -> list[str]:
    candidates = [lobe for lobe in LOBES if side == "bilateral" or lobe.startswith(side)]
    weights = np.array([3.0 if prefer_lower and "lower" in lobe else 1.0 for lobe in candidates])
    chosen = rng.choice(len(candidates), size=min(k, len(candidates)), replace=False, p=weights / weights.sum())
    lobes = sorted({candidates[i] for i in chosen}, key=LOBES.index)
    if side == "bilateral" and not ({lobe.split()[0] for lobe in lobes} >= {"right", "left"}):
        other = "left" if lobes[0].startswith("right") else "right"
        extra = [lobe for lobe in LOBES if lobe.startswith(other) and (not prefer_lower or "lower" in lobe)]
        lobes = sorted({*lobes, str(rng.choice(extra))}, key=LOBES.index)
    return lobes


def _side_of_lobes(lobes: list[str]) -> str:
    sides = {lobe.split()[0] for lobe in lobes}
    return "bilateral" if len(sides) == 2 else next(iter(sides))


def describe_finding(label: str, rng: np.random.Generator, pet: bool, heart_scale: float) -> Finding:
    """Details of one abnormality (side, lobes, size, severity, count, kind, SUVmax)."""
    region = LABEL_REGION[label]
    if label == "Medical material":
        kind = str(rng.choice(list(MATERIAL_KINDS), p=[0.35, 0.3, 0.2, 0.15]))
        side = {"pacemaker": "left", "port catheter": "right"}.get(kind)
        return Finding(label, MATERIAL_KINDS[kind], side=side, kind=kind)
    if label == "Arterial wall calcification":
        severity = _severity(rng)
        count = {"mild": 4, "moderate": 8, "severe": 14}[severity] + int(rng.integers(0, 3))
        return Finding(label, region, severity=severity, count=count, detail={"vessel": "aorta"})
    if label == "Cardiomegaly":
        ratio = round(0.5 * heart_scale + rng.uniform(0.0, 0.03), 2)
        severity = "mild" if heart_scale < 1.3 else ("moderate" if heart_scale < 1.4 else "severe")
        return Finding(label, region, severity=severity, size_mm=round(ratio * 100, 0),
                       detail={"cardiothoracic_ratio": ratio})
    if label == "Pericardial effusion":
        thickness = float(rng.uniform(6, 20))
        severity = "mild" if thickness < 10 else ("moderate" if thickness < 16 else "severe")
        return Finding(label, region, severity=severity, size_mm=round(thickness))
    if label == "Coronary artery wall calcification":
        severity = _severity(rng)
        vessels = ["LAD", "RCA", "LCx"][: {"mild": 1, "moderate": 2, "severe": 3}[severity]]
        return Finding(label, region, severity=severity, count=3 * len(vessels) + int(rng.integers(0, 3)),
                       detail={"vessels": vessels})
    if label == "Hiatal hernia":
        size = float(rng.uniform(30, 65))
        return Finding(label, region, size_mm=round(size), severity="mild" if size < 40 else "moderate")
    if label == "Lymphadenopathy":
        count = int(rng.integers(1, 5))
        stations = sorted(rng.choice(NODE_STATIONS, size=count, replace=False).tolist(), key=NODE_STATIONS.index)
        size = float(rng.uniform(12, 26))
        sides = {s.split()[0] for s in stations if s.split()[0] in ("right", "left")}
        side = None if not sides else ("bilateral" if len(sides) == 2 else sides.pop())
        suv = round(float(rng.uniform(4.0, 16.0)), 1) if pet else None
        return Finding(label, region, side=side, size_mm=round(size), count=count, kind="mediastinal",
                       suv_max=suv, detail={"stations": stations})
    if label == "Emphysema":
        kind = str(rng.choice(["centrilobular", "paraseptal"], p=[0.7, 0.3]))
        severity = _severity(rng)
        return Finding(label, region, side="bilateral", severity=severity, kind=kind,
                       lobes=["right upper lobe", "left upper lobe"])
    if label == "Atelectasis":
        kind = str(rng.choice(["subsegmental", "lobar"], p=[0.75, 0.25]))
        side = _side(rng, 0.4)
        lobes = _lobes_for(rng, side, prefer_lower=True)
        lobes = [lobe for lobe in lobes if "lower" in lobe] or lobes
        return Finding(label, region, side=_side_of_lobes(lobes), lobes=lobes, kind=kind,
                       severity="mild" if kind == "subsegmental" else "moderate")
    if label == "Lung nodule":
        count = int(rng.choice([1, 1, 1, 2, 2, 3, 4]))
        size = float(rng.choice([rng.uniform(8, 12), rng.uniform(12, 28)], p=[0.5, 0.5]))
        lobes = _lobes_for(rng, _side(rng, 0.3 if count > 1 else 0.0), k=min(count, 2))
        suv = round(float(rng.uniform(2.5, 9.0)), 1) if pet and size >= 10 else None
        return Finding(label, region, side=_side_of_lobes(lobes), lobes=lobes, size_mm=round(size), count=count,
                       kind="solid", suv_max=suv)
    if label == "Lung opacity":
        lobes = _lobes_for(rng, _side(rng, 0.4), k=int(rng.integers(1, 3)))
        return Finding(label, region, side=_side_of_lobes(lobes), lobes=lobes, severity=_severity(rng),
                       kind="ground-glass")
    if label == "Pulmonary fibrotic sequela":
        lobes = _lobes_for(rng, _side(rng, 0.35), k=int(rng.integers(1, 3)))
        return Finding(label, region, side=_side_of_lobes(lobes), lobes=lobes, severity="mild")
    if label == "Pleural effusion":
        side = _side(rng, 0.35)
        depth = float(rng.uniform(12, 55))
        severity = "mild" if depth < 25 else ("moderate" if depth < 40 else "severe")
        return Finding(label, region, side=side, size_mm=round(depth), severity=severity)
    if label == "Mosaic attenuation pattern":
        return Finding(label, region, side="bilateral", severity=_severity(rng))
    if label == "Peribronchial thickening":
        side = _side(rng, 0.6)
        return Finding(label, region, side=side, lobes=_lobes_for(rng, side, prefer_lower=True, k=2),
                       severity="mild")
    if label == "Consolidation":
        lobes = _lobes_for(rng, _side(rng, 0.2), prefer_lower=True)
        suv = round(float(rng.uniform(2.0, 4.5)), 1) if pet else None
        return Finding(label, region, side=_side_of_lobes(lobes), lobes=lobes, severity=_severity(rng),
                       size_mm=round(float(rng.uniform(40, 80))), suv_max=suv)
    if label == "Bronchiectasis":
        side = _side(rng, 0.5)
        return Finding(label, region, side=side, lobes=_lobes_for(rng, side, prefer_lower=True, k=2),
                       severity=str(rng.choice(["mild", "moderate"])), kind="cylindrical")
    if label == "Interlobular septal thickening":
        return Finding(label, region, side="bilateral", severity=_severity(rng))
    raise ValueError(label)


def sample_case(case_id: str, seed: int, rng: np.random.Generator, n_styles: int = 2, pet: bool = False,
                thyroid_in_view: bool = True, style: str | None = None) -> Case:
    """A complete case: anatomy, findings and a reporting style (hospital): ``style``, else drawn among the first
    ``n_styles`` (drawn either way, so the rest of the case does not depend on ``style``)."""
    labels = sample_labels(rng)
    cardiomegaly = "Cardiomegaly" in labels
    heart_scale = float(rng.uniform(1.22, 1.45) if cardiomegaly else rng.uniform(0.9, 1.06))
    sex = "female" if rng.random() < 0.45 else "male"
    body_width = float(rng.uniform(290, 340))
    anatomy = Anatomy(sex=sex, heart_scale=heart_scale, cardiothoracic_ratio=round(0.5 * heart_scale, 2),
                      body_width_mm=body_width, thyroid_in_view=thyroid_in_view, has_pet=pet)
    findings = [describe_finding(label, rng, pet, heart_scale) for label in labels]
    drawn = STYLES[int(rng.integers(0, max(1, min(n_styles, len(STYLES)))))]
    style = style or drawn
    case = Case(id=case_id, seed=seed, style=style, anatomy=anatomy, findings=findings)
    if pet:  # drawn last, from its own stream: the CT part of a case is the same with or without PET facts
        add_pet_facts(case, np.random.default_rng(int(rng.integers(0, 2**63))))
    return case


def add_pet_facts(case: Case, rng: np.random.Generator) -> None:
    """Give a PET case its :class:`PetFacts` and, for some, the lymphoma-like nodal pattern.

    The pattern is one more ``Lymphadenopathy`` finding (``kind="lymphoma"``): enlarged, intensely hypermetabolic
    nodes (15-35 mm short axis, SUVmax 5-20) at one or two stations outside the mediastinum (supraclavicular,
    axillary) and one to three mediastinal or hilar stations that the case's other nodes do not occupy.
    """
    others = ["liver", "stomach", "bone marrow"]
    named = [organ for organ in others if rng.random() < 0.5]
    case.pet = PetFacts(myocardial_suv=round(float(rng.uniform(2.0, 9.0)), 1),
                        physiological=["myocardium", *sorted(named, key=PHYSIOLOGICAL_ORGANS.index)])
    if rng.random() >= LYMPHOMA_RATE:
        return
    taken = {s for f in case.findings if f.label == "Lymphadenopathy" for s in f.detail.get("stations", [])}
    inner_free = [s for s in NODE_STATIONS if s not in taken]
    outer = rng.choice(OUTER_STATIONS, size=int(rng.integers(1, 3)), replace=False).tolist()
    inner = rng.choice(inner_free, size=min(len(inner_free), int(rng.integers(1, 4))), replace=False).tolist()
    order = OUTER_STATIONS + NODE_STATIONS
    stations = sorted(outer + inner, key=order.index)
    nodes = [{"station": station, "size_mm": round(float(rng.uniform(15, 35))),
              "suv_max": round(float(rng.uniform(5.0, 20.0)), 1)} for station in stations]
    sides = {s.split()[0] for s in stations if s.split()[0] in ("right", "left")}
    side = None if not sides else ("bilateral" if len(sides) == 2 else sides.pop())
    case.findings.append(Finding("Lymphadenopathy", "mediastinum", side=side,
                                 size_mm=float(max(n["size_mm"] for n in nodes)), count=len(nodes), kind="lymphoma",
                                 suv_max=max(n["suv_max"] for n in nodes),
                                 detail={"stations": stations, "nodes": nodes}))
