"""Peak memory and time of one training step per stage and encoder, batch 1, on CPU.

Each row runs in a fresh spawned process (so the peak resident memory — Linux VmHWM — is that row's alone):
build the full-size architecture (``rrg3d/configs/models/<encoder>.yaml``: the encoder at its default size, the
packaged SmolLM2-135M-Instruct with LoRA), set the stage's trainable parts, switch gradient checkpointing on
(encoder and LM) unless ``--no-checkpointing``, then time ``--steps`` AdamW steps (forward, backward, optimizer)
on a random volume and a 200-token report. The first step is reported separately (it allocates optimizer state).

Stages: ``align`` (projector only), ``sft_lora`` (projector + LoRA), ``sft_lora_encoder`` (+ the encoder),
``sft_full`` (projector + the whole LM), ``clip`` (CT-CLIP: encoder + MiniLM text tower, batch 2 — a contrastive
batch needs two pairs). The issue's target: a LoRA SFT step with ``ctvit_v`` at 240×480×480 fits in 16 GB.

    python benchmarks/train_step.py [--rows ctvit_v:sft_lora ctvit_v:align ...] [--size 240x480x480] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

from _common import parse_size, vm_hwm_gb

DEFAULT_ROWS = ("ctvit_v:align", "ctvit_v:sft_lora", "ctvit_v:sft_lora_encoder", "ctvit_v:clip",
                "resnet3d:sft_lora", "ctvit:sft_lora")
TARGET_GB = 16.0
REPORT = ("Findings: " + "The lungs are clear without focal consolidation, nodule or effusion. " * 12).strip()
TRAINABLE = {
    "align": {"encoder": False, "projector": True, "lm": "frozen"},
    "sft_lora": {"encoder": False, "projector": True, "lm": "lora"},
    "sft_lora_encoder": {"encoder": True, "projector": True, "lm": "lora"},
    "sft_full": {"encoder": False, "projector": True, "lm": "full"},
}


def _step_child(encoder: str, stage: str, size: tuple[int, int, int], steps: int, checkpointing: bool,
                threads: int, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:
        if stage == "clip":
            from rrg3d.models.clip import CTCLIP
            from rrg3d.models.config import load_model_config

            vision = dict(load_model_config(encoder).vision.encoder, input_shape=list(size))
            model = CTCLIP.from_mapping({"vision": vision})
            model.set_gradient_checkpointing(checkpointing)
            texts = [REPORT, REPORT.replace("clear", "hyperinflated")]
            tokens = model.tokenize(texts)
            volumes = torch.rand(2, 1, *size)

            def loss_fn():
                return model(volumes, tokens["input_ids"], tokens["attention_mask"])["loss"]
        else:
            from rrg3d.models.config import load_model_config
            from rrg3d.models.vlm import ReportGenerator

            config = load_model_config(encoder)
            config.lm.gradient_checkpointing = checkpointing
            model = ReportGenerator.from_config(config)
            model.set_trainable(**TRAINABLE[stage])
            model.vision.encoder.set_gradient_checkpointing(checkpointing)
            batch = model.training_batch([REPORT], model.num_image_tokens(size))
            volumes = torch.rand(1, 1, *size)

            def loss_fn():
                return model(volumes, **batch).loss
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        times = []
        for _ in range(steps):
            tick = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - tick)
        queue.put({"trainable_params": sum(p.numel() for p in parameters), "loss": float(loss.detach()),
                   "first_step_s": times[0], "step_s": times[-1], "peak_gb": vm_hwm_gb()})
    except Exception as exc:  # reported as a row, the other rows still run
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure(encoder: str, stage: str, size: tuple[int, int, int], steps: int, checkpointing: bool,
            threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_step_child, args=(encoder, stage, size, steps, checkpointing, threads, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"child exited with code {proc.exitcode}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), metavar="ENCODER:STAGE")
    parser.add_argument("--size", type=parse_size, default=(240, 480, 480))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args(argv)

    rows = []
    for item in args.rows:
        encoder, _, stage = item.partition(":")
        if stage not in (*TRAINABLE, "clip"):
            parser.error(f"unknown stage {stage!r} in {item!r}")
        result = measure(encoder, stage, args.size, max(1, args.steps), not args.no_checkpointing, args.threads)
        rows.append({"encoder": encoder, "stage": stage, **result})
        print(json.dumps(rows[-1]), flush=True)

    size = "x".join(map(str, args.size))
    print(f"\none training step, batch 1 (clip: 2), {size}, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}, {args.threads} threads")
    print(f"{'encoder':<10} {'stage':<17} {'trainable':>11} {'first s':>8} {'step s':>7} {'peak GB':>8} {'<16 GB':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['encoder']:<10} {r['stage']:<17} ERROR {r['error']}")
            continue
        ok = "PASS" if r["peak_gb"] < TARGET_GB else "FAIL"
        print(f"{r['encoder']:<10} {r['stage']:<17} {r['trainable_params'] / 1e6:>10.2f}M {r['first_step_s']:>8.1f} "
              f"{r['step_s']:>7.1f} {r['peak_gb']:>8.2f} {ok:>6}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_step", "size": list(args.size), "steps": args.steps,
                               "gradient_checkpointing": not args.no_checkpointing, "threads": args.threads,
                               "target_gb": TARGET_GB, "machine": platform.platform(), "rows": rows}, indent=2) + "\n")
    print(f"-> {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
