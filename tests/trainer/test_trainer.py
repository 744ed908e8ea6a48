"""The trainer: dataset layouts, splits, hashes, metrics, the CLI end to end, and Grad-CAM localisation.

Everything runs real code on small synthetic images (no mocks). One real training run, shared by
the CLI and Grad-CAM tests through a module fixture, keeps the file within a few minutes on 2 CPUs.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from shared.synthetic import synthetic_xray, write_synthetic_dataset
from trainer.datasets import (
    DatasetError,
    Sample,
    count_labels,
    dataset_hash,
    load_dataset,
    load_datasets,
    split_samples,
)
from trainer.evaluate import compute_metrics, format_metrics_table

# Starts real workers or trains models: left out of the fast tier (`pytest -m "not slow"`).
pytestmark = pytest.mark.slow

# The installed console script when there is one (what users run), else the module.
_SCRIPT = Path(sys.executable).with_name("lungcam-train")
TRAIN_CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "trainer.cli"]


def _write_xray(path: Path, seed: int, covid: bool, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), synthetic_xray(np.random.default_rng(seed), size=size, covid=covid).image)


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `lungcam-train ARGS` in a fresh Python process (what the console script does)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*TRAIN_CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


# --- dataset layouts -----------------------------------------------------------------------------


def test_class_folders_with_manifest(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "syn", n_per_class=6, size=32, seed=3)
    samples = load_dataset(root)
    assert count_labels(samples) == {"covid": 6, "normal": 6}
    # masks/ sits beside the class folders but is not a class.
    assert not any("masks" in sample.key for sample in samples)
    with open(root / "manifest.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    for sample in samples:
        row = rows[sample.key]
        assert sample.label == row["label"]
        assert sample.patient_id == row["patient_id_if_known"]
        assert sample.source == "synthetic"
        assert sample.path == root / sample.key


def test_class_folders_any_case_without_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for index in range(3):
        _write_xray(tmp_path / "COVID" / f"c{index}.png", index, covid=True)
        _write_xray(tmp_path / "Normal" / f"n{index}.jpg", 10 + index, covid=False)
    (tmp_path / "Normal" / "notes.txt").write_text("not an image")
    _write_xray(tmp_path / "pneumonia" / "p.png", 99, covid=False)
    with caplog.at_level(logging.WARNING):
        samples = load_dataset(tmp_path)
    assert count_labels(samples) == {"covid": 3, "normal": 3}
    assert all(sample.patient_id is None and sample.source is None for sample in samples)
    assert "pneumonia" in caplog.text  # the ignored folder is named


def test_ieee8023_metadata_layout(tmp_path: Path) -> None:
    root = tmp_path / "covid-chestxray-dataset"
    rows = [
        # patientid, finding, view, filename: kept only when COVID-19 (old or new naming) and PA
        ("1", "COVID-19", "PA", "a.png"),
        ("1", "COVID-19", "PA", "b.jpg"),
        ("2", "Pneumonia/Viral/COVID-19", "PA", "c.png"),
        ("3", "Pneumonia/Viral/COVID-19", "AP Supine", "d.png"),
        ("4", "COVID-19", "AP", "e.png"),
        ("5", "Pneumonia/Bacterial/Streptococcus", "PA", "f.png"),
        ("6", "No Finding", "PA", "g.png"),
        ("7", "COVID-19", "Axial", "h.png"),
    ]
    with open(_mkdir(root) / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientid", "offset", "sex", "age", "finding", "view", "modality", "folder", "filename"])
        for index, (patient, finding, view, filename) in enumerate(rows):
            modality = "CT" if view == "Axial" else "X-ray"
            writer.writerow([patient, "", "M", "50", finding, view, modality, "images", filename])
            _write_xray(root / "images" / filename, index, covid=True)

    samples = load_dataset(root)
    assert sorted(sample.path.name for sample in samples) == ["a.png", "b.jpg", "c.png"]
    assert {sample.label for sample in samples} == {"covid"}
    assert sorted(sample.patient_id for sample in samples) == ["1", "1", "2"]
    assert all(sample.key.startswith("images/") for sample in samples)
    # Both filters can be switched off; CT slices are never chest X-rays.
    assert len(load_dataset(root, view=None)) == 5
    assert len(load_dataset(root, finding=None, view=None)) == len(rows) - 1


def test_kermany_layout_keeps_normal_and_says_pneumonia_is_excluded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "kermany"
    for split in ("train", "test", "val"):
        _write_xray(root / "chest_xray" / split / "NORMAL" / "IM-0115-0001.jpeg", 1, covid=False)
        _write_xray(root / "chest_xray" / split / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg", 2, covid=False)
        _write_xray(root / "chest_xray" / split / "PNEUMONIA" / "person1_bacteria_1.jpeg", 3, covid=True)
        _write_xray(root / "chest_xray" / split / "PNEUMONIA" / "person2_virus_2.jpeg", 4, covid=True)
    with caplog.at_level(logging.INFO):
        samples = load_dataset(root)
    assert count_labels(samples) == {"covid": 0, "normal": 6}
    assert {sample.patient_id for sample in samples} == {"kermany-IM-0115", "kermany-NORMAL2-IM-1427"}
    assert "6 PNEUMONIA images excluded" in caplog.text


def test_data_paths_concatenate_like_the_paper(tmp_path: Path) -> None:
    covid_root = tmp_path / "ieee"
    with open(_mkdir(covid_root) / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientid", "finding", "view", "filename"])
        for index in range(4):
            writer.writerow([str(index), "COVID-19", "PA", f"{index}.png"])
            _write_xray(covid_root / "images" / f"{index}.png", index, covid=True)
    normal_root = tmp_path / "chest_xray"
    for index in range(5):
        _write_xray(normal_root / "train" / "NORMAL" / f"IM-{index:04d}-0001.jpeg", 20 + index, covid=False)
    _mkdir(normal_root / "train" / "PNEUMONIA")
    samples = load_datasets([covid_root, normal_root])
    assert count_labels(samples) == {"covid": 4, "normal": 5}
    assert [sample.label for sample in samples] == ["covid"] * 4 + ["normal"] * 5


def test_bad_data_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    _mkdir(tmp_path / "random" / "cats")
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        load_dataset(tmp_path / "random")
    _write_xray(tmp_path / "empty" / "covid" / "a.png", 0, covid=True)
    _mkdir(tmp_path / "empty" / "normal")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path / "empty")


# --- splits and hash -----------------------------------------------------------------------------


def _samples_with_patients(n_patients: int = 60, seed: int = 0) -> list[Sample]:
    """Patients with 1-4 images each, covid or normal (3:2), some images without a patient id."""
    rng = np.random.default_rng(seed)
    samples = []
    for patient in range(n_patients):
        label = "covid" if rng.random() < 0.6 else "normal"
        for image in range(int(rng.integers(1, 5))):
            samples.append(Sample(Path(f"/data/{label}/p{patient}_{image}.png"), label, f"P{patient}", "src"))
    for index in range(20):
        label = "covid" if index % 2 else "normal"
        samples.append(Sample(Path(f"/data/{label}/x{index}.png"), label, None, "src"))
    return samples


def test_grouped_split_keeps_patients_together_and_is_stratified() -> None:
    samples = _samples_with_patients()
    train, test = split_samples(samples, test_fraction=0.2, seed=42, group_by_patient=True)
    assert sorted(map(str, (s.path for s in train + test))) == sorted(str(s.path) for s in samples)
    sides: dict[str, set[str]] = defaultdict(set)
    for side, part in (("train", train), ("test", test)):
        for sample in part:
            if sample.patient_id:
                sides[sample.patient_id].add(side)
    assert all(len(found) == 1 for found in sides.values())
    assert 0.12 <= len(test) / len(samples) <= 0.28
    overall = Counter(s.label for s in samples)["covid"] / len(samples)
    assert abs(Counter(s.label for s in test)["covid"] / len(test) - overall) < 0.1
    # Deterministic for a seed, different for another.
    assert split_samples(samples, 0.2, 42, True) == (train, test)
    assert split_samples(samples, 0.2, 7, True)[1] != test


def test_ungrouped_split_is_exactly_the_papers_train_test_split() -> None:
    samples = _samples_with_patients()
    train, test = split_samples(samples, test_fraction=0.2, seed=42, group_by_patient=False)
    labels = [s.label for s in samples]
    expected_train, expected_test = train_test_split(samples, test_size=0.2, stratify=labels, random_state=42)
    assert train == expected_train
    assert test == expected_test


def test_dataset_hash_tracks_content_not_location(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "a", n_per_class=3, size=32, seed=1)
    original = dataset_hash(load_dataset(root))
    assert dataset_hash(load_dataset(root)) == original
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "b")
    assert dataset_hash(load_dataset(moved)) == original
    victim = sorted((moved / "normal").iterdir())[0]
    _write_xray(victim, 1234, covid=False, size=32)
    assert dataset_hash(load_dataset(moved)) != original


# --- metrics -------------------------------------------------------------------------------------


def test_compute_metrics_on_a_hand_made_example() -> None:
    # 4 covid, 6 normal; at the 0.5 threshold: TP 3, FN 1, FP 2, TN 4.
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p_covid = [0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.4, 0.3, 0.1, 0.05]
    metrics = compute_metrics(y_true, p_covid)
    assert metrics["confusion_matrix"]["labels"] == ["covid", "normal"]
    assert metrics["confusion_matrix"]["matrix"] == [[3, 1], [2, 4]]
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    assert metrics["precision"] == pytest.approx(3 / 5)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["specificity"] == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # Positive-negative pairs ranked correctly: 3 positives beat all 6 negatives, 0.2 beats 2.
    assert metrics["auc"] == pytest.approx(20 / 24)
    assert "notes" not in metrics
    table = format_metrics_table(metrics)
    assert "specificity" in table and "0.6667" in table


def test_compute_metrics_with_one_class_says_why_auc_is_missing() -> None:
    metrics = compute_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert metrics["auc"] is None and "one class" in metrics["notes"]["auc"]
    assert metrics["recall"] is None and metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"]["matrix"] == [[0, 0], [1, 2]]
    json.dumps(metrics)  # None, not NaN: the manifest must stay valid JSON


# --- localisation measures --------------------------------------------------------------------


def test_peaks_in_masks_maps_cell_centres_onto_the_mask() -> None:
    from trainer.localisation import peaks_in_masks

    mask = np.zeros((64, 64), dtype=bool)
    mask[0:16, 48:64] = True  # top-right 16x16 corner
    on_lesion = np.zeros((4, 4))
    on_lesion[0, 3] = 1.0  # cell centre (8, 56): inside
    elsewhere = np.zeros((4, 4))
    elsewhere[3, 0] = 1.0
    assert peaks_in_masks(np.stack([on_lesion, elsewhere]), [mask, mask]).tolist() == [True, False]


def test_occlusion_maps_find_the_region_a_model_reads() -> None:
    import keras

    from trainer.localisation import occlusion_maps

    # A real Keras model whose covid score is the brightness of the top-left quadrant only.
    inputs = keras.Input((16, 16, 3))
    quadrant = keras.layers.Cropping2D(((0, 8), (0, 8)))(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(quadrant)
    logits = keras.layers.Dense(
        2,
        kernel_initializer=keras.initializers.Constant([[4.0, -4.0]] * 3),
        bias_initializer=keras.initializers.Constant([-6.0, 6.0]),
    )(pooled)
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    images = np.full((2, 16, 16, 3), 0.9, dtype=np.float32)
    images[:, 8:, :, :] = 0.1  # dark lower half, so the 20th-percentile fill is dark
    maps = occlusion_maps(model, images, grid=2)
    assert maps.shape == (2, 2, 2)
    assert maps[:, 0, 0].min() > 0.5  # blanking the quadrant the model reads drops P(covid)
    assert np.abs(maps[:, [0, 1, 1], [1, 0, 1]]).max() < 1e-6  # the other cells do nothing


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- CLI end to end, and Grad-CAM localisation of the trained model ------------------------------

# One small, real training run. DenseNet121 fine-tuned from random initialisation (BatchNorm
# throughout trains far better from scratch than VGG16), at 64 px, with Grad-CAM on `pool3_relu`
# (an 8x8 map: the paper's conv5 layer gives 2x2 at this size, too coarse to localise anything).
ARCH = "densenet121"
INPUT_SIZE = 64
IMAGE_SIZE = 64
GRADCAM_LAYER = "pool3_relu"
N_PER_CLASS = 100
DATA_SEED = 11
HELD_OUT_POSITIVES = 60
EPOCHS = 4
TRAIN_ARGS = (
    "--arch",
    ARCH,
    "--weights",
    "none",
    "--input-size",
    str(INPUT_SIZE),
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    "8",
    "--fine-tune",
    "--gradcam-layer",
    GRADCAM_LAYER,
    "--seed",
    "42",
)


@dataclass
class TrainedRun:
    """A bundle trained by `lungcam-train train` in a subprocess, with its data and output."""

    data: Path
    bundle: Path
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One real training run through the CLI, shared by the CLI and Grad-CAM tests."""
    root = tmp_path_factory.mktemp("trained")
    data = write_synthetic_dataset(root / "data", n_per_class=N_PER_CLASS, size=IMAGE_SIZE, seed=DATA_SEED)
    bundle = root / "bundle"
    started = time.perf_counter()
    result = _run_cli("train", "--data", str(data), *TRAIN_ARGS, "--version", "test-1", "--out", str(bundle))
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-4000:]
    return TrainedRun(data, bundle, result.stdout, result.stderr, seconds)


def _last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output on stdout"
    return json.loads(lines[-1])


def test_cli_train_shows_progress_per_epoch_and_after_the_last(trained_run: TrainedRun) -> None:
    """A bar per epoch with batches, loss and ETA, then what happens after the last epoch, on stderr."""
    err = trained_run.stderr
    assert re.search(r"epoch 1/\d+: +\d+%.*batch", err) and "loss=" in err and "<" in err  # tqdm: bar, loss, ETA
    steps = ["evaluating on the test split", "drawing the plots", "publishing the bundle"]
    positions = [err.index(step) for step in steps]
    assert positions == sorted(positions) and err.rindex("epoch ") < positions[0]
    # The paper's recipe has no validation split: the per-epoch figures are named for the test split they are.
    assert "no validation split" in err and "validation 0" not in err
    epoch_lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert all("test_loss" in line and "val_" not in line for line in epoch_lines), epoch_lines


def test_cli_train_publishes_a_complete_bundle(trained_run: TrainedRun) -> None:
    manifest = json.loads((trained_run.bundle / "manifest.json").read_text())
    for name in (
        "model.keras",
        "history.json",
        "plots/training_curves.png",
        "plots/roc.png",
        "plots/confusion_matrix.png",
        "plots/gradcam_grid.png",
    ):
        assert (trained_run.bundle / name).is_file(), name
    assert manifest["name"] == f"{ARCH}-covid" and manifest["version"] == "test-1"
    assert manifest["architecture"] == ARCH and manifest["input_size"] == INPUT_SIZE
    assert manifest["class_names"] == ["covid", "normal"]
    assert manifest["gradcam_layer"] == GRADCAM_LAYER and manifest["weights"] == "none"
    assert manifest["training"]["freeze_backbone"] is False and manifest["training"]["batch_size"] == 8
    metrics = manifest["metrics"]
    for name in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
        assert isinstance(metrics[name], float), name
    assert metrics["confusion_matrix"]["labels"] == ["covid", "normal"]
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == manifest["dataset"]["split"]["n_test"]
    assert set(manifest["metrics_by_source"]) == {"synthetic"}
    assert manifest["dataset"]["n_images"] == 2 * N_PER_CLASS
    assert manifest["dataset"]["split"]["group_by_patient"] is True
    assert manifest["dataset"]["hash"] == dataset_hash(load_dataset(trained_run.data))
    history = json.loads((trained_run.bundle / "history.json").read_text())
    assert len(history["loss"]) == len(history["val_accuracy"]) == EPOCHS
    assert history["val_split"] == "test"  # Keras's val_* figures, computed on the test split (paper recipe)
    # The metrics table is on stdout, one progress line per epoch on stderr.
    assert "specificity" in trained_run.stdout and "confusion matrix" in trained_run.stdout
    assert sum(line.startswith("epoch ") for line in trained_run.stderr.splitlines()) == EPOCHS


def test_cli_evaluate_in_a_new_process_reproduces_the_manifest(trained_run: TrainedRun) -> None:
    manifest = json.loads((trained_run.bundle / "manifest.json").read_text())
    result = _run_cli("evaluate", "--bundle", str(trained_run.bundle), "--data", str(trained_run.data), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    evaluated = _last_json_line(result.stdout)
    assert evaluated["dataset_hash_matches"] is True
    assert evaluated["n_images"] == manifest["dataset"]["split"]["n_test"]
    assert evaluated["metrics"] == manifest["metrics"]
    assert evaluated["metrics_by_source"] == manifest["metrics_by_source"]


def test_cli_evaluate_all_and_changed_data(trained_run: TrainedRun, tmp_path: Path) -> None:
    result = _run_cli(
        "evaluate",
        "--bundle",
        str(trained_run.bundle),
        "--data",
        str(trained_run.data),
        "--split",
        "all",
        "--json",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    evaluated = _last_json_line(result.stdout)
    assert evaluated["n_images"] == 2 * N_PER_CLASS
    assert sum(map(sum, evaluated["metrics"]["confusion_matrix"]["matrix"])) == 2 * N_PER_CLASS
    # Other data: evaluation still runs, but says loudly that the hash differs.
    other = write_synthetic_dataset(tmp_path / "other", n_per_class=10, size=IMAGE_SIZE, seed=DATA_SEED + 1)
    result = _run_cli(
        "evaluate",
        "--bundle",
        str(trained_run.bundle),
        "--data",
        str(other),
        "--split",
        "all",
        "--json",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert _last_json_line(result.stdout)["dataset_hash_matches"] is False
    assert "DATASET HASH DIFFERS" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/out"], "does not exist"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/out"], "unknown dataset layout"),
        (["evaluate", "--bundle", "{tmp}/no-bundle", "--data", "{tmp}"], "manifest.json"),
        (["train", "--data", "{data}", "--arch", "vgg16", "--input-size", "32", "--out", "{tmp}/out"], "ImageNet"),
    ],
    ids=["missing-data", "unknown-layout", "missing-bundle", "imagenet-offline"],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_per_class=10, size=32, seed=0)
    (tmp_path / "cats").mkdir()
    formatted = [arg.format(tmp=tmp_path, data=data) for arg in args]
    if message == "ImageNet" and _imagenet_weights_cached():
        pytest.skip("ImageNet weights are cached on this machine, so loading them cannot fail")
    result = _run_cli(*formatted)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("lungcam-train") and "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0]
    # On a machine without a GPU, TensorFlow's CUDA probing is silenced (shown with --verbose).
    assert "cuInit" not in result.stderr and "cuda" not in result.stderr.lower()


def test_a_bad_path_is_refused_before_tensorflow_loads(tmp_path: Path) -> None:
    """A mistyped --bundle or --data is reported in about a second: TensorFlow is not imported for it."""
    for args in (
        ["evaluate", "--bundle", str(tmp_path / "no-bundle"), "--data", str(tmp_path)],
        ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
    ):
        code = f"import sys; from trainer.cli import main; s = main({args!r}); print('tensorflow' in sys.modules); sys.exit(s)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stdout.strip() == "False", (result.stdout, result.stderr[-2000:])
        assert "manifest.json" in result.stderr or "does not exist" in result.stderr


def _imagenet_weights_cached() -> bool:
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    return any(cache.glob("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"))


def _gradcam_hits(trained_run: TrainedRun, tmp_path: Path) -> tuple[int, int, float]:
    """(peaks inside the lesion mask, correctly classified held-out positives, mean mask area fraction)."""
    from shared.bundle import load_bundle
    from trainer.localisation import peaks_in_masks, synthetic_positives

    # Held-out images the model never saw (another seed), with their lesion masks.
    images, masks = synthetic_positives(tmp_path / "held-out", HELD_OUT_POSITIVES, IMAGE_SIZE, DATA_SEED + 100)
    probabilities, cams = load_bundle(trained_run.bundle).gradcam()(images)
    correct = probabilities[:, 0] >= 0.5
    kept = [mask for mask, ok in zip(masks, correct) if ok]
    hits = int(peaks_in_masks(cams[correct], kept).sum())
    return hits, int(correct.sum()), float(np.mean([mask.mean() for mask in kept])) if kept else 0.0


def test_gradcam_peaks_land_on_lesions_far_more_often_than_chance(trained_run: TrainedRun, tmp_path: Path) -> None:
    hits, n_correct, chance = _gradcam_hits(trained_run, tmp_path)
    assert n_correct >= 10, f"only {n_correct} held-out positives classified correctly"
    # A peak dropped at random lands in the mask with probability `chance` (the lesions' area share).
    assert hits / n_correct >= 2 * chance, f"{hits}/{n_correct} peaks in lesions; chance is {chance:.2f}"
