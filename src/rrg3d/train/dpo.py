"""``dpo``: direct preference optimisation of the report writer on judge-scored pairs (3D-CT-GPT++ stage 4).

Starts from an SFT checkpoint (``model.init``) and the pairs ``rrg3d prefs build`` wrote (``data.pairs``). The
vision tower stays frozen; the LLM trains (its LoRA adapter, or every weight with ``model.train.lm=full``). The
reference model is the SFT checkpoint exactly as saved — with a LoRA checkpoint that is the adapter as trained, not
the base LM with the adapter switched off — and it is used once: at the start of the stage every pair's reference
log-probabilities are computed with dropout off and kept in ``RUN/reference_logps.json`` beside the pairs (a resumed
run reads them back), so no second model is held in memory.

A report's log-probability is the sum over its report tokens and the end-of-turn token — exactly the tokens SFT puts
loss on (:meth:`~rrg3d.models.vlm.ReportGenerator.training_batch`), under the prompt generation uses (with a finding
classifier, the findings it calls). Each study's visual embeddings are computed once per step and serve both
reports. With ``π`` the policy, ``ρ`` the reference, ``c``/``r`` the chosen/rejected report and
``h = [log π(c) − log ρ(c)] − [log π(r) − log ρ(r)]``, the losses (``dpo.loss``) are

* ``sigmoid`` (DPO): ``−log σ(β h)``;
* ``ipo``: ``(h̄ − 1/(2β))²`` with ``h̄`` the same difference of *per-token* log-ratios (as TRL, whose IPO
  normalises by length);
* ``rpo``: DPO + ``rpo_alpha`` × the chosen reports' per-token negative log-likelihood (token mean over the batch).

Logged per step (train_log.csv): ``reward_margin`` (β h), ``reward_accuracy`` (share of pairs with h > 0),
``chosen_logp`` and ``rejected_logp`` (the policy's), and ``kl``: the mean of ``log ρ(y) − log π(y)`` over both
reports — the SFT model sampled them at temperature 1, so this estimates KL(ρ ‖ π) per report.
3D-CT-GPT++'s settings are the recipe ``ctgpt_dpo``: β 0.1, lr 5e-7, linear, 10% warm-up, batch 1, one epoch, no
weight decay, the LLM fully trained::

    rrg3d train tiny_dpo data.pairs=prefs/pairs.jsonl model.init=runs/sft/final run_dir=runs/dpo
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rrg3d.errors import ConfigError, RRG3DError
from rrg3d.train.generator import (
    build_report_generator,
    generator_frozen_modules,
    resolve_checkpoint_dir,
    save_generator,
    set_generator_preset,
)
from rrg3d.train.loop import RunContext, Stage, TrainResult, fit
from rrg3d.train.recipe import Recipe

log = logging.getLogger(__name__)

LOG_COLUMNS = ("reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "kl")
REFERENCE_FILE = "reference_logps.json"


# -- the loss ----------------------------------------------------------------------------------------------------------
def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, *, beta: float, kind: str = "sigmoid",
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    rpo_alpha: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's preference loss from summed sequence log-probs [B] (policy and reference, chosen and rejected)
    and the metrics to log. ``ipo`` and ``rpo`` need the token counts of the reports ([B])."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    difference = chosen_ratio - rejected_ratio
    if kind in ("sigmoid", "rpo"):
        losses = -F.logsigmoid(beta * difference)
    elif kind == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the reports' token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown preference loss {kind!r} (use sigmoid, ipo or rpo)")
    loss = losses.mean()
    if kind == "rpo":
        if chosen_tokens is None:
            raise ValueError("the rpo loss needs the chosen reports' token counts")
        loss = loss + rpo_alpha * (-policy_chosen.sum() / chosen_tokens.sum().clamp(min=1))
    with torch.no_grad():
        metrics = {
            "reward_margin": (beta * difference).mean(),
            "reward_accuracy": (difference > 0).float().mean(),
            "chosen_logp": policy_chosen.mean(),
            "rejected_logp": policy_rejected.mean(),
            "kl": -(chosen_ratio + rejected_ratio).mean() / 2,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


# -- data --------------------------------------------------------------------------------------------------------------
class ReferenceStore:
    """The reference log-probs of every pair ``[N, 4]``: chosen, rejected, chosen tokens, rejected tokens (NaN until
    computed). Shared by the training and validation views of the pairs."""

    def __init__(self, count: int) -> None:
        self.values = torch.full((count, 4), math.nan, dtype=torch.float64)

    @property
    def complete(self) -> bool:
        return not bool(torch.isnan(self.values).any())


class PairDataset(torch.utils.data.Dataset):
    """Pairs with their study's volume: items ``{"id", "index", "volume", "chosen", "rejected", "reference"}``
    (``reference``: the pair's row of the :class:`ReferenceStore`)."""

    def __init__(self, pairs: Sequence[dict[str, Any]], studies: Any, study_index: Sequence[int],
                 pair_index: Sequence[int], store: ReferenceStore) -> None:
        self.pairs = list(pairs)
        self.studies = studies
        self.study_index = list(study_index)  # per pair of the full list: its study's item in ``studies``
        self.pair_index = list(pair_index)  # the pairs of this view (indices into ``pairs``)
        self.store = store

    @property
    def preset(self) -> Any:
        return self.studies.preset

    def __len__(self) -> int:
        return len(self.pair_index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.pair_index[i]
        pair = self.pairs[index]
        entry = self.studies.entries[self.study_index[index]]
        volume = torch.from_numpy(self.studies.load_volume(self.study_index[index]))
        return {"id": str(pair["id"]), "index": index, "volume": volume, "chosen": pair["chosen"],
                "rejected": pair["rejected"], "reference": self.store.values[index].clone(),
                "style": (entry.style, entry.sex)}


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    if not items:
        raise ValueError("collate_pairs needs at least one item")
    return {"ids": [item["id"] for item in items], "index": torch.tensor([item["index"] for item in items]),
            "volumes": torch.stack([item["volume"] for item in items]),
            "chosen": [item["chosen"] for item in items], "rejected": [item["rejected"] for item in items],
            "reference": torch.stack([item["reference"] for item in items]),
            "styles": [item.get("style", (None, None)) for item in items]}


def _held_out(study_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"dpo-val:{seed}:{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def build_pair_datasets(recipe: Recipe, presets: list[Any], accelerator: Any) -> tuple[list[Any], Any]:
    """The training pairs (and, with ``dpo.val_fraction``, the held-out studies' pairs) over the volumes of the
    manifest the pairs were built on (or ``data.manifest``)."""
    from rrg3d.train.data import build_dataset
    from rrg3d.train.prefs import check_split, read_pairs

    pairs = read_pairs(recipe.data.pairs)  # type: ignore[arg-type]
    manifests = {p.get("manifest") for p in pairs}
    if recipe.data.manifest:
        manifest = recipe.data.manifest
    elif len(manifests) == 1 and None not in manifests:
        manifest = str(manifests.pop())
        if not Path(manifest).is_file():
            raise RRG3DError(f"{recipe.data.pairs}: the pairs were built on {manifest}, which is not there; give "
                             "data.manifest=PATH (the same studies)")
    else:
        raise ConfigError(f"{recipe.data.pairs}: the pairs do not name one manifest; give data.manifest=PATH")
    progress = recipe.train.progress and accelerator.is_main_process
    with accelerator.main_process_first():
        studies = build_dataset(manifest, presets[0], cache_dir=recipe.data.cache_dir, require_report=False,
                                workers=recipe.data.preprocess_workers, progress=progress)
    position = {study_id: i for i, study_id in enumerate(studies.ids)}
    missing = sorted({str(p["id"]) for p in pairs} - set(position))
    if missing:
        raise RRG3DError(f"{recipe.data.pairs}: {len(missing)} pair(s) name studies that {manifest} does not hold "
                         f"with a usable CT (first: {missing[:3]})")
    study_index = [position[str(p["id"])] for p in pairs]
    for i in study_index:
        check_split(str(studies.entries[i].split or "train"))  # the manifest's own word on the study
    store = ReferenceStore(len(pairs))
    fraction = recipe.dpo.val_fraction
    held = [_held_out(str(p["id"]), recipe.seed, fraction) if fraction > 0 else False for p in pairs]
    train_index = [i for i, h in enumerate(held) if not h]
    val_index = [i for i, h in enumerate(held) if h]
    if not train_index:
        raise RRG3DError(f"{recipe.data.pairs}: no pair left for training (dpo.val_fraction={fraction})")
    train = PairDataset(pairs, studies, study_index, train_index, store)
    val = PairDataset(pairs, studies, study_index, val_index, store) if val_index else None
    return [train], val


# -- reference log-probs -----------------------------------------------------------------------------------------------
def pair_logprobs(model: nn.Module, raw: nn.Module, batch: dict[str, Any], max_length: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed log-probs of the chosen and rejected reports of a batch and their token counts, each [B]; the
    visual embeddings (frozen tower, no gradient) are computed once for both reports."""
    device = raw.device
    # the frozen tower runs in float32 wherever this is called from (under the training autocast or not), so the
    # reference and the policy see the same visual embeddings and classifier calls
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        visual, finding_logits = raw.vision.encode(batch["volumes"].to(device))
    instructions = raw.style_instructions(None, batch.get("styles"), len(batch["ids"]), batch["ids"])
    instructions = raw.finding_instructions(finding_logits, instructions)
    n = len(batch["ids"])
    names = [f"{i} (chosen)" for i in batch["ids"]] + [f"{i} (rejected)" for i in batch["ids"]]
    logps, tokens = raw.report_logprobs([*batch["chosen"], *batch["rejected"]], torch.cat([visual, visual]),
                                        instructions=None if instructions is None else [*instructions, *instructions],
                                        max_length=max_length, ids=names, model=model)
    return logps[:n], logps[n:], tokens[:n], tokens[n:]


def _reference_fingerprint(recipe: Recipe, dataset: PairDataset) -> str:
    from rrg3d.models.checkpoint import read_manifest

    init = read_manifest(resolve_checkpoint_dir(str(recipe.model.init)))
    pairs_sha = hashlib.sha256(Path(str(recipe.data.pairs)).read_bytes()).hexdigest()
    payload = {"pairs": pairs_sha, "model": init.get("files"), "preset": dataset.preset.sha256,
               "max_length": recipe.data.max_length}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _autocast(recipe: Recipe, device: torch.device) -> Any:
    """The autocast training runs under (accelerate's, for the recipe's mixed precision), so the reference and the
    policy's first step agree."""
    import contextlib

    from rrg3d.train.loop import resolve_mixed_precision

    precision = resolve_mixed_precision(recipe.train.mixed_precision, device.type == "cpu")
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def compute_reference(model: nn.Module, dataset: PairDataset, recipe: Recipe, device: torch.device) -> None:
    """Fill the pairs' :class:`ReferenceStore` with the model as loaded (the SFT checkpoint), dropout off, once:
    read back from ``RUN/reference_logps.json`` when it was made for these pairs, this checkpoint and preset."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from rrg3d.train.loop import iterate_batches
    from rrg3d.utils.files import atomic_write_json

    store = dataset.store
    path = recipe.output_dir / REFERENCE_FILE
    fingerprint = _reference_fingerprint(recipe, dataset)
    state = PartialState()
    with state.main_process_first():
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("fingerprint") == fingerprint and len(saved.get("values", [])) == len(store.values):
                store.values = torch.tensor(saved["values"], dtype=torch.float64)
                log.info("reference log-probs read from %s", path)
                return
        model.to(device)
        was_training = model.training
        model.eval()
        everything = PairDataset(dataset.pairs, dataset.studies, dataset.study_index, range(len(dataset.pairs)),
                                 store)
        batch_size = recipe.data.val_batch_size or recipe.data.batch_size
        bar = tqdm(total=len(everything), desc="reference log-probs", unit="pair",
                   disable=not (recipe.train.progress and state.is_main_process))
        try:
            for batch in iterate_batches(everything, batch_size, collate=collate_pairs):
                with _autocast(recipe, device):
                    chosen, rejected, n_chosen, n_rejected = pair_logprobs(model, model, batch, recipe.data.max_length)
                store.values[batch["index"]] = torch.stack([chosen, rejected, n_chosen, n_rejected], 1).double().cpu()
                bar.update(len(batch["ids"]))
        finally:
            bar.close()
            model.train(was_training)
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"fingerprint": fingerprint, "pairs": str(recipe.data.pairs),
                                     "columns": ["chosen", "rejected", "chosen_tokens", "rejected_tokens"],
                                     "ids": [str(p["id"]) for p in dataset.pairs], "values": store.values.tolist()})


# -- the stage ---------------------------------------------------------------------------------------------------------
def dpo_loss(model: nn.Module, raw: nn.Module, batch: dict[str, Any], recipe: Recipe
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    reference = batch["reference"].to(raw.device)
    if bool(torch.isnan(reference).any()):
        raise RRG3DError(f"pairs {batch['ids']}: no reference log-probs (they are computed at the stage start)")
    chosen, rejected, n_chosen, n_rejected = pair_logprobs(model, raw, batch, recipe.data.max_length)
    if not torch.equal(n_chosen.cpu(), reference[:, 2].long().cpu()) or \
            not torch.equal(n_rejected.cpu(), reference[:, 3].long().cpu()):
        raise RRG3DError(f"pairs {batch['ids']}: the report token counts differ from the reference's (the "
                         "tokenizer, prompt or data.max_length changed since the reference was computed)")
    settings = recipe.dpo
    return preference_loss(chosen, rejected, reference[:, 0].to(chosen.dtype), reference[:, 1].to(chosen.dtype),
                           beta=settings.beta, kind=settings.loss, chosen_tokens=n_chosen,
                           rejected_tokens=n_rejected, rpo_alpha=settings.rpo_alpha)


@torch.no_grad()
def validate_dpo(model: nn.Module, dataset: Any, recipe: Recipe, context: RunContext) -> dict[str, float]:
    """Loss, reward accuracy and margin on the held-out studies' pairs (``dpo.val_fraction``)."""
    from rrg3d.train.loop import iterate_batches

    batch_size = recipe.data.val_batch_size or recipe.data.batch_size
    sums: dict[str, float] = {}
    count = 0
    for batch in iterate_batches(dataset, batch_size, collate=collate_pairs):
        with context.accelerator.autocast():
            loss, metrics = dpo_loss(model, model, batch, recipe)
        n = len(batch["ids"])
        for key, value in {"loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {f"val_{key}": value / max(1, count) for key, value in sums.items()}


def check(recipe: Recipe) -> None:
    """What the dpo stage needs and refuses."""
    if not recipe.model.init:
        raise ConfigError("the dpo stage starts from an SFT checkpoint: set model.init=RUN/final (the reference "
                          "model is that checkpoint as saved)")
    if not recipe.data.pairs:
        raise ConfigError("the dpo stage trains on preference pairs: set data.pairs=PAIRS.jsonl (rrg3d prefs build)")
    parts = recipe.model.train
    if parts.encoder or parts.compressor or parts.projector or parts.classifier:
        raise ConfigError("the dpo stage keeps the vision tower frozen (encoder, compressor, projector, classifier): "
                          "each study's visual embeddings are computed once and serve both reports")
    if parts.lm == "frozen":
        raise ConfigError("the dpo stage trains the LLM: model.train.lm must be lora or full")
    if len(recipe.phases) != 1:
        raise ConfigError("the dpo stage runs one phase (the reference log-probs belong to one input size)")
    if recipe.data.augment.enabled:
        raise ConfigError("the dpo stage reads the volumes as the reference saw them: data.augment must be off")


STAGE = Stage(
    name="dpo",
    build_model=build_report_generator,
    loss=dpo_loss,
    save=save_generator,
    validate=validate_dpo,
    set_preset=set_generator_preset,
    frozen_modules=generator_frozen_modules,
    fit_statistics=compute_reference,
    build_datasets=build_pair_datasets,
    collate=collate_pairs,
    log_columns=LOG_COLUMNS,
)


def run(recipe: Recipe, *, resume: bool = False) -> TrainResult:
    check(recipe)
    return fit(recipe, STAGE, resume=resume)
