"""Inference speed: batch images/s (PyTorch eager, ONNX Runtime, int8 ONNX) and the service under load.

    .venv/bin/python benchmarks/inference.py [--run src/bloodcell/default_model --requests 2000 --clients 8]

Batch throughput is on preprocessed uint8 batches at the model's input size
(decoding excluded, identical input for every backend); the preprocessing itself (resize,
and cell framing when the model frames) is timed separately on one thread.  Static int8 is calibrated on
half of 512 validation images of ``--check`` and its accuracy change scored on the other half.  The service is
started with uvicorn in a second process on 127.0.0.1; a bounded load of
single-image requests from 8 client threads measures latency and throughput;
every response must be 200.  Writes benchmarks/results/inference.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def batch_rate(run, batch: np.ndarray, repeats: int = 5) -> float:
    run(batch[:32])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return repeats * len(batch) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_test(url: str, payload: bytes, requests: int, clients: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker():
        with httpx.Client(timeout=30) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                start = time.perf_counter()
                response = client.post(url, files={"files": ("cell.png", payload, "image/png")})
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        errors.append(str(response.status_code))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "clients": clients, "errors": len(errors),
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_rps": len(latencies) / wall}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("src/bloodcell/default_model"))
    parser.add_argument("--pbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "pbc224")
    parser.add_argument("--check", type=Path, default=Path("runs/demo/curated"),
                        help="curated data whose validation split calibrates and scores static int8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "inference.json")
    args = parser.parse_args()

    import torch

    from bloodcell.data import preprocess
    from bloodcell.models import load_model
    from bloodcell.inference import ParallelRunner, load_predictor, onnx_session
    from bloodcell.inference.export import check_set, export_onnx

    files = sorted(args.pbc.glob("*/*.jpg"))[:: max(len(list(args.pbc.glob("*/*.jpg"))) // args.batch, 1)][: args.batch]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    results: dict = {"run": str(args.run), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        # int8 agreement with float and accuracy, on the validation split when there is one (else PBC images).
        check_images, check_labels = check_set(args.check, 512) if args.check.is_dir() else (images[:64], None)
        export = export_onnx(args.run, onnx_path, check_images, quantize=True, check_labels=check_labels)
        results["export"] = {k: v for k, v in export.items() if not k.startswith("onnx")}
        results["cpu_flags"] = sorted({flag for line in open("/proc/cpuinfo") if line.startswith("flags")
                                       for flag in line.split()[2:] if flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")})
        predictors = {"pytorch_eager": load_predictor(args.run), "onnxruntime": load_predictor(onnx_path),
                      "onnxruntime_int8_dynamic_fc": load_predictor(export["onnx_int8"])}
        if args.check.is_dir():
            static = export_onnx(args.run, Path(tmp) / "static.onnx", check_images, "static", check_labels)
            results["export_static_int8"] = {k: v for k, v in static.items() if not k.startswith("onnx")}
            predictors["onnxruntime_int8_static"] = load_predictor(static["onnx_int8"])
        size = predictors["onnxruntime"].image_size
        framing = predictors["onnxruntime"].framing
        batch = np.ascontiguousarray(np.stack([preprocess(im, size, framing) for im in images]).transpose(0, 3, 1, 2))
        results["image_size"] = size
        results["framing"] = framing
        # Preprocessing of decoded 224 px images, one thread: the resize alone, and with the
        # cell-framing step (localisation and crop) that a model trained with framing adds.
        from bloodcell.data.framing import FramingConfig

        results["preprocess_images_per_s_one_thread"] = {
            "resize": batch_rate(lambda b: [preprocess(im, size) for im in b], images, 3),
            "framing_and_resize": batch_rate(lambda b: [preprocess(im, size, framing or FramingConfig().model_dump())
                                                        for im in b], images, 3)}
        runners = {name: p.run for name, p in predictors.items()}
        # What each export/runtime choice contributes: the same graph run as one call on
        # two threads, and the plain traced graph (run-time 'SAME' padding, Pad nodes).
        two_threads = onnx_session(onnx_path, threads=2)
        runners["onnxruntime_one_call_2_threads"] = lambda b: two_threads.run(None, {"images": b})[0]
        plain = Path(tmp) / "plain.onnx"
        net = load_model(args.run)[0]
        torch.onnx.export(net, (torch.zeros(1, 3, size, size, dtype=torch.uint8),), str(plain), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
        runners["onnxruntime_plain_export"] = ParallelRunner(onnx_session(plain))
        results["batch_images_per_s"] = {name: batch_rate(run, batch) for name, run in runners.items()}
        for name, rate in results["batch_images_per_s"].items():
            print(f"{name:32s} {rate:8.0f} images/s")
        del predictors, runners

        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "bloodcell.cli", "serve", "--model", str(onnx_path),
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import httpx

            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            buffer = io.BytesIO()
            Image.fromarray(images[0]).save(buffer, "PNG")
            url = f"http://127.0.0.1:{port}/v1/predict"
            load_test(url, buffer.getvalue(), 50, 1)  # warm-up
            # Latency of a single request with nothing else in flight, then under load.
            results["service_single_client"] = load_test(url, buffer.getvalue(), 300, 1)
            results["service"] = load_test(url, buffer.getvalue(), args.requests, args.clients)
        finally:
            server.terminate()
            server.wait(timeout=20)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
