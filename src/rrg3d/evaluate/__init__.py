"""Evaluation of generated reports (``rrg3d evaluate``).

* :mod:`~rrg3d.evaluate.nlg` — pycocoevalcap-identical BLEU-1..4 / METEOR 1.5 / ROUGE-L / CIDEr-D ("coco"), plus
  rouge-score, sacreBLEU and NLTK METEOR under their own names; :mod:`~rrg3d.evaluate.meteor` runs the METEOR jar,
  :mod:`~rrg3d.evaluate.wordnet` provides WordNet offline;
* :mod:`~rrg3d.evaluate.clinical` — clinical efficacy (CE) over labeler output, per region, region recognition;
* :mod:`~rrg3d.evaluate.petrg` — PETRG-Score (PET/CT region statuses: PET-All, PET-Abnormal, CT-All, CT-Abnormal);
* :mod:`~rrg3d.evaluate.lengths` — report-length KDE, KL divergence, PNG;
* :mod:`~rrg3d.evaluate.bootstrap` — bootstrap CIs and the paired bootstrap;
* :mod:`~rrg3d.evaluate.records`, :mod:`~rrg3d.evaluate.runner`, :mod:`~rrg3d.evaluate.render` — loading and
  pairing files, the whole evaluation, and its outputs. Judges live in :mod:`rrg3d.judge`.

Nothing heavy is imported here; import the submodules.
"""
