"""Inference speed: the network by backend, the preprocessing steps, `predict` end to end, the service under load.

    .venv/bin/python benchmarks/inference.py [--run src/bloodcell/default_model] [--sections backends,steps,folder,service]
        [--reference OLD_PREDICTIONS.csv]

- backends: batch images/s on preprocessed uint8 batches (PyTorch eager, ONNX Runtime, int8 ONNX);
  static int8 is calibrated on half of 512 validation images of ``--check`` and scored on the other half.
- steps: what one image costs on one thread (decoding, resize alone, framing + resize, the network
  on a one-thread session), and from them the rate the machine's cores allow:
  cores / (decode + preprocess + network), in images/s.
- folder: ``predict_paths`` over every image of ``--pbc`` (15,382 224 px JPEGs), CSV written, in
  this process (the rate a long job sees), and the CLI's wall time from start to CSV; its rate over
  the allowed rate is the parallel efficiency. ``--reference`` (a CSV from an earlier version) checks
  that every image gets the same class and probabilities within 1e-4.
- service: uvicorn in a second process on 127.0.0.1, single-image requests (one PBC JPEG) from
  1, 8 and 32 clients, and 8 clients sending 16 images per request; every response must be 200.
  The clients are a lean load generator (asyncio, keep-alive, the request built once, as wrk
  does) so that they take little of the two cores the server runs on; the same 8 clients as
  httpx threads are kept beside it (``clients_8_httpx``), with each generator's CPU per request.
  Each figure is the run of median throughput of three, every run's figures beside it. Three
  pairs of (`predict` over ``--pbc``, 8 clients) measured in turn give ``paired_8_over_predict``,
  a ratio that a drift of the machine's speed between sections does not enter.

Writes benchmarks/results/inference.json (sections not run keep their earlier figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.data.pipeline import usable_cores

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


def load_test(url: str, payload: bytes, requests: int, clients: int, per_request: int = 1) -> dict:
    """``clients`` threads posting ``requests`` requests of ``per_request`` copies of one image each."""
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
                response = client.post(url, files=[("files", (f"cell{k}.jpg", payload, "image/jpeg"))
                                                   for k in range(per_request)])
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        errors.append(str(response.status_code))

    cpu = time.process_time()
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summarise(latencies, errors, clients, per_request, wall, time.process_time() - cpu)


def multipart_request(host: str, port: int, path: str, payload: bytes, per_request: int = 1) -> bytes:
    """A whole HTTP/1.1 POST of ``per_request`` copies of one image, built once and sent as is."""
    boundary = "bloodcell-benchmark-7f3a9c"
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="cell.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    body = b"".join(part + payload + b"\r\n" for _ in range(per_request)) + f"--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def lean_load_test(host: str, port: int, payload: bytes, requests: int, clients: int, per_request: int = 1) -> dict:
    """``clients`` keep-alive connections, each sending the next of ``requests`` prebuilt requests when its
    answer is in. Every answer is read whole (Content-Length); one that is not 200 counts as an error."""
    request = multipart_request(host, port, "/v1/predict", payload, per_request)
    latencies: list[float] = []
    errors: list[str] = []
    left = [requests]

    async def client():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while left[0] > 0:
                left[0] -= 1
                start = time.perf_counter()
                writer.write(request)
                status = await reader.readline()
                length = None
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length is None:
                    raise RuntimeError(f"an answer without Content-Length: {status!r}")
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if status.split()[1:2] != [b"200"] or not body.startswith(b'{"results"'):
                    errors.append(status.decode(errors="replace").strip())
        finally:
            writer.close()

    async def run_all():
        await asyncio.gather(*(client() for _ in range(clients)))

    cpu = time.process_time()
    start = time.perf_counter()
    asyncio.run(run_all())
    wall = time.perf_counter() - start
    return summarise(latencies, errors, clients, per_request, wall, time.process_time() - cpu)


def summarise(latencies: list[float], errors: list[str], clients: int, per_request: int, wall: float, cpu: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "clients": clients, "errors": len(errors),
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_rps": len(latencies) / wall,
            "images_per_request": per_request, "images_per_s": len(latencies) * per_request / wall,
            "client_cpu_ms_per_request": 1000 * cpu / max(len(latencies), 1)}


def step_costs(predictor, onnx_path: Path, files: list[Path], stream: list[Path], repeats: int = 3) -> dict:
    """Milliseconds per image for each step on one thread, and the rate they allow on this machine's cores.

    ``stream``: distinct files (2,048), each decoded and preprocessed once, as a folder run sees
    them; the figures on ``files`` (256) are the best of ``repeats`` passes over the same images
    (warm caches, the lower bound). The network's cost is counted both ways: one single-thread
    session on batches of 64, and as predict runs it (on every core at once: wall time x cores,
    the issue's "0.56 ms per image on 2 threads" counted as 1.12 core-ms).
    """
    from bloodcell.data import decode_file, preprocess_batch
    from bloodcell.data.framing import FramingConfig
    from bloodcell.data.sources import decode_pil
    from bloodcell.inference import onnx_session

    def best(fn, count: int, passes: int = repeats) -> float:
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * min(times) / count

    size, framing = predictor.image_size, predictor.framing or FramingConfig().model_dump()
    decode_pil(files[0])
    arrays = [decode_file(f)[0] for f in files]
    pils = [decode_pil(f)[0] for f in files]
    chunks = range(0, len(files), 64)
    session = onnx_session(onnx_path, threads=1)
    batch = preprocess_batch(arrays, size, predictor.framing).transpose(0, 3, 1, 2).copy()
    session.run(None, {"images": batch[:8]})
    steps = {
        "decode_ms": best(lambda: [decode_pil(f) for f in files], len(files)),
        "decode_to_numpy_ms": best(lambda: [decode_file(f) for f in files], len(files)),
        "resize_ms": best(lambda: [preprocess_batch(arrays[i : i + 64], size) for i in chunks], len(files)),
        "framing_and_resize_ms": best(lambda: [preprocess_batch(arrays[i : i + 64], size, framing) for i in chunks],
                                      len(files)),
        "resize_from_pillow_ms": best(lambda: [preprocess_batch(pils[i : i + 64], size) for i in chunks], len(files)),
        "framing_and_resize_from_pillow_ms": best(lambda: [preprocess_batch(pils[i : i + 64], size, framing)
                                                          for i in chunks], len(files)),
        "network_ms_one_thread": best(lambda: [session.run(None, {"images": batch[i : i + 64]}) for i in chunks],
                                      len(files)),
        "network_core_ms_all_cores": usable_cores() * best(lambda: predictor.run(batch), len(files)),
    }
    # The stream: distinct images, one pass, in the order a folder is read, a chunk at a time as
    # the workers take them (holding all 2,048 decoded images at once would time page faults).
    decoding = preprocessing = 0.0
    for i in range(0, len(stream), 64):
        start = time.perf_counter()
        decoded = [decode_pil(f)[0] for f in stream[i : i + 64]]
        middle = time.perf_counter()
        preprocess_batch(decoded, size, predictor.framing)
        decoding, preprocessing = decoding + middle - start, preprocessing + time.perf_counter() - middle
    steps["stream_decode_ms"] = 1000 * decoding / len(stream)
    steps["stream_preprocess_ms"] = 1000 * preprocessing / len(stream)
    cores = usable_cores()
    preprocess_ms = steps["framing_and_resize_from_pillow_ms" if predictor.framing else "resize_from_pillow_ms"]
    per_image = steps["stream_decode_ms"] + steps["stream_preprocess_ms"] + steps["network_core_ms_all_cores"]
    strict = steps["decode_ms"] + preprocess_ms + steps["network_ms_one_thread"]
    return {**steps, "images": len(files), "stream_images": len(stream), "cores": cores,
            "framing_over_resize": steps["framing_and_resize_ms"] / steps["resize_ms"],
            "core_ms_per_image": per_image, "allowed_images_per_s": 1000 * cores / per_image,
            "strict_core_ms_per_image": strict, "strict_allowed_images_per_s": 1000 * cores / strict,
            "note": "allowed: stream decode + stream preprocess + network as predict runs it; strict: warm "
                    "best-of-3 decode and preprocess + a one-thread network session"}


def compare_csv(new: Path, reference: Path) -> dict:
    """Same class on every image, and the largest probability difference, against an earlier CSV."""
    import csv

    with open(new) as a, open(reference) as b:
        # keyed by class folder and file name: the two runs may name the folder differently
        rows = {Path(r["path"]).parts[-2:]: r for r in csv.DictReader(a)}
        ref = {Path(r["path"]).parts[-2:]: r for r in csv.DictReader(b)}
    common = sorted(set(rows) & set(ref))
    probs = [c for c in next(iter(ref.values())) if c not in ("path", "pred", "abstained", "out_of_distribution",
                                                                "confidence", "ood_score")]
    diff = max(abs(float(rows[p][c]) - float(ref[p][c])) for p in common for c in probs)
    return {"images": len(common), "missing": len(set(ref) ^ set(rows)), "same_class": sum(rows[p]["pred"] == ref[p]["pred"]
                                                                                          for p in common),
            "max_probability_difference": diff, "note": "CSV probabilities are rounded to 6 decimals"}


def folder_rate(model: Path, folder: Path, out: Path, repeats: int = 3) -> dict:
    """predict_paths + CSV over a folder in this process, and the CLI from start to CSV; medians of ``repeats``."""
    from bloodcell.inference import load_predictor, predict_paths, write_predictions

    predictor = load_predictor(model)
    seconds, cli_seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        rows, bad = predict_paths(predictor, [folder])
        write_predictions(rows, predictor.class_names, out)
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bloodcell", "predict", str(folder), "--model", str(model), "--out",
                        str(out.with_name("cli.csv"))], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli_seconds.append(time.perf_counter() - start)
    median, cli_median = float(np.median(seconds)), float(np.median(cli_seconds))
    return {"images": len(rows), "refused": len(bad), "repeats": repeats, "seconds": median, "seconds_each": seconds,
            "images_per_s": len(rows) / median, "cli_seconds": cli_median, "cli_seconds_each": cli_seconds,
            "cli_images_per_s": len(rows) / cli_median}


BATCHED = 16  # images per request in the batched service figure
SERVICE_REPEATS = 3  # each service figure is the median of this many runs


def repeated(measure, times: int = SERVICE_REPEATS) -> dict:
    """The run of median throughput among ``times``, with every run's throughput, p50 and p99 beside it
    (this shared machine's speed drifts by ±15% within minutes)."""
    runs = [measure() for _ in range(times)]
    runs.sort(key=lambda run: run["throughput_rps"])
    median = dict(runs[len(runs) // 2])
    for key in ("throughput_rps", "p50_ms", "p99_ms"):
        median[f"{key}_runs"] = [run[key] for run in runs]
    median["errors"] = sum(run["errors"] for run in runs)  # over every run
    median["runs"] = times
    return median


def service_load(model: Path, payload: bytes, requests: int, extra: list[str], per_request: int = BATCHED,
                 predict_rate=None) -> dict:
    """The service in a second process under 1, 8 and 32 clients of single-image requests, 8 clients
    sending ``per_request`` images per request (a slide's cells sent together), and 8 httpx clients."""
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bloodcell", "serve", "--model", str(model),
                               "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/predict"
        lean_load_test("127.0.0.1", port, payload, 500, 8)  # warm-up: worker processes started, sessions warm

        def lean(count: int, clients: int, per_request: int = 1) -> dict:
            return lean_load_test("127.0.0.1", port, payload, count, clients, per_request)

        figures = {}
        if predict_rate is not None:
            # predict and the service measured in turn, three times: each ratio from neighbouring
            # measurements, so a drift of the machine's speed between sections does not enter it.
            pairs = [(predict_rate(), lean(requests, 8)["throughput_rps"]) for _ in range(SERVICE_REPEATS)]
            figures["paired_8_over_predict"] = {
                "predict_images_per_s": [rate for rate, _ in pairs], "service_8_rps": [rps for _, rps in pairs],
                "ratios": [rps / rate for rate, rps in pairs],
                "median_ratio": float(np.median([rps / rate for rate, rps in pairs]))}
        return figures | {"clients_1": repeated(lambda: lean(400, 1)), "clients_8": repeated(lambda: lean(requests, 8)),
                "clients_32": repeated(lambda: lean(requests, 32)),
                f"clients_8_images_{per_request}": repeated(lambda: lean(max(requests // per_request, 50), 8, per_request)),
                "clients_8_httpx": repeated(lambda: load_test(url, payload, requests, 8))}
    finally:
        server.terminate()
        server.wait(timeout=20)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("src/bloodcell/default_model"))
    parser.add_argument("--pbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "pbc224")
    parser.add_argument("--check", type=Path, default=Path("runs/demo/curated"),
                        help="curated data whose validation split calibrates and scores static int8")
    parser.add_argument("--sections", default="backends,steps,folder,service")
    parser.add_argument("--reference", type=Path, help="predictions CSV of the same model from an earlier version")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve-args", default="", help="extra `bloodcell serve` options, e.g. '--workers 2'")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "inference.json")
    args = parser.parse_args()
    sections = set(args.sections.split(","))

    from bloodcell.inference import load_predictor
    from bloodcell.inference.export import check_set, export_onnx

    every = sorted(args.pbc.glob("*/*.jpg"))
    files = every[:: max(len(every) // args.batch, 1)][: args.batch]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update({"run": str(args.run), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()})
    with open("/proc/cpuinfo") as cpuinfo:
        results["cpu_flags"] = sorted({flag for line in cpuinfo if line.startswith("flags")
                                       for flag in line.split()[2:] if flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")})
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        # int8 agreement with float and accuracy, on the validation split when there is one (else PBC images).
        check_images, check_labels = check_set(args.check, 512) if args.check.is_dir() else (images[:64], None)
        export = export_onnx(args.run, onnx_path, check_images, quantize="backends" in sections, check_labels=check_labels)
        predictor = load_predictor(onnx_path)
        if "backends" in sections:
            results.update(backends(args, onnx_path, export, images, check_images, check_labels, Path(tmp)))
        if "steps" in sections:
            stream = every[len(every) // 2 :: max(len(every) // 4096, 1)][:2048]
            results["steps"] = step_costs(predictor, onnx_path, files, stream)
            results.pop("preprocess_images_per_s_one_thread", None)  # the one-image-at-a-time path, gone in 0.5.0
            print(json.dumps(results["steps"], indent=1))
        if "folder" in sections:
            folder = folder_rate(onnx_path, args.pbc, Path(tmp) / "predictions.csv")
            allowed = results.get("steps", {}).get("allowed_images_per_s")
            if allowed:
                folder["parallel_efficiency"] = folder["images_per_s"] / allowed
                folder["cli_parallel_efficiency"] = folder["cli_images_per_s"] / allowed
                folder["cli_parallel_efficiency_strict"] = folder["cli_images_per_s"] / results["steps"]["strict_allowed_images_per_s"]
            if args.reference:
                folder["answers_vs_reference"] = compare_csv(Path(tmp) / "predictions.csv", args.reference)
            results["folder"] = folder
            print(json.dumps(folder, indent=1))
        if "service" in sections:
            # The same kind of file predict reads (a PBC JPEG, 224 px); the figures before 0.5.0 sent
            # it re-encoded as PNG, whose decoding alone costs 1.3 ms more than the JPEG's.
            from bloodcell.inference import predict_paths, write_predictions

            def predict_rate() -> float:
                """predict_paths + CSV over ``--pbc``, as the folder section measures it (one run)."""
                start = time.perf_counter()
                rows, _ = predict_paths(predictor, [args.pbc])
                write_predictions(rows, predictor.class_names, Path(tmp) / "paired.csv")
                return len(rows) / (time.perf_counter() - start)

            service = service_load(onnx_path, files[0].read_bytes(), args.requests, args.serve_args.split(),
                                   predict_rate=predict_rate)
            service["serve_args"] = args.serve_args
            folder_rate_now = results.get("folder", {}).get("images_per_s")
            if folder_rate_now:
                service["throughput_8_over_predict"] = service["clients_8"]["throughput_rps"] / folder_rate_now
                service["images_8_batched_over_predict"] = service[f"clients_8_images_{BATCHED}"]["images_per_s"] / folder_rate_now
                service["throughput_8_httpx_over_predict"] = service["clients_8_httpx"]["throughput_rps"] / folder_rate_now
            service["p99_8_over_p50_1"] = (float(np.median(service["clients_8"]["p99_ms_runs"]))
                                           / float(np.median(service["clients_1"]["p50_ms_runs"])))
            service["load_generator"] = "asyncio keep-alive, prebuilt requests (clients_8_httpx: httpx threads)"
            results["service"] = service
            results.pop("service_single_client", None)
            print(json.dumps(service, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


def backends(args, onnx_path: Path, export: dict, images, check_images, check_labels, tmp: Path) -> dict:
    """Batch images/s of each backend and export choice on identical preprocessed batches."""
    import torch

    from bloodcell.data import preprocess_batch
    from bloodcell.inference import ParallelRunner, load_predictor, onnx_session
    from bloodcell.inference.export import export_onnx
    from bloodcell.models import load_model

    results = {"export": {k: v for k, v in export.items() if not k.startswith("onnx")}}
    predictors = {"pytorch_eager": load_predictor(args.run), "onnxruntime": load_predictor(onnx_path),
                  "onnxruntime_int8_dynamic_fc": load_predictor(export["onnx_int8"])}
    if args.check.is_dir():
        static = export_onnx(args.run, tmp / "static.onnx", check_images, "static", check_labels)
        results["export_static_int8"] = {k: v for k, v in static.items() if not k.startswith("onnx")}
        predictors["onnxruntime_int8_static"] = load_predictor(static["onnx_int8"])
    size = predictors["onnxruntime"].image_size
    framing = predictors["onnxruntime"].framing
    batch = np.ascontiguousarray(preprocess_batch(images, size, framing).transpose(0, 3, 1, 2))
    results["image_size"] = size
    results["framing"] = framing
    runners = {name: p.run for name, p in predictors.items()}
    # What each export/runtime choice contributes: the same graph run as one call on
    # two threads, and the plain traced graph (run-time 'SAME' padding, Pad nodes).
    two_threads = onnx_session(onnx_path, threads=2)
    runners["onnxruntime_one_call_2_threads"] = lambda b: two_threads.run(None, {"images": b})[0]
    plain = tmp / "plain.onnx"
    net = load_model(args.run)[0]
    torch.onnx.export(net, (torch.zeros(1, 3, size, size, dtype=torch.uint8),), str(plain), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
    runners["onnxruntime_plain_export"] = ParallelRunner(onnx_session(plain))
    results["batch_images_per_s"] = {name: batch_rate(run, batch) for name, run in runners.items()}
    for name, rate in results["batch_images_per_s"].items():
        print(f"{name:32s} {rate:8.0f} images/s")
    return results


if __name__ == "__main__":
    main()
