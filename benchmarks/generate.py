"""Decoding speed of rrg3d generation against plain HF ``model.generate`` on the same inputs, in the same run.

Both decoders get the same spliced input embeddings — 512 visual tokens (the 8³ grid of the shipped full-size
architectures) plus the chat prompt — and generate exactly ``--new-tokens`` tokens greedily (end-of-sequence is
disabled so both do the same work; the token ids are checked to be identical). Runs alternate between the two
decoders; the median of ``--repeats`` runs is reported, for each batch size.

The memory-bandwidth bound: each decoding step must read every weight once, so a batch of B cannot go faster than
``B × bandwidth / weight_bytes`` tokens/s; bandwidth is a measured large-tensor copy (read + write bytes / time).

    python benchmarks/generate.py [--batch-sizes 1 8] [--new-tokens 200] [--repeats 3] [--threads N]
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

        ours(), plain()  # warm-up
        timings: dict[str, list[float]] = {"rrg3d": [], "hf_generate": [], "rrg3d_merged": []}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, fn in (("rrg3d", ours), ("hf_generate", plain), ("rrg3d_merged", ours_merged)):
                tick = time.perf_counter()
                outputs[name] = fn()
                timings[name].append(time.perf_counter() - tick)
        same = torch.equal(outputs["rrg3d"], outputs["hf_generate"][:, : outputs["rrg3d"].shape[1]])
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
