"""Decoding from input embeddings: greedy and sampling with a KV cache; beam search through HF ``generate``.

The loop is written for what report generation needs and nothing else: a (left-padded) batch of prompt embeddings
with hundreds of visual tokens is prefilled once, computing logits for the last position only; then one token per
step reuses the cache. Rows that finish are dropped from the batch and its cache, so a batch costs what its longest
report costs, not batch × longest. Greedy output equals ``model.generate(do_sample=False)`` token for token (tested).

Logit processing follows HF semantics: repetition penalty over the tokens generated so far (divide positive logits,
multiply negative ones), suppressed token ids set to −inf, then temperature, top-k and top-p (nucleus) filtering.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrg3d.models.config import GenerationSettings


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def apply_repetition_penalty(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's repetition penalty over ``generated`` token ids ([B, T]; T may be 0)."""
    if penalty == 1.0 or generated.shape[1] == 0:
        return logits
    scores = logits.gather(1, generated)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, generated, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set with cumulative probability ≥ top-p to −inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove_sorted = mass_before >= top_p  # the top token always stays (its mass before is 0)
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, generated: torch.Tensor, settings: GenerationSettings,
                suppress_ids: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """One decoding step's choice for each row, from last-position logits [B, V]."""
    logits = apply_repetition_penalty(logits.float(), generated, settings.repetition_penalty)
    if suppress_ids is not None and suppress_ids.numel():
        logits[:, suppress_ids] = float("-inf")
    if settings.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / settings.temperature, settings.top_k, settings.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode(lm: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings, *,
           eos_ids: Sequence[int], pad_id: int, suppress_ids: Sequence[int] = (), num_samples: int = 1
           ) -> torch.Tensor:
    """New token ids [B × num_samples, T] (rows padded with ``pad_id`` after their end-of-sequence token).

    ``num_samples`` > 1 draws that many continuations of each prompt (rows ``i × n`` … ``i × n + n − 1``): the prompt
    is prefilled once and its cache repeated, so the samples cost one prefill, not ``n``."""
    if num_samples > 1 and settings.num_beams > 1:
        raise ValueError("num_samples > 1 needs sampling or greedy decoding, not beam search")
    if settings.num_beams > 1:
        return _beam_search(lm, inputs_embeds, attention_mask, settings, eos_ids=eos_ids, pad_id=pad_id,
                            suppress_ids=suppress_ids)
    from transformers import DynamicCache

    device = inputs_embeds.device
    batch = inputs_embeds.shape[0]
    eos = torch.tensor(list(eos_ids), device=device, dtype=torch.long)
    suppress = torch.tensor(list(suppress_ids), device=device, dtype=torch.long)
    generator = None
    if settings.temperature > 0 and settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)

    cache = DynamicCache(config=lm.config)
    mask = attention_mask.long()
    positions = position_ids_from_mask(mask)
    out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
             use_cache=True, logits_to_keep=1)
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        out.logits = out.logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        positions = positions.repeat_interleave(num_samples, dim=0)
        batch = batch * num_samples
    last_position = positions[:, -1]
    active = torch.arange(batch, device=device)  # original row of each row still decoding
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)  # tokens of the active rows
    result = torch.full((batch, settings.max_new_tokens), pad_id, dtype=torch.long, device=device)
    step = 0
    for step in range(settings.max_new_tokens):
        token = next_tokens(out.logits[:, -1, :], generated, settings, suppress, generator)
        result[active, step] = token
        generated = torch.cat([generated, token[:, None]], dim=1)
        finished = torch.isin(token, eos)
        if step == settings.max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, token, generated = active[keep], token[keep], generated[keep]
            mask, last_position = mask[keep], last_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last_position = last_position + 1
        out = lm(input_ids=token[:, None], attention_mask=mask, position_ids=last_position[:, None],
                 past_key_values=cache, use_cache=True)
    return result[:, : step + 1]


def _beam_search(lm: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings,
                 *, eos_ids: Sequence[int], pad_id: int, suppress_ids: Sequence[int]) -> torch.Tensor:
    """Beam search is HF's: a well-kept implementation, fed the same spliced embeddings."""
    output = lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=False,
                         repetition_penalty=settings.repetition_penalty, eos_token_id=list(eos_ids),
                         pad_token_id=pad_id, suppress_tokens=list(suppress_ids) or None, early_stopping=True,
                         temperature=None, top_p=None, top_k=None)
    return output if output.ndim == 2 else output.sequences
