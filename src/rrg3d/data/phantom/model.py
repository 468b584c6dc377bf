"""What a phantom case *is*: its findings and their ground truth, independent of how it is drawn or written.

The renderer (:mod:`rrg3d.data.phantom.render`) turns a :class:`Case` into CT/PET volumes and a region label
map; the report writer (:mod:`rrg3d.data.phantom.reports`) turns the same :class:`Case` into text. Both read
only these structures, so images, labels, region truth and reports cannot disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rrg3d.data.adapters.radgenome import RADGENOME_REGIONS
from rrg3d.text.labels import CTRATE_LABELS

#: The 10 anatomical regions of region-guided methods; label value ``i + 1`` in region maps is REGIONS[i].
REGIONS: tuple[str, ...] = tuple(RADGENOME_REGIONS)

#: The region where each abnormality lies (medical material depends on the device: see ``Finding.region``).
LABEL_REGION: dict[str, str] = {
    "Medical material": "mediastinum",
    "Arterial wall calcification": "mediastinum",
    "Cardiomegaly": "heart",
    "Pericardial effusion": "heart",
    "Coronary artery wall calcification": "heart",
    "Hiatal hernia": "esophagus",
    "Lymphadenopathy": "mediastinum",
    "Emphysema": "lung",
    "Atelectasis": "lung",
    "Lung nodule": "lung",
    "Lung opacity": "lung",
    "Pulmonary fibrotic sequela": "lung",
    "Pleural effusion": "pleura",
    "Mosaic attenuation pattern": "lung",
    "Peribronchial thickening": "trachea and bronchi",
    "Consolidation": "lung",
    "Bronchiectasis": "trachea and bronchi",
    "Interlobular septal thickening": "lung",
}

SIDES = ("right", "left", "bilateral")
SEVERITIES = ("mild", "moderate", "severe")
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
STYLES = ("hospital_a", "hospital_b", "hospital_c")
#: Organs a PET phantom's report may name as having physiological FDG uptake (the myocardium always).
PHYSIOLOGICAL_ORGANS = ("myocardium", "liver", "stomach", "bone marrow")


@dataclasses.dataclass
class Finding:
    """One abnormality of a case, with everything a report may say about it.

    Attributes:
        label: one of :data:`CTRATE_LABELS`.
        region: one of :data:`REGIONS` (where its voxels are in the region map).
        side: ``"right"``, ``"left"``, ``"bilateral"`` or ``None`` (midline / not lateralised).
        lobes: lung lobes involved (names from :data:`LOBES`), empty outside the lungs.
        size_mm: the size a radiologist would quote (nodule diameter, node short axis, effusion depth, hernia
            diameter, pericardial effusion thickness, cardiothoracic ratio × 100 for cardiomegaly); ``None`` if n/a.
        severity: ``"mild"``, ``"moderate"``, ``"severe"`` or ``None``.
        count: number of lesions (nodules, enlarged nodes, plaques), ``None`` if not countable.
        kind: sub-type (``"pacemaker"``, ``"sternotomy wires"``, ``"port catheter"``, ``"aortic stent"`` for medical
            material; ``"solid"`` nodules; ``"centrilobular"``/``"paraseptal"`` emphysema;
            ``"subsegmental"``/``"lobar"`` atelectasis; ``"mediastinal"`` nodes; ``"lymphoma"`` for the
            lymphoma-like pattern of PET cases: hypermetabolic nodes at several stations), or ``None``.
        suv_max: PET SUVmax of the lesion when the case has PET and the finding is hypermetabolic, else ``None``.
        detail: extra facts (e.g. ``{"stations": [...]}`` for nodes, ``{"vessel": "aorta"}``; the lymphoma-like
            pattern adds ``{"nodes": [{"station", "size_mm", "suv_max"}, ...]}``, one per station).
    """

    label: str
    region: str
    side: str | None = None
    lobes: list[str] = dataclasses.field(default_factory=list)
    size_mm: float | None = None
    severity: str | None = None
    count: int | None = None
    kind: str | None = None
    suv_max: float | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in CTRATE_LABELS:
            raise ValueError(f"unknown abnormality {self.label!r}")
        if self.region not in REGIONS:
            raise ValueError(f"unknown region {self.region!r}")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"unknown side {self.side!r}")
        if self.severity is not None and self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        unknown = [lobe for lobe in self.lobes if lobe not in LOBES]
        if unknown:
            raise ValueError(f"unknown lobes {unknown}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v not in (None, [], {})}


@dataclasses.dataclass
class Anatomy:
    """Per-case normal-anatomy facts a report may mention (all physically meaningful)."""

    sex: str  # "female" (breast tissue present) or "male"
    heart_scale: float  # 1.0 normal; cardiomegaly > 1.2
    cardiothoracic_ratio: float
    body_width_mm: float
    thyroid_in_view: bool
    has_pet: bool = False


@dataclasses.dataclass
class PetFacts:
    """What a PET phantom shows beyond its findings.

    Attributes:
        myocardial_suv: SUV of the left ventricular myocardium (physiological uptake, drawn by the renderer).
        physiological: organs of :data:`PHYSIOLOGICAL_ORGANS` the report names as having physiological uptake.
    """

    myocardial_suv: float
    physiological: list[str] = dataclasses.field(default_factory=lambda: ["myocardium"])

    def __post_init__(self) -> None:
        unknown = [organ for organ in self.physiological if organ not in PHYSIOLOGICAL_ORGANS]
        if unknown:
            raise ValueError(f"unknown organs with physiological uptake {unknown}")


@dataclasses.dataclass
class Case:
    """A phantom study: identity, style, anatomy and findings (the single source of truth).

    ``pet`` holds the PET facts of a PET case (``None`` for CT-only cases, and for PET cases built by hand).
    """

    id: str
    seed: int
    style: str
    anatomy: Anatomy
    findings: list[Finding]
    pet: PetFacts | None = None

    @property
    def labels(self) -> dict[str, int]:
        """The 18 CT-RATE labels, in their order."""
        present = {f.label for f in self.findings}
        return {label: int(label in present) for label in CTRATE_LABELS}

    def findings_in(self, region: str) -> list[Finding]:
        return [f for f in self.findings if f.region == region]

    @property
    def region_truth(self) -> dict[str, list[str]]:
        """Which abnormalities lie in each of the 10 regions (empty list = normal region)."""
        return {region: sorted({f.label for f in self.findings_in(region)}) for region in REGIONS}
