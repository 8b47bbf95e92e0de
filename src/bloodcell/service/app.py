"""The HTTP service and web page (FastAPI, served by uvicorn).

Only the model named at start is ever loaded; no path from a request reaches the file system.
Uploads are checked by decoding, never by extension, and bounded in bytes and pixels. A batch
answers for each file: 200 with ``results`` for the readable images and ``errors`` for the rest,
422 only when nothing in it is readable. An optional API key (``X-API-Key`` header, compared in
constant time) guards every ``/v1`` route but ``/v1/health``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from ..core.extras import require

require("fastapi", "bloodcell serve")
require("python_multipart", "bloodcell serve")

from fastapi import FastAPI, File, UploadFile  # noqa: E402 - after the extra is checked
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from starlette.datastructures import Headers  # noqa: E402

from ..core.errors import BloodcellError, ImageReadError  # noqa: E402
from ..data import decode_bytes  # noqa: E402
from ..data.pipeline import usable_cores  # noqa: E402
from ..inference import differential_count, load_predictor  # noqa: E402
from ..models.ood import batch_shift, out_of_distribution  # noqa: E402
from .batcher import DynamicBatcher  # noqa: E402
from .workers import AsyncPreparer  # noqa: E402

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a whole request
MAX_IMAGE_PIXELS = 25_000_000  # one image
MAX_FILES = 256
NETWORK_NICENESS = 5  # the network thread yields to the decoding workers (service/batcher.py)
API_KEY_ENV = "BLOODCELL_API_KEY"
API_KEY_HEADER = "x-api-key"
log = logging.getLogger("bloodcell.service")


def _model_card(source: str) -> dict:
    """Measured figures stored beside the model (metrics.json of its evaluation), if any."""
    path = Path(source)
    for candidate in (path.parent / "metrics.json", path / "evaluation" / "metrics.json",
                      path.parent / "evaluation" / "metrics.json"):
        if candidate.is_file():
            metrics = json.loads(candidate.read_text())
            return {k: metrics[k] for k in ("accuracy", "macro_f1", "ece") if k in metrics}
    return {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(model: str | Path, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
               abstain_below: float = 0.7, api_key: str | None = None, detector: str | Path | None = "default",
               prep_workers: int | None = None, max_batch: int = 64, batch_window_ms: float = 0.0) -> FastAPI:
    """The app for one model (and one cell detector for whole fields, None for none).

    ``api_key`` (or ``BLOODCELL_API_KEY``) makes every /v1 route but health ask for it.
    /v1/predict decodes and preprocesses on ``prep_workers`` processes (None: one per core but
    one; 0: in the server process itself, on its event loop), and concurrent requests share network calls of up to
    ``max_batch`` images, waiting at most ``batch_window_ms`` for requests already on their way.
    """
    predictor = load_predictor(model)
    if prep_workers is None:
        # One core is left to this process (the event loop and the network): measured on 2 cores,
        # one decoding worker serves 8 clients ~10% faster than two.
        prep_workers = max(usable_cores() - 1, 1)
    preparer = AsyncPreparer(predictor.image_size, predictor.framing, prep_workers, max_pixels)
    batcher = DynamicBatcher(predictor.prepared_scores, max_batch, batch_window_ms / 1000, niceness=NETWORK_NICENESS)
    counter, no_counter = None, "this service has no cell detector: start it with --detector RUN"
    if detector is not None:
        from ..inference.count import FieldCounter
        from ..inference.detect import load_detector

        try:
            counter = FieldCounter(load_detector(detector), predictor, abstain_below)
        except BloodcellError as exc:
            if str(detector) != "default":
                raise
            no_counter = str(exc)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await preparer.start()
        yield
        preparer.close()

    app = FastAPI(title="bloodcell", version="1", description="Peripheral blood cell classification", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.preparer = preparer
    card = _model_card(predictor.source)
    class_names = list(predictor.class_names)

    def error(status: int, message: str, file: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message, **({"file": file} if file else {})})

    def guard(inner):
        """API key and declared size, checked before a request is read (plain ASGI: no per-request task)."""

        async def app_(scope, receive, send):
            if scope["type"] == "http":
                refusal = refuse(scope["path"], Headers(scope=scope))
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
            await inner(scope, receive, send)

        return app_

    def refuse(path: str, headers: Headers) -> JSONResponse | None:
        if api_key and path.startswith("/v1/") and path != "/v1/health":
            given = headers.get(API_KEY_HEADER, "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "missing or wrong API key: send it in the X-API-Key header")
        # Refuse oversized requests from their declared length, before reading them.
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes:
            return error(413, f"request of {int(length)} bytes is over the limit of {max_upload_bytes} bytes")
        return None

    app.add_middleware(guard)

    @app.get("/v1/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info():
        return {"model": predictor.contract.model, "classes": predictor.class_names,
                "input_size": predictor.image_size, "framing": predictor.framing, "temperature": predictor.temperature,
                "backend": predictor.backend, "abstain_below": abstain_below, "metrics": card,
                "shift_scores": predictor.has_shift, "count": counter is not None,
                "explain": predictor.backend == "torch", "schema_version": predictor.contract.schema_version}

    def read_contents(files: list[UploadFile]):
        """(names, contents), or the error response that refuses the whole request (too many, too large)."""
        if len(files) > MAX_FILES:
            return error(413, f"{len(files)} files in one request; at most {MAX_FILES}")
        names, contents, total = [], [], 0
        for index, upload in enumerate(files):
            name = upload.filename or f"image{index}"
            data = upload.file.read(max_upload_bytes + 1)  # spooled by Starlette: in memory up to 1 MB
            total += len(data)
            if total > max_upload_bytes:
                return error(413, f"upload over the limit of {max_upload_bytes} bytes", name)
            names.append(name)
            contents.append(data)
        return names, contents

    def unreadable(errors: list[dict]) -> JSONResponse:
        """The answer to a request none of whose files could be read."""
        first = errors[0]
        return JSONResponse(status_code=422, content={
            "error": first["error"] if len(errors) == 1 else f"none of the {len(errors)} files is a readable image",
            "file": first["file"], "errors": errors})

    def read_uploads(files: list[UploadFile]):
        """(images, names, indices, errors) decoded here, or the error response that refuses the whole request."""
        read = read_contents(files)
        if isinstance(read, JSONResponse):
            return read
        images, names, indices, errors = [], [], [], []
        for index, (name, data) in enumerate(zip(*read)):
            try:
                image, _ = decode_bytes(data, max_pixels)
            except ImageReadError as exc:
                errors.append({"index": index, "file": name, "error": str(exc)})
                continue
            images.append(image)
            names.append(name)
            indices.append(index)
        return (images, names, indices, errors) if images else unreadable(errors)

    # The event loop never decodes: uploads are decoded and preprocessed on worker processes,
    # and the network runs on the batcher's thread, over concurrent requests at once.
    @app.post("/v1/predict")
    async def predict(files: list[UploadFile] = File(..., description="one or more images")):
        read = read_contents(files)
        if isinstance(read, JSONResponse):
            return read
        names, contents = read
        batcher.expect()
        try:
            prepared = await preparer(contents)
        except BaseException:
            batcher.withdraw()
            raise
        errors = [{"index": position, "file": names[position], "error": reason} for position, reason in prepared.failed]
        if not prepared.kept:
            batcher.withdraw()
            return unreadable(errors)
        probs, ood = await batcher(prepared.batch)
        # Python floats at once (tolist): the answer is built per request on the event loop.
        ood_scores = None if ood is None else ood.tolist()
        results = []
        for position, (index, row) in enumerate(zip(prepared.kept, probs.tolist())):
            confidence = max(row)
            result = {"index": index, "file": names[index], "class": class_names[row.index(confidence)],
                      "confidence": confidence, "abstained": confidence < abstain_below}
            if ood_scores is not None:
                result["ood_score"] = ood_scores[position]
                result["out_of_distribution"] = bool(out_of_distribution(ood_scores[position]))
            result["probabilities"] = dict(zip(class_names, row))
            results.append(result)
        rows = [{"pred": r["class"], "abstained": r["abstained"], "out_of_distribution": r.get("out_of_distribution")}
                for r in results]
        # Plain JSON types already: a JSONResponse skips FastAPI's re-encoding of every value.
        return JSONResponse({"results": results, "errors": errors, "differential": differential_count(rows),
                             "domain_shift": batch_shift(ood) if ood is not None else None})

    @app.post("/v1/count")
    def count(files: list[UploadFile] = File(..., description="one or more whole fields")):
        if counter is None:
            return error(503, no_counter)
        read = read_uploads(files)
        if isinstance(read, JSONResponse):
            return read
        images, names, indices, errors = read
        from ..inference.count import run_differential

        fields = counter.count(images, names)
        results = [{"index": index, "file": name, "width": f.width, "height": f.height, "magnification": f.magnification,
                    "cells": f.cells, "counts": {k: v for k, v in f.counts(predictor.class_names).items() if k != "image"}}
                   for index, name, f in zip(indices, names, fields)]
        return {"results": results, "errors": errors, "summary": run_differential(fields)}

    @app.post("/v1/explain")
    def explain(file: UploadFile = File(...)):
        if predictor.backend != "torch":
            return error(422, "heat maps need the PyTorch model; serve a run directory instead of an .onnx file")
        from ..inference.explain import grad_cam_overlay

        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return error(413, f"upload over the limit of {max_upload_bytes} bytes", file.filename)
        try:
            image, _ = decode_bytes(data, max_pixels)
        except ImageReadError as exc:
            return error(422, str(exc), file.filename)
        return {"file": file.filename, "overlay_png_base64": grad_cam_overlay(predictor, image)}

    page = resources.files("bloodcell.service").joinpath("static", "index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    return app


SERVE_OPTIONS_ENV = "BLOODCELL_SERVE_OPTIONS"


def app_from_environment() -> FastAPI:
    """The app built from the options `serve` left in the environment: each of uvicorn's worker processes calls it."""
    options = json.loads(os.environ[SERVE_OPTIONS_ENV])
    return create_app(options.pop("model"), **options)


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          warn=log.warning, detector: str | Path | None = "default", workers: int = 1, access_log: bool = False,
          **options) -> None:
    """Run the service with uvicorn; ``workers`` > 1 starts that many server processes on the one port.

    Each process loads the model and prepares images on its share of the cores (``prep_workers``
    defaults to the usable cores divided among the server processes, less one for the process
    itself). ``access_log``: a line per request, off by default.
    """
    uvicorn = require("uvicorn", "bloodcell serve")
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not api_key and not is_loopback(host):
        warn(f"listening on {host}, reachable from other machines, with no API key: anyone who can reach it can "
             f"use it; pass --api-key or set {API_KEY_ENV}")
    if workers <= 1:
        uvicorn.run(create_app(model, api_key=api_key, detector=detector, **options), host=host, port=port,
                    log_level="info", access_log=access_log)
        return
    if options.get("prep_workers") is None:
        options["prep_workers"] = max(usable_cores() // workers - 1, 1)
    os.environ[SERVE_OPTIONS_ENV] = json.dumps({"model": str(model), "api_key": api_key,
                                                "detector": None if detector is None else str(detector), **options})
    uvicorn.run("bloodcell.service.app:app_from_environment", factory=True, workers=workers, host=host, port=port,
                log_level="info", access_log=access_log)
