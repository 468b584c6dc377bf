"""PETRG region statuses: 24 body regions, each with a PET (uptake) status and a CT (structure) status.

PETRG-3D scores a PET/CT report by what it says about each region: a *PET* status and a *CT* status per region,
read from the generated and the reference report (a region the report does not mention is normal). This module
holds the vocabulary and the offline rule extractor; the metric lives in :mod:`rrg3d.evaluate.petrg`.

**Regions** (:data:`PETRG_REGIONS`, rrg3d's grouping, head to toe, lymph-node groups beside the organs they drain)::

    brain, head_neck, cervical_nodes, supraclavicular_nodes, axillary_nodes, mediastinal_nodes, hilar_nodes,
    thyroid, lung, pleura, heart, breast, esophagus, liver, spleen, pancreas, gastrointestinal, kidney_adrenal,
    retroperitoneal_nodes, mesenteric_nodes, iliac_nodes, inguinal_nodes, bone, muscle_subcutis

``mediastinal_nodes`` covers the mediastinum itself (thymus, stations such as paratracheal, subcarinal, prevascular,
aortopulmonary window, internal mammary); ``heart`` covers the pericardium and the great vessels (aorta, venae
cavae, pulmonary trunk); ``lung`` covers the airways; ``liver`` the gallbladder and bile ducts;
``gastrointestinal`` the stomach to the rectum and the peritoneum; ``kidney_adrenal`` the kidneys, adrenals, urinary
tract and pelvic organs; ``muscle_subcutis`` muscles, subcutaneous fat, skin and the chest and abdominal walls.

**PET classes** (:data:`PET_CLASSES`): ``marked_uptake``, ``mild_uptake`` (mild or equivocal), ``physiological``,
``reduced``, ``normal``. **CT classes** (:data:`CT_CLASSES`): ``enlarged_node``, ``focal_lesion``,
``lung_parenchymal_change``, ``wall_thickening``, ``calcification``, ``bone_lesion``, ``other``, ``normal``.

**Rule extractor** (:class:`RuleExtractor`, English): the report's findings and impression are cut into sentences and
clauses (:mod:`rrg3d.text.reports`); region words (synonyms: "para-aortic", "axilla", "hilum", ...) and finding cues
are found in each clause, and negated cues are dropped (:func:`rrg3d.text.negation.polarity`; hedged cues count).
A cue applies to the regions of its clause it fits (an enlarged node only to node groups, a parenchymal change only
to the lung, a lytic lesion only to bone), else to those of its sentence, else — when the sentence names no region
at all — to the cue's own region ("emphysema" → lung, "cardiomegaly" → heart). Words such as "neck" or "pelvic"
name the node group when the clause speaks of nodes. A bare "mediastinal" next to hilar stations with no mediastinal
station ("mediastinal lymphadenopathy in the right hilar station") is taken as the group's name, not a second place.
Devices (pacemaker, port, stent, wires) are not findings. A lymph node with a short axis of 10 mm or more is enlarged.

Uptake: "intense", "marked", "avid", "strong", "moderate" → marked; "mild", "slight", "low-grade", "equivocal",
"faint" → mild (a hedged marked uptake also becomes mild); "physiological" → physiological; "reduced", "decreased",
"photopenic", "hypometabolic" → reduced. Ungraded wording ("increased", "hypermetabolic", "FDG-avid", "abnormal")
and bare SUV values are graded by the SUVmax stated in the clause: at least :data:`SUV_MARKED` is marked, below it
mild; without a value, marked.

When several statuses hit one region the most severe wins (:data:`PET_SEVERITY`, :data:`CT_SEVERITY`):
PET marked > mild > reduced > physiological > normal; CT bone lesion > focal lesion > enlarged node > lung parenchymal
change > wall thickening > other > calcification > normal.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CT_CLASSES",
    "CT_CLASS_NAMES",
    "CT_SEVERITY",
    "NODE_REGIONS",
    "NORMAL",
    "PETRG_REGIONS",
    "PET_CLASSES",
    "PET_CLASS_NAMES",
    "PET_SEVERITY",
    "REGION_NAMES",
    "SUV_MARKED",
    "Extraction",
    "RuleExtractor",
    "check_statuses",
    "merge_status",
    "normal_statuses",
    "pet_class_for_suv",
]

#: The 24 regions, head to toe (ids are stable; see the module doc for what each covers).
PETRG_REGIONS: tuple[str, ...] = (
    "brain", "head_neck", "cervical_nodes", "supraclavicular_nodes", "axillary_nodes", "mediastinal_nodes",
    "hilar_nodes", "thyroid", "lung", "pleura", "heart", "breast", "esophagus", "liver", "spleen", "pancreas",
    "gastrointestinal", "kidney_adrenal", "retroperitoneal_nodes", "mesenteric_nodes", "iliac_nodes",
    "inguinal_nodes", "bone", "muscle_subcutis",
)
REGION_NAMES: dict[str, str] = {
    "brain": "Brain",
    "head_neck": "Head and neck (pharynx, larynx, salivary glands, sinuses, orbits)",
    "cervical_nodes": "Cervical lymph nodes",
    "supraclavicular_nodes": "Supraclavicular lymph nodes",
    "axillary_nodes": "Axillary lymph nodes",
    "mediastinal_nodes": "Mediastinum and mediastinal lymph nodes",
    "hilar_nodes": "Hilar lymph nodes",
    "thyroid": "Thyroid",
    "lung": "Lungs and airways",
    "pleura": "Pleura",
    "heart": "Heart, pericardium and great vessels",
    "breast": "Breasts",
    "esophagus": "Esophagus",
    "liver": "Liver, gallbladder and bile ducts",
    "spleen": "Spleen",
    "pancreas": "Pancreas",
    "gastrointestinal": "Stomach, bowel and peritoneum",
    "kidney_adrenal": "Kidneys, adrenals, urinary tract and pelvic organs",
    "retroperitoneal_nodes": "Retroperitoneal (para-aortic) lymph nodes",
    "mesenteric_nodes": "Mesenteric, coeliac and porta hepatis lymph nodes",
    "iliac_nodes": "Iliac and pelvic lymph nodes",
    "inguinal_nodes": "Inguinal lymph nodes",
    "bone": "Bones and bone marrow",
    "muscle_subcutis": "Muscles, subcutaneous tissue and skin",
}
NODE_REGIONS = frozenset({"cervical_nodes", "supraclavicular_nodes", "axillary_nodes", "mediastinal_nodes",
                          "hilar_nodes", "retroperitoneal_nodes", "mesenteric_nodes", "iliac_nodes", "inguinal_nodes"})

NORMAL = "normal"
PET_CLASSES: tuple[str, ...] = ("marked_uptake", "mild_uptake", "physiological", "reduced", NORMAL)
PET_CLASS_NAMES: dict[str, str] = {
    "marked_uptake": "Marked uptake", "mild_uptake": "Mild or equivocal uptake",
    "physiological": "Physiological uptake", "reduced": "Reduced uptake", NORMAL: "Normal",
}
CT_CLASSES: tuple[str, ...] = ("enlarged_node", "focal_lesion", "lung_parenchymal_change", "wall_thickening",
                               "calcification", "bone_lesion", "other", NORMAL)
CT_CLASS_NAMES: dict[str, str] = {
    "enlarged_node": "Enlarged lymph node", "focal_lesion": "Focal lesion (nodule, mass)",
    "lung_parenchymal_change": "Lung parenchymal change", "wall_thickening": "Wall thickening",
    "calcification": "Calcification", "bone_lesion": "Bone lesion", "other": "Other abnormality", NORMAL: "Normal",
}
#: Most severe first: the status a region keeps when several are stated.
PET_SEVERITY: tuple[str, ...] = ("marked_uptake", "mild_uptake", "reduced", "physiological", NORMAL)
CT_SEVERITY: tuple[str, ...] = ("bone_lesion", "focal_lesion", "enlarged_node", "lung_parenchymal_change",
                                "wall_thickening", "other", "calcification", NORMAL)
#: SUVmax from which ungraded uptake counts as marked (below: mild or equivocal).
SUV_MARKED = 4.0

_CLASSES = {"pet": PET_CLASSES, "ct": CT_CLASSES}
_RANK = {"pet": {c: i for i, c in enumerate(PET_SEVERITY)}, "ct": {c: i for i, c in enumerate(CT_SEVERITY)}}


def normal_statuses(regions: Iterable[str] = PETRG_REGIONS) -> dict[str, dict[str, str]]:
    """Every region normal on both axes."""
    return {region: {"pet": NORMAL, "ct": NORMAL} for region in regions}


def merge_status(axis: str, a: str, b: str) -> str:
    """The more severe of two statuses of one axis (``"pet"`` or ``"ct"``)."""
    rank = _RANK[axis]
    return a if rank[a] <= rank[b] else b


def pet_class_for_suv(suv_max: float) -> str:
    """The PET class of ungraded uptake with this SUVmax."""
    return "marked_uptake" if suv_max >= SUV_MARKED else "mild_uptake"


def _key(value: Any) -> str:
    return re.sub(r"[\s\-/]+", "_", str(value).strip().lower())


def check_statuses(data: Any, regions: Iterable[str] = PETRG_REGIONS, fill: bool = True
                   ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Read ``{region: {"pet": class, "ct": class}}`` strictly: returns the statuses and the problems found.

    Region and class names are compared in lower case with spaces and hyphens as underscores. Unknown regions are
    left out, unknown or missing classes count as normal; each is one problem. With ``fill`` every region of
    ``regions`` is in the result (normal where the data says nothing); without it only the regions the data gives.
    """
    allowed = tuple(regions)
    out = normal_statuses(allowed) if fill else {}
    problems: list[str] = []
    if not isinstance(data, Mapping):
        return out, [f"expected an object of regions, got {type(data).__name__}"]
    for raw_region, value in data.items():
        region = _key(raw_region)
        if region not in allowed:
            problems.append(f"unknown region {raw_region!r} ignored")
            continue
        status = {"pet": NORMAL, "ct": NORMAL}
        if not isinstance(value, Mapping):
            problems.append(f"{region}: expected {{'pet': ..., 'ct': ...}}, got {type(value).__name__} (normal)")
            out[region] = status
            continue
        for field, raw in value.items():
            axis = _key(field)
            if axis not in _CLASSES:
                problems.append(f"{region}: unexpected key {field!r} ignored")
                continue
            cls = _key(raw) if raw is not None else NORMAL
            if cls not in _CLASSES[axis]:
                problems.append(f"{region}: unknown {axis.upper()} class {raw!r} (counted as normal)")
                continue
            status[axis] = cls
        for axis in ("pet", "ct"):
            if not any(_key(k) == axis for k in value):
                problems.append(f"{region}: no {axis.upper()} status (counted as normal)")
        out[region] = status
    return out, problems


@dataclasses.dataclass
class Extraction:
    """The statuses read from one report, and how they were read."""

    statuses: dict[str, dict[str, str]]
    problems: list[str] = dataclasses.field(default_factory=list)
    parse_ok: bool = True
    raw: str | None = None
    error: str | None = None
    cached: bool = False

    def abnormal(self) -> dict[str, dict[str, str]]:
        """Only the regions with a non-normal status (compact, for outputs)."""
        return {r: s for r, s in self.statuses.items() if s["pet"] != NORMAL or s["ct"] != NORMAL}


# ------------------------------------------------------------------------------------------------------ regions


@dataclasses.dataclass(frozen=True)
class _RegionWord:
    pattern: re.Pattern[str]
    regions: tuple[str, ...]  # what the word names
    node_regions: tuple[str, ...] | None = None  # what it names when its clause speaks of lymph nodes
    generic: bool = False  # "mediastinal": may be only the group name of hilar nodes


def _word(pattern: str, regions: Sequence[str], node: Sequence[str] | None = None,
          generic: bool = False) -> _RegionWord:
    return _RegionWord(re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE), tuple(regions),
                       tuple(node) if node is not None else None, generic)


#: Region words; a longer match wins over a shorter one inside it, and on ties the earlier entry wins.
_REGION_WORDS: tuple[_RegionWord, ...] = (
    _word(r"mediastin\w*\s*(?:,|and|or|/|&)\s*(?:(?:right|left|bilateral)\s+)?(?:bi)?hil(?:ar|um|a)"
          r"|(?:bi)?hil(?:ar|um|a)\s*(?:,|and|or|/|&)\s*mediastin\w*", ("mediastinal_nodes", "hilar_nodes")),
    _word(r"supra-?clavicular(?:\s+fossa)?|supraclavicul\w*", ("supraclavicular_nodes",)),
    _word(r"axill(?:a|ae|ary|as)", ("axillary_nodes",)),
    _word(r"(?:right\s+|left\s+)?(?:para|pre)-?tracheal|subcarinal|prevascular|aorto-?pulmonary(?:\s+window)?"
          r"|a-?p\s+window|para-?o?esophageal|internal\s+mammary|parasternal|retrosternal|thym(?:us|ic)",
          ("mediastinal_nodes",)),
    _word(r"mediastin\w*", ("mediastinal_nodes",), generic=True),
    _word(r"(?:bi)?hil(?:ar|um|a)", ("hilar_nodes",)),
    _word(r"retro-?peritone\w*|para-?aortic|peri-?aortic|para-?caval|inter-?aorto-?caval|aorto-?caval"
          r"|retro-?crural|retro-?caval", ("retroperitoneal_nodes",)),
    _word(r"mesenter\w*|c(?:o)?eliac|porta\s+hepatis|porto-?caval|peri-?pancreatic|gastro-?hepatic",
          ("mesenteric_nodes",)),
    _word(r"iliac(?!\s+(?:bones?|crests?|wings?|blades?))|obturator|pelvic\s+side-?walls?", ("iliac_nodes",)),
    _word(r"pelvi[cs]", (), node=("iliac_nodes",)),
    _word(r"inguinal|groins?|femoral\s+(?:lymph\s+)?nodes?", ("inguinal_nodes",)),
    _word(r"neck|submandibular|submental|jugul\w*|level\s+(?:i{1,3}|iv|v|vi)[ab]?", ("head_neck",),
          node=("cervical_nodes",)),
    _word(r"cervical(?!\s+(?:spine|vertebr\w*|cord))", ("head_neck",), node=("cervical_nodes",)),
    _word(r"brain|cerebr\w*|cerebell\w*|intracranial|supratentorial|infratentorial|basal\s+ganglia", ("brain",)),
    _word(r"head\s+and\s+neck|naso-?pharyn\w*|oro-?pharyn\w*|hypo-?pharyn\w*|pharyn\w*|laryn\w*|tonsil\w*"
          r"|parotid\w*|salivary|paranasal|sinus(?:es)?|orbit(?:s|al)?|tongue|oral\s+cavity|nasal|waldeyer\w*",
          ("head_neck",)),
    _word(r"thyroid\w*(?:\s+lobes?)?", ("thyroid",)),
    _word(r"pulmonary\s+(?:arter(?:y|ies|ial)|trunk|veins?)|heart|cardiac|cardi(?:o\w*|al)|myocard\w*|pericard\w*"
          r"|epicard\w*|coronar\w*|aort(?:a|ic)|ventric\w*|atri(?:um|al|a)|valv\w*|vena\s+cava|svc|ivc"
          r"|great\s+vessels", ("heart",)),
    _word(r"lungs?|pulmonary|lobes?|lobar|lingul\w*|\w*bronch\w*|trache\w*|airways?|alveol\w*|apices|perihilar"
          r"|interstiti\w*", ("lung",)),
    _word(r"pleura\w*|pneumothora\w*|hydrothora\w*|hemithora\w*|empyema", ("pleura",)),
    _word(r"breasts?|mammar\w*|gyn(?:a)?ecomastia|nipples?", ("breast",)),
    _word(r"hiat(?:al|us)\s+hernia", ("esophagus", "gastrointestinal")),
    _word(r"o?esophag\w*|gastro-?o?esophageal(?:\s+junction)?", ("esophagus",)),
    _word(r"liver|hepat\w*|(?:hepatic|liver|caudate|quadrate)\s+lobes?|gall-?bladder|gall\s+bladder|biliary"
          r"|bile\s+ducts?|cholang\w*|portal\s+vein", ("liver",)),
    _word(r"spleen|splen\w*", ("spleen",)),
    _word(r"pancrea\w*", ("pancreas",)),
    _word(r"stomach|gastr\w*|bowel|intestin\w*|duoden\w*|jejun\w*|ile(?:um|al)|ileo-?c(?:a)?ecal|colon\w*|colic"
          r"|rect(?:um|al)|recto\w*|sigmoid|c(?:a)?ec(?:um|al)|appendi\w*|peritone\w*|omen(?:tum|tal)",
          ("gastrointestinal",)),
    _word(r"kidneys?|renal|adrenal\w*|ureter\w*|(?:urinary\s+)?bladder|prostat\w*|uter(?:us|ine)|ovar(?:y|ies|ian)"
          r"|adnex\w*|testi(?:s|cles?|cular)|scrot\w*|cervix|seminal", ("kidney_adrenal",)),
    _word(r"bones?|osseous|bony|skelet\w*|vertebr\w*|spin(?:e|al)|ribs?|costal|stern(?:um|al)|clavic\w*|scapul\w*"
          r"|humer\w*|ilium|iliac\s+(?:bones?|crests?|wings?|blades?)|sacr(?:um|al)|sacro-?iliac|coccy\w*|femur"
          r"|femor(?:a|al)|acetabul\w*|marrow|skull|calvari\w*|(?:cervical|thoracic|lumbar)\s+(?:spine|vertebr\w*)"
          r"|[TL]\d{1,2}", ("bone",)),
    _word(r"muscles?|muscul\w*|intramuscular|subcutane\w*|soft\s+tissues?|skin|cutaneous|chest\s+wall"
          r"|abdominal\s+wall|pectoral\w*|psoas|glute\w*|brown\s+fat|paraspinal", ("muscle_subcutis",)),
)
_NODE_CONTEXT = re.compile(r"\b(?:lymph\w*|nodes?|nodal|adenopath\w*)\b", re.IGNORECASE)
_COORDINATION = re.compile(r"^\s*(?:,|and|or|/|&)\s*(?:and\s+)?(?:(?:right|left|bilateral)\s+)?$", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------------- CT cues

#: CT cue kinds: ``node`` (enlarged node: node groups only), ``enlarged`` (a node group's enlarged node, else other),
#: ``lesion`` (focal lesion; bone lesion in bone), ``parenchyma`` (lung only), ``bone`` (bone only), ``wall``,
#: ``calcification``, ``other``. Longer matches win; on ties the earlier kind wins.
_CT_CUES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("wall", r"(?:(?:bowel|gastric|o?esophageal|bladder|bronchial|peribronchial|wall|mural|circumferential)\s+)+"
             r"thicken\w*|thicken(?:ed|ing)\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+){0,2}walls?|peribronchial\s+cuffing",
     ()),
    ("parenchyma", r"(?:interlobular\s+)?septal\s+thicken\w*|consolidat\w*|ground[- ]?glass(?:\s+opacit\w*)?"
                   r"|opacit\w*|atelecta\w*|emphysem\w*|fibro(?:sis|tic|us)|reticula\w*|honeycomb\w*|infiltrat\w*"
                   r"|pneumoni\w*|pneumonitis|mosaic(?:\s+attenuation)?|air[- ]?trapping|tree[- ]in[- ]bud"
                   r"|bronchiolitis|bullae?|bullous|scarring|sequelae?|interstitial\s+(?:lung\s+)?(?:disease|changes?"
                   r"|pattern)|crazy[- ]paving|densit(?:y|ies)", ("lung",)),
    ("node", r"lymphadenopath\w*|adenopath\w*|(?:enlarged|enlarging|bulky|pathologic(?:al)?(?:ly)?\s+enlarged"
             r"|conglomerate\w*|matted)\s+(?:[\w-]+\s+){0,3}?(?:lymph[\s-]+)?(?:nodes?|nodal)"
             r"|(?:lymph\s+)?nodes?\s+of\s+pathologic(?:al)?\s+(?:size|dimensions?)"
             r"|nodal\s+(?:mass\w*|disease|conglomerate\w*|enlargement)|(?:lymph\s+)?node\s+enlargement", ()),
    ("enlarged", r"enlarge(?:d|ment)|\w+megaly|increased\s+in\s+size|hypertroph\w*", ()),
    ("bone", r"(?:osteo)?lytic|(?:osteo)?sclerotic|(?:osteo)?blastic|osteolysis|destructive"
             r"|pathologic(?:al)?\s+fractures?", ("bone",)),
    ("lesion", r"nodul(?:e|es|ar|arity)|mass(?:es)?|lesions?|tumou?r\w*|neoplas\w*|metasta\w*|deposits?"
               r"|carcinoma\w*|space[- ]occupying", ()),
    ("calcification", r"(?<!non-)(?<!non)(?<!non )calcif\w*|atheroscl\w*|atherom\w*", ()),
    ("other", r"effusions?|hernia\w*|herniat\w*|ascites|pneumothora\w*|hydrothora\w*|fluid|collections?"
              r"|abscess\w*|cysts?|cystic|fractur\w*|dilat\w*|ectasia|ectatic|aneurysm\w*|stenos[ie]s|thromb\w*"
              r"|embol\w*|bronchiectas\w*|steatos\w*|fatty\s+(?:liver|infiltration)|cirrho\w*|atroph\w*"
              r"|degenerat\w*|osteophyt\w*|spondylo\w*|hydronephros\w*|calcul(?:us|i)|stones?|diverticul\w*"
              r"|o?edema\w*|ha?ematoma\w*|scar|gyn(?:a)?ecomastia|goit(?:re|er)|thicken\w*", ()),
)
_CT_CUE_RES = tuple((kind, re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE), defaults)
                    for kind, pattern, defaults in _CT_CUES)
_NODULE = re.compile(r"nodul", re.IGNORECASE)
#: A node's short axis: 10 mm or more is an enlarged node (only read in clauses about nodes).
_SHORT_AXIS = re.compile(r"\bshort[- ](?:axis|diameter)\D{0,30}?(\d+(?:[.,]\d+)?)\s*(mm|cm)\b", re.IGNORECASE)


def _ct_class(kind: str, region: str, node_context: bool) -> str | None:
    """The CT class a cue of ``kind`` gives ``region`` (``None``: the cue does not fit the region)."""
    if kind == "node":
        return "enlarged_node" if region in NODE_REGIONS else None
    if kind == "enlarged":
        return "enlarged_node" if region in NODE_REGIONS and node_context else "other"
    if kind == "lesion":
        return "bone_lesion" if region == "bone" else "focal_lesion"
    if kind == "parenchyma":
        return "lung_parenchymal_change" if region == "lung" else None
    if kind == "bone":
        return "bone_lesion" if region == "bone" else None
    if kind == "wall":
        return None if region == "bone" or region in NODE_REGIONS else "wall_thickening"
    return kind  # calcification, other


# ------------------------------------------------------------------------------------------------------ PET cues

_PET_ANCHOR = re.compile(
    r"\b(?:(?:fdg|tracer|radiotracer|glucose)[\s-]+)?(?:uptake|activity|avidity|accumulation|metabolism)\b"
    r"|\b(?:fdg[\s-]+)?avid\b|\bhyper-?metabolic\w*|\bhypo-?metabolic\w*|\bphotopeni\w*|\bmetabolically\s+active\b",
    re.IGNORECASE,
)
_SUV = re.compile(r"\bSUV\s*(?:max|peak)?\s*(?:of|=|:|was|is|up\s+to)?\s*(\d+(?:[.,]\d+)?)", re.IGNORECASE)
_GRADES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("mild_uptake", re.compile(r"\b(?:mild\w*|slight\w*|low[\s-]+(?:grade|level)|equivocal\w*|faint\w*|minimal\w*"
                               r"|minor|borderline|subtle|discrete|weak\w*|low-?intensity)\b", re.IGNORECASE)),
    ("marked_uptake", re.compile(r"\b(?:intense\w*|intensive\w*|marked\w*|strong\w*|high\w*|avidly|very|moderate\w*"
                                 r"|significant\w*|prominent\w*|considerabl\w*|extensive\w*|vivid\w*)\b",
                                 re.IGNORECASE)),
    ("physiological", re.compile(r"\b(?:physiologic\w*|expected|usual)\b", re.IGNORECASE)),
    (NORMAL, re.compile(r"\b(?:normal|unremarkable|symmetric\w*|homogeneous)\b", re.IGNORECASE)),
    ("reduced", re.compile(r"\b(?:reduced|decreased|diminished|low|lower|absent|photopeni\w*|hypo-?metabolic\w*"
                           r"|cold)\b", re.IGNORECASE)),
)
_UNGRADED = "increased"
_COPULA = re.compile(r"\b(?:is|are|was|were|appears?|remains?|seems?)\b(.*)", re.IGNORECASE)
_WORD = re.compile(r"[\w.-]+")


def _grade(text: str) -> str | None:
    for name, pattern in _GRADES:
        if pattern.search(text):
            return name
    return None


def _window(text: str, start: int, end: int, before: int, after: int) -> tuple[str, str]:
    """Up to ``before`` words before ``start`` and ``after`` words after ``end`` (within ``text``)."""
    left = [m for m in _WORD.finditer(text, 0, start)][-before:] if before else []
    right = [m for m in _WORD.finditer(text, end)][:after] if after else []
    return (text[left[0].start():start] if left else ""), (text[end:right[-1].end()] if right else "")


@dataclasses.dataclass(frozen=True)
class _Mention:
    """One cue of a clause: where it is, its axis, what it says and whether it counts."""

    start: int
    end: int
    axis: str
    kind: str  # CT cue kind, or the PET class
    text: str
    defaults: tuple[str, ...] = ()


def _pick_non_overlapping(spans: list[tuple[int, int, int, Any]]) -> list[tuple[int, int, Any]]:
    """Longest spans first (ties: lowest order), keeping those that overlap no span already kept."""
    kept: list[tuple[int, int, Any]] = []
    for start, end, _, item in sorted(spans, key=lambda s: (-(s[1] - s[0]), s[2], s[0])):
        if all(end <= a or start >= b for a, b, _ in kept):
            kept.append((start, end, item))
    return sorted(kept, key=lambda s: s[0])


def _region_mentions(clause: str) -> list[tuple[int, int, _RegionWord]]:
    spans = [(m.start(), m.end(), order, word) for order, word in enumerate(_REGION_WORDS)
             for m in word.pattern.finditer(clause)]
    return _pick_non_overlapping(spans)


def _clause_regions(clause: str) -> list[str]:
    """The regions a clause names (node groups for node-capable words when it speaks of nodes)."""
    mentions = _region_mentions(clause)
    node_context = bool(_NODE_CONTEXT.search(clause))
    named: list[tuple[str, bool]] = []  # (region, from a generic word)
    for index, (start, end, word) in enumerate(mentions):
        regions = word.node_regions if node_context and word.node_regions is not None else word.regions
        generic = word.generic
        if generic:  # "mediastinal and hilar" joined by a coordination is not generic
            neighbours = []
            if index + 1 < len(mentions):
                neighbours.append(clause[end:mentions[index + 1][0]])
            if index > 0:
                neighbours.append(clause[mentions[index - 1][1]:start])
            generic = not any(_COORDINATION.match(text) for text in neighbours)
        named.extend((region, generic) for region in regions)
    specific = {region for region, generic in named if not generic}
    if "hilar_nodes" in specific and "mediastinal_nodes" not in specific:
        named = [(r, g) for r, g in named if not (g and r == "mediastinal_nodes")]
    out: list[str] = []
    for region, _ in named:
        if region not in out:
            out.append(region)
    return out


def _ct_mentions(clause: str) -> list[_Mention]:
    spans = [(m.start(), m.end(), order, (kind, defaults)) for order, (kind, pattern, defaults)
             in enumerate(_CT_CUE_RES) for m in pattern.finditer(clause)]
    if _NODE_CONTEXT.search(clause):
        for m in _SHORT_AXIS.finditer(clause):
            size = float(m.group(1).replace(",", ".")) * (10.0 if m.group(2).lower() == "cm" else 1.0)
            if size >= 10.0:
                spans.append((m.start(), m.end(), len(_CT_CUE_RES), ("node", ())))
    out = []
    for start, end, (kind, defaults) in _pick_non_overlapping(spans):
        text = clause[start:end]
        if kind == "lesion" and _NODULE.match(text):
            defaults = ("lung",)
        out.append(_Mention(start, end, "ct", kind, text, defaults))
    return out


def _pet_mentions(clause: str) -> list[_Mention]:
    """PET cues of a clause: graded uptake wording, and SUV values not attached to any wording."""
    suvs = [(m.start(), m.end(), float(m.group(1).replace(",", "."))) for m in _SUV.finditer(clause)]
    used: set[int] = set()
    out: list[_Mention] = []
    for match in _PET_ANCHOR.finditer(clause):
        anchor = match.group(0).lower()
        before, after = _window(clause, match.start(), match.end(), 4, 6)
        before, after = re.split(r"[,;()]", before)[-1], re.split(r"[,;()]", after)[0]
        predicate = _COPULA.search(after)  # "uptake in the bowel is physiological"
        reduced = "hypo" in anchor or "photopeni" in anchor
        cls = "reduced" if reduced else (_grade(before) or (_grade(predicate.group(1)) if predicate else None)
                                         or _UNGRADED)
        nearest = min((i for i in range(len(suvs)) if i not in used), default=None,
                      key=lambda i: abs(suvs[i][0] - match.end()))
        if nearest is not None and abs(suvs[nearest][0] - match.end()) <= 40:
            used.add(nearest)
            if cls == _UNGRADED:
                cls = pet_class_for_suv(suvs[nearest][2])
        if cls == _UNGRADED:
            cls = "marked_uptake"
        if cls != NORMAL:  # "normal uptake" states no finding
            out.append(_Mention(match.start(), match.end(), "pet", cls, match.group(0)))
    for i, (start, end, value) in enumerate(suvs):
        if i not in used:
            out.append(_Mention(start, end, "pet", pet_class_for_suv(value), clause[start:end]))
    return out


# ------------------------------------------------------------------------------------------------------ extractor

_SKIP_SECTIONS = ("clinical_information", "technique", "comparison")
#: A structured report's line label ("LUNGS:", "Heart/mediastinum:") at the start of a sentence.
_HEADER = re.compile(r"^\s*([A-Za-z][A-Za-z /&,-]{0,40}?)\s*:\s+")


def _sentences(text: str) -> list[tuple[str, list[str]]]:
    """Sentences of the findings and impression, each with the regions of the line label in force (structured
    reports: a label such as ``LIVER:`` holds until the next label or the end of its section)."""
    from rrg3d.text.reports import split_sections, split_sentences

    out: list[tuple[str, list[str]]] = []
    for name, body in split_sections(text or "").items():
        if name in _SKIP_SECTIONS:
            continue
        context: list[str] = []
        for sentence in split_sentences(body):
            header = _HEADER.match(sentence)
            if header:
                context = _clause_regions(header.group(1))
                sentence = sentence[header.end():]
            if sentence.strip():
                out.append((sentence, context))
    return out


class RuleExtractor:
    """Region statuses of English reports by rules (see the module doc). Deterministic, no model."""

    name = "rule-v1"

    def extract(self, text: str | None) -> dict[str, dict[str, str]]:
        """``{region: {"pet": class, "ct": class}}`` for all 24 regions."""
        statuses = normal_statuses()
        for hit in self.explain(text):
            if hit["counted"]:
                current = statuses[hit["region"]]
                current[hit["axis"]] = merge_status(hit["axis"], current[hit["axis"]], hit["class"])
        return statuses

    def extract_many(self, texts: Sequence[str | None], progress: bool = False) -> list[Extraction]:
        """One :class:`Extraction` per text (``progress`` is accepted for the LLM extractor's interface)."""
        return [Extraction(self.extract(text)) for text in texts]

    def explain(self, text: str | None) -> list[dict[str, Any]]:
        """Every cue found, with its sentence, text, axis, class, region and polarity (``counted`` when it counts)."""
        from rrg3d.text.negation import polarity
        from rrg3d.text.reports import split_clauses

        hits: list[dict[str, Any]] = []
        for sentence, header_regions in _sentences(text or ""):
            clauses = [(offset, clause, _clause_regions(clause)) for offset, clause in split_clauses(sentence)]
            sentence_regions: list[str] = []
            for _, _, regions in clauses:
                sentence_regions.extend(r for r in regions if r not in sentence_regions)
            for offset, clause, regions in clauses:
                mentions = _ct_mentions(clause) + _pet_mentions(clause)
                if not mentions:
                    continue
                node_context = bool(_NODE_CONTEXT.search(clause))
                polarities = polarity(sentence, [(offset + m.start, offset + m.end) for m in mentions])
                for mention, pol in zip(mentions, polarities, strict=True):
                    for region, cls in self._targets(mention, regions, sentence_regions or header_regions,
                                                     node_context):
                        if mention.axis == "pet" and pol.uncertain and cls == "marked_uptake":
                            cls = "mild_uptake"  # hedged uptake is equivocal
                        hits.append({"sentence": sentence, "text": mention.text, "axis": mention.axis,
                                     "class": cls, "region": region, "negated": pol.negated,
                                     "uncertain": pol.uncertain, "counted": not pol.negated})
        return hits

    @staticmethod
    def _targets(mention: _Mention, clause_regions: list[str], sentence_regions: list[str],
                 node_context: bool) -> list[tuple[str, str]]:
        """(region, class) pairs a cue applies to: its clause's fitting regions, else its sentence's (or its line
        label's), else its own."""

        def fitting(regions: Iterable[str]) -> list[tuple[str, str]]:
            if mention.axis == "pet":
                return [(region, mention.kind) for region in regions]
            pairs = [(region, _ct_class(mention.kind, region, node_context)) for region in regions]
            return [(region, cls) for region, cls in pairs if cls is not None]

        if clause_regions:
            return fitting(clause_regions)
        if sentence_regions:
            return fitting(sentence_regions)
        return fitting(mention.defaults)
