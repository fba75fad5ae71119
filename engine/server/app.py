"""HTTP API v1 of the local job server (`realfusion serve`), which the Blender add-on talks to.

Routes (JSON unless noted; every error is {"error": {"problem", "fix"}}):
  GET    /health                  engine version, device, presets, default model, queue length
  POST   /jobs                    submit a photo (base64) with a preset, seed, model and overrides -> 201 job
  GET    /jobs                    {"jobs": [...]}, newest first
  GET    /jobs/{id}               one job: state, stage, step/total, overall progress, error, files
  GET    /jobs/{id}/files/{name}  a file of the job's folder (nothing outside it)
  DELETE /jobs/{id}               cancel: leaves the queue, or stops at the next step keeping the checkpoint
  POST   /jobs/{id}/resume        queue an interrupted/failed/cancelled job again
  GET    /jobs/{id}/events        Server-Sent Events, one `job` event per change (polling works as well)

The server listens on 127.0.0.1 unless told otherwise, and then only answers requests
addressed to a loopback name (so a web page cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import mimetypes
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__
from ..cli import METHODS
from ..config import PRESETS
from ..errors import EngineError, InputImageError
from .jobs import (FINISHED, JobSettings, JobStateConflict, JobStore, Reconstructor, ServerSettings, UnknownJob)
from .schemas import ErrorResponse, Health, JobList, JobOut, JobRequest

log = logging.getLogger("realfusion.server")

MAX_UPLOAD_BYTES = 64 * 1024 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
CONTENT_TYPES = {".glb": "model/gltf-binary", ".gltf": "model/gltf+json", ".pt": "application/octet-stream",
                 ".json": "application/json", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
EVENT_POLL_S = 0.25
EVENT_KEEPALIVE_S = 15.0
ERRORS = {404: {"model": ErrorResponse}, 400: {"model": ErrorResponse}}


def create_app(jobs_dir: Path, settings: ServerSettings | None = None, prior_factory=None) -> FastAPI:
    """The API over the jobs in `jobs_dir`; `prior_factory(settings)` -> the prior handed to reconstruct."""
    from ..pipeline import resolve_device

    settings = settings or ServerSettings()
    device = resolve_device(settings.device)  # a --device cuda without a GPU fails here, before listening
    gpu = _gpu_name(device)
    store = JobStore(jobs_dir, Reconstructor(settings, prior_factory), default_model=settings.model)

    @asynccontextmanager
    async def lifespan(_app):
        store.start()
        try:
            yield
        finally:
            await run_in_threadpool(store.stop)

    app = FastAPI(title="RealFusion job server", version=__version__, lifespan=lifespan)
    app.state.store = store
    if settings.host in LOOPBACK_NAMES[:2]:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES))
    _add_error_handlers(app)

    def job_out(job_id: str) -> JobOut:
        record, _version = store.snapshot(job_id)
        return _job_out(store, record)

    @app.get("/health", response_model=Health)
    def health():
        return Health(ok=True, version=__version__, device=device.type, gpu=gpu, methods=list(METHODS),
                      presets=list(PRESETS), model=settings.default_model, queue=store.queued_count(),
                      running=store.running_id())

    @app.post("/jobs", status_code=201, response_model=JobOut, responses=ERRORS)
    def submit(request: JobRequest):
        image = _decode_image(request.image_png_base64)
        record = store.submit(image, JobSettings(filename=request.filename, preset=request.preset,
                                                 method=request.method, seed=request.seed, model=request.model,
                                                 overrides=list(request.overrides)))
        return _job_out(store, record)

    @app.get("/jobs", response_model=JobList)
    def list_jobs():
        return JobList(jobs=[job_out(job.id) for job in store.jobs()])

    @app.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS)
    def get_job(job_id: str):
        return job_out(job_id)

    @app.delete("/jobs/{job_id}", response_model=JobOut, responses=ERRORS)
    def cancel_job(job_id: str):
        store.cancel(job_id)
        return job_out(job_id)

    @app.post("/jobs/{job_id}/resume", response_model=JobOut, responses={**ERRORS, 409: {"model": ErrorResponse}})
    def resume_job(job_id: str):
        store.resume(job_id)
        return job_out(job_id)

    @app.get("/jobs/{job_id}/files/{name:path}", responses=ERRORS)
    def get_file(job_id: str, name: str):
        path = store.file(job_id, name)
        if path is None:
            raise _NotFound(f"Job {job_id} has no file {name!r}.",
                            "The job's files are listed in GET /jobs/{id} under \"files\".")
        media_type = CONTENT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
        return FileResponse(path, media_type=media_type or "application/octet-stream",
                            headers={"Cache-Control": "no-store"})

    @app.get("/jobs/{job_id}/events", responses=ERRORS)
    async def job_events(job_id: str, request: Request):
        store.get(job_id)  # 404 now, not inside the stream

        async def stream():
            seen, quiet = -1, 0.0
            while not store.stopping:
                record, version = store.snapshot(job_id)
                if version != seen:
                    seen, quiet = version, 0.0
                    yield f"event: job\ndata: {_job_out(store, record).model_dump_json()}\n\n"
                    if record["state"] in FINISHED:
                        return
                elif quiet >= EVENT_KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(EVENT_POLL_S)
                quiet += EVENT_POLL_S

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _job_out(store: JobStore, record: dict) -> JobOut:
    job_id = record["id"]
    files = {name: f"/jobs/{job_id}/files/{name}" for name in store.present_files(job_id)}
    return JobOut(**{k: v for k, v in record.items() if k != "settings"},
                  preview=files.get("preview.png"), files=files,
                  queue_position=store.queue_position(job_id),
                  settings={k: v for k, v in record["settings"].items() if k != "input"})


def _decode_image(data: str) -> bytes:
    try:
        image = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputImageError(f"image_png_base64 is not valid base64 ({exc}).",
                              "Send the photo's bytes base64-encoded (standard alphabet, with padding).") from exc
    if not image:
        raise InputImageError("image_png_base64 is empty.", "Send the bytes of a PNG or JPEG photo of the object.")
    if len(image) > MAX_UPLOAD_BYTES:
        raise InputImageError(f"The photo is {len(image) / 2**20:.0f} MiB; the server takes up to "
                              f"{MAX_UPLOAD_BYTES // 2**20} MiB.", "Send a smaller PNG or JPEG (2048 pixels is plenty).")
    return image


class _NotFound(EngineError):
    pass


def _error(status: int, problem: str, fix: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"problem": problem, "fix": fix}, **extra}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def engine_error(_request, exc: EngineError):
        status = 404 if isinstance(exc, (UnknownJob, _NotFound)) else 409 if isinstance(exc, JobStateConflict) else 400
        return _error(status, exc.problem, exc.fix)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        details = exc.errors()
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                          for e in details)
        return _error(422, f"The request is not valid ({where}).",
                      "Send JSON as described at GET /docs (e.g. preset is one of "
                      f"{', '.join(PRESETS)}).", detail=json.loads(json.dumps(details, default=str)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        fix = "See GET /docs for the API." if exc.status_code in (404, 405) else "Check the request."
        return _error(exc.status_code, str(exc.detail), fix)


def _gpu_name(device) -> str | None:
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(device)


def serve(jobs_dir: Path, settings: ServerSettings, port: int = 8765, prior_factory=None) -> int:
    """Listen on settings.host:port (0: any free port) until Ctrl-C; prints the address on one line first."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(jobs_dir, settings, prior_factory)
    sock = _listen(settings.host, port)
    host, bound_port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"realfusion server {__version__} listening on http://{url_host}:{bound_port} "
          f"(jobs in {jobs_dir})", flush=True)
    if settings.host not in LOOPBACK_NAMES:
        print(f"warning: listening on {settings.host}: anyone who can reach this machine can submit jobs "
              "and read their results (there is no authentication).", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # before the address is printed, so a client reading it can connect at once
    except OSError as exc:
        raise EngineError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}).",
                           "Another server may already use that port: stop it, or pick another with --port.") from exc
    sock.set_inheritable(True)
    return sock
