"""Load test of ``rrg3d serve``: a live uvicorn on loopback, a tiny model, N requests from C concurrent clients.

Each client uploads a phantom scan when it has no study in flight (and, at random, another while it has fewer than
--max-inflight) and polls its studies otherwise, until the N
requests are spent; then every accepted study is polled to its end (the drain, not counted in N). The only
non-2xx answer allowed is the documented 429 (queue full, with Retry-After, which the client honours up to a cap).
Verdicts: no request lost (a connection error or a timeout) or errored (any status other than 200/202/429), every
accepted study finished as done. Prints a table of p50/p95 latency per request kind and writes JSON.

    python benchmarks/serve_load.py [--model CKPT] [--requests 200] [--clients 16] [--queue 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_load.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_checkpoint(work: Path) -> Path:
    """An untrained tiny CT model (the server's cost, not the model's quality, is measured); writes 8 tokens."""
    from rrg3d.models.checkpoint import save_checkpoint
    from rrg3d.models.config import load_model_config
    from rrg3d.models.vlm import ReportGenerator

    target = work / "tiny_resnet3d"
    if (target / "rrg3d.yaml").is_file():
        return target
    spec = load_model_config("tiny_resnet3d").to_dict()
    spec["generation"] = {**(spec.get("generation") or {}), "max_new_tokens": 8}
    return save_checkpoint(ReportGenerator.from_config(spec, seed=0).eval(), target)


def phantom_scan(work: Path) -> Path:
    from rrg3d.data.phantom import PhantomConfig, generate_phantoms

    scan = work / "phantom" / "vols" / "phantom_00000.nii.gz"
    if not scan.is_file():
        generate_phantoms(PhantomConfig(n=1, seed=0, shape=(32, 64, 64)), work / "phantom", workers=1, progress=False)
    return scan


class Load:
    """The shared request budget and what the clients saw."""

    def __init__(self, requests: int) -> None:
        self.left = requests
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {"upload": [], "poll": [], "drain": []}
        self.status: Counter[str] = Counter()
        self.lost: list[str] = []
        self.errored: list[str] = []
        self.accepted: list[str] = []
        self.final: dict[str, str] = {}

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True

    def record(self, kind: str, seconds: float, status: int | None, detail: str = "") -> None:
        with self.lock:
            self.latency[kind].append(seconds)
            if status is None:
                self.lost.append(f"{kind}: {detail}")
            else:
                self.status[f"{kind} {status}"] += 1
                if status not in (200, 202, 429):
                    self.errored.append(f"{kind} {status}: {detail[:200]}")


def client_loop(base: str, scan: bytes, load: Load, seed: int, args: argparse.Namespace) -> None:
    import httpx

    rng = random.Random(seed)
    mine: list[str] = []
    with httpx.Client(base_url=base, timeout=args.request_timeout) as http:
        while load.take():
            pending = [job for job in mine if job not in load.final]
            if not pending or (len(pending) < args.max_inflight and rng.random() < args.upload_share):
                start = time.perf_counter()
                try:
                    answer = http.post("/v1/studies", files={"file": ("scan.nii.gz", scan, "application/gzip")})
                except httpx.HTTPError as exc:
                    load.record("upload", time.perf_counter() - start, None, type(exc).__name__)
                    continue
                load.record("upload", time.perf_counter() - start, answer.status_code, answer.text)
                if answer.status_code == 202:
                    job = answer.json()["id"]
                    mine.append(job)
                    with load.lock:
                        load.accepted.append(job)
                elif answer.status_code == 429:
                    time.sleep(min(float(answer.headers.get("retry-after", 1)), args.retry_cap) * rng.uniform(0.5, 1.0))
                continue
            job = rng.choice(pending)
            start = time.perf_counter()
            try:
                answer = http.get(f"/v1/studies/{job}")
            except httpx.HTTPError as exc:
                load.record("poll", time.perf_counter() - start, None, type(exc).__name__)
                continue
            load.record("poll", time.perf_counter() - start, answer.status_code, answer.text)
            if answer.status_code == 200 and answer.json()["status"] in ("done", "failed"):
                with load.lock:
                    load.final[job] = answer.json()["status"]
            time.sleep(rng.uniform(0.05, 0.15))


def drain(base: str, load: Load, deadline: float, timeout: float) -> None:
    """Poll every accepted study until it ends (or the deadline passes)."""
    import httpx

    with httpx.Client(base_url=base, timeout=timeout) as http:
        while time.monotonic() < deadline:
            open_jobs = [job for job in load.accepted if job not in load.final]
            if not open_jobs:
                return
            for job in open_jobs:
                start = time.perf_counter()
                try:
                    answer = http.get(f"/v1/studies/{job}")
                except httpx.HTTPError as exc:
                    load.record("drain", time.perf_counter() - start, None, type(exc).__name__)
                    continue
                load.record("drain", time.perf_counter() - start, answer.status_code, answer.text)
                if answer.status_code == 200 and answer.json()["status"] in ("done", "failed"):
                    load.final[job] = answer.json()["status"]
            time.sleep(0.2)


def start_server(model: Path, data: Path, port: int, queue: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "rrg3d.cli", "serve", "--model", str(model), "--no-auth", "--host", "127.0.0.1",
               "--port", str(port), "--data", str(data), "--queue", str(queue), "--log-level", "warning"]
    handle = open(log, "wb")  # noqa: SIM115 - the server's lifetime
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_healthy(base: str, server: subprocess.Popen[bytes], seconds: float) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before it was healthy")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server was not healthy within {seconds:.0f} s")


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}
    ms = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "max_ms": round(float(ms.max()), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else tiny_checkpoint(work)
    scan = phantom_scan(work).read_bytes()
    data = work / f"serve_data_{os.getpid()}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(model, data, port, args.queue, work / "server.log")
    load = Load(args.requests)
    try:
        wait_healthy(base, server, args.startup_seconds)
        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(base, scan, load, args.seed + i, args), daemon=True)
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + args.max_seconds
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in threads)
        load_seconds = time.perf_counter() - start
        drain(base, load, deadline, args.request_timeout)
        seconds = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    finals = Counter(load.final.values())
    unfinished = [job for job in load.accepted if job not in load.final]
    result = {
        "benchmark": "serve_load",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "model": model.name,
        "requests": args.requests,
        "clients": args.clients,
        "seconds": round(seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "status_counts": dict(sorted(load.status.items())),
        "rejected_429": sum(n for key, n in load.status.items() if key.endswith(" 429")),
        "accepted": len(load.accepted),
        "finished": dict(finals),
        "unfinished": len(unfinished),
        "lost": load.lost,
        "errored": load.errored,
        "stuck_clients": stuck,
        "latency": {kind: percentiles(values) for kind, values in load.latency.items()},
        "latency_all": percentiles(load.latency["upload"] + load.latency["poll"]),
        "studies_per_second": round(finals.get("done", 0) / seconds, 3) if seconds else None,
        "verdicts": {
            "no_request_lost_or_errored": not load.lost and not load.errored and stuck == 0,
            "every_accepted_study_finished": bool(load.accepted) and not unfinished and finals.get("failed", 0) == 0,
            "all_requests_spent": load.left == 0,
        },
    }
    result["passed"] = all(result["verdicts"].values())
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"{'kind':<8} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}"]
    for kind, stats in [*result["latency"].items(), ("all", result["latency_all"])]:
        if stats["n"]:
            lines.append(f"{kind:<8} {stats['n']:>5} {stats['p50_ms']:>9.1f} {stats['p95_ms']:>9.1f} "
                         f"{stats['max_ms']:>9.1f}")
    lines.append(f"{result['requests']} requests from {result['clients']} clients in {result['load_seconds']} s "
                 f"(+ drain: {result['seconds']} s in all); accepted {result['accepted']}, 429: "
                 f"{result['rejected_429']}, finished {result['finished']}, lost {len(result['lost'])}, errored "
                 f"{len(result['errored'])}")
    lines.append("verdicts: " + ", ".join(f"{k}={v}" for k, v in result["verdicts"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to serve (default: an untrained tiny model made in --work)")
    parser.add_argument("--work", default=str(ROOT / "serve_load_work"), help="scratch folder")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queue", type=int, default=8, help="the server's --queue")
    parser.add_argument("--upload-share", type=float, default=0.25,
                        help="chance that a client with a study in flight uploads another rather than polls")
    parser.add_argument("--max-inflight", type=int, default=2, help="studies a client keeps in flight at most")
    parser.add_argument("--retry-cap", type=float, default=1.0, help="longest Retry-After a client honours (s)")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run")
    parser.add_argument("--startup-seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"-> {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
