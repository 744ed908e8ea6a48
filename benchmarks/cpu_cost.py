"""CPU cost per scan of each decoding and rendering step, on one core, for full-size inputs.

    python benchmarks/cpu_cost.py [--repeats 5] [--threads-batch 16] [--overlay png|jpeg|webp]

Inputs are made here from `shared.synthetic.synthetic_film` (an upscaled synthetic chest X-ray with
full-resolution texture and noise): a 2500x2048 12-bit DICOM, uncompressed and JPEG Lossless SV1,
a 3000x2500 16-bit PNG and a 3000x2500 8-bit JPEG. Every figure is the minimum of --repeats runs
(other jobs share the machine; the minimum is the least disturbed), and old and new paths run
side by side in the same process, so their ratio is meaningful even when absolute times drift.

Steps: old = decode_image -> preprocess(224) -> fit_within(1024) + to_uint8 -> overlay_png;
new = decode_reduced(1024) -> preprocess(224) -> to_uint8 -> encode_overlay(png|jpeg|webp);
floor = the plain decode alone (pydicom pixel_array / cv2.imdecode), the cost no path can avoid.
The last line is `cpu ms/scan dicom=A jpegll=B png16=C jpeg8=D floor_dicom=E pipeline scans/s=F`,
where A-D are the whole new path with --overlay overlays (default png, today's format; the lines
before give the totals with JPEG and WebP overlays: PNG encoding is ~60% of the DICOM total). F is `measure_pipeline`: the 2500x2048
12-bit DICOM, --pipeline-n times, through real Redis, a `lungcam worker` (its default settings and
overlay format), a local store and SQLite, with a near-zero-cost model bundle, so the non-model cost
per scan shows (scans/s on this machine's cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.pixels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.imaging.decode import decode_image, decode_reduced
from shared.imaging.preprocess import DISPLAY_MAX_SIDE, fit_within, preprocess, to_uint8
from shared.overlay import encode_overlay, overlay_png
from shared.synthetic import make_dicom, synthetic_film

INPUT_SIZE = 224


def best_ms(step: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of `repeats` calls, in milliseconds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best * 1000.0


def make_inputs() -> dict[str, bytes]:
    """The four full-size inputs, made from one synthetic film per size."""
    from pydicom.uid import JPEGLosslessSV1

    rng = np.random.default_rng(11)
    film12 = synthetic_film(rng, 2500, 2048, bits=12)
    film16 = synthetic_film(rng, 3000, 2500, bits=16)
    ok, jpeg = cv2.imencode(".jpg", (film16 >> 8).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    ok16, png16 = cv2.imencode(".png", film16)
    assert ok and ok16
    # CR/DX files usually carry a window; this one clips the extremes, as a real one does.
    window = (2048.0, 3600.0)
    return {
        "dicom": make_dicom(film12, bits_stored=12, window=window),
        "jpegll": make_dicom(film12, bits_stored=12, window=window, transfer_syntax=JPEGLosslessSV1),
        "png16": png16.tobytes(),
        "jpeg8": jpeg.tobytes(),
    }


def floor_decode(name: str, data: bytes) -> Callable[[], object]:
    """The plain decode of `data`, with no conversion: the cost floor of its format."""
    if name in ("dicom", "jpegll"):
        return lambda: pydicom.pixels.pixel_array(BytesIO(data), index=0)
    return lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def old_path(data: bytes, cam: np.ndarray) -> tuple[np.ndarray, bytes]:
    """Today's worker steps: full decode, model input, display image, PNG overlay."""
    image = decode_image(data)
    model_input = preprocess(image, INPUT_SIZE)
    display = to_uint8(fit_within(image, DISPLAY_MAX_SIDE))
    return model_input, overlay_png(display, cam, max_side=DISPLAY_MAX_SIDE)


def new_path(data: bytes, cam: np.ndarray, fmt: str = "png") -> tuple[np.ndarray, bytes]:
    """The reduced steps: decode_reduced, model input, display image, overlay in `fmt`."""
    reduced = decode_reduced(data, DISPLAY_MAX_SIDE)
    model_input = preprocess(reduced.image, INPUT_SIZE)
    display = to_uint8(reduced.image)
    return model_input, encode_overlay(display, cam, fmt, max_side=DISPLAY_MAX_SIDE)[0]


def measure_steps(inputs: dict[str, bytes], cam: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Print ms per step for every input; return the new path's totals per overlay format, and the floors."""
    totals: dict[str, dict[str, float]] = {"png": {}, "jpeg": {}, "webp": {}, "floor": {}}
    for name, data in inputs.items():
        image = decode_image(data)
        reduced = decode_reduced(data, DISPLAY_MAX_SIDE)
        display = to_uint8(reduced.image)
        steps = {
            "floor decode": floor_decode(name, data),
            "old decode_image": lambda: decode_image(data),
            "old preprocess": lambda: preprocess(image, INPUT_SIZE),
            "old display": lambda: to_uint8(fit_within(image, DISPLAY_MAX_SIDE)),
            "new decode_reduced": lambda: decode_reduced(data, DISPLAY_MAX_SIDE),
            "new preprocess": lambda: preprocess(reduced.image, INPUT_SIZE),
            "new display": lambda: to_uint8(reduced.image),
        }
        for fmt in ("png", "jpeg", "webp"):
            steps[f"overlay {fmt}"] = lambda fmt=fmt: encode_overlay(display, cam, fmt, max_side=DISPLAY_MAX_SIDE)
        steps["OLD total"] = lambda: old_path(data, cam)
        steps["NEW total (png)"] = lambda: new_path(data, cam)
        steps["NEW total (jpeg)"] = lambda: new_path(data, cam, "jpeg")
        steps["NEW total (webp)"] = lambda: new_path(data, cam, "webp")
        timings = {label: best_ms(step, repeats) for label, step in steps.items()}
        sizes = {fmt: len(encode_overlay(display, cam, fmt)[0]) // 1024 for fmt in ("png", "jpeg", "webp")}
        closeness = float(np.abs(old_path(data, cam)[0] - new_path(data, cam)[0]).max())
        print(
            f"\n{name}: {len(data) / 1e6:.1f} MB, {image.shape[1]}x{image.shape[0]} -> {reduced.image.shape[1]}x{reduced.image.shape[0]}"
        )
        for label, ms in timings.items():
            print(f"  {label:<20} {ms:8.1f} ms")
        print(f"  overlay KB png={sizes['png']} jpeg={sizes['jpeg']} webp={sizes['webp']}")
        print(
            f"  speed-up old/new {timings['OLD total'] / timings['NEW total (png)']:.1f}x; "
            f"model input max |new-old| = {closeness:.4f}"
        )
        for fmt in ("png", "jpeg", "webp"):
            totals[fmt][name] = timings[f"NEW total ({fmt})"]
        totals["floor"][name] = timings["floor decode"]
    return totals


def measure_plugins(repeats: int) -> None:
    """Decode time of the 2500x2048 12-bit film per transfer syntax and installed pydicom plugin."""
    from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

    film = synthetic_film(np.random.default_rng(5), 2500, 2048, bits=12)
    print("\nplugins (frame decode ms, 2500x2048 12-bit; licence in docs/decoding.md):")
    for syntax in (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless):
        data = make_dicom(film, bits_stored=12, transfer_syntax=syntax)
        dataset = pydicom.dcmread(BytesIO(data))
        decoder = pydicom.pixels.get_decoder(syntax)
        results = []
        for plugin in sorted(decoder.available_plugins):
            try:
                ms = best_ms(lambda: pydicom.pixels.pixel_array(dataset, index=0, decoding_plugin=plugin), repeats)
                results.append(f"{plugin}={ms:.0f}")
            except Exception as exc:  # noqa: BLE001 - a plugin that declines this layout
                results.append(f"{plugin}=fails({type(exc).__name__})")
        print(f"  {syntax.name[:48]:<48} {len(data) / 1e6:5.1f} MB  {' '.join(results)}")


def measure_threads(inputs: dict[str, bytes], cam: np.ndarray, batch: int, repeats: int, fmt: str) -> None:
    """The new path over a batch of DICOMs on 1 thread vs 2 (OpenCV itself single-threaded)."""
    print(f"\nthreads (batch of {batch}, new path with {fmt} overlay, OpenCV 1 thread per call):")
    for name in ("dicom", "jpegll"):
        scans = [inputs[name]] * batch
        one = best_ms(lambda: [new_path(scan, cam, fmt) for scan in scans], max(1, repeats // 2))
        with ThreadPoolExecutor(2) as pool:
            two = best_ms(lambda: list(pool.map(lambda scan: new_path(scan, cam, fmt), scans)), max(1, repeats // 2))
            # CPU time over wall time while two threads run: ~2 if they run in parallel, ~1 if the
            # GIL (or a busy machine) serialises them.
            wall, cpu = time.perf_counter(), time.process_time()
            list(pool.map(lambda scan: new_path(scan, cam, fmt), scans))
            parallelism = (time.process_time() - cpu) / (time.perf_counter() - wall)
        print(
            f"  {name:<7} 1 thread {one / batch:6.1f} ms/scan   2 threads {two / batch:6.1f} ms/scan   "
            f"speed-up {one / two:.2f}x   cpu/wall with 2 threads {parallelism:.2f}"
        )


def measure_pipeline(data: bytes, n: int, broker: str, batch_size: int = 16) -> float:
    """Scans/s of n copies of one DICOM through Redis, a real worker, a local store and SQLite, with a near-zero-cost model."""
    import shutil
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import make_tiny_bundle
    from throughput import pipeline

    tmp = Path(tempfile.mkdtemp(prefix="lungcam-cpu-cost-"))
    try:
        files = []
        for index in range(n):
            path = tmp / "in" / f"film-{index:04d}.dcm"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            files.append(path)
        bundle = make_tiny_bundle(tmp / "bundle", INPUT_SIZE)
        # The near-zero-cost model leaves the cores to decoding, as on a GPU host: decode processes
        # per core, as a GPU worker uses by default (a CPU-only worker decodes in threads instead).
        os.environ.setdefault("LUNGCAM_DECODE_PROCESSES", str(len(os.sched_getaffinity(0))))
        return pipeline(bundle, files, batch_size, "local", tmp, broker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads-batch", type=int, default=16)
    parser.add_argument("--overlay", choices=("jpeg", "png", "webp"), default="png")
    parser.add_argument("--pipeline-n", type=int, default=96, help="scans through the pipeline (0 skips it)")
    parser.add_argument("--broker", default=os.environ.get("LUNGCAM_BROKER_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args()

    cv2.setNumThreads(1)  # one core per scan: the worker runs one decode per process/thread
    print(f"cpus={os.cpu_count()} opencv={cv2.__version__} numpy={np.__version__} pydicom={pydicom.__version__}")
    inputs = make_inputs()
    cam = np.random.default_rng(0).random((7, 7)).astype(np.float32)  # a Grad-CAM map at feature-map size
    totals = measure_steps(inputs, cam, args.repeats)
    measure_plugins(args.repeats)
    measure_threads(inputs, cam, args.threads_batch, args.repeats, args.overlay)
    pipeline = measure_pipeline(inputs["dicom"], args.pipeline_n, args.broker) if args.pipeline_n else None
    rate = "n/a" if pipeline is None else f"{pipeline:.1f}"
    floor = totals["floor"]["dicom"]
    print(f"\nload average while measuring: {os.getloadavg()[0]:.1f} (cpus={os.cpu_count()})")
    for fmt in sorted({"png", "jpeg", "webp"} - {args.overlay}):
        t = totals[fmt]
        print(
            f"with {fmt} overlays: dicom={t['dicom']:.1f} jpegll={t['jpegll']:.1f} png16={t['png16']:.1f} jpeg8={t['jpeg8']:.1f}"
        )
    t = totals[args.overlay]
    print(f"overlay format for the line below: {args.overlay}")
    print(
        f"cpu ms/scan dicom={t['dicom']:.1f} jpegll={t['jpegll']:.1f} png16={t['png16']:.1f} "
        f"jpeg8={t['jpeg8']:.1f} floor_dicom={floor:.1f} pipeline scans/s={rate}"
    )


if __name__ == "__main__":
    main()
