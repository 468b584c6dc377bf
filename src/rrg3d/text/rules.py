"""Per-label patterns of the rule labeler: synonyms and phrasings of the 18 CT-RATE abnormalities.

A label has one or more :class:`LabelRule` s. A rule has *patterns* (regular expressions, matched
case-insensitively on one sentence; a pattern with a named group ``hit`` reports only that group as the mention,
so that context matched around it — "effusion ... in the pericardial space" — cannot swallow a negation cue),
*unless* patterns (a hit is dropped when one matches a window of the sentence around it: "subcutaneous
emphysema" is not lung emphysema) and a *sentence_unless* pattern (all hits of the rule are dropped when it
matches the sentence: a bare "effusion" in a sentence about the kidney is not a pleural effusion).

Patterns were written from radiology usage, then checked against the manual labels of the development folds of
``benchmarks/labeler.py`` (folds 1-4; fold 5 never inspected). Where those labels follow a consistent convention
narrower than radiology usage, the rules follow the labels: "Peribronchial
thickening" needs peri-bronchial wording (plain "bronchial wall thickening" is not labelled), "Lung opacity" is
ground glass or a named opacity (not "pneumonic infiltration" or "crazy paving" alone), "Pulmonary fibrotic
sequela" is post-inflammatory fibrosis and bands (honeycombing / interstitial lung disease alone are not
labelled), "fibroatelectasis" is a fibrotic sequela and not an atelectasis, and any affirmed lymph node mention
in the chest counts as "Lymphadenopathy" (also sub-centimetre nodes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rrg3d.text.labels import CTRATE_LABELS

__all__ = ["LABEL_RULES", "LabelRule"]

_W = r"[\s,/-]+"  # separators inside a noun phrase ("pleural effusion-thickening", "pleural, pericardial")
_GAP = r"[^.;:]{0,70}?"  # the rest of a clause, lazily, for "X ... in the Y" constructions

# Vessels (never the heart valves) and atherosclerotic wall changes.
_ARTERY = (r"(?:aort(?:a|ic)(?!\s+valve)|aortic\s+arch|arcus|iliac|carotid|subclavian|brachiocephalic|"
           r"supra-?aortic|innominate|vertebral\s+arter|renal\s+arter|celiac|mesenteric|femoral|"
           r"(?:main\s+|major\s+|great\s+)?(?:vascular\s+structures|vessels|arteries)(?<!coronary arteries)|"
           r"arterial\s+wall|visceral\s+arter)")
_CORONARY = r"(?:coronar\w*|\blad\b|\brca\b|\bcx\b|circumflex|left\s+anterior\s+descending|\bdiagonal\s+branch)"
_PLAQUE = (r"(?:atherom\w*|atheroscl\w*|calcif\w*|calcific|(?<!pleural )(?<!pleural calcified )"
           r"(?<!pleural calcific )plaques?)")

# A sentence about another organ that does not also name the lungs.
_NOT_LUNG = (r"^(?!.*\b(?:lungs?|pulmonary|parenchyma\w*|lingula\w*|fissur\w*|subpleural|pleural[\s-]+based|"
             r"perifissural|(?:upper|middle|lower)\s+lobes?|apical|basal)\b)"
             r".*\b(?:thyroid|liver|hepatic|breast|areola|spleen|splenic|mesenter\w*|kidneys?|renal|adrenal|schmorl|"
             r"pancrea\w*|capsul\w*|colon|omentum|peritone\w*|bone|vertebra\w*|skin|subcutaneous|axilla\w*)")


@dataclass(frozen=True)
class LabelRule:
    """Patterns of one label; a hit is dropped when an ``unless`` pattern matches around it."""

    label: str
    patterns: tuple[str, ...]
    unless: tuple[str, ...] = ()
    window: int = 40
    sentence_unless: str | None = None
    compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    compiled_unless: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    compiled_sentence_unless: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", tuple(re.compile(p, re.IGNORECASE) for p in self.patterns))
        object.__setattr__(self, "compiled_unless", tuple(re.compile(p, re.IGNORECASE) for p in self.unless))
        object.__setattr__(self, "compiled_sentence_unless",
                           re.compile(self.sentence_unless, re.IGNORECASE) if self.sentence_unless else None)

    def find(self, sentence: str) -> list[tuple[int, int]]:
        """Non-overlapping ``(start, end)`` spans of this label in a sentence, in order."""
        spans: list[tuple[int, int]] = []
        if self.compiled_sentence_unless is not None and self.compiled_sentence_unless.search(sentence):
            return spans
        for pattern in self.compiled:
            for match in pattern.finditer(sentence):
                start, end = match.span("hit") if "hit" in pattern.groupindex else match.span()
                if end <= start:
                    continue
                lo, hi = max(0, start - self.window), min(len(sentence), end + self.window)
                window = sentence[lo:hi]
                if any(u.search(window) for u in self.compiled_unless):
                    continue
                spans.append((start, end))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged


_RULES = (
    LabelRule("Medical material", (
        r"\bstents?\b|\bstent(?:ing|ed)\b|endoprosthe\w*|\bevar\b|\btevar\b",
        r"pace\s*-?makers?|pacing\s+(?:leads?|wires?|electrodes?)|defibrillator|\bicd\b|\bcrt-?d?\b|"
        r"(?:cardiac|pacemaker|metallic)\s+(?:leads?|electrodes?)|electrodes?\s+(?:of|extending|lead)",
        r"catheters?|cannula|\bport\b(?:\s*-?\s*(?:a\s*-?\s*cath|catheter|chamber|reservoir))?|\bpicc\b|"
        r"central\s+(?:venous\s+)?(?:line|access)|hemodialysis\s+(?:line|catheter)|dialysis\s+catheter",
        r"(?:sternotomy|sternal|cerclage|metallic|surgical)\s+(?:suture\s+)?(?:wires?|sutures?|materials?|clips?|"
        r"staples?)|suture\s+materials?|sternotomy\s+(?:suture|wire|material)|wire\s+sutures?|\bclips?\b|"
        r"staples?\b|\bsutures?\b(?!\s+line)",
        r"prosthe(?:sis|ses|tic)(?!\s+appearance)|(?:valve|valvular)\s+replacement|replaced\s+valve|"
        r"mechanical\s+valve|annuloplasty|valve\s+prosthe\w*|\btavi\b|\btavr\b",
        r"(?:endotracheal|tracheostomy|tracheal|nasogastric|orogastric|gastrostomy|feeding|chest|thoracostomy|"
        r"drainage|\bng|\bpeg)\s+(?:tubes?|cannula|catheter|material)|\bpeg\b|tracheostomy|\bett?\b\s+tube|"
        r"(?:drainage|drain)\s+(?:tubes?|catheters?|systems?)|\bdrains?\b|chest\s+tubes?",
        r"(?:metallic|metal|surgical|fixation|orthopedic)\s+(?:implants?|materials?|densit\w+|screws?|plates?|"
        r"fixation|rods?|devices?|foreign)|(?:screws?|plates?|rods?)\s+(?:and\s+)?(?:fixation|osteosynthesis)|"
        r"osteosynthesis|(?:vertebroplasty|kyphoplasty)|embolization\s+(?:coils?|material)|\bcoils?\b",
        r"(?:bypass|vascular|aortic)\s+grafts?|\bcabg\b|graft\s+(?:material|in\s+the\s+aorta)",
        r"(?:breast|tissue)\s+(?:implants?|expanders?)|silicone\s+implants?|mammary\s+(?:implants?|prosthe\w*)",
        r"\bvp\s+shunt|ventriculoperitoneal\s+shunt|\bfilter\b(?=[^.]{0,30}vena\s+cava)|vena\s+cava\s+filter",
    ), unless=(r"contrast\s+materials?", r"\bno\s+drain\w*\s+lymph", r"postural\s+drain")),
    LabelRule("Arterial wall calcification", (
        rf"(?P<hit>{_PLAQUE}){_GAP}{_ARTERY}",
        rf"{_ARTERY}{_GAP}(?P<hit>{_PLAQUE})",
        r"atheroscler\w*(?:\s+(?:heart|vascular)\s+disease)?|atherom\w*\s+(?:plaques?|changes?)|atheromatous",
        r"(?:aortic|vascular|arterial|mural)\s+(?:wall\s+)?calcifications?|calcified\s+aort\w*",
    ), sentence_unless=rf"^(?!.*{_ARTERY})(?=.*{_CORONARY})"),
    LabelRule("Cardiomegaly", (
        r"cardiomegal\w*|cardiac\s+enlargement|enlarge(?:d|ment\s+of\s+the)\s+(?:heart|cardiac)|enlarged\s+heart",
        r"(?:\bctr\b|cardio-?thoracic\s+(?:ratio|index)|heart\s+(?:sizes?|dimensions?|contours?)|cardiac\s+(?:size|"
        r"silhouette|dimensions?)|heart|size\s+of\s+the\s+heart)\s+(?:\w+\s+){0,3}?(?:increas\w*|enlarg\w*|"
        r"larger\s+than\s+normal)",
        r"(?:increas\w*|enlarg\w*)\s+(?:in\s+|of\s+)?(?:the\s+)?(?:\w+\s+)?(?:\bctr\b|cardio-?thoracic\s+"
        r"(?:ratio|index)|heart\s+(?:sizes?|dimensions?)|size\s+of\s+the\s+heart|cardiac\s+(?:size|silhouette))",
        r"(?:biventricular|left\s+ventricular|right\s+ventricular|biatrial|atrial|cardiac\s+chamber)\s+"
        r"(?:enlargement|dilat\w+)|(?:dilated|enlarged)\s+(?:cardiac\s+chambers?|cardiac\s+cavities|(?:left|right)\s+"
        r"(?:ventricle|atrium))",
    )),
    LabelRule("Pericardial effusion", (
        rf"pericardial(?:{_W}(?:or|and|thickening|pleural|minimal|mild|slight|small|significant)){{0,3}}{_W}"
        r"(?:effusions?|fluid)",
        r"(?:effusion|fluid)(?:\s+(?:was|is|were))?\s+(?:\w+\s+){0,2}(?:in|within|into)\s+the\s+pericardi\w*",
        r"pericardial\s+(?:space|cavity|recess\w*)[^.;]{0,30}(?P<hit>effusion|fluid)",
        r"(?P<hit>effusion|fluid)[^.;]{0,80}?pericardi",
        r"hemopericardium|pericardial\s+(?:thickening\s*-\s*)?effusion|pericardial\s+tamponade",
    )),
    LabelRule("Coronary artery wall calcification", (
        rf"(?P<hit>{_PLAQUE})[^.;:]{{0,120}}?{_CORONARY}",
        rf"{_CORONARY}{_GAP}(?P<hit>{_PLAQUE})",
        r"coronary\s+(?:artery\s+)?(?:disease|atheroscl\w*)",
    )),
    LabelRule("Hiatal hernia", (
        r"hiat(?:al|us)\s+hernia\w*|(?:sliding|paraesophageal|para-esophageal)(?:\s+type)?(?:\s+\w+)?\s+hernia\w*|"
        r"hernia\w*\s+(?:of\s+the\s+stomach\s+)?(?:through|at|in)\s+the\s+(?:esophageal\s+)?hiatus|"
        r"(?:diaphragmatic|hiatal)\s+hernia\w*[^.;]{0,90}(?:esophag|gastroesophag)|"
        r"esophag\w*\s+hiatus[^.;]{0,30}(?:widen\w*|hernia\w*|herniat\w*)|intrathoracic\s+stomach",
    )),
    LabelRule("Lymphadenopathy", (
        r"lymphadenopath\w*|\bl\.?a\.?p\.?s?\b|adenopath\w*|\blaps?\b",
        r"lymph\s*-?\s*nodes?|lymph\s+nod\w*|\blns?\b",
        r"(?:hilar|mediastinal|paratracheal|subcarinal|axillary|prevascular|supraclavicular)\s+(?:\w+\s+)?"
        r"(?:nodes?|adenopath\w*|conglomerat\w*)",
    ), unless=(r"lymph\s+nodes?\s+stations?", r"(?:subpleural|intrapulmonary|fissur\w*|perifissural|intramammary)\s+"
               r"(?:\w+\s+)?lymph",
               r"(?:intraabdominal|intra-abdominal|abdominal|inguinal|retroperitoneal|paraaortic|mesenteric|"
               r"pelvic|iliac|celiac|periportal|upper\s+abdominal)\s+(?:and\s+(?:bilateral\s+)?\w+\s+)?"
               r"(?:pathological\s+size\s+and\s+appearance\s+of\s+)?(?:lymph|\w+\s+lymph)",)),
    LabelRule("Emphysema", (
        r"emphysem\w*|\bbullae\b|\bbulla\b|bullous|\bblebs?\b|(?:centri|panlobular|paraseptal|centro)\w*\s+"
        r"(?:emphysem\w*|changes?)|hyperinflat\w*|hyperaerat\w*|increased\s+aeration",
    ), unless=(r"(?:subcutaneous|soft\s+tissue|mediastinal|interstitial|surgical|subcutan\w*|chest\s+wall|"
               r"pectoral|axillary)\s+(?:\w+\s+)?emphysem", r"emphysem\w*\s+(?:is\s+|was\s+)?(?:\w+\s+){0,3}"
               r"(?:in\s+the\s+)?(?:subcutaneous|soft\s+tissue|mediastin\w*|fatty\s+planes|chest\s+wall)",
               r"free\s+air[^.]{0,40}emphysem")),
    LabelRule("Atelectasis", (
        r"(?<!fibro)(?<!fibro-)atelecta\w*|dystelecta\w*|(?:lobar|segmental|subsegmental|passive|compressive|"
        r"rounded|round)\s+collapse|collapse\w*\s+(?:of\s+the\s+)?(?:\w+\s+){0,3}(?:lobe|lung|segment)",
    )),
    LabelRule("Lung nodule", (
        r"(?:micro-?)?nodul(?:e|es|i)\b|(?:micro-?)?nodular\s+(?:lesions?|opacit\w+|densit\w+|(?:ground[\s-]+glass\s+)?"
        r"areas?|foc\w+|appearances?|formations?|shadows?|structures?|infiltrat\w*)|micronodul\w*",
        r"\b(?:pulmonary|lung|parenchymal)\s+(?:mass|masses|lesions?)\b|\bgranulom\w*|tree[\s-]+in[\s-]+bud",
    ), unless=(r"\b(?:thyroid|adrenal|liver|hepatic|renal|kidney|breast|splenic|pleural|subcutaneous|lymph|schmorl)"
               r"\s+(?:\w+\s+){0,2}nodul",),
        sentence_unless=_NOT_LUNG),
    # In the CT-RATE annotations an opacity is ground glass or a named opacity; "infiltration" alone (mostly
    # "pneumonic infiltration", an interpretation) and "crazy paving" alone are not labelled as one.
    LabelRule("Lung opacity", (
        r"opacit\w*|ground[\s-]*glass\w*|\bggos?\b|frosted[\s-]+glass|haz(?:y|iness)|alveolar\s+(?:filling|pattern)",
    ), unless=(r"ground[\s-]*glass\s+(?:density\s+)?(?:\w+\s+)?nodul", r"(?:nodular|acinar)\s+opacit",
               r"(?:breast|soft\s+tissue|subcutaneous|bone|liver)\s+(?:\w+\s+){0,2}opacit"), window=30),
    # A bare density increase counts in a sentence about the lungs that gives it no other name.
    LabelRule("Lung opacity", (
        r"(?:density|densities)\s+increase\w*|increase\w*\s+(?:in\s+)?(?:\w+\s+)?densit\w*|"
        r"(?:patchy|reticulonodular)\s+densit\w+|hyperdens\w*\s+(?:areas?|foci|zones?)",
    ),
        sentence_unless=r"sequel|atelecta|consolidat|fibro|scar|pleuro-?\s*parenchymal|pleural\s+parenchymal|linear|band|"
                       r"nodul|fat|skin|soft\s+tissue|breast|perirenal|perinephric|mediastin|inguinal|abdom|liver|"
                       r"hepat|bone|vertebra|kidney|spleen|thym|muscle|metallic|peribronch|^(?!.*(?:lung|lobe|lingul|"
                       r"parenchym|pulmonary|segment|subpleural))"),
    LabelRule("Pulmonary fibrotic sequela", (
        r"fibrot\w*|fibrosis|fibrous\s+(?:bands?|strands?|changes?|scar\w*|densit\w+|traces?|stripes?|lines?)|"
        r"fibro[\s-]*atel\w*|(?:parenchymal|fibrous|fibrotic|linear|subpleural|pleuroparenchymal)\s+bands?|"
        r"\bbands?\s+(?:of\s+)?(?:fibrosis|atelectasis)|sequel\w*|\bscar\w*|cicatri\w*|"
        r"pleuro-?\s*parenchymal\s+(?:\w+\s+)?(?:densit\w*|recession\w*|retraction\w*|changes?|thicken\w*)",
    ), unless=(r"(?:renal|kidneys?|liver|hepatic|breast|myocard\w*|bones?|cerebral|postoperative|incision\w*|skin|"
               r"operation|fracture|humer\w*|spleen|splenic|lymph|calcific|pyelonephritis|treatments?|costa\w*|"
               r"rib|vertebra\w*)\s+(?:\w+\s+){0,3}(?:sequel|scar|fibro)",
               r"(?:sequel|scar)\w*\s+(?:\w+\s+){0,3}(?:in|of|to)\s+the\s+(?:both\s+|left\s+|right\s+)?(?:\w+\s+)?"
               r"(?:kidneys?|liver|breast|bones?|skin|spleen|humerus|mediastinum|perirenal|lymph|ribs?|costa\w*)",
               r"(?:sequel|fibrot)\w*\s+(?:\w+\s+){0,2}(?:lymph|treatments?)",
               r"(?:cirrho|portal|pancrea|retroperitone|mesenter|perigastric|breast)\w*\s+(?:\w+\s+){0,4}"
               r"(?:fibro|sequel)")),
    LabelRule("Pleural effusion", (
        rf"pleural(?:{_W}(?:or|and|pericardial|thickening|minimal|mild|slight|small|massive|free|loculated)){{0,3}}"
        rf"{_W}(?:effusions?|fluid)",
        r"hydro-?(?:pneumo|pnomo)?-?thora\w*|hemo-?thora\w*|empyema|pyothora\w*|chylothora\w*|"
        r"hydropneumo\w*|hydropnomo\w*",
    ), unless=(r"(?:joint|knee|shoulder|subdeltoid|bursa\w*)\s+(?:\w+\s+){0,3}effusion",), window=12),
    # A bare "effusion" is pleural when the sentence places it in the chest and names no other space.
    LabelRule("Pleural effusion", (
        r"(?P<hit>effusion|fluid|collection)\w*[^.;]{0,60}?(?:pleural\s+(?:space|cavity|sinus)|hemithora\w+|"
        r"costophrenic|sinus(?:es)?\b)",
        r"(?:bilateral|left|right|left-sided|right-sided|minimal|mild|small|moderate|massive|large)\s+"
        r"(?:\w+\s+){0,2}effusions?",
        r"\beffusions?\b(?:\s+(?:\w+\s+){0,3}(?:on|in)\s+the\s+(?:right|left|both|bilateral))",
    ), sentence_unless=r"pericardi|kidney|renal|perirenal|perinephric|abdom|pelvi|spleen|splenic|subcapsular|"
                       r"liver|hepatic|perihepatic|joint|knee|shoulder|hip\b|bursa|ascites|peritone"),
    LabelRule("Mosaic attenuation pattern", (
        r"mosaic\w*(?:\s+(?:attenuation|perfusion|pattern|oligemia|appearance))?|air[\s-]+trapping|"
        r"(?:heterogeneous|inhomogeneous)\s+(?:lung\s+)?(?:attenuation|aeration|parenchymal\s+density)",
    )),
    # The CT-RATE annotations keep this label for peri-bronchial wording: "bronchial wall thickening" alone is not it.
    LabelRule("Peribronchial thickening", (
        r"peri-?bronch\w*\s+(?:\w+\s+){0,4}(?:thick\w*|cuffing)|"
        r"(?:thicken\w*|thickness\s+increase\w*|increase\w*\s+in\s+(?:the\s+)?(?:\w+\s+)?thickness)\s+"
        r"(?:\w+\s+){0,5}?peri-?bronch\w*|peri-?bronch\w*\s+(?:areas?\s+of\s+)?(?:increased\s+)?densit\w*",
    )),
    LabelRule("Consolidation", (
        r"consolidat\w*|air\s+bronchogram\w*|lobar\s+pneumonia",
    )),
    LabelRule("Bronchiectasis", (
        r"bronchiect\w*|bronchiolectas\w*|(?:bronchial|bronchus|bronchi)\s+(?:\w+\s+)?(?:dilatation|dilation|"
        r"dilated|ectasia)|(?:dilated|ectatic)\s+(?:\w+\s+)?(?:bronchi|bronchus|bronchial|bronchioles?)|"
        r"dilatation\s+of\s+the\s+(?:\w+\s+)?bronch\w*",
    )),
    LabelRule("Interlobular septal thickening", (
        r"(?:(?:interlobular|interlobar|intralobular)[\s-]+(?:and\s+|or\s+)?(?:intralobular[\s-]+)?)?septal\s+"
        r"(?:\w+\s+){0,2}thick\w*|thicken\w*\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+)?(?:interlobular\s+)?sept(?:a|al|um)\b|"
        r"interlobular\s+(?:\w+\s+){0,2}thicken\w*|kerley|interlobular\s+sept\w*|"
        r"septal\s+lines?|interstiti\w*\s+(?:\w+\s+){0,2}thicken\w*|thicken\w*\s+(?:in\s+|of\s+)?(?:the\s+)?"
        r"interstiti\w*(?:\s+elements?)?",
    ), unless=(r"peri-?bronch\w*\s+(?:\w+\s+)?interstiti",)),
)

#: The label rules in CT-RATE column order (a label may have several rules).
LABEL_RULES: tuple[LabelRule, ...] = tuple(sorted(_RULES, key=lambda r: CTRATE_LABELS.index(r.label)))
assert {r.label for r in LABEL_RULES} == set(CTRATE_LABELS)
