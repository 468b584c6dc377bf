"""Decoding speed of rrg3d generation against plain HF ``model.generate`` on the same inputs, in the same run.

Both decoders get the same spliced input embeddings — 512 visual tokens (the 8³ grid of the shipped full-size
architectures) plus the chat prompt — and generate exactly ``--new-tokens`` tokens greedily (end-of-sequence is
disabled so both do the same work; the token ids are checked to be identical). Runs alternate between the
decoders; the median of ``--repeats`` runs is reported, for each batch size. rrg3d runs in each of its variants:
``dynamic`` (the default: HF's growing DynamicCache), ``static`` (``cache="static"``: preallocated KV buffers) and
``static+compile`` (``compile=True``: the decoding step through torch.compile; its compilation, the first call for a
batch size, is timed apart and reported as ``compile_seconds``). ``rrg3d_*`` keys are the default (dynamic) decoder.

The memory-bandwidth bound: each decoding step must read every weight once, so a batch of B cannot go faster than
``B × bandwidth / weight_bytes`` tokens/s; bandwidth is a measured large-tensor copy (read + write bytes / time).

    python benchmarks/generate.py [--batch-sizes 1 8] [--new-tokens 200] [--repeats 3] [--threads N] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

VARIANT_NAMES = {"rrg3d": "dynamic", "rrg3d_static": "static", "rrg3d_compiled": "static+compile"}


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large float32 tensor copy (bytes read + bytes written)."""
    source = torch.rand(megabytes * (1 << 20) // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - tick)
    return 2 * source.numel() * 4 / min(times)


def build_inputs(model: Any, batch: int, visual_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spliced embeddings [B, T, H] and attention mask for ``batch`` volumes' worth of random visual embeddings."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.lm.config.hidden_size
    prompts = model.prompt_batch(visual_tokens, batch)
    visual = torch.randn(batch, visual_tokens, hidden, generator=generator) * 0.02
    with torch.inference_mode():
        embeds = model.embed(prompts["input_ids"], visual=visual)
    return embeds, prompts["attention_mask"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--visual-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile variant (its first call per batch size compiles)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rrg3d.models.config import GenerationSettings
    from rrg3d.models.generation import decode
    from rrg3d.models.vlm import ReportGenerator

    model = ReportGenerator.from_config("tiny_ctvit_v").eval()  # the LM is the packaged SmolLM2-135M-Instruct
    lm = model.lm.get_base_model()  # with its LoRA layers, as a LoRA-trained checkpoint has them
    merged = copy.deepcopy(model.lm).merge_and_unload()  # what `rrg3d generate` decodes with (LoRA folded in)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    # tied input/output embeddings are one tensor; the lm_head reads it once more per step
    bandwidth = copy_bandwidth()
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    pad = int(model.tokenizer.pad_token_id)
    rows = []

    def tokens_of(batch: int) -> int:
        return batch * args.new_tokens

    for batch in args.batch_sizes:
        embeds, mask = build_inputs(model, batch, args.visual_tokens)

        def ours(decoder: Any = lm, embeds: torch.Tensor = embeds, mask: torch.Tensor = mask) -> torch.Tensor:
            # no stopping, and end-of-sequence suppressed as HF's min_new_tokens does: both do the same work
            return decode(decoder, embeds, mask, settings, eos_ids=(), pad_id=pad,
                          suppress_ids=[*model.suppress_ids, *model.eos_ids])

        def plain(embeds: torch.Tensor = embeds, mask: torch.Tensor = mask) -> torch.Tensor:
            with torch.inference_mode():
                return lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad,
                                   suppress_tokens=model.suppress_ids, temperature=None, top_p=None, top_k=None)

        def ours_merged(ours: Any = ours) -> torch.Tensor:
            return ours(merged)

        def ours_static(embeds: torch.Tensor = embeds, mask: torch.Tensor = mask) -> torch.Tensor:
            return decode(lm, embeds, mask, settings, eos_ids=(), pad_id=pad, cache="static",
                          suppress_ids=[*model.suppress_ids, *model.eos_ids])

        def ours_compiled(embeds: torch.Tensor = embeds, mask: torch.Tensor = mask) -> torch.Tensor:
            return decode(lm, embeds, mask, settings, eos_ids=(), pad_id=pad, compile=True,
                          suppress_ids=[*model.suppress_ids, *model.eos_ids])

        variants = {"rrg3d": ours, "hf_generate": plain, "rrg3d_merged": ours_merged, "rrg3d_static": ours_static}
        if args.compile:
            tick = time.perf_counter()
            ours_compiled()  # the first call for this batch size and cache length compiles the decoding step
            first_call = time.perf_counter() - tick
            variants["rrg3d_compiled"] = ours_compiled
        ours(), plain(), ours_static()  # warm-up
        timings: dict[str, list[float]] = {name: [] for name in variants}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                tick = time.perf_counter()
                outputs[name] = fn()
                timings[name].append(time.perf_counter() - tick)
        reference = outputs["hf_generate"]
        same_each = {name: torch.equal(out, reference[:, : out.shape[1]]) and out.shape[1] == args.new_tokens
                     for name, out in outputs.items() if name != "hf_generate"}
        same = all(same_each.values())
        merged_tps = tokens_of(batch) / statistics.median(timings["rrg3d_merged"])
        tokens = batch * args.new_tokens
        ours_tps = tokens / statistics.median(timings["rrg3d"])  # ratio_vs_bound uses the unmerged decoder
        plain_tps = tokens / statistics.median(timings["hf_generate"])
        bound = batch * bandwidth / weight_bytes
        rows.append({"batch": batch, "prompt_tokens": int(mask.shape[1]), "new_tokens": args.new_tokens,
                     "rrg3d_tokens_per_s": round(ours_tps, 2), "hf_generate_tokens_per_s": round(plain_tps, 2),
                     "ratio_vs_hf": round(ours_tps / plain_tps, 3),
                     "rrg3d_merged_tokens_per_s": round(merged_tps, 2),
                     "merged_ratio_vs_hf": round(merged_tps / plain_tps, 3),
                     "bandwidth_bound_tokens_per_s": round(bound, 2),
                     "ratio_vs_bound": round(ours_tps / bound, 3), "identical_tokens": bool(same),
                     "seconds": {k: [round(t, 3) for t in v] for k, v in timings.items()}})
        variant_rows = {}
        for name in ("rrg3d", "rrg3d_static", "rrg3d_compiled"):
            if name in timings:
                tps = tokens / statistics.median(timings[name])
                variant_rows[VARIANT_NAMES[name]] = {
                    "tokens_per_s": round(tps, 2), "ratio_vs_hf": round(tps / plain_tps, 3),
                    "ratio_vs_bound": round(tps / bound, 3), "identical_tokens": same_each[name]}
        if args.compile:
            variant_rows["static+compile"]["compile_seconds"] = round(
                first_call - statistics.median(timings["rrg3d_compiled"]), 1)
        rows[-1]["variants"] = variant_rows

    header = f"{'batch':>5} {'prompt':>6} {'rrg3d tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'merged tok/s':>12} " \
             f"{'ratio':>6} {'bound tok/s':>11} {'of bound':>8} {'same':>5}"
    print(f"SmolLM2-135M ({weight_bytes / 1e6:.0f} MB weights), copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens")
    print(header)
    for r in rows:
        print(f"{r['batch']:>5} {r['prompt_tokens']:>6} {r['rrg3d_tokens_per_s']:>11.1f} "
              f"{r['hf_generate_tokens_per_s']:>9.1f} {r['ratio_vs_hf']:>6.2f} {r['rrg3d_merged_tokens_per_s']:>12.1f} "
              f"{r['merged_ratio_vs_hf']:>6.2f} {r['bandwidth_bound_tokens_per_s']:>11.1f} "
              f"{r['ratio_vs_bound']:>8.2f} {r['identical_tokens']!s:>5}")
    print(f"{'batch':>5} {'variant':>15} {'tok/s':>8} {'vs HF':>6} {'of bound':>8} {'compile s':>9} {'same':>5}")
    for r in rows:
        for name, v in r["variants"].items():
            print(f"{r['batch']:>5} {name:>15} {v['tokens_per_s']:>8.1f} {v['ratio_vs_hf']:>6.2f} "
                  f"{v['ratio_vs_bound']:>8.2f} {v.get('compile_seconds', ''):>9} {v['identical_tokens']!s:>5}")
    result = {"benchmark": "generate", "model": "SmolLM2-135M-Instruct (packaged)", "threads": torch.get_num_threads(),
              "weight_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": round(bandwidth), "rows": rows,
              "python": sys.version.split()[0], "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
