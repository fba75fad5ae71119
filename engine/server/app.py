"""HTTP API v1 of the local job server (`realfusion serve`), which the Blender add-on talks to.

Routes (JSON unless noted; every error is {"error": {"problem", "fix"}}):
  GET    /health                  engine version, workers (device, GPU and memory, job, model), presets, queue
  POST   /jobs                    submit a photo (base64) with a preset, seed, model and overrides -> 201 job
  GET    /jobs                    {"jobs": [...]}, newest first
  GET    /jobs/{id}               one job: state, stage, step/total, overall progress, error, files
  GET    /jobs/{id}/files/{name}  a file of the job's folder (nothing outside it)
  DELETE /jobs/{id}               cancel: leaves the queue, or stops at the next step keeping the checkpoint
  POST   /jobs/{id}/resume        queue an interrupted/failed/cancelled job again
  GET    /jobs/{id}/events        Server-Sent Events, one `job` event per change (polling works as well)

Every request must carry `Authorization: Bearer <token>`, the token the server generates on
its first start and keeps in DATA_DIR/token (readable by its user only); /docs (Swagger UI from the
installed fastapi-offline package, no CDN) and /openapi.json are open. The server listens on 127.0.0.1
unless told otherwise, and on any loopback address (127.x, ::1) only answers requests addressed to
a loopback name (so a web page cannot reach it through DNS rebinding). Uploads are limited in bytes
and in pixels (ServerSettings), at most UPLOAD_SLOTS are read at once, and one server at a time may
use a data folder (jobs.DataDirLock).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import io
import ipaddress
import json
import logging
import mimetypes
import os
import secrets
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import PRESETS
from ..errors import DiskFullError, EngineError, InputImageError
from ..validation import known_methods
from .jobs import (FINISHED, DataDirLock, JobSettings, JobStateConflict, JobStore, Reconstructor, ServerSettings,
                   UnknownJob, process_memory_bytes)
from .schemas import ErrorResponse, GpuMemory, Health, JobList, JobOut, JobRequest, WorkerOut

log = logging.getLogger("realfusion.server")

TOKEN_FILE = "token"
OPEN_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")  # no token needed: no data in them
DOCS_ASSETS = "/docs/assets/"  # Swagger UI's files, from the fastapi-offline package (open too)
BODY_SLACK = 1024 * 1024  # JSON around the base64 photo
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# Uploads read and decoded at once; more wait their turn unread (TCP holds them), so memory stays at about
# UPLOAD_SLOTS x 5 x the largest upload however many clients send at the same time.
UPLOAD_SLOTS = 2
KEEP_ALIVE_S = 5.0
CONTENT_TYPES = {".glb": "model/gltf-binary", ".gltf": "model/gltf+json", ".pt": "application/octet-stream",
                 ".json": "application/json", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
EVENT_POLL_S = 0.25
EVENT_KEEPALIVE_S = 15.0
ERRORS = {404: {"model": ErrorResponse}, 400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}}


class UploadTooLarge(EngineError):
    """413: the photo has more bytes or pixels than the server takes."""


def token_path(data_dir: Path) -> Path:
    return Path(data_dir) / TOKEN_FILE


def ensure_token(data_dir: Path) -> str:
    """The server's bearer token from DATA_DIR/token, created (user-only, 0600) on the first start."""
    path = token_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # reading or chmodding it would act on whatever it points to
        raise EngineError(f"The token file {path} is a symbolic link.",
                          "Delete it (the server writes a new token on its next start), then start the server again.")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if token:
        if os.name == "posix" and path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # someone loosened it: only this user may read the token
        return token
    token = secrets.token_urlsafe(32)
    # An unpredictable name created exclusively (O_EXCL) and never through a symlink (O_NOFOLLOW): a file or
    # link planted in the folder beforehand can be neither written through nor chmodded.
    tmp = path.with_name(f".{TOKEN_FILE}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return token


class _Guard:
    """ASGI middleware: the Host check (loopback binds), the bearer token on every request (but the docs),
    and the body: its size capped before it is read (Content-Length) and while it is read (chunked bodies,
    answered 413 as soon as they pass the limit), at most UPLOAD_SLOTS bodies read and handled at once."""

    def __init__(self, app, token: str, token_file: Path, max_body: int, check_host: bool):
        self.app, self.token_file, self.max_body, self.check_host = app, token_file, max_body, check_host
        self.token = token.encode()
        self.uploads = asyncio.Semaphore(UPLOAD_SLOTS)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.check_host and not _is_loopback_host(headers.get(b"host", b"")):
            return await _send_error(send, 400, "The request is addressed to a host name that is not this "
                                                "machine's loopback (refused against DNS rebinding).",
                                     "Address the server as http://127.0.0.1:PORT, http://localhost:PORT or "
                                     "http://[::1]:PORT.")
        path = scope.get("path") or ""
        if path not in OPEN_PATHS and not path.startswith(DOCS_ASSETS) and not self._authorized(headers):
            problem = ("The request has no bearer token." if not headers.get(b"authorization", b"").strip()
                       else "The bearer token is wrong.")
            return await _send_error(send, 401, problem,
                                     f"Send the header `Authorization: Bearer <token>` with the token in "
                                     f"{self.token_file} (written by `realfusion serve` on its first start; "
                                     "the Blender add-on reads it when its Token field is empty).",
                                     [(b"www-authenticate", b"Bearer")])
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _send_error(send, 400, "The Content-Length header is not a number.", "Send a valid request.")
        if length > self.max_body:
            return await _send_error(send, 413, *_too_big(length, self.max_body))
        if length == 0 and b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return await self.app(scope, receive, send)
        async with self.uploads:
            body = await self._read_body(receive)
            if body is None:
                return  # the client went away
            if isinstance(body, int):
                return await _send_error(send, 413, *_too_big(body, self.max_body), [(b"connection", b"close")])
            return await self.app(scope, _replay(body, receive), send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, credentials = headers.get(b"authorization", b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(credentials.strip(), self.token)

    async def _read_body(self, receive) -> bytes | int | None:
        """The whole body; the bytes received so far (an int) once past the limit; None on a disconnect."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return size
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that hands the app the body already read, then waits on the real one (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _is_loopback_host(host: bytes) -> bool:
    """Host header "127.0.0.1:8765", "localhost", "[::1]:8765", ... names this machine's loopback."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # [IPv6]:port
        name, _, rest = text[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return False
    else:
        name, _, port = text.partition(":")
        if port and not port.isdigit():
            return False
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_loopback_bind(host: str) -> bool:
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _too_big(size: int, limit: int) -> tuple[str, str]:
    return (f"The request is {size / 2**20:.1f} MiB; the server takes up to {limit / 2**20:.1f} MiB.",
            "Send a smaller photo (2048 pixels a side is plenty), or start the server with a larger "
            "--max-upload-mb.")


async def _send_error(send, status: int, problem: str, fix: str, headers=()) -> None:
    body = json.dumps({"error": {"problem": problem, "fix": fix}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def create_app(jobs_dir: Path, settings: ServerSettings | None = None, prior_factory=None,
               token: str | None = None) -> FastAPI:
    """The API over the jobs in `jobs_dir` (the data folder, which also holds the token file);
    `prior_factory(settings)` -> the prior handed to reconstruct; `token`: None reads or creates the file.
    Raises DataDirInUse, having changed nothing, when another server holds the folder."""
    import torch

    settings = settings or ServerSettings()
    reconstructor = None
    if settings.ray is None:
        reconstructor = Reconstructor(settings, prior_factory)
        devices = reconstructor.devices()  # --gpus 3 or --device cuda without that GPU fails here, before listening
    lock = DataDirLock(jobs_dir)  # before any job is read: a second server must not mark the first one's interrupted
    try:
        if reconstructor is None:  # the workers are Ray actors (a cluster's, or a local one started here)
            from .ray_pool import RayJobRunner

            reconstructor = RayJobRunner(settings, prior_factory)
            devices = reconstructor.devices()
        gpus = {d: None if settings.ray is not None else _gpu_name(torch.device(d)) for d in devices}
        store = JobStore(jobs_dir, reconstructor, default_model=settings.model, devices=devices)
        store.remove_stale_temporaries()
        token = token or ensure_token(jobs_dir)
    except BaseException:
        if hasattr(reconstructor, "shutdown"):
            reconstructor.shutdown()
        lock.release()
        raise
    device = torch.device("cuda" if getattr(reconstructor, "use_gpu", False) else "cpu") if settings.ray is not None \
        else torch.device(devices[0])

    @asynccontextmanager
    async def lifespan(_app):
        store.start()
        try:
            yield
        finally:
            await run_in_threadpool(store.stop)
            if hasattr(reconstructor, "shutdown"):
                await run_in_threadpool(reconstructor.shutdown)  # the Ray actors, and a cluster started here

    app = _fastapi(title="RealFusion job server", version=__version__, lifespan=lifespan, redoc_url=None,
                   swagger_ui_parameters={"persistAuthorization": True})
    app.state.store = store
    app.state.reconstructor = reconstructor
    app.state.data_dir_lock = lock  # held for the app's life; the kernel drops it when the process ends
    max_body = settings.max_upload_bytes * 4 // 3 + BODY_SLACK  # base64 makes 3 bytes into 4
    app.add_middleware(_Guard, token=token, token_file=token_path(jobs_dir), max_body=max_body,
                       check_host=_is_loopback_bind(settings.host))
    _add_error_handlers(app)
    _add_docs(app)

    def job_out(job_id: str) -> JobOut:
        record, _version = store.snapshot(job_id)
        return _job_out(store, record)

    @app.get("/health", response_model=Health)
    def health():
        if settings.ray is not None:
            workers = _ray_workers(store, reconstructor)
            loads = sum(w.model_loads for w in workers)
            gpu_memory = next((w.gpu_memory for w in workers if w.gpu_memory is not None), None)
        else:
            workers = _local_workers(store, reconstructor, gpus)
            loads = sum(c.loads for c in reconstructor.caches.values())
            gpu_memory = _gpu_memory(device)
        loaded = [w.model_loaded for w in workers if w.model_loaded is not None]
        problems = store.problems()
        return Health(ok=not problems, problems=problems, version=__version__, device=device.type,
                      gpu=next((w.gpu for w in workers if w.gpu), None), methods=list(known_methods()),
                      presets=list(PRESETS), model=settings.default_model, queue=store.queued_count(),
                      running=store.running_id(), workers=workers, model_loaded=bool(loaded),
                      loaded_model=loaded[0] if loaded else None, model_loads=loads, gpu_memory=gpu_memory,
                      pool="ray" if settings.ray is not None else "local")

    @app.post("/jobs", status_code=201, response_model=JobOut,
              responses={**ERRORS, 413: {"model": ErrorResponse}, 507: {"model": ErrorResponse}})
    def submit(request: JobRequest):
        image = _decode_image(request.image_png_base64, settings)
        record = store.submit(image, JobSettings(filename=request.filename, preset=request.preset,
                                                 method=request.method, seed=request.seed, model=request.model,
                                                 overrides=list(request.overrides),
                                                 initializer=request.initializer or None))
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

        def event() -> tuple[str, int, bool]:
            """(the event, its version, finished): run in a worker thread, so building and serialising the
            record never holds up the event loop (nor /health) however many clients watch."""
            record, version = store.snapshot(job_id)
            return (f"event: job\ndata: {_job_out(store, record).model_dump_json()}\n\n", version,
                    record["state"] in FINISHED)

        async def stream():
            seen, quiet = -1, 0.0
            while not store.stopping:
                if store.version(job_id) != seen:  # two dict lookups: cheap enough for the loop itself
                    text, seen, finished = await run_in_threadpool(event)
                    quiet = 0.0
                    yield text
                    if finished:
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


def _local_workers(store: JobStore, reconstructor: Reconstructor, gpus: dict) -> list[WorkerOut]:
    """Each worker thread of this process: its device, its GPU and that GPU's memory, its model."""
    import torch

    caches = reconstructor.caches
    memory = process_memory_bytes()
    workers = []
    for index, w in enumerate(store.workers()):
        cache = caches.get((str(w["device"]), index))
        workers.append(WorkerOut(device=w["device"], gpu=gpus.get(w["device"]), running=w["running"],
                                 model_loaded=cache.loaded if cache else None, model_loads=cache.loads if cache else 0,
                                 runs_on=w["device"], gpu_memory=_gpu_memory(torch.device(w["device"])),
                                 memory_bytes=memory,
                                 pid=os.getpid(), host=socket.gethostname()))
    return workers


def _ray_workers(store: JobStore, runner) -> list[WorkerOut]:
    """Each Ray slot: what its actor last reported about itself (its device, GPU and memory, model)."""
    info = runner.slot_info()
    workers = []
    for w in store.workers():
        actor = info.get(w["device"], {})
        memory = actor.get("gpu_memory")
        workers.append(WorkerOut(device=w["device"], runs_on=actor.get("device"), gpu=actor.get("gpu"), running=w["running"], model_loaded=actor.get("model_loaded"),
                                 model_loads=actor.get("model_loads") or 0,
                                 gpu_memory=GpuMemory(**memory) if memory else None,
                                 memory_bytes=actor.get("memory_bytes"), pid=actor.get("pid"), host=actor.get("host"),
                                 ready=bool(actor.get("ready")), replaced=actor.get("replaced") or 0,
                                 last_death=actor.get("last_death")))
    return workers


def _job_out(store: JobStore, record: dict) -> JobOut:
    job_id = record["id"]
    files = {name: f"/jobs/{job_id}/files/{name}" for name in store.present_files(job_id)}
    return JobOut(**{k: v for k, v in record.items() if k != "settings"},
                  preview=files.get("preview.png"), files=files,
                  queue_position=store.queue_position(job_id),
                  settings={k: v for k, v in record["settings"].items() if k != "input"})


def _decode_image(data: str, settings: ServerSettings) -> bytes:
    try:
        image = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputImageError(f"image_png_base64 is not valid base64 ({exc}).",
                              "Send the photo's bytes base64-encoded (standard alphabet, with padding).") from exc
    if not image:
        raise InputImageError("image_png_base64 is empty.", "Send the bytes of a PNG or JPEG photo of the object.")
    if len(image) > settings.max_upload_bytes:
        raise UploadTooLarge(f"The photo is {len(image) / 2**20:.1f} MiB; the server takes up to "
                             f"{settings.max_upload_bytes / 2**20:.1f} MiB.",
                             "Send a smaller PNG or JPEG (2048 pixels a side is plenty), or start the server with "
                             "a larger --max-upload-mb.")
    _check_pixels(image, settings.max_pixels)
    return image


def _check_pixels(image: bytes, max_pixels: int) -> None:
    """Width x height from the header only (PIL's open does not decode), before anything decodes it."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image)) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        raise UploadTooLarge(f"The photo has too many pixels ({exc}).",
                             "Send a smaller photo (2048 pixels a side is plenty).") from exc
    except Exception:  # noqa: BLE001 - not an image PIL knows: the matting's load says so with its own message
        return
    if width * height > max_pixels:
        raise UploadTooLarge(f"The photo is {width}x{height} ({width * height / 1e6:.1f} Mpx); the server takes up "
                             f"to {max_pixels / 1e6:.1f} Mpx.",
                             "Scale the photo down (2048 pixels a side is plenty), or start the server with a "
                             "larger --max-megapixels.")


class _NotFound(EngineError):
    pass


def _fastapi(**kwargs) -> FastAPI:
    """FastAPI whose /docs loads Swagger UI from the installed fastapi-offline package (works offline);
    without that package, FastAPI's own /docs (Swagger UI from a CDN: needs the internet)."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:
        log.info("fastapi-offline is not installed: /docs loads Swagger UI from the internet")
        return FastAPI(**kwargs)
    return FastAPIOffline(static_url=DOCS_ASSETS.rstrip("/"), **kwargs)


def _add_docs(app: FastAPI) -> None:
    """The bearer scheme in the OpenAPI document, so /docs' "Authorize" then "Try it out" send the token."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="Every request but /docs and /openapi.json needs "
                                             "`Authorization: Bearer <token>` (the token is in DATA_DIR/token).")
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the token in DATA_DIR/token"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _error(status: int, problem: str, fix: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"problem": problem, "fix": fix}, **extra}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def engine_error(_request, exc: EngineError):
        status = (404 if isinstance(exc, (UnknownJob, _NotFound)) else 409 if isinstance(exc, JobStateConflict)
                  else 413 if isinstance(exc, UploadTooLarge) else 507 if isinstance(exc, DiskFullError) else 400)
        return _error(status, exc.problem, exc.fix)

    @app.exception_handler(OSError)
    async def os_error(_request, exc: OSError):
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return _error(507, f"The server's disk is full ({exc.strerror}).",
                          "Free disk space (old jobs in the server's data folder can be deleted) and try again.")
        log.error("internal error", exc_info=exc)
        return _error(500, f"The server could not read or write a file ({exc.strerror or exc}).",
                      "See the server's log.")

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


def _gpu_memory(device) -> GpuMemory | None:
    if device.type != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return GpuMemory(free_bytes=free, total_bytes=total, used_by_server_bytes=torch.cuda.memory_reserved(device))


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
          f"(data in {jobs_dir}; token in {token_path(jobs_dir)})", flush=True)
    if settings.host not in LOOPBACK_NAMES:
        print(f"warning: listening on {settings.host}: anyone who can reach this machine and has the token can "
              "submit jobs and read their results, over plain HTTP.", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=5,
                            http=_header_timeout_protocol(settings.header_timeout_s),
                            timeout_keep_alive=int(KEEP_ALIVE_S),
                            h11_max_incomplete_event_size=64 * 1024)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request header within
    `timeout_s` of connecting (or of its last answer): uvicorn's keep-alive timer stops at the first
    byte, so a client trickling a header (or sending nothing) would otherwise hold its connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._header_timer is not None:
                self._header_timer.cancel()  # a whole request header arrived
                self._header_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted sockets only then, and
        # without it every answer on a keep-alive connection waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # before the address is printed, so a client reading it can connect at once
    except OSError as exc:
        raise EngineError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}).",
                           "Another server may already use that port: stop it, or pick another with --port.") from exc
    sock.set_inheritable(True)
    return sock
