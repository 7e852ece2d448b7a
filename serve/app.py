"""`build_app(args) -> Application`: what `serve run serve.app:build_app` and `moray serve` deploy.

Two deployments: `OpenAIIngress` (FastAPI, validates and tokenizes) and `MoEModel` (each
replica one sharded copy of the model: router in the replica, shards in its placement group).

args: checkpoint (required), num_shards (2), max_batch_size (32), use_gpu (false),
model_name (the checkpoint's config name), min_replicas / max_replicas / target_ongoing_requests
and upscale_delay_s / downscale_delay_s for the model deployment's autoscaling, elastic (a
dict or JSON string of `actors.elastic.ElasticConfig` fields: failover, expert rebalancing and
shard autoscaling inside each replica), cuda_graphs (GPU: where decode steps replay as CUDA
graphs, "all", "router" or "none").
"""


import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from actors.bundles import model_bundles
from actors.elastic import elastic_config_from
from model import checkpoint
from model.config import check_cuda_graphs
from model.hf import as_moray_checkpoint
from model.tokenizer import Tokenizer
from serve.model_server import ModelServer
from serve import moray_pb2
from serve.openai_api import (APIError, ChatRequest, CompletionRequest, OpenAIService, stop_strings, chat_prompt,
                              register_error_handlers)

GRPC_SERVICER = "serve.moray_pb2_grpc.add_MorayGenerateServicer_to_server"

def _grpc_invalid(grpc_context, exc: Exception, reply):
    """Bad gRPC input: INVALID_ARGUMENT with the reason, as HTTP would answer 400."""
    if grpc_context is not None:
        grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        grpc_context.set_details(exc.message if isinstance(exc, APIError) else str(exc).splitlines()[0])
    return reply


api = FastAPI(title="moray", version="0.1.0")
register_error_handlers(api)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, model: DeploymentHandle, model_name: str, tokenizer_file: str, max_context: int):
        self.service = OpenAIService(model, model_name, Tokenizer.load(tokenizer_file), max_context)

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        return await self.service.respond(req, self.service.tokenize(req.prompt), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest):
        return await self.service.respond(req, self.service.tokenize(chat_prompt(req.messages, self.service.tokenizer)), chat=True)

    @api.get("/v1/models")
    async def models(self):
        return self.service.models()

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    # gRPC (serve/moray.proto), through Serve's gRPC proxy

    async def Generate(self, request: moray_pb2.GenerateRequest, grpc_context=None) -> moray_pb2.GenerateReply:
        try:
            req, ids = self._grpc_request(request)
            text, count, finish = await self.service.complete(ids, self.service.params_for(req, 0), stop_strings(req.stop))
        except (APIError, ValidationError) as exc:
            return _grpc_invalid(grpc_context, exc, moray_pb2.GenerateReply())
        return moray_pb2.GenerateReply(text=text, finish_reason=finish, prompt_tokens=len(ids),
                                       completion_tokens=count)

    async def GenerateStream(self, request: moray_pb2.GenerateRequest, grpc_context=None
                             ) -> AsyncIterator[moray_pb2.GenerateChunk]:
        try:
            req, ids = self._grpc_request(request)
        except (APIError, ValidationError) as exc:
            _grpc_invalid(grpc_context, exc, None)
            return
        async for piece, _, finish in self.service.pieces(ids, self.service.params_for(req, 0), stop_strings(req.stop)):
            yield moray_pb2.GenerateChunk(text=piece, finish_reason=finish or "")

    def _grpc_request(self, request: moray_pb2.GenerateRequest) -> tuple[CompletionRequest, list[int]]:
        req = CompletionRequest(model=self.service.model_name, prompt=request.prompt or list(request.prompt_ids),
                                max_tokens=request.max_tokens or 16, temperature=request.temperature,
                                top_p=request.top_p or 1.0, top_k=request.top_k,
                                seed=request.seed if request.HasField("seed") else None, stop=list(request.stop))
        ids = self.service.tokenize(req.prompt)
        self.service.check(req, ids)
        return req, ids


MoEModel = serve.deployment(ModelServer, name="MoEModel", max_ongoing_requests=256)


@dataclass
class AppArgs:
    checkpoint: str
    num_shards: int = 2
    max_batch_size: int = 32
    use_gpu: bool = False
    model_name: str | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    elastic: dict | str | None = None
    cuda_graphs: str = "all"

    def __post_init__(self) -> None:
        """`serve run ... key=value` passes strings: coerce them to the declared types."""
        for name, kind in (("num_shards", int), ("max_batch_size", int), ("min_replicas", int),
                           ("max_replicas", int), ("target_ongoing_requests", float), ("upscale_delay_s", float),
                           ("downscale_delay_s", float)):
            setattr(self, name, kind(getattr(self, name)))
        if isinstance(self.use_gpu, str):
            self.use_gpu = self.use_gpu.lower() in ("1", "true", "yes")
        if isinstance(self.elastic, str):
            self.elastic = json.loads(self.elastic)
        self.elastic = asdict(elastic_config_from(self.elastic))  # a bad key fails here, before any replica
        check_cuda_graphs(self.cuda_graphs)


def build_app(args: dict) -> Application:
    opts = AppArgs(**args)
    opts.checkpoint = str(as_moray_checkpoint(opts.checkpoint))  # a Hugging Face dir is converted once
    cfg = checkpoint.load_config(opts.checkpoint)  # a bad checkpoint fails here, before any replica
    tokenizer_file = checkpoint.tokenizer_file(opts.checkpoint)
    if tokenizer_file is None:
        raise checkpoint.CheckpointError(f"checkpoint {opts.checkpoint} has no tokenizer.json to serve text with")
    autoscaling = {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                   "target_ongoing_requests": opts.target_ongoing_requests,
                   "upscale_delay_s": opts.upscale_delay_s, "downscale_delay_s": opts.downscale_delay_s}
    bundles = model_bundles(opts.num_shards, opts.use_gpu)
    model = MoEModel.options(
        autoscaling_config=autoscaling, placement_group_bundles=bundles, placement_group_strategy="SPREAD",
        ray_actor_options={"num_cpus": bundles[0]["CPU"], "num_gpus": bundles[0].get("GPU", 0)},
    ).bind(str(Path(opts.checkpoint).resolve()), opts.num_shards, opts.max_batch_size, opts.use_gpu,
            elastic=opts.elastic, cuda_graphs=opts.cuda_graphs)
    return OpenAIIngress.bind(model, opts.model_name or cfg.name, str(tokenizer_file), cfg.max_seq_len)
