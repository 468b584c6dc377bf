"""rrg3d evaluate --lang zh: per-character NLG, English-rule metrics skipped with warnings, lengths in characters."""

from __future__ import annotations

import json
from pathlib import Path

from rrg3d.cli import main

REFERENCES = ["检查所见：纵隔多发肿大淋巴结，SUVmax 12.3。诊断意见：淋巴瘤。", "脾脏增大。", "双肺未见异常。"]
PREDICTIONS = ["纵隔淋巴结肿大，SUVmax约11.8。诊断意见：淋巴瘤可能。", "脾脏稍大。", "双肺未见异常。"]


def _write(path: Path, texts: list[str]) -> Path:
    lines = [json.dumps({"id": f"s{i}", "report": text}, ensure_ascii=False) for i, text in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_evaluate_chinese_reports(tmp_path: Path) -> None:
    refs, preds = _write(tmp_path / "refs.jsonl", REFERENCES), _write(tmp_path / "pred.jsonl", PREDICTIONS)
    code = main(["evaluate", str(preds), "--refs", str(refs), "--out", str(tmp_path / "out"), "--lang", "zh",
                 "--bootstrap", "20", "--no-progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert 0 < metrics["coco"]["bleu_1"] < 1 and metrics["coco"]["meteor"] is None
    assert 0 < metrics["extra"]["meteor_nltk"] < 1 and metrics["implementation"]["lang"] == "zh"
    assert "ce" not in metrics and "region_recognition" not in metrics
    assert any("clinical efficacy (CE) is not computed" in w for w in metrics["warnings"])
    assert any("WordNet synonymy does not apply to Chinese" in w for w in metrics["warnings"])
    assert metrics["lengths"]["unit"] == "characters" and metrics["lengths"]["reference"]["max"] == 22


def test_evaluate_chinese_reports_warns_about_the_english_petrg_rules(tmp_path: Path) -> None:
    refs, preds = _write(tmp_path / "refs.jsonl", REFERENCES), _write(tmp_path / "pred.jsonl", PREDICTIONS)
    assert main(["evaluate", str(preds), "--refs", str(refs), "--out", str(tmp_path / "out"), "--lang", "zh",
                 "--petrg", "--bootstrap", "0", "--no-progress", "--no-java"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert any("rule PETRG extractor reads English reports only" in w for w in metrics["warnings"])
