"""The finding classifier and diagnosis prompts: masked loss, threshold calibration, the prompt line, the same calls
in training batches and in generation, and checkpoints that carry the head and its threshold."""

from __future__ import annotations

import math

import pytest
import torch

from rrg3d.errors import ConfigError
from rrg3d.models.classifier import ClassifierConfig, FindingClassifier, soft_histogram
from rrg3d.models.config import PromptConfig, load_model_config
from rrg3d.text.labels import CTRATE_LABELS

PROMPT = "Findings the image classifier calls: {findings}."


def _config_with_classifier(**classifier):
    config = load_model_config("tiny_ctvit_v").to_dict()
    config["vision"]["classifier"] = classifier or {"hidden": 0}
    config["prompt"]["findings"] = PROMPT
    return load_model_config(config)


def test_loss_is_the_cross_entropy_of_the_known_labels_only():
    head = FindingClassifier(8)
    logits = torch.randn(3, 18, requires_grad=True)
    labels = torch.randint(0, 2, (3, 18)).float()
    labels[0, :5] = math.nan
    known = ~torch.isnan(labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], labels[known])
    torch.testing.assert_close(head.loss(logits, labels), expected)
    nothing_known = head.loss(logits, torch.full((3, 18), math.nan))
    assert float(nothing_known.detach()) == 0.0
    nothing_known.backward()  # still part of the graph (no unused-parameter errors under DDP)
    with pytest.raises(ValueError, match="18 columns"):
        head.loss(logits, labels[:, :4])


def test_a_head_on_some_labels_reads_their_columns():
    head = FindingClassifier(4, ClassifierConfig(labels=["Lung nodule", "Emphysema"]))
    grid = torch.randn(2, 3, 3, 3, 4)
    assert head(grid).shape == (2, 2)
    labels = torch.arange(18.0).expand(2, 18)
    assert head.targets(labels)[0].tolist() == [CTRATE_LABELS.index("Lung nodule"), CTRATE_LABELS.index("Emphysema")]
    with pytest.raises(ValueError, match="unknown"):
        ClassifierConfig(labels=["Broken leg"])
    with pytest.raises(ValueError, match="repeated"):
        ClassifierConfig(labels=["Emphysema", "Emphysema"])
    with pytest.raises(ValueError, match="encoder grid"):
        head(torch.randn(2, 4))


def test_the_intensity_histogram_counts_voxels_per_bin_and_channel():
    volumes = torch.full((2, 2, 4, 4, 4), 0.05)  # the centre of bin 0 of 10 over [0, 1]
    volumes[0, 0, :2] = 0.95  # half the voxels of channel 0 of study 0 at the centre of bin 9
    volumes[1] = 0.5
    histogram = soft_histogram(volumes, 10, (0.0, 1.0)).reshape(2, 2, 10)
    torch.testing.assert_close(histogram.sum(-1), torch.ones(2, 2))
    assert histogram[0, 0, 0] > 0.4 and histogram[0, 0, 9] > 0.4 and histogram[0, 0, 1:9].sum() < 0.2
    assert histogram[0, 1].argmax() == 0 and histogram[1, 0, 4] == histogram[1, 0, 5]  # 0.5 sits between two bins
    head = FindingClassifier(4, ClassifierConfig(histogram_bins=10), in_channels=2)
    assert head(torch.randn(2, 3, 3, 3, 4), volumes).shape == (2, 18)
    with pytest.raises(ValueError, match="pass the volumes"):
        head(torch.randn(2, 3, 3, 3, 4))
    with pytest.raises(ValueError, match="histogram_range"):
        ClassifierConfig(histogram_bins=4, histogram_range=(1.0, 0.0))


def test_block_histograms_keep_where_the_intensities_are():
    volumes = torch.full((1, 1, 4, 4, 6), 0.05)
    volumes[0, 0, :2, :, 3:] = 0.95  # upper slices, the second half of x: block (0, 0, 1) of a 2 x 1 x 2 grid
    blocks = soft_histogram(volumes, 10, (0.0, 1.0), (2, 1, 2)).reshape(2, 1, 2, 10)
    torch.testing.assert_close(blocks.sum(-1), torch.ones(2, 1, 2))
    assert blocks[0, 0, 1, 9] > 0.75 and blocks[0, 0, 0, 0] > 0.75 and blocks[1, :, :, 9].max() < 0.01
    whole = soft_histogram(volumes, 10, (0.0, 1.0))
    torch.testing.assert_close(blocks.mean((0, 1, 2)), whole[0])  # equal blocks average to the global histogram
    head = FindingClassifier(4, ClassifierConfig(histogram_bins=10, histogram_blocks=(2, 1, 2)))
    assert head.features(torch.randn(1, 2, 2, 2, 4), volumes).shape == (1, 2 * 4 + 4 * 10)
    with pytest.raises(ValueError, match="exceed the volume"):
        soft_histogram(volumes, 10, (0.0, 1.0), (8, 1, 1))
    with pytest.raises(ValueError, match="histogram_blocks"):
        ClassifierConfig(histogram_bins=4, histogram_blocks=(2, 2))


def test_the_histogram_equals_the_full_gaussian_kernel_sum():
    """The five-nearest-bins count agrees with every bin's kernel averaged over each block (values in and out of
    range), and uneven blocks split an axis into contiguous near-equal parts."""
    generator = torch.Generator().manual_seed(0)
    volumes = torch.rand(3, 2, 4, 6, 8, generator=generator) * 1.4 - 0.2
    volumes[0, 0] = -3.0  # far below the range: (almost) all of it in the first bin
    bins, blocks = 12, (2, 3, 2)
    centres = (torch.arange(bins) + 0.5) / bins
    clamped = volumes.clamp(-0.5 / bins, 1 + 0.5 / bins)  # out of range: half a bin beyond the edge
    kernel = torch.exp(-2.0 * ((clamped.unsqueeze(-1) - centres) * bins) ** 2)  # [B, C, D, H, W, bins]
    pooled = kernel.view(3, 2, 2, 2, 3, 2, 2, 4, bins).mean((3, 5, 7))  # [B, C, bz, by, bx, bins]
    expected = (pooled / pooled.sum(-1, keepdim=True)).flatten(1)
    torch.testing.assert_close(soft_histogram(volumes, bins, (0.0, 1.0), blocks), expected, atol=1e-5, rtol=0)
    assert soft_histogram(volumes, bins, (0.0, 1.0), blocks).view(3, 2, 12, bins)[0, 0, :, 0].min() > 0.99
    uneven = soft_histogram(torch.arange(5.0).view(1, 1, 5, 1, 1) / 5 + 0.1, 5, (0.0, 1.0), (2, 1, 1)).view(2, 5)
    assert uneven[0, :3].min() > 0.3 and uneven[1, 3:].min() > 0.45  # voxels 0-2 | 3-4 (i * 2 // 5)


def test_calibration_picks_the_threshold_with_the_best_micro_f1():
    head = FindingClassifier(4)
    labels = torch.zeros(4, 18)
    labels[:2, 0] = 1  # two positives of label 0 at probability 0.45 and 0.4; negatives at 0.2 and 0.42
    probs = torch.full((4, 18), 0.01)
    probs[:, 0] = torch.tensor([0.45, 0.4, 0.2, 0.42])
    logits = torch.logit(probs)
    # 0.25 … 0.40 call both positives and one negative (F1 0.8, the best); of those, 0.4 is nearest 0.5
    assert head.calibrate(logits, labels) == pytest.approx(0.4)
    assert float(head.threshold) == pytest.approx(0.4)
    assert head.micro_f1(logits, labels) == pytest.approx(0.8)
    assert head.calls(logits)[0] == [CTRATE_LABELS[0]] and head.calls(logits)[2] == []
    labels[3, 0] = math.nan  # an unknown label is neither a hit nor a false call
    assert head.micro_f1(logits, labels) == pytest.approx(1.0)


def test_the_prompt_line_and_config_errors(tmp_path):
    prompt = PromptConfig(findings=PROMPT)
    assert prompt.with_findings("<image>\nWrite.", ["Lung nodule", "Emphysema"]) == (
        "<image>\nWrite.\nFindings the image classifier calls: lung nodule, emphysema.")
    assert prompt.with_findings("<image>", []).endswith("calls: none.")
    assert PromptConfig().with_findings("<image>", ["Lung nodule"]) == "<image>"
    with pytest.raises(ConfigError, match="findings"):
        PromptConfig(findings="no placeholder")
    ordered = PromptConfig(findings=PROMPT, findings_order=["Pleural effusion", "Lung nodule"])
    assert ordered.with_findings("<image>", ["Emphysema", "Lung nodule", "Pleural effusion", "Cardiomegaly"]) == (
        "<image>\nFindings the image classifier calls: pleural effusion, lung nodule, emphysema, cardiomegaly.")
    with pytest.raises(ConfigError, match="unknown Lung nodules"):
        PromptConfig(findings=PROMPT, findings_order=["Lung nodules"])
    with pytest.raises(ConfigError, match="twice"):
        PromptConfig(findings=PROMPT, findings_order=["Emphysema", "Emphysema"])
    with pytest.raises(ConfigError, match="'reports'"):
        PromptConfig(findings=PROMPT, findings_order="labels")
    unfilled = PromptConfig(findings=PROMPT, findings_order="reports")  # before a training run fills it: label order
    assert unfilled.with_findings("<image>", ["Lung nodule", "Emphysema"]).endswith("lung nodule, emphysema.")
    config = load_model_config("tiny_ctvit_v").to_dict()
    config["prompt"]["findings_order"] = ["Emphysema"]  # written as YAML lists are: through the config loader
    assert load_model_config(config).prompt.findings_order == ["Emphysema"]
    config["prompt"]["findings"] = PROMPT
    with pytest.raises(ConfigError, match=r"needs vision\.classifier"):
        load_model_config(config)
    config["vision"]["classifier"] = {"hidden": -1}
    with pytest.raises(ConfigError, match="hidden"):
        load_model_config(config)
    config["vision"]["classifier"] = {"hiden": 2}
    with pytest.raises(ConfigError, match="hiden"):
        load_model_config(config)


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers")
    from rrg3d.models.vlm import ReportGenerator

    return ReportGenerator.from_config(_config_with_classifier(hidden=8, histogram_bins=16), seed=0).eval()


def test_training_and_generation_prompts_carry_the_same_calls(model, monkeypatch):
    volumes = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.vision.encode(volumes)[1]
    model.vision.classifier.threshold.fill_(float(torch.sigmoid(logits[0]).median()))
    calls = model.vision.classifier.calls(logits)
    assert calls[0] and len(calls[0]) < 18
    batch = model.report_batch(volumes, ["Report one.", "Report two."], max_length=400)
    text = model.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] == -100])
    expected = ", ".join(name[0].lower() + name[1:] for name in calls[0])
    assert f"calls: {expected}." in text
    seen = []
    original = model.prompt_batch
    monkeypatch.setattr(model, "prompt_batch", lambda n, b, instructions=None, region_tokens=0:
                        seen.append(instructions) or original(n, b, instructions, region_tokens=region_tokens))
    model.generate_ids(volumes, model.config.generation.replace(max_new_tokens=2))
    assert seen[0] == model.finding_instructions(logits)
    assert seen[0][0].endswith(f"calls: {expected}.")
    model.vision.classifier.threshold.fill_(2.0)  # calls nothing
    assert model.finding_instructions(logits)[1].endswith("calls: none.")
    model.vision.classifier.threshold.fill_(0.5)


def test_forward_returns_the_classifier_loss_and_checkpoints_keep_the_head(model, tmp_path):
    from rrg3d.models.checkpoint import load_checkpoint, read_manifest, save_checkpoint

    volumes = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(1))
    model.set_trainable(encoder=False, lm="lora", classifier=True)
    assert model.trainable_parameters()["classifier"] > 0
    batch = model.report_batch(volumes, ["Report one.", "Report two."])
    labels = torch.randint(0, 2, (2, 18)).float()
    output = model(volumes, batch["input_ids"], batch["attention_mask"], batch["labels"], finding_labels=labels)
    assert output.finding_logits.shape == (2, 18)
    torch.testing.assert_close(output.classifier_loss, model.vision.classifier.loss(output.finding_logits, labels))
    (output.loss + output.classifier_loss).backward()
    assert model.vision.classifier.head[-1].weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.set_trainable(encoder=False, lm="lora", classifier=False)
    model.vision.classifier.threshold.fill_(0.35)
    path = save_checkpoint(model, tmp_path / "ckpt")
    assert read_manifest(path)["model"]["vision"]["classifier"]["hidden"] == 8
    loaded = load_checkpoint(path)
    assert float(loaded.vision.classifier.threshold) == pytest.approx(0.35)
    for key, value in model.vision.classifier.state_dict().items():
        assert torch.equal(loaded.vision.classifier.state_dict()[key], value), key
    assert loaded.uses_findings_prompt
    model.vision.classifier.threshold.fill_(0.5)


def test_predictions_record_what_the_classifier_called(model, tmp_path):
    import json

    import nibabel as nib
    import numpy as np

    from rrg3d.models.inference import generate_reports

    scan = tmp_path / "scan.nii.gz"
    hu = np.random.default_rng(0).uniform(-1000, 400, (40, 48, 24)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), scan)
    out = tmp_path / "pred.jsonl"
    generate_reports(model, [scan], out, settings=model.config.generation.replace(max_new_tokens=2), progress=False)
    record = json.loads(out.read_text())
    found = record["meta"]["findings_classifier"]
    assert set(found["probabilities"]) == set(CTRATE_LABELS) and found["threshold"] == 0.5
    assert found["called"] == [n for n in CTRATE_LABELS if found["probabilities"][n] >= 0.5]


def test_outputs_survive_accelerates_fp32_conversion():
    """Under autocast accelerate rebuilds the forward's output mapping; the classifier's entries must stay."""
    from accelerate.utils import convert_to_fp32

    from rrg3d.models.vlm import GeneratorOutput

    output = GeneratorOutput(loss=torch.tensor(1.0, dtype=torch.bfloat16), classifier_loss=torch.tensor(0.5))
    converted = convert_to_fp32(output)
    assert isinstance(converted, GeneratorOutput) and converted.loss.dtype == torch.float32
    assert float(converted.classifier_loss) == 0.5 and converted.finding_logits is None
    with pytest.raises(AttributeError, match="holds"):
        converted.no_such_output  # noqa: B018


def test_fit_standardises_the_features_and_learns_the_labels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200, 18), generator=generator).float()
    signal = labels[:, :4] * 0.01  # tiny-scale features that carry labels 0-3 (like histogram shares)
    features = torch.cat([signal + 0.002 * torch.randn(200, 4, generator=generator),
                          5 + 3 * torch.randn(200, 6, generator=generator)], dim=1)  # large-scale noise
    labels[:10, 5] = math.nan
    head = FindingClassifier(3, ClassifierConfig(hidden=0, histogram_bins=4))  # 2 × 3 pooled + 4 = 10 features
    head.head.requires_grad_(False)  # frozen parts are fitted all the same and stay frozen
    assert not bool(head.fitted)
    head.fit(features, labels)
    assert bool(head.fitted) and not any(p.requires_grad for p in head.parameters())
    torch.testing.assert_close(head.feature_mean, features.mean(0))
    with torch.no_grad():
        probs = torch.sigmoid(head.head(head.standardize(features)))
    from rrg3d.train.metrics import zero_shot_auroc

    auroc = zero_shot_auroc(probs, labels)["per_label"]
    assert min(auroc[CTRATE_LABELS[k]] for k in range(4)) > 0.95  # read through the standardisation
    with pytest.raises(ValueError, match="rows"):
        head.fit(features[:1], labels[:1])


def test_teacher_forced_prompts_list_the_true_findings(model):
    volumes = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(2, 18)
    labels[0, CTRATE_LABELS.index("Emphysema")] = 1
    labels[0, CTRATE_LABELS.index("Lung nodule")] = math.nan  # unknown: not listed
    model.vision.classifier.threshold.fill_(2.0)  # the classifier calls nothing

    def prompts(share: float) -> list[str]:
        batch = model.report_batch(volumes, ["One.", "Two."], max_length=400, true_labels=labels, true_share=share)
        return [model.tokenizer.decode(ids[lab == -100]) for ids, lab in zip(batch["input_ids"], batch["labels"],
                                                                              strict=True)]

    passes = []
    original = model.vision.finding_logits
    model.vision.finding_logits = lambda volumes: passes.append(len(volumes)) or original(volumes)
    try:
        forced = prompts(1.0)
        assert not passes  # every sample teacher-forced: no classifier pass
        prompts(0.0)
        assert passes == [2]
    finally:
        del model.vision.finding_logits
    assert "calls: emphysema." in forced[0] and "calls: none." in forced[1]
    assert all("calls: none." in text for text in prompts(0.0))
    model.vision.classifier.threshold.fill_(0.5)
