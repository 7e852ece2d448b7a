"""The dashboard's FastAPI app: a JSON API over `ClusterView` and the static front end.

Reads are GETs (open unless `protect_reads`); every POST changes the cluster and needs the
admin token. Route handlers are plain functions, so FastAPI runs the blocking Ray calls in
its thread pool and the event loop stays free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from cluster.dashboard.security import AdminGuard, AuditTrail
from cluster.dashboard.sources import ClusterView, NotFound, Unavailable

STATIC = Path(__file__).resolve().parent / "static"

DOTLIST = re.compile(r"^[A-Za-z_][\w.]*=\S*$")


def _dotlist_item(value: str) -> str:
    if not DOTLIST.match(value):
        raise ValueError(f"an override is key=value with a dotted key (train.max_steps=50), got {value!r}")
    return value


Override = Annotated[str, StringConstraints(max_length=200), AfterValidator(_dotlist_item)]
Name = Annotated[str, StringConstraints(pattern=r"^[\w.\-]+$", max_length=100)]


class SubmitJob(BaseModel):
    preset: Name
    overrides: list[Override] = Field(default_factory=list, max_length=50)


class TestCompletion(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    max_tokens: int = Field(default=16, ge=1, le=256)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


class ScaleShards(BaseModel):
    shards: int = Field(ge=1, le=4096)


class DrainNode(BaseModel):
    node_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,64}$")]


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)


def create_app(view: ClusterView, token: str, default_app: str = "moray", protect_reads: bool = False) -> FastAPI:
    guard = AdminGuard(token)
    audit = AuditTrail()
    api = FastAPI(title="moray dashboard", docs_url=None, redoc_url=None)

    @api.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": _validation_message(exc)})

    @api.exception_handler(NotFound)
    async def missing(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"error": str(exc)})

    @api.exception_handler(Unavailable)
    async def unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"error": str(exc)})

    @api.exception_handler(ValueError)
    async def refused(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": str(exc).splitlines()[0] if str(exc) else repr(exc)})

    reads = APIRouter(prefix="/api", dependencies=[Depends(guard)] if protect_reads else [])
    writes = APIRouter(prefix="/api", dependencies=[Depends(guard)])

    def audited(request: Request, action: str, target: str, do):
        try:
            result = do()
        except Exception as exc:
            audit.record(request, action, target, f"failed: {str(exc).splitlines()[0] if str(exc) else repr(exc)}")
            raise
        audit.record(request, action, target, "ok" if not isinstance(result, dict) or result.get("ok", True)
                     else f"failed: {result.get('message', '')}")
        return result

    @reads.get("/session")
    def session() -> dict:
        return {"app": default_app, "protect_reads": protect_reads}

    @reads.get("/overview")
    def overview(app: str = default_app) -> dict:
        return {**view.overview(app), "audit": list(audit.entries)[-20:]}

    @reads.get("/jobs")
    def jobs() -> dict:
        return {"jobs": view.jobs()}

    @reads.get("/jobs/{job_id}")
    def job(job_id: Name) -> dict:
        return view.job(job_id)

    @reads.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def job_logs(job_id: Name) -> str:
        return view.job_logs(job_id)

    @writes.post("/jobs")
    def submit_job(body: SubmitJob, request: Request) -> dict:
        job_id = audited(request, "submit job", f"{body.preset} {' '.join(body.overrides)}",
                         lambda: view.submit_job(body.preset, body.overrides))
        return {"id": job_id}

    @writes.post("/jobs/{job_id}/stop")
    def stop_job(job_id: Name, request: Request) -> dict:
        return {"message": audited(request, "stop job", job_id, lambda: view.stop_job(job_id))}

    @reads.get("/endpoints")
    def endpoints() -> dict:
        return view.endpoints()

    @writes.post("/endpoints/{app}/completion")
    def test_completion(app: Name, body: TestCompletion, request: Request) -> dict:
        return audited(request, "test completion", app,
                       lambda: view.test_completion(app, body.prompt, body.max_tokens, body.temperature))

    @reads.get("/experts/{app}")
    def experts(app: Name) -> dict:
        return view.experts(app)

    @writes.post("/experts/{app}/rebalance")
    def rebalance(app: Name, request: Request) -> dict:
        return audited(request, "rebalance", app, lambda: view.rebalance(app))

    @writes.post("/experts/{app}/scale")
    def scale(app: Name, body: ScaleShards, request: Request) -> dict:
        return audited(request, "scale shards", f"{app} to {body.shards}", lambda: view.scale_shards(app, body.shards))

    @writes.post("/experts/{app}/drain")
    def drain(app: Name, body: DrainNode, request: Request) -> dict:
        return audited(request, "drain node", f"{app} node {body.node_id}", lambda: view.drain_node(app, body.node_id))

    api.include_router(reads)
    api.include_router(writes)
    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return api
