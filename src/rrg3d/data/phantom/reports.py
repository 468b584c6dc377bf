"""Report text for phantom cases: findings, impression and region reports written from a :class:`Case`.

The writer reads only the case's :class:`~rrg3d.data.phantom.model.Finding` list and anatomy, so the text states
exactly the case's abnormalities: one or more sentences per finding (side, lobes, size, severity, count, sub-type
and PET SUVmax where known, worded "intense" from the PETRG marked-uptake SUVmax and "mildly increased" below it),
simple negations for some absent abnormalities, and normal-organ statements; a PET case with
:class:`~rrg3d.data.phantom.model.PetFacts` also names its organs with physiological uptake, in every style. The
phrasing varies with the random generator, and the layout with the reporting style ("hospital"):

- ``hospital_a``: long organ-by-organ narrative with many normal structures and negations;
- ``hospital_b``: short structured lines per organ system and a numbered impression;
- ``hospital_c``: terse, impression first, few negations.

All template text is written for rrg3d. Optionally a :class:`SentenceBank` mined at run time from real labelled
reports (never stored in the repository) supplies some sentences of the narrative style, so that the text reads
more like a real report corpus. Every mined sentence is checked with the abnormality labeler when the bank is
built: it is used only where its labels are exactly the intended ones. Mined *positive* sentences are kept only
when they carry no side, lobe, size, grade, count or sub-type words (nothing is substituted into them); the
case's own details then follow in a templated sentence that names no abnormality ("It is small, 3.5 cm across."),
so a mined sentence can never contradict the case.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrg3d.data.phantom.model import LOBES, REGIONS, STYLES, Case, Finding
from rrg3d.text.labels import CTRATE_LABELS
from rrg3d.text.petrg import pet_class_for_suv

__all__ = ["PhantomReport", "SentenceBank", "format_size", "lobes_phrase", "write_report"]


@dataclasses.dataclass
class PhantomReport:
    """A generated report.

    Attributes:
        text: the full report, ``"Findings: ... Impression: ..."`` (order and layout depend on the style).
        sections: ``{"findings": ..., "impression": ...}`` without the headers.
        region_reports: one text for every region of :data:`~rrg3d.data.phantom.model.REGIONS`: the sentences
            about the region's findings, or a normal statement.
        lobe_reports: one text for every lung lobe of :data:`~rrg3d.data.phantom.model.LOBES` (the lung findings
            that involve the lobe, or a normal statement).
    """

    text: str
    sections: dict[str, str]
    region_reports: dict[str, str]
    lobe_reports: dict[str, str] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# small wording helpers

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen")


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _sentence(text: str) -> str:
    """Capitalised, single-spaced, ending with a full stop."""
    text = " ".join(text.split()).strip()
    text = _cap(text)
    return text if text.endswith((".", "!", "?")) else text + "."


def _join(items: Sequence[str], conj: str = "and") -> str:
    items = [item for item in items if item]
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conj} {items[-1]}"


def _count_word(n: int, words: bool = True) -> str:
    return _NUMBER_WORDS[n] if words and 0 <= n < len(_NUMBER_WORDS) else str(n)


def _article(phrase: str) -> str:
    """``a`` or ``an`` for the phrase that follows (numbers read aloud: "an 8 mm", "an 11 mm", "a 1.2 cm")."""
    first = phrase.split()[0] if phrase.split() else ""
    match = re.match(r"(\d+)", first)
    if match:
        digits = match.group(1)
        return "an" if digits.startswith("8") or digits in ("11", "18") else "a"
    return "an" if first[:1].lower() in "aeio" else "a"


def format_size(mm: float, unit: str | None = None) -> str:
    """A size as a radiologist writes it: ``"8 mm"`` below 1 cm, ``"1.2 cm"`` above (``unit="mm"`` forces mm)."""
    if unit == "mm" or mm < 9.5:
        return f"{max(1, round(mm))} mm"
    text = f"{round(mm / 10, 1):.1f}".rstrip("0").rstrip(".")
    return f"{text} cm"


def lobes_phrase(lobes: Iterable[str]) -> str:
    """``["right upper lobe", "right lower lobe"]`` → ``"the right upper and lower lobes"``."""
    lobes = [lobe for lobe in LOBES if lobe in set(lobes)]
    parts = []
    for side in ("right", "left"):
        levels = [lobe.split()[1] for lobe in lobes if lobe.startswith(side)]
        if len(levels) == 1:
            parts.append(f"the {side} {levels[0]} lobe")
        elif levels:
            parts.append(f"the {side} {_join(levels)} lobes")
    return " and ".join(parts)


def _where(finding: Finding, lung: bool = True) -> str:
    """``"in the right upper lobe"``, ``"in both lungs"``, ``"in the left lung"`` or ``""``."""
    if finding.lobes:
        return "in " + lobes_phrase(finding.lobes)
    if finding.side == "bilateral":
        return "in both lungs" if lung else "bilaterally"
    if finding.side:
        return f"in the {finding.side} lung" if lung else f"on the {finding.side}"
    return ""


def _short_where(finding: Finding) -> str:
    """Compact location for structured lines: ``"right upper and lower lobes"``, ``"both lungs"``."""
    where = _where(finding)
    return where[3:].removeprefix("the ") if where.startswith("in ") else where


_SEVERITY = {"mild": "mild", "moderate": "moderate", "severe": "severe"}
_AMOUNT = {"mild": "small", "moderate": "moderate", "severe": "large"}


def _sev(finding: Finding, table: dict[str, str] = _SEVERITY, default: str = "") -> str:
    return table.get(finding.severity or "", default)


def _marked(suv_max: float) -> bool:
    """Whether uptake with this SUVmax is marked (PETRG; below: mild or equivocal), so the wording says so."""
    return pet_class_for_suv(suv_max) == "marked_uptake"


def _suv(finding: Finding, lead: str = ", with") -> str:
    if finding.suv_max is None:
        return ""
    grade = "intense" if _marked(finding.suv_max) else "mildly increased"
    return f"{lead} {grade} FDG uptake (SUVmax {finding.suv_max:.1f})"


def _hyper(suv_max: float) -> str:
    return "hypermetabolic" if _marked(suv_max) else "mildly hypermetabolic"


def _size(finding: Finding, unit: str | None) -> str:
    return format_size(finding.size_mm, unit) if finding.size_mm is not None else ""


# --------------------------------------------------------------------------------------------------------------
# what is said about each finding


@dataclasses.dataclass
class _Text:
    """Ways of stating one finding: a narrative sentence, a short structured sentence, an impression phrase."""

    long: str
    short: str
    impression: str


_Writer = Callable[[Finding, np.random.Generator, "str | None"], _Text]

_MATERIAL = {
    "pacemaker": (
        ["A cardiac pacemaker is present, with its generator in the {side} chest wall and leads in the right heart"
         " chambers.",
         "A pacemaker generator lies in the {side} infraclavicular subcutaneous tissue; its leads end in the right"
         " atrium and right ventricle."],
        "Pacemaker in situ, generator on the {side}.", "Cardiac pacemaker in situ"),
    "sternotomy wires": (
        ["Median sternotomy wires are present.", "Sternal wires from a previous median sternotomy are noted.",
         "The sternum is closed with sternotomy wires."],
        "Sternotomy wires.", "Median sternotomy wires"),
    "port catheter": (
        ["A port catheter is present in the {side} anterior chest wall, its tip in the superior vena cava.",
         "A central venous port is seen on the {side}, with the catheter tip in the superior vena cava."],
        "Port catheter on the {side}, tip in the SVC.", "Central venous port catheter"),
    "aortic stent": (
        ["A stent graft is seen in the descending thoracic aorta.",
         "An endovascular stent graft lines the descending aorta."],
        "Aortic stent graft.", "Aortic stent graft in place"),
}


def _medical_material(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    kind = f.kind
    if kind is None:
        return _Text("Surgical material is present in the chest.", "Surgical material in the chest.",
                     "Surgical material in the chest")
    if kind in _MATERIAL:
        longs, short, impression = _MATERIAL[kind]
        default_side = "right" if kind == "port catheter" else "left"
        side = f.side if f.side in ("right", "left") else default_side
        return _Text(_pick(rng, longs).format(side=side), short.format(side=side), impression)
    return _Text(f"{_cap(_article(kind))} {kind} is present in the chest.", f"{_cap(kind)} in situ.",
                 f"{_cap(kind)} in situ")


def _arterial(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    vessel = str(f.detail.get("vessel", "aorta"))
    vessel_name = "thoracic aorta" if vessel == "aorta" else vessel
    sev = _sev(f, {"mild": "mild", "moderate": "moderate", "severe": "extensive"})
    plaques = f"{_count_word(f.count)} calcified atherosclerotic plaques" if f.count and f.count > 1 else ""
    options = [
        f"Atherosclerotic calcifications are present in the wall of the {vessel_name}.",
        f"There is {sev or 'some'} atherosclerotic calcification in the wall of the {vessel_name}.",
    ]
    if plaques:
        options.append(f"{_cap(plaques)} are seen along the wall of the {vessel_name}.")
    wall = "aortic wall" if vessel == "aorta" else f"{vessel} wall"
    short = f"{_cap(sev + ' ' if sev else '')}{wall} calcification."
    return _Text(_pick(rng, options), short, f"{_cap(sev + ' ' if sev else '')}atherosclerotic calcification of the"
                 f" {vessel_name}")


def _cardiomegaly(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    ratio = f.detail.get("cardiothoracic_ratio")
    if ratio is None and f.size_mm is not None:
        ratio = f.size_mm / 100
    sev = _sev(f, {"mild": "mild", "moderate": "moderate", "severe": "marked"})
    ctr = f"{float(ratio):.2f}" if ratio is not None else ""
    options = [f"There is {sev + ' ' if sev else ''}cardiomegaly" + (f", with a cardiothoracic ratio of {ctr}." if ctr
                                                                    else ".")]
    if ctr:
        options.append(f"Cardiomegaly is present (cardiothoracic ratio {ctr}).")
        options.append(f"The heart is enlarged (cardiomegaly), with a cardiothoracic ratio of {ctr}.")
    short = f"{_cap(sev + ' ' if sev else '')}cardiomegaly" + (f" (CTR {ctr})." if ctr else ".")
    return _Text(_pick(rng, options), short, f"{_cap(sev + ' ' if sev else '')}cardiomegaly")


def _pericardial(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    amount = _sev(f, _AMOUNT)
    size = _size(f, unit)
    art = _article(amount) if amount else "a"
    options = [f"There is {art} {amount} pericardial effusion" + (f" measuring {size} in maximal thickness." if size
                                                                 else ".")]
    if size:
        options.append(f"A pericardial effusion with a maximal thickness of {size} is present.")
        options.append(f"Pericardial effusion is seen, {size} thick.")
    short = f"{_cap(amount + ' ' if amount else '')}pericardial effusion" + (f" ({size})." if size else ".")
    return _Text(_pick(rng, options), short, f"{_cap(amount + ' ' if amount else '')}pericardial effusion")


_CORONARY = {"LAD": "left anterior descending", "RCA": "right coronary", "LCx": "circumflex", "LM": "left main"}


def _coronary(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    vessels = [str(v) for v in f.detail.get("vessels", [])]
    names = [_CORONARY.get(v, v) for v in vessels]
    sev = _sev(f)
    options = [f"There is {sev + ' ' if sev else ''}coronary artery calcification."]
    if names:
        arteries = "arteries" if len(names) > 1 else "artery"
        options.append(f"There is {sev + ' ' if sev else ''}coronary artery calcification involving the"
                       f" {_join(names)} {arteries}.")
        options.append(f"Calcified plaques are present in the coronary arteries ({_join(vessels)}).")
    short = f"{_cap(sev + ' ' if sev else '')}coronary artery calcification" + (
        f" ({', '.join(vessels)})." if vessels else ".")
    return _Text(_pick(rng, options), short, f"{_cap(sev + ' ' if sev else '')}coronary artery calcification")


def _hiatal(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    amount = _sev(f, {"mild": "small", "moderate": "moderate-sized", "severe": "large"})
    size = _size(f, unit)
    options = [f"There is {_article(amount or 'a')} {amount + ' ' if amount else ''}sliding hiatal hernia"
               + (f" measuring {size}." if size else ".")]
    if size:
        options.append(f"A hiatal hernia of {size} is present.")
        options.append(f"Part of the stomach has herniated through the esophageal hiatus, forming a hiatal hernia"
                       f" of {size}.")
    short = f"{_cap(amount + ' ' if amount else '')}hiatal hernia" + (f" ({size})." if size else ".")
    return _Text(_pick(rng, options), short, f"{_cap(amount + ' ' if amount else '')}hiatal hernia")


_NODE_SIDE = {"right": "on the right", "left": "on the left", "bilateral": "on both sides"}


def _lymphoma(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    """The lymphoma-like pattern of PET cases: a lead sentence, then one sentence (or item) per node."""
    nodes = f.detail["nodes"]
    n = len(nodes)
    each = [f"An enlarged {node['station']} lymph node measures {format_size(node['size_mm'], unit)} in short axis,"
            f" with {'intense' if _marked(node['suv_max']) else 'mildly increased'} FDG uptake"
            f" (SUVmax {node['suv_max']:.1f})." for node in nodes]
    lead = _pick(rng, [f"Hypermetabolic lymphadenopathy is seen at {_count_word(n)} nodal stations.",
                       f"There are enlarged, FDG-avid lymph nodes at {_count_word(n)} nodal stations."])
    items = "; ".join(f"{node['station']} {format_size(node['size_mm'], 'mm')}, SUVmax {node['suv_max']:.1f}"
                      for node in nodes)
    short = f"Hypermetabolic lymphadenopathy at {n} stations: {items}."
    stations = ", ".join(node["station"] for node in nodes)
    top = max(node["suv_max"] for node in nodes)
    impression = f"{_cap(_hyper(top))} lymphadenopathy at {_count_word(n)} nodal stations ({stations}), SUVmax up to" \
                 f" {top:.1f}"
    return _Text(" ".join([lead, *each]), short, impression)


def _lymph(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    if f.detail.get("nodes"):
        return _lymphoma(f, rng, unit)
    stations = [str(s) for s in f.detail.get("stations", [])]
    group = f.kind if f.kind and f.kind not in stations else "mediastinal"
    count = f.count or max(1, len(stations))
    size = _size(f, unit)
    largest = f", the largest measuring {size} in short axis" if size else ""
    suv = _suv(f)
    if stations:
        place = f"in the {_join(stations)} {'station' if len(stations) == 1 else 'stations'}"
    else:
        place = _NODE_SIDE.get(f.side or "", "")
    loc = f" {place}" if place else ""
    if count == 1:
        options = [f"An enlarged {stations[0] if stations else group} lymph node"
                   + (f" measures {size} in short axis" if size else " is present")
                   + ("" if stations else loc) + f"{suv}."]
        options.append(f"There is an enlarged {group} lymph node{loc}"
                       + (f", {size} in short axis" if size else "") + f"{suv}.")
    else:
        n = _count_word(count)
        options = [f"{_cap(n)} enlarged lymph nodes are present{loc}{largest}{suv}.",
                   f"There is {group} lymphadenopathy{loc} ({n} nodes){largest}{suv}."]
    parts = [", ".join(stations)] if stations else ([f"{f.side}"] if f.side else [])
    if count > 1:
        parts.append(f"{count} nodes")
    if size:
        parts.append(f"up to {size}")
    short = f"{_cap(group)} lymphadenopathy" + (f" ({'; '.join(parts)})" if parts else "") + _suv(f, ",") + "."
    hyper = f"{_cap(_hyper(f.suv_max))} " if f.suv_max is not None else ""
    impression = f"{hyper}{group} lymphadenopathy" + (f" ({', '.join(stations)})" if stations else "") + (
        f" (SUVmax {f.suv_max:.1f})" if f.suv_max is not None else "")
    return _Text(_pick(rng, options), short, _cap(impression))


def _emphysema(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    sev = _sev(f)
    kind = f.kind or ""
    adj = " ".join(x for x in (sev, kind) if x)
    where = _where(f)
    options = [f"{_cap(adj + ' ' if adj else '')}emphysema is present" + (f", most pronounced {where}." if where
                                                                        else ".")]
    options.append(f"There is {adj + ' ' if adj else ''}emphysema" + (f" {where}." if where else "."))
    short = f"{_cap(adj + ' ' if adj else '')}emphysema" + (f", {_short_where(f)}." if where else ".")
    return _Text(_pick(rng, options), short, f"{_cap(adj + ' ' if adj else '')}emphysema")


def _atelectasis(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    kind = f.kind or ""
    where = _where(f)
    if kind == "lobar":
        options = [f"There is lobar atelectasis {where}." if where else "There is lobar atelectasis.",
                   f"Lobar atelectasis is seen {where}." if where else "Lobar atelectasis is seen."]
    else:
        k = kind + " " if kind else ""
        options = [f"{_cap(k)}atelectasis is seen {where}." if where else f"{_cap(k)}atelectasis is seen.",
                   f"There is plate-like {k}atelectasis {where}." if where else f"There is plate-like {k}atelectasis."]
    short = f"{_cap(kind + ' ' if kind else '')}atelectasis" + (f", {_short_where(f)}." if where else ".")
    impression = f"{_cap(kind + ' ' if kind else '')}atelectasis" + (f" {where}" if where else "")
    return _Text(_pick(rng, options), short, impression)


def _nodule(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    count = f.count or 1
    kind = f.kind + " " if f.kind else ""
    size = _size(f, unit)
    where = _where(f)
    suv = _suv(f)
    loc = f" {where}" if where else ""
    if count == 1:
        options = [f"There is {_article(kind or 'a')} {kind}pulmonary nodule" + (f" measuring {size}" if size else "")
                   + f"{loc}{suv}."]
        if size:
            options.append(f"{_cap(_article(size))} {size} {kind}nodule is seen{loc}{suv}.")
        if where:
            options.append(f"{_cap(where)} there is {_article(kind or 'a')} {kind}nodule"
                           + (f" of {size}" if size else "") + f"{suv}.")
        short = f"{_cap(size + ' ' if size else '')}{kind}nodule" + (f", {_short_where(f)}" if where else "")
        impression = f"{_cap(size + ' ' if size else '')}{kind}pulmonary nodule{loc}"
    else:
        n = _count_word(count)
        largest = f", the largest measuring {size}" if size else ""
        options = [f"{_cap(n)} {kind}pulmonary nodules are present{loc}{largest}{suv}.",
                   f"There are {n} {kind}nodules{loc}" + (f", up to {size} in diameter" if size else "") + f"{suv}."]
        short = f"{count} {kind}nodules" + (f", {_short_where(f)}" if where else "") + (
            f", largest {size}" if size else "")
        impression = f"{_cap(n)} {kind}pulmonary nodules{loc}" + (f" (largest {size})" if size else "")
    short += _suv(f, ",") + "."
    if f.suv_max is not None:
        impression += f", {_hyper(f.suv_max)} (SUVmax {f.suv_max:.1f})"
    return _Text(_pick(rng, options), short, impression)


def _opacity(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    sev = _sev(f)
    where = _where(f)
    loc = f" {where}" if where else ""
    if f.kind in (None, "ground-glass", "ground glass"):
        sev = _sev(f, {"mild": "faint", "moderate": "patchy", "severe": "extensive"})
        options = [f"Ground-glass opacities are seen{loc}.",
                   f"There are {sev + ' ' if sev else ''}areas of ground-glass opacity{loc}.",
                   f"Patchy ground-glass opacity is present{loc}."]
        name = "ground-glass opacity"
    else:
        options = [f"{_cap(f.kind)} opacities are seen{loc}.", f"There is {f.kind} opacity{loc}."]
        name = f"{f.kind} opacity"
    short = f"{_cap(name)}" + (f", {_short_where(f)}." if where else ".")
    impression = f"{_cap(sev + ' ' if sev else '')}{name}{loc}"
    return _Text(_pick(rng, options), short, impression)


def _fibrotic(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    where = _where(f)
    loc = f" {where}" if where else ""
    options = [f"Fibrotic sequelae are seen{loc}.", f"There are linear fibrotic changes{loc}.",
               f"Sequelae fibrotic bands are present{loc}."]
    short = "Fibrotic sequelae" + (f", {_short_where(f)}." if where else ".")
    return _Text(_pick(rng, options), short, f"Fibrotic sequelae{loc}")


def _pleural(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    amount = _sev(f, _AMOUNT)
    size = _size(f, unit)
    if f.side == "bilateral":
        options = ["Bilateral pleural effusions are present" + (f", up to {size} in depth." if size else "."),
                   f"There are {amount + ' ' if amount else ''}pleural effusions on both sides"
                   + (f", the deeper measuring {size}." if size else ".")]
        name = "bilateral pleural effusions"
    else:
        side = f"{f.side} " if f.side else ""
        adj = " ".join(x for x in (amount, f.side or "") if x)
        options = [f"There is {_article(adj or 'a')} {adj + ' ' if adj else ''}pleural effusion"
                   + (f" measuring {size} in depth." if size else "."),
                   f"{_cap(_article(side or 'a'))} {side}pleural effusion is present"
                   + (f", {size} at its deepest point." if size else ".")]
        name = f"{side}pleural effusion"
    short = f"{_cap(amount + ' ' if amount else '')}{name}" + (f" ({size})." if size else ".")
    return _Text(_pick(rng, options), short, f"{_cap(amount + ' ' if amount else '')}{name}")


def _mosaic(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    sev = _sev(f)
    where = _where(f) or "in both lungs"
    options = [f"A mosaic attenuation pattern is seen {where}.",
               f"There is {sev + ' ' if sev else ''}mosaic attenuation of the lung parenchyma {where}.",
               "The lungs show a mosaic attenuation pattern" + ("." if where == "in both lungs" else f" {where}.")]
    short = f"{_cap(sev + ' ' if sev else '')}mosaic attenuation pattern, {_short_where(f) or 'both lungs'}."
    return _Text(_pick(rng, options), short, f"{_cap(sev + ' ' if sev else '')}mosaic attenuation pattern")


def _peribronchial(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    sev = _sev(f)
    where = _where(f)
    loc = f" {where}" if where else ""
    options = [f"Peribronchial thickening is seen{loc}.",
               f"There is {sev + ' ' if sev else ''}peribronchial thickening{loc}."]
    if where:
        options.append(f"Peribronchial thickening is noted, most marked {where}.")
    short = f"{_cap(sev + ' ' if sev else '')}peribronchial thickening" + (f", {_short_where(f)}." if where else ".")
    return _Text(_pick(rng, options), short, f"{_cap(sev + ' ' if sev else '')}peribronchial thickening{loc}")


def _consolidation(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    size = _size(f, unit)
    where = _where(f)
    loc = f" {where}" if where else ""
    suv = _suv(f)
    options = [f"There is an area of consolidation{loc}" + (f" measuring {size}" if size else "") + f"{suv}.",
               f"Consolidation is seen{loc}" + (f", spanning {size}" if size else "") + f"{suv}."]
    if size:
        options.append(f"{_cap(_article(size))} {size} area of consolidation with air bronchograms is present{loc}"
                       f"{suv}.")
    short = "Consolidation" + (f", {_short_where(f)}" if where else "") + (f" ({size})" if size else "") + _suv(
        f, ",") + "."
    impression = f"Consolidation{loc}" + (f" (SUVmax {f.suv_max:.1f})" if f.suv_max is not None else "")
    return _Text(_pick(rng, options), short, impression)


def _bronchiectasis(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    sev = _sev(f)
    kind = f.kind or ""
    adj = " ".join(x for x in (sev, kind) if x)
    where = _where(f)
    loc = f" {where}" if where else ""
    options = [f"{_cap(adj + ' ' if adj else '')}bronchiectasis is present{loc}.",
               f"There is {kind + ' ' if kind else ''}bronchiectasis{loc}."]
    short = f"{_cap(adj + ' ' if adj else '')}bronchiectasis" + (f", {_short_where(f)}." if where else ".")
    return _Text(_pick(rng, options), short, f"{_cap(adj + ' ' if adj else '')}bronchiectasis{loc}")


def _septal(f: Finding, rng: np.random.Generator, unit: str | None) -> _Text:
    sev = _sev(f)
    where = _where(f) or "in both lungs"
    options = [f"Interlobular septal thickening is seen {where}.",
               f"There is {sev + ' ' if sev else ''}smooth interlobular septal thickening {where}."]
    short = f"{_cap(sev + ' ' if sev else '')}interlobular septal thickening, {_short_where(f) or 'both lungs'}."
    return _Text(_pick(rng, options), short, f"{_cap(sev + ' ' if sev else '')}interlobular septal thickening")


_WRITERS: dict[str, _Writer] = {
    "Medical material": _medical_material,
    "Arterial wall calcification": _arterial,
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial,
    "Coronary artery wall calcification": _coronary,
    "Hiatal hernia": _hiatal,
    "Lymphadenopathy": _lymph,
    "Emphysema": _emphysema,
    "Atelectasis": _atelectasis,
    "Lung nodule": _nodule,
    "Lung opacity": _opacity,
    "Pulmonary fibrotic sequela": _fibrotic,
    "Pleural effusion": _pleural,
    "Mosaic attenuation pattern": _mosaic,
    "Peribronchial thickening": _peribronchial,
    "Consolidation": _consolidation,
    "Bronchiectasis": _bronchiectasis,
    "Interlobular septal thickening": _septal,
}
assert set(_WRITERS) == set(CTRATE_LABELS)

#: Order of findings in impressions (most clinically pressing first).
_IMPRESSION_ORDER = (
    "Consolidation", "Pleural effusion", "Pericardial effusion", "Lung nodule", "Lymphadenopathy", "Lung opacity",
    "Atelectasis", "Cardiomegaly", "Interlobular septal thickening", "Mosaic attenuation pattern", "Bronchiectasis",
    "Peribronchial thickening", "Emphysema", "Pulmonary fibrotic sequela", "Hiatal hernia",
    "Coronary artery wall calcification", "Arterial wall calcification", "Medical material",
)

# --------------------------------------------------------------------------------------------------------------
# negations and normal statements

#: Simple negations of each abnormality (one abnormality per sentence, negation at the start).
_NEGATIONS: dict[str, tuple[str, ...]] = {
    "Medical material": ("No medical device is seen in the chest.",),
    "Arterial wall calcification": ("There is no atherosclerotic calcification of the aortic wall.",
                                    "No calcification is seen in the aortic wall."),
    "Cardiomegaly": ("Heart size is normal.", "The heart is normal in size.", "There is no cardiomegaly."),
    "Pericardial effusion": ("No pericardial effusion.", "There is no pericardial effusion.",
                             "Pericardial effusion is not seen."),
    "Coronary artery wall calcification": ("No coronary artery calcification.",
                                           "There is no coronary artery calcification."),
    "Hiatal hernia": ("No hiatal hernia.", "There is no hiatal hernia."),
    "Lymphadenopathy": ("No lymph nodes of pathological size.", "There is no mediastinal or hilar lymphadenopathy.",
                        "No enlarged lymph nodes are seen.", "No lymphadenopathy."),
    "Emphysema": ("No emphysema.", "There is no emphysema."),
    "Atelectasis": ("No atelectasis.", "There is no atelectasis."),
    "Lung nodule": ("No pulmonary nodule is seen.", "There is no lung nodule.", "No pulmonary nodules."),
    "Lung opacity": ("No ground-glass opacity.", "There is no ground-glass opacity."),
    "Pulmonary fibrotic sequela": ("No pulmonary fibrosis is seen.", "There are no fibrotic sequelae."),
    "Pleural effusion": ("No pleural effusion.", "There is no pleural effusion.", "Pleural effusion is not seen.",
                         "No pleural effusion or pneumothorax."),
    "Mosaic attenuation pattern": ("No mosaic attenuation pattern.", "There is no mosaic attenuation."),
    "Peribronchial thickening": ("No peribronchial thickening.", "There is no peribronchial thickening."),
    "Consolidation": ("No consolidation.", "There is no consolidation.", "Consolidation is not seen."),
    "Bronchiectasis": ("No bronchiectasis.", "There is no bronchiectasis."),
    "Interlobular septal thickening": ("No interlobular septal thickening.",
                                       "There is no interlobular septal thickening."),
}

#: Negations of two abnormalities at once (used only when both are absent).
_PAIR_NEGATIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Pleural effusion", "Pericardial effusion"): ("No pericardial or pleural effusion.",),
    ("Consolidation", "Lung opacity"): ("No consolidation or ground-glass opacity.",),
    ("Emphysema", "Bronchiectasis"): ("No emphysema or bronchiectasis.",),
}

#: How likely the narrative style mentions each absent abnormality.
_NEGATION_RATE_A: dict[str, float] = {
    "Medical material": 0.0, "Arterial wall calcification": 0.3, "Cardiomegaly": 0.85, "Pericardial effusion": 0.8,
    "Coronary artery wall calcification": 0.3, "Hiatal hernia": 0.4, "Lymphadenopathy": 0.85, "Emphysema": 0.3,
    "Atelectasis": 0.3, "Lung nodule": 0.6, "Lung opacity": 0.3, "Pulmonary fibrotic sequela": 0.2,
    "Pleural effusion": 0.85, "Mosaic attenuation pattern": 0.1, "Peribronchial thickening": 0.1,
    "Consolidation": 0.5, "Bronchiectasis": 0.15, "Interlobular septal thickening": 0.1,
}

#: Where the negation of each abnormality is said (the region of the abnormality).
_NEGATION_REGION = {
    "Medical material": "mediastinum", "Arterial wall calcification": "mediastinum", "Cardiomegaly": "heart",
    "Pericardial effusion": "heart", "Coronary artery wall calcification": "heart", "Hiatal hernia": "esophagus",
    "Lymphadenopathy": "mediastinum", "Emphysema": "lung", "Atelectasis": "lung", "Lung nodule": "lung",
    "Lung opacity": "lung", "Pulmonary fibrotic sequela": "lung", "Pleural effusion": "pleura",
    "Mosaic attenuation pattern": "lung", "Peribronchial thickening": "trachea and bronchi", "Consolidation": "lung",
    "Bronchiectasis": "trachea and bronchi", "Interlobular septal thickening": "lung",
}

#: Normal statements said only when the region has no finding at all.
_NORMAL_FREE: dict[str, tuple[str, ...]] = {
    "lung": ("Both lungs are clear.", "The lung parenchyma is normally aerated.", "The lungs are clear."),
    "trachea and bronchi": ("The airways are unremarkable.", "The bronchial tree is unremarkable."),
    "mediastinum": ("The mediastinum is unremarkable.", "Mediastinal structures are unremarkable."),
    "heart": ("The heart is unremarkable.", "Cardiac contours are unremarkable."),
    "esophagus": ("The esophagus is unremarkable.", "The thoracic esophagus has a normal calibre.",
                  "Esophageal wall thickness and calibre are normal."),
    "pleura": ("The pleural spaces are clear.", "The pleura is unremarkable."),
    "bone": ("The bony thorax is intact.", "The osseous structures are unremarkable."),
    "thyroid": ("The thyroid gland is unremarkable.", "Both thyroid lobes are of normal size and attenuation."),
    "breast": ("The breasts are unremarkable.", "No breast mass is seen."),
    "abdomen": ("The imaged upper abdominal organs are unremarkable.",
                "The liver, spleen and adrenal glands included in the scan are unremarkable."),
}

#: Statements that hold unless one of the listed abnormalities is present (mentioned by the narrative style).
_NORMAL_UNLESS: dict[str, tuple[tuple[str, frozenset[str]], ...]] = {
    "trachea and bronchi": (("The trachea and both main bronchi are patent.", frozenset()),),
    "mediastinum": (("The thoracic aorta has a normal diameter.", frozenset({"Medical material"})),
                    ("The main pulmonary artery is of normal calibre.", frozenset()),
                    ("Mediastinal fat planes are preserved.", frozenset({"Lymphadenopathy", "Medical material"}))),
    "heart": (),
    "esophagus": (),
    "lung": (("Lung volumes are preserved.", frozenset({"Atelectasis", "Emphysema"})),
             ("The central pulmonary vessels are unremarkable.", frozenset())),
    "pleura": (("There is no pneumothorax.", frozenset()),),
    "bone": (("No lytic or sclerotic bone lesion is seen.", frozenset()),
             ("Vertebral body heights are preserved.", frozenset())),
    "thyroid": (),
    "breast": (),
    "abdomen": (("The gallbladder is unremarkable.", frozenset()),
                ("Both kidneys are unremarkable where imaged.", frozenset())),
}

_THYROID_OUT = "The thyroid gland is outside the scanned field."
_MALE_BREAST = "No gynecomastia."
_PET_NORMAL = "FDG uptake is physiological in the myocardium, liver and kidneys."

#: Narrative order of regions (organ by organ).
_NARRATIVE_ORDER = ("thyroid", "trachea and bronchi", "mediastinum", "heart", "esophagus", "lung", "pleura",
                    "breast", "abdomen", "bone")

#: Structured-style line groups.
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AIRWAYS", ("trachea and bronchi",)),
    ("LUNGS", ("lung",)),
    ("PLEURA", ("pleura",)),
    ("HEART/MEDIASTINUM", ("heart", "mediastinum", "esophagus", "thyroid")),
    ("CHEST WALL/BONES", ("breast", "bone")),
    ("UPPER ABDOMEN", ("abdomen",)),
)

_NORMAL_IMPRESSION = ("No significant abnormality on chest CT.", "Normal CT of the chest.",
                      "Chest CT within normal limits.", "No acute abnormality in the chest.")


# --------------------------------------------------------------------------------------------------------------
# the writer


@dataclasses.dataclass
class _Said:
    """A sentence of the findings section and the region (and lobes) it is about."""

    text: str
    region: str
    positive: bool = False
    lobes: tuple[str, ...] = ()


def _finding_lobes(finding: Finding) -> tuple[str, ...]:
    """Lobes a lung finding involves (its lobes, else every lobe on its side); empty outside the lungs."""
    if finding.lobes:
        return tuple(lobe for lobe in LOBES if lobe in finding.lobes)
    if finding.region != "lung":
        return ()
    if finding.side in ("right", "left"):
        return tuple(lobe for lobe in LOBES if lobe.startswith(finding.side))
    return LOBES


class _Builder:
    """One report being written (keeps the generator and the case together)."""

    def __init__(self, case: Case, rng: np.random.Generator, bank: SentenceBank | None) -> None:
        if case.style not in STYLES:
            raise ValueError(f"unknown report style {case.style!r} (known: {', '.join(STYLES)})")
        self.case = case
        self.rng = rng
        self.bank = bank
        self.present = {f.label for f in case.findings}
        self.absent = [label for label in CTRATE_LABELS if label not in self.present]
        self.busy = {f.region for f in case.findings}

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def texts(self, unit: str | None) -> list[tuple[Finding, _Text]]:
        return [(f, _WRITERS[f.label](f, self.rng, unit)) for f in self.case.findings]

    def region_free(self, region: str) -> bool:
        return region not in self.busy

    # ---- negations
    def negations(self, labels: Sequence[str], mined: bool) -> list[tuple[str, str]]:
        """(sentence, region) negating every label in ``labels`` (all absent); pairs merged sometimes."""
        todo = list(labels)
        out: list[tuple[str, str]] = []
        for pair, options in _PAIR_NEGATIONS.items():
            if pair[0] in todo and pair[1] in todo and self.chance(0.3):
                todo = [label for label in todo if label not in pair]
                out.append((_pick(self.rng, options), _NEGATION_REGION[pair[0]]))
        covered: set[str] = set()
        for label in todo:
            if label in covered:
                continue
            mined_item = None
            if mined and self.bank is not None and self.chance(self.bank.p_use):
                mined_item = self.bank.negation_item(label, self.case, self.rng)
            if mined_item is not None:
                covered |= mined_item.labels
                out.append((mined_item.text, _NEGATION_REGION[label]))
            else:
                out.append((_pick(self.rng, _NEGATIONS[label]), _NEGATION_REGION[label]))
        return out

    # ---- styles
    def narrative(self) -> tuple[list[_Said], str]:
        use_bank = self.bank is not None
        said: list[_Said] = []
        negated = [label for label in self.absent if self.chance(_NEGATION_RATE_A[label])]
        negations = self.negations(negated, mined=use_bank)
        texts = self.texts(None)
        for region in _NARRATIVE_ORDER:
            block: list[_Said] = []
            for f, text in texts:
                if f.region != region:
                    continue
                sentence = None
                if use_bank and self.chance(self.bank.p_use):
                    sentence = self.bank.positive(f, self.rng)
                block.append(_Said(sentence or text.long, region, True, _finding_lobes(f)))
            normal = self.normal_statements(region, mined=use_bank)
            negs = [_Said(s, region) for s, r in negations if r == region]
            findings_first = bool(block) and self.chance(0.5)
            said.extend(block + negs + normal if findings_first else normal + block + negs)
        if self.case.pet is not None:
            said.append(_Said(f"Physiological FDG uptake is seen in the {_join(self.case.pet.physiological)}.", ""))
        elif self.case.anatomy.has_pet and self.chance(0.8):
            said.append(_Said(_PET_NORMAL, ""))
        impressions = [text.impression for _, text in _ordered_texts(texts)]
        impression = (" ".join(_sentence(x) for x in impressions) if impressions
                      else _pick(self.rng, _NORMAL_IMPRESSION))
        return said, impression

    def normal_statements(self, region: str, mined: bool) -> list[_Said]:
        anatomy = self.case.anatomy
        out: list[_Said] = []
        if region == "thyroid" and not anatomy.thyroid_in_view:
            return [_Said(_THYROID_OUT, region)] if self.chance(0.5) else []
        if region == "breast" and anatomy.sex != "female":
            return [_Said(_MALE_BREAST, region)] if self.chance(0.3) and self.region_free(region) else []
        if self.region_free(region):
            sentence = None
            if mined and self.bank is not None and self.chance(self.bank.p_use):
                sentence = self.bank.normal(region, self.case, self.rng)
            out.append(_Said(sentence or _pick(self.rng, _NORMAL_FREE[region]), region))
        for sentence, blockers in _NORMAL_UNLESS[region]:
            if not (blockers & self.present) and self.chance(0.5):
                out.append(_Said(sentence, region))
        return out

    def structured(self) -> tuple[list[tuple[str, list[_Said]]], str]:
        texts = self.texts("mm")
        negated = [label for label in self.absent if self.chance(0.35)]
        negations = self.negations(negated, mined=False)
        lines = []
        for name, regions in _GROUPS:
            items = [_Said(text.short, f.region, True, _finding_lobes(f)) for f, text in _ordered_texts(texts)
                     if f.region in regions]
            items += [_Said(s, r) for s, r in negations if r in regions][:2]
            if not items:
                free = [r for r in regions if self.region_free(r)]
                if regions == ("breast", "bone") or not free:
                    items = [_Said("Unremarkable.", "")]
                else:
                    items = [_Said(_pick(self.rng, _NORMAL_FREE[free[0]]), free[0])]
            lines.append((name, items))
        if self.case.pet is not None:
            lines.append(("PET", [_Said(f"Physiological FDG uptake in the {_join(self.case.pet.physiological)}.",
                                        "")]))
        impressions = [text.impression for _, text in _ordered_texts(texts)]
        if impressions:
            impression = " ".join(f"{i}. {_sentence(x)}" for i, x in enumerate(impressions, 1))
        else:
            impression = "1. " + _pick(self.rng, _NORMAL_IMPRESSION)
        return lines, impression

    def terse(self) -> tuple[list[_Said], str]:
        texts = self.texts(None)
        said = [_Said(text.short, f.region, True, _finding_lobes(f)) for f, text in _ordered_texts(texts)]
        important = [label for label in ("Pleural effusion", "Lymphadenopathy", "Consolidation", "Lung nodule")
                     if label in self.absent]
        chosen = [label for label in important if self.chance(0.3)]
        said += [_Said(s, r) for s, r in self.negations(chosen, mined=False)]
        if not texts:
            said.insert(0, _Said(_pick(self.rng, ("Lungs clear.", "Both lungs are clear.")), "lung"))
        elif self.chance(0.5):
            said.append(_Said(_pick(self.rng, ("Otherwise unremarkable.", "Remaining structures unremarkable.")), ""))
        if self.case.pet is not None:
            said.append(_Said(f"Physiological uptake in the {_join(self.case.pet.physiological)}.", ""))
        impressions = [text.impression for _, text in _ordered_texts(texts)]
        impression = (" ".join(_sentence(x) for x in impressions) if impressions
                      else _pick(self.rng, _NORMAL_IMPRESSION))
        return said, impression

    # ---- assembly
    def region_reports(self, said: list[_Said]) -> tuple[dict[str, str], dict[str, str]]:
        regions: dict[str, str] = {}
        for region in REGIONS:
            positive = [s.text for s in said if s.region == region and s.positive]
            others = [s.text for s in said if s.region == region and not s.positive]
            if positive:
                regions[region] = " ".join(_sentence(t) for t in positive)
            elif others:
                regions[region] = " ".join(_sentence(t) for t in others)
            else:
                regions[region] = self.default_normal(region)
        lobes: dict[str, str] = {}
        for lobe in LOBES:
            about = [s.text for s in said if s.positive and lobe in s.lobes]
            lobes[lobe] = " ".join(_sentence(t) for t in about) if about else f"The {lobe} is clear."
        return regions, lobes

    def default_normal(self, region: str) -> str:
        if region == "thyroid" and not self.case.anatomy.thyroid_in_view:
            return _THYROID_OUT
        if region == "breast" and self.case.anatomy.sex != "female":
            return _MALE_BREAST
        return _NORMAL_FREE[region][0]

    def write(self) -> PhantomReport:
        style = self.case.style
        if style == "hospital_b":
            lines, impression = self.structured()
            said = [item for _, items in lines for item in items]
            findings = "\n".join(f"{name}: {' '.join(_sentence(i.text) for i in items)}" for name, items in lines)
            text = f"Findings:\n{findings}\nImpression:\n{impression}"
        elif style == "hospital_c":
            said, impression = self.terse()
            findings = " ".join(_sentence(s.text) for s in said)
            text = f"Impression: {impression}\nFindings: {findings}"
        else:
            said, impression = self.narrative()
            findings = " ".join(_sentence(s.text) for s in said)
            text = f"Findings: {findings}\nImpression: {impression}"
        regions, lobes = self.region_reports(said)
        return PhantomReport(text=text, sections={"findings": findings, "impression": impression},
                             region_reports=regions, lobe_reports=lobes)


def _ordered_texts(texts: list[tuple[Finding, _Text]]) -> list[tuple[Finding, _Text]]:
    return sorted(texts, key=lambda ft: _IMPRESSION_ORDER.index(ft[0].label))


def write_report(case: Case, rng: np.random.Generator, bank: SentenceBank | None = None) -> PhantomReport:
    """The report of ``case`` in its style (``case.style``); deterministic given ``rng``'s state.

    With a ``bank``, the narrative style (``hospital_a``) takes each positive, negated and normal sentence from
    the bank with probability ``bank.p_use`` (where the bank has a fitting one) and from the templates otherwise.
    """
    return _Builder(case, rng, bank).write()


# --------------------------------------------------------------------------------------------------------------
# sentence bank mined from real labelled reports (at run time only; nothing mined is ever stored in the repository)

#: Region of a sentence by organ keywords; the weak ones count only when no organ keyword is present.
_REGION_WORDS: dict[str, str] = {
    "thyroid": r"thyroid",
    "trachea and bronchi": r"trachea|bronch|airway",
    "esophagus": r"esophag|oesophag",
    "heart": r"heart|cardi|pericard|coronary",
    "breast": r"breast|axill",
    "abdomen": r"liver|hepat|abdom|adrenal|kidney|renal|spleen|splenic|gallbladder|pancrea|stomach|gastric|bile"
               r"|biliary|portal",
    "bone": r"\bbones?\b|bony|osseous|skelet|vertebr|\bribs?\b|stern|spin(?:e|al)|scapul|clavic",
    "pleura": r"pleura|pneumothorax|hemithora",
    "mediastinum": r"mediastin|aort|lymph|vena cava|pulmonary arter|hil(?:ar|um)|thymus",
    "lung": r"lung|lobe|pulmonary(?! arter)|alveol|interstiti",
}
_WEAK_REGION_WORDS: dict[str, str] = {"lung": r"parenchym", "mediastinum": r"vascular|vessel"}
_REGION_RES = {region: re.compile(pattern, re.I) for region, pattern in _REGION_WORDS.items()}
_WEAK_REGION_RES = {region: re.compile(pattern, re.I) for region, pattern in _WEAK_REGION_WORDS.items()}

#: Words that make a sentence unusable anywhere: hedging, comparison, time course, causes, exceptions, references
#: to other sentences, clinical advice, and body parts outside a chest CT.
_UNSAFE = re.compile(
    r"\?|\b(?:suspicious|suspected|suspicion|compatible|consistent|favou?r\w*|possibl\w*|probabl\w*|likely|may|might"
    r"|could|suggest\w*|differential|recommend\w*|correlat\w*|follow\w*|evaluat\w*|infect\w*|pneumoni\w*|malign\w*"
    r"|metasta\w*|covid|viral|history|operat\w*|postop\w*|previous\w*|prior|compared|comparison|secondary|due|but"
    r"|however|although|whereas|except|apart|besides|other|also|another|additional|new|newly|emerg\w*|appeared"
    r"|increas\w*|decreas\w*|regress\w*|progress\w*|patient|clinical\w*|artifact\w*|limited|not\s+be|nonspecific"
    r"|non-specific|indeterminate|trauma\w*|posttraumatic|it|its|this|these|those|they|their|them|such|described"
    r"|above|aforementioned|mentioned|said|same|former|latter|here|neighbou?rhood|accompan\w*|adjacent"
    r"|femor\w*|pelv\w*|pubi\w*|sacr\w*|iliac|hips?|bladder|prostat\w*|uter\w*|ovar\w*|brain|cerebr\w*|crani\w*"
    r"|orbit\w*|sinus\w*|parotid|submandibular|inguinal|colon\w*|bowel|intestin\w*|rect\w*|appendi\w*|duct\w*"
    r"|ureter\w*|mesenter\w*|remaining|residual|\w+ectomy)\b",
    re.I,
)
#: Side, place, size, grade, count and sub-type words: a positive mined sentence must have none of them (the case's
#: own values are then given in a templated sentence that follows it and names no abnormality).
_DETAILED = re.compile(
    r"\d|\b(?:right|left|bilateral\w*|both|unilateral|upper|middle|lower|lobes?|lingul\w*|apic\w*|apex|apices|basal"
    r"|bases?|segments?|segmental|superior|inferior|anterior|posterior|lateral|medial|dependent|peripheral|central"
    r"|mild\w*|minim\w*|slight\w*|minor|moderate\w*|severe\w*|marked\w*|significant\w*|prominent|extensive\w*|small"
    r"|large|massive|huge|tiny|few|several|multiple|numerous|many|millimetric|diffuse\w*|focal|widespread|scattered"
    r"|centrilobular|paraseptal|panlobular|bullous|bullae?|subsegmental|lobar|linear|plate\w*|cylindrical|varicose"
    r"|tubular|cystic|traction|solid|calcified|spiculated|paratracheal|subcarinal|hilar|hilum|prevascular"
    r"|aortopulmonary|axill\w*|mediastinal|valve|clips?|mass|lesions?|tumou?r\w*|cm|mm|one|two|three|four|five"
    r"|single|solitary|largest|biggest|chambers?|double|dual|type|abdominal|thoracic|ascending|descending|arch"
    r"|dorsal|ventral|no|not|without|neither|nor|non)\b",
    re.I,
)
#: Abnormal things other than the one a positive sentence is about (checked after removing the label's own words).
_OTHER_ABNORMAL = re.compile(
    r"lesion|mass|nodul|cyst|stone|calcul|fractur|degenerat|osteophyt|scolio|kyphos|scleros|sclerotic|lytic"
    r"|destruct|thicken|dilat|aneurysm|ectasi|herni|edema|oedema|fluid|effusion|collection|\bair\b|emphysem"
    r"|atelecta|opacit|densit|infiltrat|consolidat|fibro|sequel|calcif|plaque|atherom|atheroscl|enlarg|hypertroph"
    r"|megaly|steato|hypodens|hyperdens|attenuat|lobulat|irregular|heterogen|compress|deviat|shift|obstruct"
    r"|stenos|occlu|thromb|embol|tortuous|elongat|anomal|absent|atroph|resect|surgical|graft|implant|prosthe"
    r"|catheter|tube|drain|pacemaker|stent|wire|suture|contrast|lymph|mosaic|bronchiect|septa|nodes?\b|bulla"
    r"|pneumothorax|scar|band|strand|ground.?glass|bud|cavit|honeycomb|reticul|interstitial|pleura|pericard",
    re.I,
)
#: Words of each label that a positive sentence may use (and that are not "other" abnormalities there).
_OWN_WORDS: dict[str, str] = {
    "Medical material": r"pacemaker|sternotomy|sternal|wires?|\bport\b|catheter|stent|graft|sutures?|materials?"
                        r"|metallic|leads?|electrodes?",
    "Arterial wall calcification": r"calcif\w*|atheroscl\w*|atherom\w*|plaques?",
    "Cardiomegaly": r"cardiomegal\w*|enlarg\w*",
    "Pericardial effusion": r"effusion|fluid|pericardi\w*",
    "Coronary artery wall calcification": r"calcif\w*|atheroscl\w*|atherom\w*|plaques?",
    "Hiatal hernia": r"hernia\w*|herniat\w*",
    "Lymphadenopathy": r"lymphadenopath\w*|enlarg\w*|lymph|nodes?\b",
    "Emphysema": r"emphysem\w*",
    "Atelectasis": r"atelecta\w*",
    "Lung nodule": r"nodul\w*",
    "Lung opacity": r"opacit\w*|densit\w*|ground.?glass",
    "Pulmonary fibrotic sequela": r"fibro\w*|sequel\w*|bands?|strands?",
    "Pleural effusion": r"effusion|fluid|pleural",
    "Mosaic attenuation pattern": r"mosaic|attenuat\w*",
    "Peribronchial thickening": r"thicken\w*|peribronch\w*",
    "Consolidation": r"consolidat\w*|air\s+bronchogram\w*",
    "Bronchiectasis": r"bronchiect\w*",
    "Interlobular septal thickening": r"thicken\w*|septa\w*",
}
#: What a positive sentence must say (one of the standard names of the abnormality, at the right place).
_CORE: dict[str, str] = {
    "Medical material": r"pacemaker|sternotomy|sternal wire|\bport\b|stent",
    "Arterial wall calcification": r"aort\w*.*(?:calcif|atheroscl|atherom|plaque)|(?:calcif|atheroscl|atherom|plaque)"
                                   r".*aort",
    "Cardiomegaly": r"cardiomegal|cardiac enlargement|heart\b.*\benlarged",
    "Pericardial effusion": r"pericardial.*(?:effusion|fluid)|(?:effusion|fluid).*pericardi",
    "Coronary artery wall calcification": r"coronar.*(?:calcif|atheroscl|atherom|plaque)|(?:calcif|atheroscl|atherom"
                                          r"|plaque).*coronar",
    "Hiatal hernia": r"hiatal hernia|hiatus hernia",
    "Lymphadenopathy": r"lymphadenopath|enlarged\s+(?:\w+\s+)?lymph|lymph nodes? .*pathological (?:size|dimension)",
    "Emphysema": r"emphysem",
    "Atelectasis": r"atelecta",
    "Lung nodule": r"nodul",
    "Lung opacity": r"ground.?glass|opacit",
    "Pulmonary fibrotic sequela": r"fibrotic|fibrosis|fibrous",
    "Pleural effusion": r"pleural.*(?:effusion|fluid)",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronch|bronchial wall",
    "Consolidation": r"consolidat",
    "Bronchiectasis": r"bronchiect",
    "Interlobular septal thickening": r"septa",
}
_OWN_RES = {label: re.compile(pattern, re.I) for label, pattern in _OWN_WORDS.items()}
_CORE_RES = {label: re.compile(pattern, re.I) for label, pattern in _CORE.items()}
#: Side words a negation or normal statement must not have (one-sided normality implies something on the other).
_SIDED = re.compile(r"\b(?:right|left|unilateral)\b", re.I)
#: A statement of normality, and a simple negation sentence ("No ...", "There is no ...").
_NORMAL_WORD = re.compile(r"\b(?:normal|natural|preserved|patent|open|unremarkable|intact|usual|clear|symmetric\w*)\b",
                          re.I)
_NEGATION_WORD = re.compile(r"\b(?:no|not|without|neither|nor|none)\b", re.I)
_SIMPLE_NEGATION = re.compile(r"^(?:no|there\s+(?:is|are|was|were)\s+no)\b[^,;:]*$", re.I)
#: Device words of each medical-material kind (a mined device sentence must name the case's device and no other).
_DEVICE_WORDS = {
    "pacemaker": re.compile(r"pacemaker", re.I),
    "sternotomy wires": re.compile(r"sternotomy|sternal wire", re.I),
    "port catheter": re.compile(r"\bport\b", re.I),
    "aortic stent": re.compile(r"stent(?=.*aort)|aort.*stent", re.I),
}
#: Words that belong with each device (a pacemaker's leads, a port's catheter).
_DEVICE_EXTRAS = {
    "pacemaker": re.compile(r"leads?|electrodes?|generator|battery", re.I),
    "sternotomy wires": re.compile(r"wires?|sutures?|materials?|metallic", re.I),
    "port catheter": re.compile(r"catheter|chamber|reservoir", re.I),
    "aortic stent": re.compile(r"graft", re.I),
}
_ANY_DEVICE = re.compile(r"pacemaker|sternotomy|sternal wire|\bport\b|stent|catheter|tube|valve|clip|prosthe|drain"
                         r"|\bicd\b|defibrillat|screw|plate|coil|filter|shunt|implant", re.I)
_PLURAL = re.compile(r"\b(?:are|were|have)\b", re.I)


_SKIP_SECTIONS = ("clinical_information", "technique", "comparison")


def _split_sentences(text: str) -> list[str]:
    """Sentences of a report's findings and impression (the project splitter when available, else a small one)."""
    try:
        from rrg3d.text.reports import split_sections, split_sentences
    except ImportError:  # pragma: no cover - the text package ships with rrg3d
        out = []
        text = re.sub(r"\b(?:findings|impression)\s*:", "\n", text, flags=re.I)
        for chunk in re.split(r'["\n\r]+', text):
            out.extend(part.strip() for part in re.split(r"(?<=[.!?;])\s+(?=[A-Z])", chunk) if part.strip())
        return out
    sections = split_sections(text)
    return [sentence for name, body in sections.items() if name not in _SKIP_SECTIONS
            for sentence in split_sentences(body)]


def _clean(sentence: str) -> str | None:
    """A mined sentence tidied (spaces, final full stop) or ``None`` when it is not a usable sentence."""
    text = " ".join(sentence.replace('"', " ").split()).strip(" ;,")
    if not text or not text[0].isupper():
        return None
    words = text.split()
    if not 3 <= len(words) <= 30 or ";" in text or ":" in text or text.count("(") != text.count(")"):
        return None
    if re.search(r"\b(?:pleural|pericardial)\s+(?:was|were|is|are)\b", text, re.I):  # a noun is missing
        return None
    return text if text.endswith(".") else text.rstrip(".!?") + "."


def _regions_of(text: str) -> list[str]:
    """Regions a sentence talks about, in order of first mention (weak keywords only when nothing else matches)."""
    for table in (_REGION_RES, _WEAK_REGION_RES):
        hits = [(m.start(), region) for region, pattern in table.items() if (m := pattern.search(text))]
        if hits:
            return [region for _, region in sorted(hits)]
    return []


def _kind_key(finding: Finding) -> str:
    return f"{finding.label}/{finding.kind}" if finding.label == "Medical material" else finding.label


def _details(finding: Finding, plural: bool) -> str:
    """A templated sentence with the case's own details that names no abnormality ("" when nothing to add)."""
    f = finding
    adjectives = []
    if f.kind and f.label in ("Emphysema", "Atelectasis", "Lung nodule", "Bronchiectasis"):
        adjectives.append(f.kind)
    if f.severity and f.label not in ("Atelectasis", "Pulmonary fibrotic sequela"):
        table = _AMOUNT if f.label in ("Pleural effusion", "Pericardial effusion", "Hiatal hernia") else _SEVERITY
        adjectives.append(table[f.severity])
    if f.label == "Pleural effusion" and f.side:
        adjectives.append("bilateral" if f.side == "bilateral" else f"{f.side}-sided")
    parts = [_join(adjectives)] if adjectives else []
    if f.label == "Lymphadenopathy" and f.detail.get("stations"):
        stations = [str(s) for s in f.detail["stations"]]
        parts.append(f"located at the {_join(stations)} {'station' if len(stations) == 1 else 'stations'}")
    elif f.label != "Pleural effusion" and (where := _where(f, lung=f.region == "lung")):
        parts.append(f"located {where}")
    if f.count and f.count > 1 and f.label in ("Lung nodule", "Lymphadenopathy"):
        parts.append(f"{_count_word(f.count)} in number")
    size = _size(f, None)
    if f.label == "Cardiomegaly":
        ratio = f.detail.get("cardiothoracic_ratio", f.size_mm / 100 if f.size_mm is not None else None)
        if ratio is not None:
            parts.append(f"with a cardiothoracic ratio of {float(ratio):.2f}")
    elif size:
        parts.append({
            "Lung nodule": f"measuring up to {size}" if (f.count or 1) > 1 else f"measuring {size}",
            "Lymphadenopathy": f"up to {size} in short axis",
            "Pleural effusion": f"{size} in depth",
            "Pericardial effusion": f"{size} thick",
            "Hiatal hernia": f"{size} across",
        }.get(f.label, f"spanning {size}"))
    if f.label == "Coronary artery wall calcification" and f.detail.get("vessels"):
        parts.append(f"involving the {_join([str(v) for v in f.detail['vessels']])}")
    if f.suv_max is not None:
        parts.append(f"with increased FDG uptake (SUVmax {f.suv_max:.1f})")
    if not parts:
        return ""
    return f"{'They are' if plural else 'It is'} {', '.join(parts)}."


@dataclasses.dataclass(frozen=True)
class _Mined:
    text: str
    labels: frozenset[str]
    regions: frozenset[str]
    normal_words: bool
    plural: bool


class SentenceBank:
    """Sentences mined at run time from labelled real reports, checked with the abnormality labeler.

    - ``positives``: per abnormality (``"Medical material/<kind>"`` for devices), sentences that affirm exactly that
      abnormality and nothing else, without side, place, size, grade, count or sub-type words. Where one is used,
      the case's own details follow in a templated sentence that names no abnormality ("It is located in the right
      lower lobe, measuring 8 mm."), so the text never contradicts the case.
    - ``negations``: sentences whose every abnormality mention is negated (nothing affirmed or uncertain),
      usable for a case only when all the abnormalities they negate are absent.
    - ``normals``: per region, sentences with no abnormality mention that state normality, usable only when every
      region they talk about is free of findings.

    Build one with :meth:`mine`; nothing mined is ever written to disk by this class.
    """

    def __init__(self, positives: dict[str, list[_Mined]], negations: list[_Mined], normals: dict[str, list[_Mined]],
                 p_use: float = 0.5, source: str = "") -> None:
        self.positives = positives
        self.negations = negations
        self.normals = normals
        self.p_use = p_use
        self.source = source

    # ---- building
    @classmethod
    def mine(cls, csv_path: str | Path, labeler: Any = None, p_use: float = 0.5) -> SentenceBank:
        """Mine a CT-RATE-style label CSV (``report_text`` + the 18 label columns; label columns are optional).

        ``labeler`` needs ``explain(text) -> list[dict]`` and ``predict(texts) -> (n, 18) array``; the project's
        :class:`rrg3d.text.labeler.RuleLabeler` by default. Raises ``ValueError`` when the file lacks
        ``report_text``.
        """
        if labeler is None:
            from rrg3d.text.labeler import RuleLabeler

            labeler = RuleLabeler()
        path = Path(csv_path)
        candidates: dict[str, tuple[set[str], set[str]]] = {}  # sentence -> (labels present, labels absent)
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "report_text" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: no 'report_text' column")
            columns = [label for label in CTRATE_LABELS if label in (reader.fieldnames or [])]
            for row in reader:
                present = {label for label in columns if str(row.get(label, "")).strip() in ("1", "1.0")}
                absent = {label for label in columns if str(row.get(label, "")).strip() in ("0", "0.0")}
                if not columns:
                    present, absent = set(CTRATE_LABELS), set(CTRATE_LABELS)  # no manual labels to cross-check
                for raw in _split_sentences(row.get("report_text") or ""):
                    text = _clean(raw)
                    if text is None or _UNSAFE.search(text):
                        continue
                    seen = candidates.setdefault(text, (set(CTRATE_LABELS), set(CTRATE_LABELS)))
                    seen[0].intersection_update(present)
                    seen[1].intersection_update(absent)
        texts = sorted(candidates)
        predicted = np.asarray(labeler.predict(texts)) if texts else np.zeros((0, len(CTRATE_LABELS)))
        positives: dict[str, list[_Mined]] = {}
        negations: list[_Mined] = []
        normals: dict[str, list[_Mined]] = {}
        for text, row in zip(texts, predicted, strict=True):
            present, absent = candidates[text]
            labels_out = {label for label, value in zip(CTRATE_LABELS, row, strict=True) if value}
            mentions = [m for m in labeler.explain(text) if m.get("label") in CTRATE_LABELS]
            affirmed = {m["label"] for m in mentions if not m.get("negated") and not m.get("uncertain")}
            negated = {m["label"] for m in mentions if m.get("negated")}
            uncertain = {m["label"] for m in mentions if m.get("uncertain") and not m.get("negated")}
            regions = _regions_of(text)
            item = _Mined(text, frozenset(affirmed or negated), frozenset(regions),
                          bool(_NORMAL_WORD.search(text)), bool(_PLURAL.search(text)))
            if uncertain:
                continue
            if len(affirmed) == 1 and not negated and labels_out == affirmed and affirmed <= present:
                key = cls._positive_key(next(iter(affirmed)), text)
                if key:
                    positives.setdefault(key, []).append(item)
            elif negated and not affirmed and not labels_out and negated <= absent and not _SIDED.search(text):
                negations.append(item)
            elif not mentions and not labels_out and regions and cls._is_normal(text):
                normals.setdefault(regions[0], []).append(item)
        return cls(positives, negations, normals, p_use=p_use, source=path.name)

    @staticmethod
    def _is_normal(text: str) -> bool:
        """A plain statement of normality ("X is normal.") or a simple negation ("No X.", "There is no X.")."""
        if re.search(r"\d", text) or _SIDED.search(text):
            return False
        if _SIMPLE_NEGATION.search(text.rstrip(".")):
            return True
        return bool(_NORMAL_WORD.search(text)) and not _NEGATION_WORD.search(text) and not _OTHER_ABNORMAL.search(text)

    @staticmethod
    def _positive_key(label: str, text: str) -> str | None:
        """The bank key of an affirmed sentence, or ``None`` when it is not a short, detail-free, single statement."""
        if len(text.split()) > 16 or not _CORE_RES[label].search(text):
            return None
        rest = _OWN_RES[label].sub(" ", text)
        if label == "Medical material":
            kinds = [kind for kind, pattern in _DEVICE_WORDS.items() if pattern.search(text)]
            if len(kinds) != 1 or _NEGATION_WORD.search(text) or _SIDED.search(text) or re.search(r"\d", text):
                return None
            extra = _DEVICE_EXTRAS[kinds[0]].sub(" ", _DEVICE_WORDS[kinds[0]].sub(" ", text))
            if _ANY_DEVICE.search(extra) or _OTHER_ABNORMAL.search(rest):
                return None
            return f"{label}/{kinds[0]}"
        if _DETAILED.search(text) or _OTHER_ABNORMAL.search(rest):
            return None
        return label

    # ---- reporting
    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """How many sentences were mined: ``{"positive": {label: n}, "negated": {label: n}, "normal": {region: n}}``."""
        positive = {label: 0 for label in CTRATE_LABELS}
        for key, items in self.positives.items():
            positive[key.split("/")[0]] += len(items)
        negated = {label: sum(label in item.labels for item in self.negations) for label in CTRATE_LABELS}
        normal = {region: len(self.normals.get(region, [])) for region in REGIONS}
        return {"positive": positive, "negated": negated, "normal": normal}

    def __len__(self) -> int:
        return (sum(len(v) for v in self.positives.values()) + len(self.negations)
                + sum(len(v) for v in self.normals.values()))

    def __repr__(self) -> str:
        return f"SentenceBank({len(self)} sentences from {self.source or 'memory'}, p_use={self.p_use})"

    # ---- choosing sentences for a case
    def positive(self, finding: Finding, rng: np.random.Generator) -> str | None:
        """A mined sentence for ``finding`` followed by its details, or ``None`` when the bank has none that fits."""
        options = self.positives.get(_kind_key(finding), [])
        if finding.label in ("Lung nodule", "Lymphadenopathy"):
            word = "nodules?" if finding.label == "Lung nodule" else "nodes?"
            many = (finding.count or 1) > 1
            options = [o for o in options if (m := re.search(rf"\b{word}\b", o.text, re.I))
                       and m.group(0).lower().endswith("s") == many]
        if not options:
            return None
        item = _pick(rng, options)
        if finding.label == "Medical material":
            return item.text
        details = _details(finding, item.plural)
        return f"{item.text} {details}" if details else item.text

    def negation(self, label: str, case: Case, rng: np.random.Generator) -> str | None:
        """A mined negation of ``label`` that negates only abnormalities the case lacks, or ``None``.

        A negation that also states normality ("..., heart size is normal") is used only when every region it
        names is free of findings.
        """
        item = self.negation_item(label, case, rng)
        return item.text if item is not None else None

    def negation_item(self, label: str, case: Case, rng: np.random.Generator) -> _Mined | None:
        """Like :meth:`negation`, with the set of abnormalities the sentence negates."""
        present = {f.label for f in case.findings}
        busy = _busy_regions(case)
        options = [o for o in self.negations if label in o.labels and not (o.labels & present)
                   and not (o.normal_words and o.regions & busy)]
        return _pick(rng, options) if options else None

    def normal(self, region: str, case: Case, rng: np.random.Generator) -> str | None:
        """A mined normal statement for a finding-free ``region`` (every region it names finding-free), or ``None``."""
        busy = _busy_regions(case)
        options = [o for o in self.normals.get(region, []) if not (o.regions & busy)]
        return _pick(rng, options).text if options else None


def _busy_regions(case: Case) -> set[str]:
    """Regions a normal statement must not talk about: those with findings, and those not in the scan."""
    busy = {f.region for f in case.findings}
    if not case.anatomy.thyroid_in_view:
        busy.add("thyroid")
    if case.anatomy.sex != "female":
        busy.add("breast")
    return busy
