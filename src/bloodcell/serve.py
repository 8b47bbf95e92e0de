"""The HTTP service and web page (FastAPI, served by uvicorn).

Only the model named at start is ever loaded; no path from a request reaches
the file system.  Uploads are checked by decoding, never by extension, and
bounded in bytes and pixels (413 / 422 with a JSON error, never a 500).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from .data import ImageReadError, decode_bytes
from .predict import differential_count, load_predictor

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a whole request
MAX_IMAGE_PIXELS = 25_000_000  # one image
MAX_FILES = 256


def _model_card(source: str) -> dict:
    """Measured figures stored beside the model (metrics.json of its evaluation), if any."""
    path = Path(source)
    for candidate in (path.parent / "metrics.json", path / "evaluation" / "metrics.json",
                      path.parent / "evaluation" / "metrics.json"):
        if candidate.is_file():
            metrics = json.loads(candidate.read_text())
            return {k: metrics[k] for k in ("accuracy", "macro_f1", "ece") if k in metrics}
    return {}


def create_app(model: str | Path, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
               abstain_below: float = 0.7) -> FastAPI:
    predictor = load_predictor(model)
    app = FastAPI(title="bloodcell", version="1", description="Peripheral blood cell classification")
    card = _model_card(predictor.source)

    def error(status: int, message: str, file: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message, **({"file": file} if file else {})})

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Refuse oversized requests from their declared length, before reading them.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes:
            return error(413, f"request of {int(length)} bytes is over the limit of {max_upload_bytes} bytes")
        return await call_next(request)

    @app.get("/v1/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info():
        return {"model": predictor.info.get("model"), "classes": predictor.class_names,
                "input_size": predictor.image_size, "framing": predictor.framing, "temperature": predictor.temperature,
                "backend": predictor.backend, "abstain_below": abstain_below, "metrics": card,
                "explain": predictor.backend == "torch"}

    # A plain (sync) endpoint: FastAPI runs it on its thread pool, so concurrent
    # requests share the one loaded session, which is thread-safe.
    @app.post("/v1/predict")
    def predict(files: list[UploadFile] = File(..., description="one or more images")):
        if len(files) > MAX_FILES:
            return error(413, f"{len(files)} files in one request; at most {MAX_FILES}")
        images, names, total = [], [], 0
        for upload in files:
            data = upload.file.read(max_upload_bytes + 1)
            total += len(data)
            if total > max_upload_bytes:
                return error(413, f"upload over the limit of {max_upload_bytes} bytes", upload.filename)
            try:
                image, _ = decode_bytes(data, max_pixels)
            except ImageReadError as exc:
                return error(422, str(exc), upload.filename)
            images.append(image)
            names.append(upload.filename or f"image{len(names)}")
        probs = predictor.probabilities(images)
        results = []
        for name, row in zip(names, probs):
            confidence = float(row.max())
            results.append({"file": name, "class": predictor.class_names[int(row.argmax())],
                            "confidence": confidence, "abstained": confidence < abstain_below,
                            "probabilities": {c: float(p) for c, p in zip(predictor.class_names, row)}})
        rows = [{"pred": r["class"], "abstained": r["abstained"]} for r in results]
        return {"results": results, "differential": differential_count(rows)}

    @app.post("/v1/explain")
    def explain(file: UploadFile = File(...)):
        if predictor.backend != "torch":
            return error(422, "heat maps need the PyTorch model; serve a run directory instead of an .onnx file")
        from .explain import grad_cam_overlay

        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return error(413, f"upload over the limit of {max_upload_bytes} bytes", file.filename)
        try:
            image, _ = decode_bytes(data, max_pixels)
        except ImageReadError as exc:
            return error(422, str(exc), file.filename)
        return {"file": file.filename, "overlay_png_base64": grad_cam_overlay(predictor, image)}

    page = resources.files("bloodcell").joinpath("static", "index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    import uvicorn

    uvicorn.run(create_app(model, **limits), host=host, port=port, log_level="info")
