"""Throughput, measured side by side in one run: the paper's per-image way, the batched pass, the pipeline.

    python benchmarks/throughput.py [--bundle DIR] [--images DIR] [--n 256] [--batch-size 16] [--store local|s3]

(a) seed:     per image, model.predict, then a separate GradientTape pass for the heat map, then the overlay.
(b) batched:  the compiled probabilities+Grad-CAM pass over batches (model work only).
(c) pipeline: Redis -> a real `lungcam worker` process -> store -> database, for the same images.
The last line is `ratios batched/seed=B/A pipeline/batched=C/B`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DEV_SET = REPO.parent / "shared" / "data" / "cxr-dev"


def image_files(folder: Path | None, n: int, tmp: Path) -> list[Path]:
    """n image files: from the folder (recursively) if given, else synthetic PNGs."""
    if folder and folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
        if files:
            return [files[i % len(files)] for i in range(n)]
    from shared.synthetic import synthetic_xray

    rng = np.random.default_rng(0)
    out = []
    for index in range(n):
        path = tmp / f"syn-{index:04d}.png"
        cv2.imwrite(str(path), synthetic_xray(rng, 512, covid=bool(index % 2)).image)
        out.append(path)
    return out


def seed_way(bundle, files: list[Path]) -> float:
    """Images per second the paper's way (its pyimagesearch-style GradCAM class), one image at a time.

    Per image: cv2.imread, BGR->RGB, resize, /255; model.predict; then the seed's compute_heatmap,
    which builds a gradient model, runs an eager GradientTape on the softmax score, keeps the
    guided (positive) gradients, and upsamples the map; then the JET overlay, encoded as PNG.
    """
    import tensorflow as tf

    from shared.overlay import overlay_png

    model = bundle.model
    layer_name = bundle.manifest["gradcam_layer"]
    size = bundle.input_size
    started = time.perf_counter()
    for path in files:
        original = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        image = cv2.resize(original, (size, size)).astype("float32")[None] / 255.0
        probabilities = model.predict(image, verbose=0)
        index = int(np.argmax(probabilities[0]))
        grad_model = tf.keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
        with tf.GradientTape() as tape:
            activations, predictions = grad_model(tf.cast(image, tf.float32))
            loss = predictions[:, index]
        gradients = tape.gradient(loss, activations)
        guided = tf.cast(activations > 0, "float32") * tf.cast(gradients > 0, "float32") * gradients
        weights = tf.reduce_mean(guided[0], axis=(0, 1))
        cam = tf.reduce_sum(tf.multiply(weights, activations[0]), axis=-1).numpy()
        heatmap = cv2.resize(cam, (original.shape[1], original.shape[0]))
        heatmap = (heatmap - heatmap.min()) / ((heatmap.max() - heatmap.min()) or 1e-8)
        overlay_png(original, heatmap)
    return len(files) / (time.perf_counter() - started)


def batched_pass(bundle, files: list[Path], batch_size: int) -> float:
    """Images per second of the compiled batched pass alone (inputs decoded beforehand)."""
    from shared.imaging.decode import load_image
    from shared.imaging.preprocess import preprocess

    gradcam = bundle.gradcam()
    inputs = np.stack([preprocess(load_image(path), bundle.input_size) for path in files])
    gradcam.warm_up(batch_size)
    started = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        gradcam(inputs[start : start + batch_size])
    return len(inputs) / (time.perf_counter() - started)


def pipeline(bundle_dir: Path, files: list[Path], batch_size: int, store_kind: str, tmp: Path, broker: str) -> float:
    """Images per second through Redis, a real worker process, the store and the database."""
    from helpers import start_worker, wait_until

    from shared.engine import make_engine, make_session_factory, migrate
    from shared.queueing import make_app, submit_scans
    from shared.scans import NewScan, batch_counts
    from shared.settings import Settings
    from shared.store import scan_key, store_from_settings

    env = {
        "LUNGCAM_BROKER_URL": broker,
        "LUNGCAM_DATABASE_URL": f"sqlite:///{tmp / 'bench.sqlite'}",
        "LUNGCAM_MODELS": str(bundle_dir),
        "LUNGCAM_BATCH_SIZE": str(batch_size),
        "LUNGCAM_BATCH_FLUSH_MS": "100",
        "LUNGCAM_STORE_URL": str(tmp / "store"),
    }
    moto = None
    if store_kind == "s3":
        from moto.server import ThreadedMotoServer

        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        env.update(LUNGCAM_STORE_URL="s3://lungcam-bench", LUNGCAM_S3_ENDPOINT_URL=f"http://{host}:{port}")
    settings = Settings(**{key.removeprefix("LUNGCAM_").lower(): value for key, value in env.items()})
    store = store_from_settings(settings)
    if store_kind == "s3":
        store.client.create_bucket(Bucket="lungcam-bench")
    for index, path in enumerate(files):
        store.put(scan_key(f"b{index:05d}"), path.read_bytes())
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    sessions = make_session_factory(engine)
    worker = start_worker(env, tmp / "worker.log")
    try:
        worker.wait_ready()
        app = make_app(settings)
        scans = [NewScan(f"b{index:05d}", scan_key(f"b{index:05d}")) for index in range(len(files))]
        started = time.perf_counter()
        submit_scans(sessions, app, scans, batch_id="bench")

        def finished() -> bool:
            with sessions() as session:
                counts = batch_counts(session, "bench")
            return counts["done"] + counts["failed"] == len(files)

        wait_until(finished, 3600, interval=0.1, message="benchmark batch")
        elapsed = time.perf_counter() - started
        with sessions() as session:
            counts = batch_counts(session, "bench")
        print(f"pipeline counts: {counts}", flush=True)
    finally:
        worker.stop()
        if moto:
            moto.stop()
    return len(files) / elapsed


def main() -> None:
    """Run the three measurements and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="model bundle folder (default: a random-weight resnet50 at 224)")
    parser.add_argument("--images", type=Path, default=DEV_SET if DEV_SET.is_dir() else None)
    parser.add_argument("--n", type=int, default=256, help="images per measurement")
    parser.add_argument("--seed-n", type=int, default=48, help="images for the slow per-image way")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--broker", default=os.environ.get("LUNGCAM_BROKER_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args()

    from shared.bundle import load_bundle

    tmp = Path(tempfile.mkdtemp(prefix="lungcam-bench-"))
    try:
        bundle_dir = args.bundle
        if bundle_dir is None:
            from helpers import make_bundle

            bundle_dir = make_bundle(tmp / "bundle", "resnet50", 224)
        bundle = load_bundle(bundle_dir)
        files = image_files(args.images, args.n, tmp)
        print(
            f"model {bundle.name}/{bundle.version} ({bundle.manifest['architecture']}, {bundle.input_size}px), "
            f"{len(files)} images from {args.images or 'synthetic'}, batch {args.batch_size}, store {args.store}",
            flush=True,
        )
        a = seed_way(bundle, files[: args.seed_n])
        print(f"(a) seed, per image:        {a:7.2f} images/s", flush=True)
        b = batched_pass(bundle, files, args.batch_size)
        print(f"(b) batched single pass:    {b:7.2f} images/s", flush=True)
        c = pipeline(Path(bundle_dir), files, args.batch_size, args.store, tmp, args.broker)
        print(f"(c) pipeline ({args.store} store): {c:7.2f} images/s", flush=True)
        print(f"ratios batched/seed={b / a:.2f} pipeline/batched={c / b:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
