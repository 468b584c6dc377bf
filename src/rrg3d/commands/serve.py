"""Serve a model over HTTP: a REST API, and a web page to upload a scan and read its report beside the volume.

The model is loaded once; uploads (a NIfTI file or a zip of one DICOM series) are queued in a sqlite job store under
--data and reported one at a time on CPU (--batch-size studies per forward pass on a GPU). A restart finishes the
jobs that were queued or running. A region-guided model reads the label map the --segment backend makes of each scan.

Auth: every /v1 request needs "Authorization: Bearer TOKEN". The token is read from --token-file, else from
$RRG3D_TOKEN, else one is made and written to DATA/token (readable by you alone). --no-auth is allowed only on a
loopback address (127.0.0.1, ::1, localhost).

API: POST /v1/studies (multipart field "file") → 202 {"id", "status"}; GET /v1/studies/ID (status, progress, report,
region_reports); GET /v1/studies/ID/fhir | /sr | /volume | /regions; DELETE /v1/studies/ID; GET /v1/model;
GET /healthz. The OpenAPI page is at /docs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from rrg3d.errors import RRG3DError

HELP = "serve a model: REST API and web viewer (FastAPI + uvicorn)"
LOOPBACK_NAMES = ("localhost",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="CKPT", help="checkpoint directory (default: $RRG3D_MODEL or the demo's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--token-file", metavar="F", help="file holding the bearer token clients must send")
    parser.add_argument("--no-auth", action="store_true", help="no token (only when bound to a loopback address)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload in MB (default 1024)")
    parser.add_argument("--queue", type=int, default=32,
                        help="studies queued or running before uploads get 429 (default 32)")
    parser.add_argument("--data", default="rrg3d_serve", metavar="DIR",
                        help="job store and study files (default ./rrg3d_serve)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="language-model dtype (default: checkpoint's)")
    parser.add_argument("--batch-size", type=int, help="studies per forward pass (default: 1 on CPU, 4 on a GPU)")
    parser.add_argument("--segment", choices=("rules", "totalsegmentator"), default="rules",
                        help="region-guided models: segmentation backend for uploads (default rules)")
    parser.add_argument("--max-new-tokens", type=int, help="longest report in tokens (default: checkpoint's)")
    parser.add_argument("--num-beams", type=int, help="beam search width (default: checkpoint's)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy; default: checkpoint's)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads for inference (default: all cores but one, left to the API)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or name."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(args: argparse.Namespace, data_dir: Path) -> str | None:
    """The bearer token: --token-file, $RRG3D_TOKEN, or a new one written to DATA/token; None with --no-auth."""
    if args.no_auth:
        if not is_loopback(args.host):
            raise RRG3DError(f"--no-auth is only allowed on a loopback address, not {args.host!r}: give --token-file")
        return None
    if args.token_file:
        path = Path(args.token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RRG3DError(f"{path}: cannot read the token file ({exc.strerror})") from None
        if len(token) < 16:
            raise RRG3DError(f"{path}: the token must be at least 16 characters")
        return token
    if os.environ.get("RRG3D_TOKEN"):
        return os.environ["RRG3D_TOKEN"].strip()
    path = data_dir / "token"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    print(f"rrg3d serve: a bearer token was written to {path}", file=sys.stderr)
    return token


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from rrg3d.models.checkpoint import default_model_path
    from rrg3d.serve.app import ServeSettings, create_app

    data_dir = Path(args.data)
    token = resolve_token(args, data_dir)
    checkpoint = Path(args.model) if args.model else default_model_path()
    cuda = (args.device or "").startswith("cuda") or (args.device is None and torch.cuda.is_available())
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    if not cuda:
        torch.set_num_threads(threads)
    settings = ServeSettings(model=checkpoint, data_dir=data_dir, token=token, max_upload_mb=args.max_upload_mb,
                             queue=args.queue, device=args.device, dtype=args.dtype,
                             batch_size=args.batch_size or (4 if cuda else 1), segment=args.segment,
                             generation={"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                                         "temperature": args.temperature})
    auth = "no auth (loopback)" if token is None else "bearer token required"
    print(f"rrg3d serve: {checkpoint.name} on http://{args.host}:{args.port}/ ({auth}; data in {data_dir})",
          file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0
