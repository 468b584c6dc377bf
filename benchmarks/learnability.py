"""Does the image drive the text? Train on phantoms, report on held-out phantoms, compare with two controls.

Per encoder architecture (default the learnability-size ``small_ctvit_v`` and ``small_resnet3d``, CPU-trainable in
minutes): CT-CLIP pretraining of the encoder on the training split (frozen MiniLM text tower, each impression encoded
once; mean+max pooling; label supervision, ``--clip-label-weight``), then align (projector and finding classifier)
and LoRA SFT on the impressions with the encoder frozen; then greedy reports for the held-out test phantoms.
Control a, the text prior: the same align + SFT with every volume replaced by zeros (run once, with
``--blank-encoder``: an encoder that only ever sees zeros hands the LM one constant input whatever its kind, and
CLIP pretraining on zeros is skipped for the same reason). Control b: the majority-class report (the training report
whose 18-label vector is the most frequent), for every test case. Every arm is scored with the evaluation suite:
clinical efficacy (CE) micro/macro-F1 of the generated reports against the phantoms' true labels, BLEU-4, METEOR,
ROUGE-L; the CLIP stage's zero-shot AUROC on the test phantoms (with retrieval R@k, the label head's AUROC and
each label's, under ``clip.test``) is reported beside its arm, and so is the *readout ceiling* of the trained
encoder: a logistic probe on its frozen, pooled features (threshold chosen on the validation phantoms) — the CE
micro-F1 a report writer that read those features perfectly through a linear map would reach.

Diagnosis prompting is on by default (``--no-findings-prompt``: off, and the classifier options are ignored; see
``rrg3d.models.classifier``): a finding classifier reads the encoder grid plus soft intensity histograms of the input
(16 bins per octant, ``--histogram-bins``, ``--histogram-blocks``), is fitted on the training phantoms before align,
trains beside the projector and has its threshold chosen on the validation phantoms; every prompt lists the
findings it calls, in the order the training impressions name findings (``--findings-order reports``), in
generation and validation. Training prompts list the true findings instead (teacher forcing,
``--true-findings-share 1.0``): the LM learns to write what the list says. Arm folders name the setup
(``<encoder>/image_labels1_findings_b222_ord_true100``, ``blank_findings_b222_ord_true100``, CLIP in
``<encoder>/clip_labels1``) and the arms report the classifier's own test micro-F1 and AUROC beside the reports'. A
rerun reuses every stage run that finished with the same recipe and the same model config file contents; earlier
setups are in the ``args`` of their result files.

Targets (issue 6): CE micro-F1 ≥ 0.60 and at least 0.20 above both controls, for both encoders; CLIP zero-shot
AUROC ≥ 0.80. Arms measured by earlier runs on the same phantoms join the table with ``--merge``. ``--clip-only``
trains (or reuses) just the CLIP runs and scores them; ``--clip-field``, ``--clip-text-pooling`` and
``--clip-histogram-bins`` vary what CLIP reads (see ``rrg3d.models.clip``); ``--clip-text-adapter N`` trains N
transformer blocks on the frozen text tower's token states (the text side learns the reports' wording, negations
included; the prompts stay unseen); ``--clip-prompt-weight`` adds vocabulary fine-tuning (the prompts' log-odds
trained on the labels, as CT-CLIP's VocabFine: the verdict records that the prompts were seen in training). Each
CLIP run is scored on the validation and test phantoms under every wording of :func:`prompt_wordings` (CT-CLIP's
negated pairs and pairs anchored on a normal study); the verdict is the test AUROC of the wording validation chose.
The scores also hold a logistic probe on the frozen pooled image features (what any read-out of them could reach)
and study-level bootstrap intervals of the verdict. The CLIP target's runs, on the multi-window encoders (see the
README), strict zero-shot, on 2400 phantoms (the first 1200 are the 1200-phantom set: case ``i`` of a seed is the
same whatever the count; the ResNet run is trained with ``--mixed-precision no``; another value changes its recipe,
and the loop refuses to reuse the folder):

    python benchmarks/learnability.py --clip-only --phantoms 2400 --encoders small_resnet3d_mw --mixed-precision no
    python benchmarks/learnability.py --clip-only --phantoms 2400 --encoders small_ctvit_v_mw --clip-steps 2000

the same on 1200 phantoms (without ``--phantoms``), and with vocabulary fine-tuning:

    python benchmarks/learnability.py --clip-only --encoders small_resnet3d_mw small_ctvit_v_mw --clip-prompt-weight 1
    python benchmarks/learnability.py --clip-only --encoders small_ctvit_v_mw --clip-prompt-weight 1 --clip-steps 2000

and with a text adapter on the findings:

    python benchmarks/learnability.py --clip-only --encoders small_resnet3d_mw --clip-field findings \\
        --clip-text-pooling sentences --clip-text-adapter 1

    python benchmarks/learnability.py [--encoders small_ctvit_v small_resnet3d] [--phantoms 1200]
        [--clip-steps 1200] [--clip-label-weight 1.0] [--align-steps 300] [--sft-steps 450] [--arms image blank]
        [--no-findings-prompt] [--findings-order {reports,labels}] [--true-findings-share 1.0]
        [--merge earlier.json] [--out benchmarks/results/learnability.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def score(predictions: Path, references: Path, out: Path) -> dict[str, Any]:
    from rrg3d.evaluate.runner import EvaluateOptions, evaluate_files

    metrics = evaluate_files(predictions, references, out, EvaluateOptions(bootstrap=200, progress=False))
    coco, ce = metrics["coco"], metrics["ce"]
    return {"ce_micro_f1": ce["micro_f1"], "ce_macro_f1": ce["macro_f1"], "ce_micro_precision": ce["micro_precision"],
            "ce_micro_recall": ce["micro_recall"], "bleu_4": coco["bleu_4"],
            "meteor": coco["meteor"], "rouge_l": coco["rouge_l"], "ci": metrics.get("ci", {}).get("ce", {})}


FINDINGS_PROMPT = "Findings the image classifier calls: {findings}."


def findings_variant(args: argparse.Namespace, teacher: bool = True) -> str:
    """The suffix of a diagnosis-prompt arm's folder (and, without ``teacher``, its model config): ``_findings``,
    + ``_b222`` with block histograms, + ``_ord`` with calls in report order, + ``_true100`` with teacher-forced
    prompts, + ``_fit600`` / ``_clr0`` with a classifier fitted on 600 studies / not trained in align."""
    if not args.findings_prompt:
        return ""
    blocks = "".join(str(b) for b in args.histogram_blocks)
    share = round(100 * args.true_findings_share) if teacher else 0
    order = "_ord" if args.findings_order == "reports" else ""
    fitted = ""
    if teacher:
        fitted = (f"_fit{args.fit_samples}" if args.fit_samples else "") + \
            (f"_clr{args.classifier_lr_mult:g}" if args.classifier_lr_mult != 1 else "")
    return ("_findings" + ("" if blocks == "111" else f"_b{blocks}") + order + (f"_true{share}" if share else "")
            + fitted)


def generator_architecture(architecture: str, work: Path, args: argparse.Namespace) -> str:
    """The report generator's architecture: ``architecture`` itself, or with ``--findings-prompt`` a copy with a
    finding classifier on the encoder grid whose calls are written into every prompt (diagnosis prompting), listed
    in label order or (``--findings-order reports``) in the order the training reports name them."""
    if not args.findings_prompt:
        return architecture
    import yaml

    from rrg3d.models.config import load_model_config

    config = load_model_config(architecture).to_dict()
    config["name"] = f"{config['name']}{findings_variant(args, teacher=False)}"
    config["vision"]["classifier"] = {"hidden": 0, "histogram_bins": args.histogram_bins}
    if list(args.histogram_blocks) != [1, 1, 1]:
        config["vision"]["classifier"]["histogram_blocks"] = list(args.histogram_blocks)
    config["prompt"]["findings"] = FINDINGS_PROMPT
    if args.findings_order == "reports":
        from rrg3d.data.manifest import load_manifest
        from rrg3d.text.labeler import mention_order
        from rrg3d.train.data import record_text

        texts = [record_text(r, args.field) for r in load_manifest(work / "phantoms" / "manifest.jsonl")
                 if r.get("split") == "train"]
        config["prompt"]["findings_order"] = mention_order(texts)
    path = work / "configs" / f"{config['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


#: stage runs this invocation reused instead of training (their minutes are not in the arm's wall time)
REUSED: list[str] = []


def stage_minutes(stage_dirs: list[Path]) -> dict[str, float]:
    """Training minutes of each finished stage of an arm (``elapsed_s`` of its last logged step; validation and
    generation not included), read from the runs' ``train_log.csv``."""
    import csv

    found = {}
    for folder in stage_dirs:
        log = folder / "train_log.csv"
        if not log.is_file():
            continue
        with open(log, encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if rows and rows[-1].get("elapsed_s"):
            found[folder.name] = round(float(rows[-1]["elapsed_s"]) / 60, 1)
    return found


def finished_or_train(name: str, overrides: list[str], metrics: dict[str, Any] | None = None) -> Path:
    """The final checkpoint of this exact recipe: reused when an earlier run of it finished (same fingerprint; its
    last validation metrics go into ``metrics``), resumed from its last checkpoint when a run of it was interrupted,
    trained otherwise. A rerun thus redoes only what changed."""
    import csv

    from rrg3d.train import train
    from rrg3d.train.recipe import load_recipe, recipe_from_yaml

    recipe = load_recipe(name, overrides)
    folder = recipe.output_dir
    config, log, stamp = folder / "config.yaml", folder / "eval_log.csv", folder / "model_config.sha256"
    # the recipe names its model config by path: a run is reused only if that file still reads the same
    model_file = Path(str(recipe.model.config))
    model_hash = hashlib.sha256(model_file.read_bytes()).hexdigest() if model_file.is_file() else "-"
    same_recipe = config.is_file() and \
        recipe_from_yaml(config.read_text(encoding="utf-8")).fingerprint() == recipe.fingerprint()
    recorded_hash = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None
    if (folder / "final" / "rrg3d.yaml").is_file() and same_recipe and recorded_hash == model_hash:
        print(f"reusing the finished run {folder}", flush=True)
        REUSED.append(str(folder))
        if metrics is not None and log.is_file():
            with open(log, encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            metrics.update({k: float(v) for k, v in (rows[-1] if rows else {}).items()
                            if v not in ("", None) and k not in ("step", "phase")})
        return folder / "final"
    # an interrupted run of this same recipe (same fingerprint, same model config) resumes from its last checkpoint
    resume = same_recipe and not (folder / "final").exists() and recorded_hash in (None, model_hash)
    if resume:
        print(f"resuming the interrupted run {folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(model_hash + "\n", encoding="utf-8")
    result = train(recipe, resume=resume)
    if metrics is not None:
        metrics.update(result.metrics)
    return Path(result.final)


CLIP_STEPS = 1200  # the default CLIP budget (runs with another are named _steps<N>)


def clip_variant(args: argparse.Namespace) -> str:
    """The suffix of a CLIP run's folder and of its image arms': ``_labels<w>`` with label supervision, ``_prompts<w>``
    with vocabulary fine-tuning, ``_hist<n>`` with intensity histograms beside the pooled features, ``_sent`` with
    sentence-pooled text, ``_text`` with a trained text tower, ``_adapter<n>`` with a text adapter, ``_steps<n>``
    with another number of CLIP steps than the default, ``_<field>`` when CLIP reads another report field than the
    generator writes."""
    suffix = f"_labels{args.clip_label_weight:g}" if args.clip_label_weight > 0 else ""
    suffix += f"_prompts{args.clip_prompt_weight:g}" if args.clip_prompt_weight > 0 else ""
    suffix += f"_hist{args.clip_histogram_bins}" if args.clip_histogram_bins else ""
    suffix += "_sent" if args.clip_text_pooling == "sentences" else ""
    suffix += "_text" if args.clip_text else ""
    suffix += f"_adapter{args.clip_text_adapter}" if args.clip_text_adapter else ""
    suffix += f"_steps{args.clip_steps}" if args.clip_steps not in (0, CLIP_STEPS) else ""  # 0: no CLIP run
    return suffix + (f"_{args.clip_field}" if args.clip_field not in (None, args.field) else "")


def clip_dir(run_dir: Path, args: argparse.Namespace) -> Path:
    """The encoder's CT-CLIP run: one per architecture and CLIP setting (``<work>/<arch>/clip[_labels1]``), shared by
    its image arms — the CLIP recipe does not depend on how the report generator is set up."""
    return run_dir.parent / f"clip{clip_variant(args)}"


def common_overrides(architecture: str, manifest: Path, work: Path, args: argparse.Namespace, blank: bool) -> list[str]:
    """The recipe overrides every stage of an arm shares (a stage's own come after them and win)."""
    return [f"model.config={architecture}", f"data.manifest={manifest}", f"data.report_field={args.field}",
            f"data.blank_images={str(blank).lower()}", f"data.batch_size={args.batch_size}",
            f"data.cache_dir={work / 'cache'}", f"data.max_length={args.max_length}",
            f"seed={args.seed}", "data.max_val_samples=null",  # validate on the whole validation split
            "train.progress=false", "train.save_every=0", f"train.threads={os.cpu_count() or 1}",
            f"train.mixed_precision={args.mixed_precision}",
            "phases.0.preset=null"]  # every stage at the architecture's own preset (the tiny recipes name tiny)


def train_clip(architecture: str, manifest: Path, run_dir: Path, args: argparse.Namespace, common: list[str],
               clip_metrics: dict[str, Any]) -> Path:
    """The encoder's CT-CLIP run (trained, resumed or reused), its last validation metrics in ``clip_metrics`` and
    its scores on the held-out test phantoms under ``clip_metrics["test"]`` (the target's measurement)."""
    blocks = ",".join(str(b) for b in args.histogram_blocks)
    clip = finished_or_train("tiny_clip", [
        *common, f"run_dir={clip_dir(run_dir, args)}", f"phases.0.steps={args.clip_steps}",
        f"data.batch_size={args.clip_batch_size}", f"optim.lr={args.clip_lr}", "optim.weight_decay=0.05",
        f"data.report_field={args.clip_field or args.field}",
        "model.clip.pooling=meanmax", "model.clip.embed_dim=128", f"model.clip.label_weight={args.clip_label_weight}",
        f"model.clip.prompt_weight={args.clip_prompt_weight}",
        f"model.clip.text_pooling={args.clip_text_pooling}", f"model.clip.text_adapter_layers={args.clip_text_adapter}",
        f"model.clip.histogram_bins={args.clip_histogram_bins}",
        *([f"model.clip.histogram_blocks=[{blocks}]"] if args.clip_histogram_bins else []),
        f"model.clip.train_text={str(args.clip_text).lower()}", "data.max_val_samples=200",
        f"data.augment.enabled={str(args.augment).lower()}",
        *([f"optim.lr_multipliers={{text: {args.clip_text_lr_mult}}}"] if args.clip_text else [])], clip_metrics)
    clip_metrics["test"] = clip_test_scores(clip, manifest, run_dir.parent.parent / "cache", args)
    return clip


def prompt_wordings() -> dict[str, list[list[str]]]:
    """The zero-shot prompt wordings every CLIP run is scored with (none of them is trained, unless
    --clip-prompt-weight): CT-CLIP's negated pairs and other negated wordings, their ensemble, and two whose absent
    side describes a normal study (:func:`rrg3d.models.clip.anchored_prompts`)."""
    from rrg3d.models.clip import anchored_prompts

    wordings = {
        "is_present": [["{label} is present.", "{label} is not present."]],  # CT-CLIP's, the default
        "there_is": [["There is {label_lower}.", "There is no {label_lower}."]],
        "short": [["{label}.", "No {label_lower}."]],
        "is_seen": [["{label} is seen.", "No {label_lower} is seen."]],
    }
    wordings["ensemble"] = [pair for pairs in wordings.values() for pair in pairs]
    wordings["is_present_vs_normal"] = [list(pair) for pair in anchored_prompts("{label} is present.")]
    wordings["there_is_vs_normal"] = [list(pair) for pair in anchored_prompts("There is {label_lower}.")]
    return wordings


def clip_test_scores(checkpoint: Path, manifest: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A CT-CLIP checkpoint on the test phantoms: retrieval, macro zero-shot and label-head AUROC, and per label;
    the zero-shot macro AUROC under every wording of :func:`prompt_wordings` on the test (``prompt_wordings``) and
    validation phantoms (``prompt_wordings_val``), the mean cosine between each wording's present and absent text
    embeddings (``prompt_cosine``: near 1, the zero-shot direction is mostly noise), and the wording validation
    chooses with its test AUROC (``zero_shot_val_chosen``, with a study-level bootstrap 95% interval and the paired
    bootstrap difference from CT-CLIP's wording); and what its frozen pooled image features carry
    (``linear_probe_auroc``: a logistic probe fitted on the training phantoms, the ceiling for any read-out of those
    features)."""
    import torch

    from rrg3d.evaluate.bootstrap import bootstrap_ci, macro_auroc_statistic, paired_bootstrap
    from rrg3d.models.checkpoint import load_clip_checkpoint, read_manifest
    from rrg3d.preprocess.presets import load_preset
    from rrg3d.train.clip import clip_scores
    from rrg3d.train.data import build_dataset
    from rrg3d.train.loop import iterate_batches
    from rrg3d.train.metrics import linear_probe_readout, zero_shot_auroc

    model = load_clip_checkpoint(checkpoint).eval()
    preset = load_preset(read_manifest(checkpoint)["preprocess"])
    splits = {split: build_dataset(manifest, preset, split=split, cache_dir=cache_dir,
                                   report_field=args.clip_field or args.field, progress=False)
              for split in ("train", "val", "test")}
    scores = clip_scores(model, splits["test"], batch_size=16)
    pooled: dict[str, Any] = {}
    wordings: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    logits: dict[str, dict[str, Any]] = {"val": {}, "test": {}}
    cosine = {}
    with torch.no_grad():
        for split, dataset in splits.items():
            pooled[split] = torch.cat([model.pool_image(batch["volumes"]).float()
                                       for batch in iterate_batches(dataset, 16)])
        image_embeds = {split: torch.nn.functional.normalize(model.vision_proj(pooled[split]), dim=-1)
                        for split in wordings}
        for name, pairs in prompt_wordings().items():
            text = model.prompt_embeddings(prompts=pairs).float()  # [L, 2, E]
            cosine[name] = round(float((text[:, 0] * text[:, 1]).sum(-1).mean()), 4)
            difference = text[:, 0] - text[:, 1]
            for split in wordings:
                logits[split][name] = (image_embeds[split] @ difference.T).numpy()
                wordings[split][name] = round(zero_shot_auroc(logits[split][name],
                                                              splits[split].label_matrix())["macro"], 4)
    chosen = max(wordings["val"], key=wordings["val"].get)  # model selection on validation; test stays held out
    # how far the test phantoms pin the verdict down: a study-level bootstrap of the chosen wording's macro AUROC,
    # and paired against CT-CLIP's wording on the same resamples
    test_labels = splits["test"].label_matrix().numpy()
    chosen_auroc = macro_auroc_statistic(logits["test"][chosen], test_labels)
    interval = bootstrap_ci(chosen_auroc, n_resamples=2000, seed=args.seed)
    paired = paired_bootstrap(chosen_auroc, macro_auroc_statistic(logits["test"]["is_present"], test_labels),
                              n_resamples=2000, seed=args.seed)
    probe = linear_probe_readout(*((pooled[split], splits[split].label_matrix()) for split in ("train", "val", "test")))
    return {**{k: round(v, 4) for k, v in scores["metrics"].items()}, "prompt_wordings": wordings["test"],
            "prompt_wordings_val": wordings["val"], "prompt_cosine": cosine,
            "zero_shot_val_chosen": {"wording": chosen, "val": wordings["val"][chosen],
                                     "test": wordings["test"][chosen],
                                     "test_ci95": [round(interval["low"], 4), round(interval["high"], 4)],
                                     "test_minus_is_present": {k: round(paired[k], 4)
                                                               for k in ("delta", "low", "high", "p_value")},
                                     "test_studies": len(test_labels)},
            "linear_probe_auroc": round(probe["test_macro_auroc"], 4), "per_label": scores["per_label"]}


def train_arm(architecture: str, manifest: Path, run_dir: Path, args: argparse.Namespace, blank: bool,
              clip_metrics: dict[str, Any]) -> Path:

    generator = generator_architecture(architecture, run_dir.parent.parent, args)
    common = common_overrides(architecture, manifest, run_dir.parent.parent, args, blank)
    vision_init = []
    if args.clip_steps > 0 and not blank:  # CT-CLIP pretraining of the encoder on the training split's reports
        # (the zeros arm skips it: an encoder that only ever sees zeros gives the LM one constant input anyway)
        clip = train_clip(architecture, manifest, run_dir, args, common, clip_metrics)
        vision_init = [f"model.vision_init={clip}"]
    common[0] = f"model.config={generator}"  # CLIP trained the encoder alone; the generator may add a classifier
    # a finding classifier is fitted on the first --fit-samples training studies (default: every one) before align
    # (its probe), then trains beside the projector; its threshold is chosen on the whole validation split
    classifier_rate = [f"optim.lr_multipliers={{vision.classifier: {args.classifier_lr_mult}}}",
                       f"data.fit_samples={args.fit_samples or args.phantoms}"]
    # teacher-forced diagnosis prompts (a share of the training prompts list the true findings): align and sft
    teacher = ([f"model.true_findings_share={args.true_findings_share}"]
               if args.findings_prompt and args.true_findings_share else [])
    align = finished_or_train("tiny_align", [*common, *vision_init, *teacher, f"run_dir={run_dir / 'align'}",
                                             *(classifier_rate if args.findings_prompt else []),
                                             f"phases.0.steps={args.align_steps}", f"optim.lr={args.align_lr}"])
    return finished_or_train("tiny_sft", [*common, *teacher, f"run_dir={run_dir / 'sft'}",
                                          f"model.init={align}",
                                          f"model.train.encoder={str(args.sft_encoder_lr > 0).lower()}",
                                          f"optim.lr_multipliers={{vision.encoder: {args.sft_encoder_lr}}}"
                                          if args.sft_encoder_lr > 0 else "optim.lr_multipliers={}",
                                          f"phases.0.steps={args.sft_steps}", f"optim.lr={args.sft_lr}"])


def visual_token_stats(model: Any, dataset: Any, count: int = 32) -> dict[str, float]:
    """How the projected visual tokens look to the LM: their norm against its word embeddings', and the share of
    their variance that differs between studies (the rest is what every scan shares at each token position)."""
    import torch

    volumes = torch.stack([dataset[i]["volume"] for i in range(min(count, len(dataset)))])
    with torch.no_grad():
        tokens = model.vision(volumes.to(model.device)).float()  # [B, N, hidden]
        words = model.lm.get_input_embeddings().weight.float()
    return {"visual_norm": float(tokens.norm(dim=-1).mean()), "word_norm": float(words.norm(dim=-1).mean()),
            "between_study_variance": float(tokens.var(0).mean() / tokens.flatten(0, 1).var(0).mean())}


def classifier_scores(model: Any, dataset: Any) -> dict[str, Any]:
    """A finding classifier's calls on the test phantoms: micro-F1 at its (validation-chosen) threshold and macro
    AUROC — what a report that copied the diagnosis prompt would score at best."""
    import torch

    from rrg3d.train.metrics import zero_shot_auroc

    classifier = model.vision.classifier
    if classifier is None:
        return {}
    logits = []
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            volumes = torch.stack([dataset[i]["volume"] for i in range(start, min(len(dataset), start + 16))])
            logits.append(model.vision.finding_logits(volumes.to(model.device)).float().cpu())
    found, labels = torch.cat(logits), dataset.label_matrix()
    auroc = zero_shot_auroc(torch.sigmoid(found), classifier.targets(labels), names=classifier.labels)
    return {"classifier_test_micro_f1": classifier.micro_f1(found, labels), "classifier_test_auroc": auroc["macro"],
            "classifier_threshold": float(classifier.threshold)}


def encoder_readout(encoder: Any, manifest: Path, preset: Any, cache_dir: Path) -> dict[str, Any]:
    """What the frozen encoder's features support: a logistic probe on its mean+max pooled grid (train split),
    threshold chosen on val, CE micro/macro-F1 and AUROC on test — the ceiling for a report writer reading them."""
    import torch

    from rrg3d.train.data import build_dataset
    from rrg3d.train.metrics import linear_probe_readout

    def features(split: str) -> tuple[Any, Any]:
        dataset = build_dataset(manifest, preset, split=split, cache_dir=cache_dir)
        device = next(encoder.parameters()).device
        rows = []
        with torch.no_grad():
            for start in range(0, len(dataset), 32):
                volumes = torch.stack([dataset[i]["volume"] for i in range(start, min(len(dataset), start + 32))])
                grid = encoder(volumes.to(device)).float().flatten(1, 3)  # [B, cells, C]
                rows.append(torch.cat([grid.mean(1), grid.amax(1)], dim=1).cpu())
        return torch.cat(rows), dataset.label_matrix()

    was_training = encoder.training
    encoder.eval()
    try:
        found = linear_probe_readout(features("train"), features("val"), features("test"))
    finally:
        encoder.train(was_training)
    return {f"readout_{k}": v for k, v in found.items() if k != "train_loss"}


def phantom_manifest(work: Path, args: argparse.Namespace) -> Path:
    """The benchmark's phantom set under ``work/phantoms`` (generated once; a rerun reuses it)."""
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    return generate_phantoms(PhantomConfig(n=args.phantoms, seed=args.seed, shape=tuple(args.shape), styles=1),
                             work / "phantoms", workers=2, progress=False)


def inspect(checkpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    """Image gain and visual-token statistics of a trained report generator on the test phantoms."""
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.train.data import build_dataset
    from rrg3d.train.generator import image_conditioned_losses

    work = Path(args.work).resolve()
    manifest = phantom_manifest(work, args)
    model = load_checkpoint(checkpoint, merge_lora=True)
    test_set = build_dataset(manifest, model.config.preprocess, split="test", cache_dir=work / "cache",
                             report_field=args.field)
    losses = image_conditioned_losses(model, test_set, batch_size=8, max_length=args.max_length)
    return {"checkpoint": str(checkpoint), "test_loss": losses["loss"], "test_image_gain": losses.get("image_gain"),
            **visual_token_stats(model, test_set),
            **encoder_readout(model.vision.encoder, manifest, test_set.preset, work / "cache")}


def clip_auroc(row: dict[str, Any]) -> float | None:
    """An arm's CLIP zero-shot AUROC on the test phantoms under the prompt wording that validation chose (results
    before that was measured: the model's own wording; before 2026-12: on validation)."""
    clip = row.get("clip", {})
    test = clip.get("test", {})
    if "zero_shot_val_chosen" in test:
        return test["zero_shot_val_chosen"]["test"]
    return test.get("zero_shot_auroc", clip.get("zero_shot_auroc"))


def clip_only(args: argparse.Namespace) -> int:
    """``--clip-only``: each encoder's CLIP run, scored on the test phantoms; a table and a JSON result."""
    start = time.perf_counter()
    work = Path(args.work).resolve()
    manifest = phantom_manifest(work, args)
    rows = []
    for architecture in args.encoders:
        tick, metrics = time.perf_counter(), {}
        run_dir = work / architecture / f"image{clip_variant(args)}"  # its CLIP run sits beside: <arch>/clip...
        train_clip(architecture, manifest, run_dir, args, common_overrides(architecture, manifest, work, args, False),
                   metrics)
        rows.append({"encoder": architecture, "run": str(clip_dir(run_dir, args)),
                     "minutes": round((time.perf_counter() - tick) / 60, 1),
                     "stage_training_minutes": stage_minutes([clip_dir(run_dir, args)]), "clip": metrics})
    print(f"\nCT-CLIP on {args.phantoms} phantoms, test split, {time.perf_counter() - start:.0f} s")
    print(f"{'encoder':<17} {'zero-shot (own)':>15} {'val-chosen wording [95% CI]':>48} {'label head':>10} "
          f"{'linear probe':>12} {'i2t R@1':>8} {'t2i R@1':>8} {'val zero-shot':>13} {'minutes':>7}")
    verdicts = {}
    for r in rows:
        test, val = r["clip"]["test"], r["clip"]
        head, probe = test.get("label_head_auroc"), test.get("linear_probe_auroc")
        chosen = test["zero_shot_val_chosen"]
        interval = chosen.get("test_ci95")
        chosen_text = f"{chosen['wording']} {chosen['test']:.3f}" + (
            f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        print(f"{r['encoder']:<17} {test['zero_shot_auroc']:>15.3f} {chosen_text:>48} "
              f"{'-' if head is None else f'{head:.3f}':>10} {'-' if probe is None else f'{probe:.3f}':>12} "
              f"{test['i2t_R@1']:>8.3f} {test['t2i_R@1']:>8.3f} {val.get('zero_shot_auroc', float('nan')):>13.3f} "
              f"{r['minutes']:>7}")
        verdicts[r["encoder"]] = {"clip_zero_shot_auroc": chosen["test"], "clip_zero_shot_wording": chosen["wording"],
                                  "clip_meets_target": chosen["test"] >= 0.80,
                                  "clip_prompts_seen_in_training": args.clip_prompt_weight > 0}
    for r in rows:
        test = r["clip"]["test"]
        print(f"{r['encoder']} zero-shot AUROC by prompt wording, test (validation; present-absent cosine): "
              + ", ".join(f"{k} {v:.3f} ({test['prompt_wordings_val'][k]:.3f}; {test['prompt_cosine'][k]:.2f})"
                          for k, v in test["prompt_wordings"].items()))
    if args.clip_prompt_weight > 0:
        print("vocabulary fine-tuning (--clip-prompt-weight): the prompts were trained on the labels, so the AUROC is "
              "prompt classification of held-out phantoms, not zero-shot in the strict sense")
    print(json.dumps(verdicts, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "learnability_clip", "args": vars(args), "rows": rows,
                               "verdicts": verdicts, "seconds": round(time.perf_counter() - start)}, indent=2) + "\n")
    print(f"-> {out}")
    return 0 if all(v["clip_meets_target"] for v in verdicts.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["small_ctvit_v", "small_resnet3d"], metavar="ARCH")
    parser.add_argument("--phantoms", type=int, default=1200)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--field", default="impression", choices=("report", "findings", "impression"))
    parser.add_argument("--align-steps", type=int, default=300)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--sft-steps", type=int, default=450)
    parser.add_argument("--sft-lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--clip-steps", type=int, default=CLIP_STEPS, help="CT-CLIP pretraining steps first (0: none)")
    parser.add_argument("--clip-batch-size", type=int, default=32)
    parser.add_argument("--clip-lr", type=float, default=1e-3)
    parser.add_argument("--clip-label-weight", type=float, default=1.0,
                        help="label supervision in CLIP pretraining: weight of a label head's cross-entropy on the "
                             "18 manifest labels beside the InfoNCE (0: contrastive only)")
    parser.add_argument("--clip-prompt-weight", type=float, default=0.0,
                        help="> 0: vocabulary fine-tuning, the zero-shot prompts' log-odds also trained on the labels "
                             "(as CT-CLIP's VocabFine; the prompts are then seen in training)")
    parser.add_argument("--clip-text", action="store_true", help="train the CLIP text tower too (default: frozen)")
    parser.add_argument("--clip-text-lr-mult", type=float, default=0.01,
                        help="with --clip-text: the text tower's lr as a multiple of --clip-lr (a pretrained "
                             "transformer fine-tunes at ~1e-5)")
    parser.add_argument("--clip-text-adapter", type=int, default=0, metavar="LAYERS",
                        help="> 0: trainable transformer blocks on the frozen text tower's token states "
                             "(model.clip.text_adapter_layers); the prompts stay unseen, so zero-shot stays strict")
    parser.add_argument("--clip-field", default=None, choices=("report", "findings", "impression"),
                        help="the report field CLIP pretraining reads (default: --field)")
    parser.add_argument("--clip-text-pooling", default="tokens", choices=("tokens", "sentences"),
                        help="CLIP text features: the whole text, or the mean of its sentences encoded alone")
    parser.add_argument("--clip-histogram-bins", type=int, default=0,
                        help="CLIP: bins of the input-intensity histograms (per --histogram-blocks block) that join "
                             "the pooled image features (0: none)")
    parser.add_argument("--clip-only", action="store_true",
                        help="train (or reuse) each encoder's CLIP run and score it on the test phantoms; no report "
                             "generators")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                        help="augment the volumes in CLIP pretraining (at 400 steps it underfits: off by default)")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16"),
                        help="autocast of every stage; auto: bf16 on CPUs with AVX512-BF16 or AMX (and GPUs), else no "
                             "(emulated bf16 is several times slower than float32)")
    parser.add_argument("--sft-encoder-lr", type=float, default=0.0,
                        help="train the encoder in SFT at this multiple of the SFT lr (0: frozen)")
    parser.add_argument("--findings-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="diagnosis prompting: a finding classifier on the encoder grid (trained in align beside "
                             "the projector, threshold chosen on val) whose calls every prompt lists; without it "
                             "the classifier options below are ignored")
    parser.add_argument("--histogram-bins", type=int, default=16,
                        help="with --findings-prompt: bins of the classifier's input-intensity histogram (0: none)")
    parser.add_argument("--findings-order", default="reports", choices=("labels", "reports"),
                        help="with --findings-prompt: list the calls in label order or in the order the training "
                             "reports name them (prompt.findings_order from rrg3d.text.labeler.mention_order)")
    parser.add_argument("--histogram-blocks", type=int, nargs=3, default=[2, 2, 2], metavar=("Z", "Y", "X"),
                        help="with --findings-prompt: one intensity histogram per block of this grid (2 2 2: octants)")
    parser.add_argument("--classifier-lr-mult", type=float, default=1.0,
                        help="with --findings-prompt: the classifier's lr in align as a multiple of --align-lr")
    parser.add_argument("--fit-samples", type=int, default=None,
                        help="with --findings-prompt: fit the classifier's probe on the first N training phantoms "
                             "(default: all); with --classifier-lr-mult 0 the rest are studies it never saw, where "
                             "its calls err as on test studies (benchmarks/dpo.py builds its pairs there)")
    parser.add_argument("--true-findings-share", type=float, default=1.0,
                        help="with --findings-prompt: share of the align and SFT training prompts that list the true "
                             "findings instead of the classifier's calls (teacher forcing; validation and the test "
                             "reports use the classifier)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="cap of each generated test report (0: the model config's, 96 for the small "
                             "architectures; diagnosis prompts calling many findings give longer reports)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="of the greedy test reports (default: the model config's, 1.1; a report listing many "
                             "findings repeats words such as 'lobe' and 'calcification' legitimately)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="token budget of prompt + report (default 160; 256 with --findings-prompt)")
    parser.add_argument("--arms", nargs="+", default=["image", "blank"], choices=("image", "blank"))
    parser.add_argument("--blank-encoder", default=None, metavar="ARCH",
                        help="architecture of the zeros arm (default: the first of --encoders). It runs once: an "
                             "encoder that only sees zeros gives the LM one constant input, whatever its kind")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                        help="result files of earlier runs on the same phantoms whose arms join this table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="learnability_work", help="folder for phantoms, runs and predictions")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "learnability.json"))
    parser.add_argument("--inspect", nargs="+", default=None, metavar="CHECKPOINT",
                        help="only measure trained report generators on the test phantoms: image gain, visual-token "
                             "norm against the word embeddings, between-study share of the token variance")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.true_findings_share <= 1.0:
        parser.error(f"--true-findings-share must be in [0, 1], got {args.true_findings_share}")
    if args.max_length is None:
        args.max_length = 256 if args.findings_prompt else 160
    if args.inspect:
        found = [inspect(path, args) for path in args.inspect]
        for row in found:
            print(json.dumps(row))
        Path(args.out).write_text(json.dumps({"benchmark": "learnability_inspect", "args": vars(args),
                                              "rows": found}, indent=2) + "\n")
        print(f"-> {args.out}")
        return 0

    if args.clip_only:
        return clip_only(args)

    import torch

    from rrg3d.data.manifest import load_manifest
    from rrg3d.models.checkpoint import load_checkpoint
    from rrg3d.models.inference import generate_reports
    from rrg3d.preprocess.presets import load_preset
    from rrg3d.train.data import build_dataset, majority_text, write_references
    from rrg3d.train.generator import image_conditioned_losses

    start = time.perf_counter()
    work = Path(args.work).resolve()
    manifest = phantom_manifest(work, args)
    references = write_references(manifest, work / "test_references.jsonl", split="test", field=args.field)
    rows: list[dict[str, Any]] = []
    majority = work / "majority.jsonl"
    text = majority_text(manifest, split="train", field=args.field)
    majority.write_text("".join(json.dumps({"id": r["id"], "report": text}) + "\n"
                                for r in load_manifest(references)))
    rows.append({"encoder": "-", "arm": "majority report", **score(majority, references, work / "eval_majority")})
    for merged in args.merge:  # arms measured by earlier runs of this script on the same phantoms
        earlier = json.loads(Path(merged).read_text(encoding="utf-8"))
        if earlier["args"]["phantoms"] != args.phantoms or earlier["args"]["seed"] != args.seed:
            raise SystemExit(f"{merged}: measured on other phantoms (--phantoms/--seed differ)")
        rows += [{**r, "from": str(merged)} for r in earlier["rows"] if r["arm"] != "majority report"]
    blank_encoder = args.blank_encoder or args.encoders[0]
    arms = [(a, False) for a in args.encoders if "image" in args.arms]
    arms += [(blank_encoder, True)] if "blank" in args.arms else []
    for architecture, blank in arms:
        tick = time.perf_counter()
        clip_metrics: dict[str, Any] = {}
        arm = "blank" if blank else f"image{clip_variant(args)}"
        run_dir = work / architecture / (arm + findings_variant(args))
        final = train_arm(architecture, manifest, run_dir, args, blank, clip_metrics)
        predictions = run_dir / "predictions.jsonl"
        model = load_checkpoint(final, merge_lora=True)
        if args.max_new_tokens:
            model.config.generation.max_new_tokens = args.max_new_tokens
        if args.repetition_penalty:
            model.config.generation.repetition_penalty = args.repetition_penalty
        if blank:  # the control sees zeros at test time too: one constant input, one greedy report for all
            shape = load_preset(model.config.preprocess).shape
            report = model.generate(torch.zeros(1, 1, *shape))[0]
            predictions.write_text("".join(json.dumps({"id": r["id"], "report": report}) + "\n"
                                           for r in load_manifest(references)))
        else:
            generate_reports(model, [references], predictions, batch_size=8, progress=False, resume=False)
        result = score(predictions, references, run_dir / "eval")
        # teacher-forced report loss on the test split with each study's own image vs a neighbour's
        test_set = build_dataset(manifest, model.config.preprocess, split="test", cache_dir=work / "cache",
                                 report_field=args.field, blank_images=blank)  # the zeros arm: as it was trained
        losses = image_conditioned_losses(model, test_set, batch_size=8, max_length=args.max_length)
        result.update({"test_loss": losses["loss"], "test_image_gain": losses.get("image_gain"),
                       **visual_token_stats(model, test_set), **classifier_scores(model, test_set)})
        if not blank:  # the ceiling the encoder sets: a linear reader of its frozen features
            result.update(encoder_readout(model.vision.encoder, manifest, test_set.preset, work / "cache"))
        stages = ([] if blank else [clip_dir(run_dir, args)]) + [run_dir / "align", run_dir / "sft"]
        reused = [r for r in REUSED if Path(r) in stages]
        rows.append({"encoder": architecture, "arm": "zeros (text prior)" if blank else "image",
                     "minutes": round((time.perf_counter() - tick) / 60, 1), "reused_runs": reused,
                     "stage_training_minutes": stage_minutes(stages), **result, "clip": clip_metrics})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nlearnability on {args.phantoms} phantoms ({args.field}), test split, {time.perf_counter() - start:.0f} s")
    print(f"{'encoder':<15} {'arm':<20} {'CE micro-F1':>11} {'macro-F1':>9} {'BLEU-4':>7} {'METEOR':>7} {'ROUGE-L':>8} "
          f"{'CLIP AUROC':>10} {'readout F1':>10} {'image gain':>10} {'minutes':>7}")
    for r in rows:
        meteor = "n/a" if r["meteor"] is None else f"{r['meteor']:.3f}"
        auroc, gain, readout = (clip_auroc(r), r.get("test_image_gain"), r.get("readout_test_micro_f1"))
        print(f"{r['encoder']:<15} {r['arm']:<20} {r['ce_micro_f1']:>11.3f} {r['ce_macro_f1']:>9.3f} "
              f"{r['bleu_4']:>7.3f} {meteor:>7} {r['rouge_l']:>8.3f} {'-' if auroc is None else f'{auroc:.3f}':>10} "
              f"{'-' if readout is None else f'{readout:.3f}':>10} {'-' if gain is None else f'{gain:.3f}':>10} "
              f"{r.get('minutes', '-'):>7}")
    controls = [r for r in rows if r["arm"] != "image"]
    best_control = max(r["ce_micro_f1"] for r in controls)
    has_text_prior = any(r["arm"] == "zeros (text prior)" for r in controls)
    verdicts = {}
    for r in rows:
        if r["arm"] == "image":
            margin = r["ce_micro_f1"] - best_control
            auroc = clip_auroc(r)
            verdicts[r["encoder"]] = {
                "micro_f1": r["ce_micro_f1"], "margin_over_controls": round(margin, 3),
                "meets_target": has_text_prior and r["ce_micro_f1"] >= 0.60 and margin >= 0.20,
                "clip_zero_shot_auroc": auroc, "clip_meets_target": auroc is not None and auroc >= 0.80,
                "clip_prompts_seen_in_training": args.clip_prompt_weight > 0}
    note = "" if has_text_prior else " — no zeros (text prior) arm measured: verdicts incomplete"
    print(json.dumps(verdicts, indent=2), f"(best control micro-F1 {best_control:.3f}{note})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "learnability", "args": vars(args), "rows": rows,
                               "verdicts": verdicts, "seconds": round(time.perf_counter() - start)}, indent=2) + "\n")
    print(f"-> {out}")
    return 0 if verdicts and all(v["meets_target"] for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
