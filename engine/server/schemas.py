"""Requests and responses of the job server's API v1 (the Blender add-on's side of the contract).

Fields may be added over time; none is removed or renamed within v1.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, Field

from ..config import PRESETS
from ..validation import INITIALIZER_PATTERN, known_methods

# What one request may carry, so no request makes every later answer slow (each job's record is read
# and serialised on every status request and event); generous for real use (the presets need no overrides).
MAX_OVERRIDES = 64
MAX_OVERRIDE_CHARS = 200
MAX_FILENAME_CHARS = 255
MAX_MODEL_CHARS = 1024

PresetName = Literal[tuple(PRESETS)]  # "fast" | "standard" | "paper"
MethodName = Literal[known_methods()]  # "realfusion"
JobState = Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]


class ErrorInfo(BaseModel):
    problem: str
    fix: str


class ErrorResponse(BaseModel):
    error: ErrorInfo


class JobRequest(BaseModel):
    image_png_base64: str = Field(description="the photo's bytes (PNG or JPEG), base64")
    filename: str = Field("input.png", max_length=MAX_FILENAME_CHARS, description="the photo's file name, for display")
    preset: PresetName = "standard"
    method: MethodName = "realfusion"
    seed: int = Field(0, description="0 to 2**32 - 1")
    model: Optional[str] = Field(None, max_length=MAX_MODEL_CHARS,
                                 description="Stable Diffusion hub id or folder; null: the server's")
    overrides: list[Annotated[str, Field(max_length=MAX_OVERRIDE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_OVERRIDES, description='config overrides, e.g. "fit.iterations=500"')
    initializer: Optional[str] = Field(None, max_length=32, pattern=INITIALIZER_PATTERN + "|^$",
                                       description='one word naming the object (e.g. "mug"), which textual inversion '
                                                   'starts from (textual_inversion.initializer); null or "": the '
                                                   'preset\'s ("object")')


class JobSettingsOut(BaseModel):
    filename: str
    preset: str
    method: str
    seed: int
    model: Optional[str]
    overrides: list[str]
    initializer: Optional[str] = None


class JobOut(BaseModel):
    id: str
    state: JobState
    stage: str
    step: int
    total: int
    progress: float = Field(description="0..1 over the whole job, stages weighted by their usual share of time")
    message: str
    error: Optional[ErrorInfo]
    created: float = Field(description="seconds since the epoch")
    updated: float
    preview: Optional[str] = Field(description="URL path of preview.png, null until the first one is written")
    files: dict[str, str] = Field(description="result file name -> URL path, for the files present")
    metrics: dict[str, float] = Field(description="losses of the last fit step")
    queue_position: Optional[int] = Field(None, description="0 for the next job to run; null unless queued")
    device: Optional[str] = Field(None, description="the worker's device (cuda:0, cpu) running it; the last one "
                                                    "after it ends; null while queued")
    settings: JobSettingsOut


class JobList(BaseModel):
    jobs: list[JobOut]


class GpuMemory(BaseModel):
    free_bytes: int
    total_bytes: int
    used_by_server_bytes: int = Field(description="memory torch holds in this server process")


class WorkerOut(BaseModel):
    device: str = Field(description="cuda:0, cuda:1, ... or cpu; ray:0, ray:1, ... for the workers of a Ray pool")
    gpu: Optional[str] = Field(None, description="the GPU's name; null on CPU")
    running: Optional[str] = Field(None, description="id of the job it runs now")
    model_loaded: Optional[str] = Field(None, description="the model kept loaded on this device")
    model_loads: int = Field(0, description="times this worker loaded a model")
    runs_on: Optional[str] = Field(None, description="the torch device the work runs on (a Ray worker's own: cuda "
                                                     "or cpu); null until a Ray worker has reported")
    gpu_memory: Optional[GpuMemory] = Field(None, description="its GPU's memory (a Ray worker's as it reports "
                                                                "it); null on CPU")
    memory_bytes: Optional[int] = Field(None, description="resident memory of the worker's process")
    pid: Optional[int] = Field(None, description="the worker's process (the server's own for local workers)")
    host: Optional[str] = Field(None, description="the machine it runs on")
    ready: Optional[bool] = Field(None, description="Ray: its process is up; null for local workers")
    replaced: int = Field(0, description="Ray: its workers that died and were replaced (their jobs went on)")
    last_death: Optional[str] = Field(None, description="Ray: why the last one died")


class Health(BaseModel):
    ok: bool = Field(description="false while something needs attention: see problems")
    problems: list[str] = Field(default_factory=list, description="e.g. a worker thread that died and was restarted")
    version: str
    device: Literal["cuda", "cpu"]
    gpu: Optional[str]
    methods: list[str]
    presets: list[str]
    model: str
    queue: int = Field(description="jobs waiting to start")
    running: Optional[str] = Field(None, description="id of a running job (the first worker's)")
    workers: list[WorkerOut] = Field(default_factory=list, description="one per device (--gpus); one job each")
    model_loaded: bool = Field(False, description="a Stable Diffusion model is loaded and kept for the next job")
    loaded_model: Optional[str] = Field(None, description="id or folder of the loaded model")
    model_loads: int = Field(0, description="times a model was loaded since the server started")
    gpu_memory: Optional[GpuMemory] = Field(None, description="null on CPU")
    pool: Literal["local", "ray"] = Field("local", description="local: worker threads on this machine's devices; "
                                                               "ray: Ray actors (serve --ray)")
