"""OpenAI-compatible HTTP ingress: /v1/completions, /v1/chat/completions, /v1/models, /health.

Validates and tokenizes, then streams tokens from the model deployment. Bad requests get a 4xx
with OpenAI's error body ({"error": {"message", "type", "param", "code"}}); they never reach
the model, so other requests are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray.serve.handle import DeploymentHandle

from actors.router import ShardFailure
from model.generate import SamplingParams
from model.tokenizer import Tokenizer


class SamplingFields(BaseModel):
    """What completions and chat share: the model, sampling knobs, how many, streaming."""

    model: str
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain chat template: one 'role: content' line per message, then the assistant's turn."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ShardFailure)
    async def shards_down(_: Request, exc: ShardFailure) -> JSONResponse:
        """The model's shards are down and could not be replaced: say so, as OpenAI's 503."""
        cause = getattr(exc, "cause", exc)  # Ray wraps the router's ShardFailure in a RayTaskError
        message = str(cause).strip().splitlines()[0][:500]
        return JSONResponse(error_body(message, None, "shards_unavailable", "server_error"), status_code=503)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("request body is not valid JSON"), status_code=400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg')}", param), status_code=400)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


class OpenAIService:
    """The API's logic, independent of how the routes are mounted."""

    def __init__(self, model: DeploymentHandle, model_name: str, tokenizer: Tokenizer, max_context: int):
        self.model, self.model_name, self.tokenizer, self.max_context = model, model_name, tokenizer, max_context

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "prompt is empty", "prompt")
        if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", "prompt")
        return ids

    def check(self, req: CompletionRequest | ChatRequest, prompt_ids: list[int]) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        if len(prompt_ids) >= self.max_context:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; the context is {self.max_context}", "prompt",
                           "context_length_exceeded")
        if len(prompt_ids) + req.max_tokens > self.max_context:
            raise APIError(400, f"max_tokens {req.max_tokens} + prompt {len(prompt_ids)} tokens exceed the context "
                                f"of {self.max_context}", "max_tokens", "context_length_exceeded")

    def params_for(self, req: CompletionRequest | ChatRequest, index: int) -> SamplingParams:
        seed = None if req.seed is None else req.seed + index
        return SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, seed=seed, stop_tokens=(self.tokenizer.eos_id,))

    async def pieces(self, prompt_ids: list[int], params: SamplingParams, stops: list[str]
                     ) -> AsyncIterator[tuple[str, int, str | None]]:
        """(new text, tokens so far, finish reason when done) as tokens arrive; stop strings
        end the sequence early and cancel the rest of its generation."""
        tokens: list[int] = []
        sent = ""
        stream = self.model.options(stream=True).stream.remote(prompt_ids, params)
        finish = "length"
        async for token in stream:
            if token == self.tokenizer.eos_id:
                finish = "stop"
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                yield text[len(sent):cut], len(tokens), None
                finish = "stop"
                stream.cancel()
                break
            if not text.endswith("\ufffd"):  # hold back half of a multi-byte character
                yield text[len(sent):], len(tokens), None
                sent = text
        else:
            text = self.tokenizer.decode(tokens)
            if len(text) > len(sent):
                yield text[len(sent):], len(tokens), None
        yield "", len(tokens), finish

    async def complete(self, prompt_ids: list[int], params: SamplingParams, stops: list[str]
                       ) -> tuple[str, int, str]:
        text, count, finish = "", 0, "length"
        async for piece, count, reason in self.pieces(prompt_ids, params, stops):
            text += piece
            finish = reason or finish
        return text, count, finish

    async def respond(self, req: CompletionRequest | ChatRequest, prompt_ids: list[int], chat: bool):
        self.check(req, prompt_ids)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        stops = stop_strings(req.stop)
        base: dict[str, Any] = {"id": rid, "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return StreamingResponse(_sse(self._chunks(req, prompt_ids, stops, base, chat)),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(self.complete(prompt_ids, self.params_for(req, i), stops)
                                         for i in range(req.n)))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                       for i, (text, _, finish) in enumerate(results)]
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                       for i, (text, _, finish) in enumerate(results)]
        return base | {"object": "chat.completion" if chat else "text_completion", "choices": choices,
                       "usage": _usage(len(prompt_ids), sum(count for _, count, _ in results))}

    async def _chunks(self, req, prompt_ids: list[int], stops: list[str], base: dict, chat: bool
                      ) -> AsyncIterator[dict]:
        for i in range(req.n):
            first = True
            async for piece, _, finish in self.pieces(prompt_ids, self.params_for(req, i), stops):
                if chat:
                    delta = ({"role": "assistant"} if first else {}) | ({"content": piece} if piece else {})
                    yield base | {"object": "chat.completion.chunk",
                                  "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}
                else:
                    yield base | {"object": "text_completion",
                                  "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": finish}]}
                first = False

    def models(self) -> dict:
        return {"object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "moray"}]}
