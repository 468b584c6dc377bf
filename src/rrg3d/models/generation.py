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
           eos_ids: Sequence[int], pad_id: int, suppress_ids: Sequence[int] = (), num_samples: int = 1,
           cache: str = "dynamic", compile: bool = False) -> torch.Tensor:
    """New token ids [B × num_samples, T] (rows padded with ``pad_id`` after their end-of-sequence token).

    ``num_samples`` > 1 draws that many continuations of each prompt (rows ``i × n`` … ``i × n + n − 1``): the prompt
    is prefilled once and its cache repeated, so the samples cost one prefill, not ``n``.

    ``cache="static"`` decodes into a preallocated KV cache (no per-step concatenation) with a prebuilt attention
    mask; ``compile=True`` (implies static) also runs each decoding step through ``torch.compile`` — the first call
    for a new batch size / cache length pays the compilation, later ones reuse it. Both give the same tokens."""
    if num_samples > 1 and settings.num_beams > 1:
        raise ValueError("num_samples > 1 needs sampling or greedy decoding, not beam search")
    if settings.num_beams > 1:
        return _beam_search(lm, inputs_embeds, attention_mask, settings, eos_ids=eos_ids, pad_id=pad_id,
                            suppress_ids=suppress_ids)
    if cache == "static" or compile:
        return _decode_static(lm, inputs_embeds, attention_mask, settings, eos_ids=eos_ids, pad_id=pad_id,
                              suppress_ids=suppress_ids, num_samples=num_samples, compile=compile)
    if cache != "dynamic":
        raise ValueError(f"cache must be 'dynamic' or 'static', not {cache!r}")
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


CACHE_BUCKET = 128  # compiled decoding rounds the static cache length up to this, so prompt lengths share graphs
_compiled_step: Any = None


def _decode_step(lm: Any, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """One cached decoding step: last-position logits [B, V] for tokens [B, 1] at positions [B, 1]."""
    return lm(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
              use_cache=True).logits[:, -1, :]


def compiled_decode_step() -> Any:
    """:func:`_decode_step` through ``torch.compile`` (static shapes), created once per process; compiled graphs are
    cached per model, batch size and cache length (up to dynamo's recompile limit, then eager)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_decode_step, dynamic=False)
    return _compiled_step


def _static_cache(lm: Any, length: int) -> Any:
    """A ``StaticCache`` of ``length`` positions, or ``None`` where the model's layers are not all plain static."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=lm.config, max_cache_len=length)
    return cache if all(type(layer) is StaticLayer for layer in cache.layers) else None


def _decode_static(lm: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings,
                   *, eos_ids: Sequence[int], pad_id: int, suppress_ids: Sequence[int], num_samples: int,
                   compile: bool) -> torch.Tensor:
    """:func:`decode` into a preallocated cache. The prompt is prefilled exactly as the dynamic path does, then its
    keys/values are copied into fixed buffers of ``prompt + max_new_tokens`` positions, and every step writes one
    column in place and attends through a prebuilt mask whose next column is switched on.

    Eager, finished rows leave the batch as on the dynamic path. Compiled, the batch keeps its shape (a new shape
    would mean a new graph): finished rows are still computed but their outputs are ignored, and the logit
    processing and sampling run on the unfinished rows only — so tokens and seeded samples equal the dynamic path's."""
    from transformers import DynamicCache

    device = inputs_embeds.device
    batch, prompt = attention_mask.shape
    new = settings.max_new_tokens
    length = prompt + new
    if compile:
        length = -(-length // CACHE_BUCKET) * CACHE_BUCKET
    cache = _static_cache(lm, length)
    if cache is None:  # sliding-window or hybrid layers: the dynamic path handles them
        return decode(lm, inputs_embeds, attention_mask, settings, eos_ids=eos_ids, pad_id=pad_id,
                      suppress_ids=suppress_ids, num_samples=num_samples)
    eos = torch.tensor(list(eos_ids), device=device, dtype=torch.long)
    suppress = torch.tensor(list(suppress_ids), device=device, dtype=torch.long)
    generator = None
    if settings.temperature > 0 and settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)

    prefill = DynamicCache(config=lm.config)
    mask = attention_mask.long()
    positions = position_ids_from_mask(mask)
    logits = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, past_key_values=prefill,
                use_cache=True, logits_to_keep=1).logits[:, -1, :]
    if num_samples > 1:
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        positions = positions.repeat_interleave(num_samples, dim=0)
        batch = batch * num_samples
    for layer, filled in zip(cache.layers, prefill.layers, strict=True):
        keys, values = filled.keys, filled.values
        if num_samples > 1:
            keys, values = keys.repeat_interleave(num_samples, dim=0), values.repeat_interleave(num_samples, dim=0)
        layer.lazy_initialization(keys, values)
        layer.keys[:, :, :prompt] = keys
        layer.values[:, :, :prompt] = values
        layer.cumulative_length.fill_(prompt)
    del prefill
    attend = torch.zeros(batch, length, dtype=torch.long, device=device)  # the full-length padding mask
    attend[:, :prompt] = mask
    position = positions[:, -1:] + 1  # [B, 1]: the position of the token fed next
    step_fn = compiled_decode_step() if compile else _decode_step
    model = lm.get_base_model() if compile and hasattr(lm, "get_base_model") else lm  # compile the plain model
    active = torch.arange(batch, device=device)  # original row of each model row
    live: torch.Tensor | None = None  # compiled: model rows still decoding (None = all)
    penalised = settings.repetition_penalty != 1.0
    generated = torch.empty(batch, new if penalised else 0, dtype=torch.long, device=device)
    result = torch.full((batch, new), pad_id, dtype=torch.long, device=device)
    step = 0
    for step in range(new):
        history = generated[:, :step]
        if live is None:
            token = next_tokens(logits, history, settings, suppress, generator)
            chosen = token
            rows = active
        else:
            chosen = next_tokens(logits[live], history[live], settings, suppress, generator)
            token = torch.full_like(active, pad_id).index_copy_(0, live, chosen)
            rows = active[live]
        result[rows, step] = chosen
        if penalised:
            generated[:, step] = token
        finished = torch.isin(chosen, eos)
        if step == new - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)
            if compile:
                live = keep if live is None else live[keep]
            else:
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[keep], layer.values[keep]
                active, token, generated = active[keep], token[keep], generated[keep]
                attend, position = attend[keep], position[keep]
        attend[:, prompt + step] = 1
        logits = step_fn(model, token[:, None], position, attend, cache)
        position += 1
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
