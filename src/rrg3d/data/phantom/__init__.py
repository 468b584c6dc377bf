"""Synthetic chest CT (+PET) phantoms with known findings, region masks and reports (``rrg3d phantom``)."""

from rrg3d.data.phantom.generator import PhantomConfig, generate_phantoms, make_case
from rrg3d.data.phantom.model import LABEL_REGION, REGIONS, Anatomy, Case, Finding, PetFacts
from rrg3d.data.phantom.render import render_case
from rrg3d.data.phantom.sampling import sample_case

__all__ = [
    "LABEL_REGION",
    "REGIONS",
    "Anatomy",
    "Case",
    "Finding",
    "PetFacts",
    "PhantomConfig",
    "generate_phantoms",
    "make_case",
    "render_case",
    "sample_case",
]
