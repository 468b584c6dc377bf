"""The abnormality label set: the 18 labels that the labelers, the finding heads, CT-CLIP and clinical efficacy use.

It is CT-RATE's label set (Hamamci et al.), so the names and their order are exactly those of the columns of the
CT-RATE label CSVs; :mod:`rrg3d.data.adapters.ctrate` reads those CSVs with it. This module has no imports, so any
part of rrg3d (text, models, evaluate, data) can learn the labels without importing a dataset adapter.
"""

from __future__ import annotations

#: The 18 abnormality labels, named and ordered exactly as the columns of the CT-RATE label CSVs.
CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

__all__ = ["CTRATE_LABELS"]
