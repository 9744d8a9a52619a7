"""The HTTP API, one FastAPI app over a backend that ranks, encodes and describes the model.

Two backends: plain in-process objects (`LocalBackend`, for `fusionrec serve --plain` and as the
benchmark's baseline) and, in a Ray Serve Ranker replica, the same with the encoder behind a
deployment handle (serve/app.py). The routes, the request schemas and every error are the same
for both.

    POST /predict    {"user_id", "item_ids"}                       -> {"predictions", "model_version"}
    POST /recommend  {"user_id", "k", "exclude_seen"} or {"user": {"text", "image", "attributes"}, "k"}
                                                                   -> {"items", "model_version"}
    GET  /healthz (200 once the model and its encoders are loaded, else 503), GET /model

Bad input is a 4xx with {"error": "field: message"}: never a 500, never a traceback. The OpenAPI
document says which answers each route gives, and what a request must look like, as far as a
schema can (which attributes and images a model accepts is checked against the model, a 422).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import io
import json
import time
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from starlette.exceptions import HTTPException

from fusionrec import __version__
from fusionrec.data.images import ImageProblem, open_image
from fusionrec.serve.ranker import STALE

MAX_BODY_BYTES = 8 * 1024**2  # a 5 MB image is ~6.7 MB of base64
MAX_IMAGE_BYTES = 5 * 1024**2
MAX_ITEMS = 10_000
MAX_K = 1000
INFO_MAX_AGE_S = 2.0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"user_id": "u00001", "item_ids": ["i00001", "i00002"]}]})

    user_id: StrictStr = Field(min_length=1, max_length=256)
    item_ids: list[StrictStr] = Field(min_length=1, max_length=MAX_ITEMS)


# "At least one of text, image, attributes", as the validator below checks it (empty counts as absent).
AT_LEAST_ONE_CONTENT = [
    {"required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}},
    {"required": ["image"], "properties": {"image": {"type": "string", "minLength": 1}}},
    {"required": ["attributes"], "properties": {"attributes": {"type": "object", "minProperties": 1}}},
]
# "Exactly one of user_id and user" (null counts as absent).
EXACTLY_ONE_USER = [
    {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
    {"required": ["user"], "properties": {"user": {"type": "object"}}},
]


class NewUser(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": AT_LEAST_ONE_CONTENT})

    text: StrictStr | None = Field(None, max_length=10_000, description="What the user wrote about themselves.")
    image: StrictStr | None = Field(None, description="A picture of the user's taste, base64 (at most 5 MB).",
                                    json_schema_extra={"contentEncoding": "base64"})
    # Values are checked against the model's attributes by the ranker (names, levels, numbers).
    attributes: dict[StrictStr, Any] = Field(default_factory=dict,
                                             description="Structured attributes by name (see GET /model).")


class RecommendRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": EXACTLY_ONE_USER, "examples": [
        {"user_id": "u00001", "k": 10}, {"user": {"text": "I love flowing linen dresses for summer"}, "k": 5}]})

    user_id: StrictStr | None = Field(None, min_length=1, max_length=256, description="A known user.")
    user: NewUser | None = Field(None, description="A user never seen, described by content.")
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    exclude_seen: StrictBool = True

    @model_validator(mode="after")
    def one_user(self) -> RecommendRequest:
        if (self.user_id is None) == (self.user is None):
            raise ValueError("user_id, user: give exactly one (user_id: a known user; user: a new user's content)")
        if self.user is not None and not (self.user.text or self.user.image or self.user.attributes):
            raise ValueError("user: give at least one of text, image or attributes")
        return self


class Prediction(BaseModel):
    item_id: str
    rating: float


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model_version: str


class Recommendation(BaseModel):
    item_id: str
    score: float = Field(description="The model's raw score, by which the list is ranked, best first. Under the "
                                     "rating objective it is the predicted rating before clipping, so it may lie "
                                     "outside the rating scale.")
    rating: float | None = Field(description="The predicted rating on the dataset's scale: the score clipped to "
                                             "it, as /predict answers. null for a model trained on implicit "
                                             "feedback, whose scores are logits.")


class RecommendResponse(BaseModel):
    items: list[Recommendation]
    model_version: str


class Health(BaseModel):
    status: Literal["ok"]
    model_version: str


class ErrorBody(BaseModel):
    error: str = Field(description="`field: message`, naming the part of the request that is wrong.")


ERRORS = {
    400: "The body is not valid JSON.",
    404: "An unknown user or item (named in the error).",
    409: "The served model changed twice while a new user's content was being encoded: send it again.",
    413: "The body is over 8 MB, or the image over 5 MB.",
    422: "A field missing, of the wrong type, out of range, or unknown to the model (named in the error).",
    503: "The model's encoder for a new user's text or image cannot be loaded on this server (yet).",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route, for the OpenAPI document (each with the {"error": ...} body)."""
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in statuses}


class Backend(Protocol):
    async def rank(self, call: dict) -> dict: ...  # Ranker.answer's {"status", "body" | "error"}

    # PayloadEncoder.answer's {"status", "vectors" | "error"}
    async def encode(self, encoders: dict, text: str | None, image: bytes | None) -> dict: ...

    async def ready(self, encoders: dict) -> str | None: ...  # PayloadEncoder.ready: None, or why not

    async def info(self) -> dict: ...


class LocalBackend:
    """Everything in this process: a Ranker and a PayloadEncoder; blocking work runs in threads."""

    def __init__(self, ranker, encoder):
        self.ranker, self.encoder = ranker, encoder

    async def rank(self, call: dict) -> dict:
        return await asyncio.to_thread(self.ranker.answer, call)

    async def encode(self, encoders: dict, text: str | None, image: bytes | None) -> dict:
        return await asyncio.to_thread(self.encoder.answer, encoders, text, image)

    async def ready(self, encoders: dict) -> str | None:
        return await asyncio.to_thread(self.encoder.ready, encoders)

    async def info(self) -> dict:
        return self.ranker.info()


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _location(loc: tuple) -> str:
    """pydantic's error location as a field path: ("body", "user", "attributes", "x") -> user.attributes.x"""
    out = ""
    for part in (str(p) for p in loc if p != "body"):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _decode_image(value: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "user.image: not valid base64") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"user.image: {len(data) / 1024**2:.1f} MB, over the limit of 5 MB")
    try:
        open_image(io.BytesIO(data))
    except ImageProblem as exc:
        raise HTTPException(422, f"user.image: {exc}") from None
    return data


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"body: larger than the limit of {limit / 1024**2:g} MB")


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (413), whether announced or streamed.
    (An HTTPException, so FastAPI's body parsing passes it on instead of making it a 400.)"""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": BodyTooLarge(self.limit).detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_api(backend: Backend) -> FastAPI:
    app = FastAPI(title="fusionrec", version=__version__,
                  description="Multimodal recommendations: FusionNeuMF over text, images and attributes.")
    app.add_middleware(BodyLimit)
    cached: dict[str, Any] = {"at": 0.0, "info": None}

    async def model_info(fresh: bool = False) -> dict:
        if fresh or cached["info"] is None or time.monotonic() - cached["at"] > INFO_MAX_AGE_S:
            cached["info"], cached["at"] = await backend.info(), time.monotonic()
        return cached["info"]

    def answer(result: dict):
        return result["body"] if result["status"] == 200 else error(result["status"], result["error"])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, f"body: invalid JSON ({first.get('ctx', {}).get('error', 'cannot parse')})")
        message = first.get("msg", "invalid").removeprefix("Value error, ")
        where = _location(tuple(first.get("loc", ())))
        return error(422, f"{where}: {message}" if where else message)  # a model-level check names its fields

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}")

    @app.post("/predict", response_model=PredictResponse, responses=documented(400, 404, 413, 422))
    async def predict(request: PredictRequest):
        """Predicted ratings of the given items for a known user."""
        return answer(await backend.rank({"method": "predict", "user_id": request.user_id,
                                          "item_ids": request.item_ids}))

    @app.post("/recommend", response_model=RecommendResponse, responses=documented(400, 404, 409, 413, 422, 503))
    async def recommend(request: RecommendRequest):
        """Top-k items for a known user (`user_id`) or for a new user described by content (`user`)."""
        if request.user_id is not None:
            return answer(await backend.rank({"method": "recommend", "user_id": request.user_id, "k": request.k,
                                              "exclude_seen": request.exclude_seen}))
        user = request.user
        # decoding a large image takes a while: off the event loop, which other requests share
        image = await asyncio.to_thread(_decode_image, user.image) if user.image is not None else None
        for attempt in range(2):  # a promotion between encoding and ranking: encode again, once
            encoders = (await model_info(fresh=attempt > 0))["user_encoders"]
            needed = (user.text is not None and encoders["text"]) or (image is not None and encoders["image"])
            encoded = await backend.encode(encoders, user.text, image) if needed else {"status": 200, "vectors": {}}
            if encoded["status"] != 200:
                return error(encoded["status"], encoded["error"])
            result = await backend.rank({"method": "recommend_new", "k": request.k, "encoders": encoders,
                                         "vectors": encoded["vectors"], "text": user.text, "image": image,
                                         "attributes": user.attributes})
            if result["status"] != STALE:
                break
        return answer(result)

    @app.get("/healthz", response_model=Health, responses=documented(503))
    async def healthz():
        """200 once the model and the encoders a new user's text or image needs are loaded; 503 until then
        (the error says what is missing)."""
        info = await model_info()
        problem = await backend.ready(info["user_encoders"])
        if problem:
            return error(503, problem)
        return {"status": "ok", "model_version": info["version"]}

    @app.get("/model")
    async def model():
        """The served model: name, version, alias, training metrics, and what a new user may send."""
        return await model_info(fresh=True)

    return app


def plain_app(model_uri: str, refresh_s: float = 5.0):
    """The whole service in one process, without Ray (development, and the load benchmark's baseline)."""
    from fusionrec.serve.encoding import PayloadEncoder
    from fusionrec.serve.ranker import Ranker

    ranker = Ranker(model_uri, refresh_s)
    ranker.follow_alias()
    encoder = PayloadEncoder()
    encoder.ready(ranker.info()["user_encoders"])  # load them now; /healthz reports any that cannot be
    app = build_api(LocalBackend(ranker, encoder))
    # What is loaded by now lives as long as the process: keep it out of the collector's full passes,
    # as Ray Serve does in each replica. One such pass took 348 ms here, and made the p99 at half
    # load 339 ms against 66 (benchmarks/serve_load.py).
    gc.collect()
    gc.freeze()
    return app
