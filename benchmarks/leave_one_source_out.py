"""Leave-one-source-out (LOSO) validation of the covid class, for the paper recipe and robust candidates.

The dev set's covid images come from three source collections; all its normals come from ONE
source (NIH films redistributed by muhammedtalo/COVID-19). For each covid source S:

- train on the covid images of the other two sources + 75% of the normals (patient-grouped);
- test on S's covid images + the held-out 25% of the normals (the same normals in every fold).

So LOSO measures only whether the covid side transfers to an unseen collection; the test normals
share a source with the training normals, which flatters every model. Two further columns help:
`blanked` is the AUC with the central lung region blanked (the shortcut audit, trainer/audit.py;
near 0.5 is good, near the full AUC means the model reads outside the lungs) and `lungs` the AUC
with everything but the lungs blanked. `styled` stands in for normals from another hospital: the
test normals re-cut to the held-out source's file geometry and format (each takes a random covid
file's aspect ratio, size and JPEG/PNG format), so a model that tells the classes apart by
geometry, resolution or compression loses AUC there.

    nice -n 19 python benchmarks/leave_one_source_out.py --data ../shared/data/cxr-dev \\
        --candidates paper-resnet50,robust-small-clahe --results benchmarks/results/loso.json

Each candidate's results are merged into the JSON file (re-running a candidate replaces it) and the
markdown table `benchmarks/results/loso.md` is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import GroupShuffleSplit  # noqa: E402

# Candidates: a TrainConfig (recipe + overrides). "paper-resnet50" is the baseline command.
CANDIDATES: dict[str, dict[str, Any]] = {
    "paper-resnet50": {"recipe": "paper", "arch": "resnet50", "weights": "none", "epochs": 2},
    "robust-small-clahe": {"recipe": "robust"},
    "robust-small-raw": {"recipe": "robust", "intensity": "none"},
    "robust-small-clahe-noaug": {"recipe": "robust", "augment_strength": 0.0, "rotation_degrees": 0.0},
    "robust-small-zscore": {"recipe": "robust", "intensity": "zscore"},
    "robust-small-equalize": {"recipe": "robust", "intensity": "equalize"},
    "robust-small-clahe-crop": {"recipe": "robust", "crop_fraction": 0.10},
    "robust-small-clahe-blur": {"recipe": "robust", "blur_sigma": 2.0},
    "robust-small-clahe-crop-blur": {"recipe": "robust", "crop_fraction": 0.10, "blur_sigma": 2.0},
    "robust-small-clahe-square": {"recipe": "robust", "square": "centre_crop"},
    "robust-small-clahe-square-blur": {"recipe": "robust", "square": "centre_crop", "blur_sigma": 2.0},
    "robust-small-clahe-64": {"recipe": "robust", "input_size": 64},
    "robust-small-clahe-nols": {"recipe": "robust", "label_smoothing": 0.0, "weight_decay": 0.0},
    "robust-resnet50-clahe-96": {"recipe": "robust", "arch": "resnet50", "weights": "none", "input_size": 96,
                                 "batch_size": 16, "epochs": 15, "learning_rate": 1e-3},
    "robust-densenet121-clahe-96": {"recipe": "robust", "arch": "densenet121", "weights": "none", "input_size": 96,
                                    "batch_size": 16, "epochs": 15, "learning_rate": 1e-3},
}
NORMAL_TEST_FRACTION = 0.25


def folds(samples: list, seed: int) -> list[tuple[str, list, list]]:
    """(held-out covid source, training samples, test samples) per covid source."""
    normals = [s for s in samples if s.label == "normal"]
    covid = [s for s in samples if s.label == "covid"]
    groups = [s.patient_id or f"image-{i}" for i, s in enumerate(normals)]
    train_index, test_index = next(
        GroupShuffleSplit(n_splits=1, test_size=NORMAL_TEST_FRACTION, random_state=seed).split(normals, groups=groups)
    )
    normal_train = [normals[i] for i in train_index]
    normal_test = [normals[i] for i in test_index]
    out = []
    for source in sorted({s.source for s in covid}):
        train = [s for s in covid if s.source != source] + normal_train
        test = [s for s in covid if s.source == source] + normal_test
        out.append((source, train, test))
    return out


def styled_normals(normals: list, covid: list, out_dir: Path, seed: int) -> list:
    """Copies of `normals` re-cut to the geometry and file format of randomly drawn `covid` files."""
    import cv2

    from trainer.datasets import Sample

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    styled = []
    for index, normal in enumerate(normals):
        model_file = covid[int(rng.integers(len(covid)))]
        target = cv2.imread(str(model_file.path), cv2.IMREAD_GRAYSCALE)
        image = cv2.imread(str(normal.path), cv2.IMREAD_GRAYSCALE)
        aspect = target.shape[0] / target.shape[1]  # height / width
        height, width = image.shape
        if aspect < height / width:  # wider than the normal: cut rows
            rows = max(8, int(round(width * aspect)))
            top = (height - rows) // 2
            image = image[top:top + rows]
        else:  # taller: cut columns
            columns = max(8, int(round(height / aspect)))
            left = (width - columns) // 2
            image = image[:, left:left + columns]
        image = cv2.resize(image, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_AREA)
        jpeg = model_file.path.suffix.lower() in (".jpg", ".jpeg")
        path = out_dir / f"styled-{index}{'.jpg' if jpeg else '.png'}"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 85] if jpeg else [])
        styled.append(Sample(path=path, label="normal", patient_id=None, source="styled",
                             relative_path=f"styled/{path.name}"))
    return styled


def run_candidate(name: str, overrides: dict[str, Any], samples: list, seed: int, cache: dict, progress: bool) -> dict:
    import keras

    from trainer.audit import audit_aucs
    from trainer.datasets import split_samples
    from trainer.evaluate import COVID_INDEX, covid_targets, predict_probabilities
    from trainer.loading import load_images
    from trainer.train import TrainConfig, build_for, fit_on_arrays, preprocessing_for

    config = TrainConfig(**{"seed": seed, "progress": progress, **overrides}).resolved()
    preprocessing = preprocessing_for(config)
    key = json.dumps([preprocessing, config.input_size], sort_keys=True)
    if key not in cache:
        loaded = load_images(samples, config.input_size, preprocessing=preprocessing, progress=progress, desc=name)
        cache[key] = {sample.key: image for sample, image in zip(loaded.samples, loaded.images)}
    images = cache[key]
    result: dict[str, Any] = {"candidate": name, "config": {k: v for k, v in asdict(config).items()
                                                           if k not in ("progress", "name", "version")},
                              "folds": {}}
    for source, train, test in folds(samples, seed):
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        train = [s for s in train if s.key in images]
        test = [s for s in test if s.key in images]
        if config.val_fraction > 0:
            fit_part, val_part = split_samples(train, test_fraction=config.val_fraction, seed=seed + 1)
        else:
            # The paper's recipe only draws curves on its validation data (no effect on the weights);
            # a few test images keep that cheap.
            fit_part, val_part = train, test[:: max(1, len(test) // 16)]
        model = build_for(config, None if config.weights == "none" else config.weights)
        started = time.perf_counter()
        stack = lambda part: np.stack([images[s.key] for s in part])  # noqa: E731
        history = fit_on_arrays(config, model, stack(fit_part), [s.label for s in fit_part],
                                stack(val_part), [s.label for s in val_part])
        seconds = time.perf_counter() - started
        test_images = stack(test)
        y = covid_targets(test)
        p = predict_probabilities(model, test_images)[:, COVID_INDEX]

        def predict(batch: np.ndarray) -> np.ndarray:
            return np.concatenate([np.asarray(model.predict_on_batch(batch[i:i + 32]))[:, COVID_INDEX]
                                   for i in range(0, len(batch), 32)])

        audit = audit_aucs(predict, test_images, y)
        test_covid = [s for s in test if s.label == "covid"]
        styled_key = json.dumps([source, preprocessing, config.input_size], sort_keys=True)
        if styled_key not in cache:
            normals = [s for s in test if s.label == "normal"]
            with tempfile.TemporaryDirectory() as folder:
                styled = styled_normals(normals, test_covid, Path(folder), seed)
                cache[styled_key] = load_images(styled, config.input_size, preprocessing=preprocessing,
                                                progress=False).images
        styled_images = np.concatenate([stack(test_covid), cache[styled_key]])
        styled_y = np.concatenate([np.ones(len(test_covid)), np.zeros(len(cache[styled_key]))])
        result["folds"][source] = {
            "auc": float(roc_auc_score(y, p)),
            "auc_styled_normals": float(roc_auc_score(
                styled_y, predict_probabilities(model, styled_images)[:, COVID_INDEX])),
            "auc_lungs_blanked": audit["lungs_blanked"],
            "auc_lungs_only": audit["lungs_only"],
            "n_covid": int(y.sum()),
            "n_normal": int(len(y) - y.sum()),
            "n_train": len(fit_part),
            "epochs_run": len(history.history.get("loss", [])),
            "seconds": round(seconds, 1),
        }
        print(f"{name} held-out {source}: {result['folds'][source]}", file=sys.stderr, flush=True)
    aucs = [fold["auc"] for fold in result["folds"].values()]
    result["mean_auc"] = float(np.mean(aucs))
    result["mean_auc_lungs_blanked"] = float(np.mean([f["auc_lungs_blanked"] for f in result["folds"].values()]))
    result["mean_auc_lungs_only"] = float(np.mean([f["auc_lungs_only"] for f in result["folds"].values()]))
    result["mean_auc_styled_normals"] = float(np.mean([f["auc_styled_normals"] for f in result["folds"].values()]))
    return result


def render_markdown(results: dict[str, dict]) -> str:
    sources = sorted({source for r in results.values() for source in r["folds"]})
    short = {s: s.split("/")[0] for s in sources}
    lines = [
        "# Leave-one-source-out AUC, covid class (dev set cxr-dev)",
        "",
        "Produced by `benchmarks/leave_one_source_out.py` (see its docstring for the command). Each fold holds out",
        "one covid source; test = that source's covid + the same 25% of normals (patient-grouped) in every fold.",
        "**All dev normals come from one source (NIH via muhammedtalo/COVID-19)**, so these AUCs measure only",
        "the covid side's transfer. blanked = AUC with the central lung box blanked (shortcut indicator: near",
        "0.5 is good); lungs = AUC with everything but the lung box blanked; styled = AUC against the test",
        "normals re-cut to the held-out covid files' aspect ratio, size and format (a stand-in for another",
        "hospital's normals; a model reading geometry or compression drops here). n/a: run before that column.",
        "",
        "| candidate | " + " | ".join(f"{short[s]} AUC (styled / blanked / lungs)" for s in sources)
        + " | mean AUC | mean styled | mean blanked | mean lungs | s/fold |",
        "|---|" + "---|" * (len(sources) + 5),
    ]
    for name, r in sorted(results.items(), key=lambda item: -item[1]["mean_auc"]):
        cells = []
        for s in sources:
            f = r["folds"].get(s)
            cells.append("n/a" if f is None else
                         f"{f['auc']:.3f} ({_optional(f.get('auc_styled_normals'))} / {f['auc_lungs_blanked']:.3f}"
                         f" / {f['auc_lungs_only']:.3f})")
        seconds = np.mean([f["seconds"] for f in r["folds"].values()])
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {r['mean_auc']:.3f} | {_optional(r.get('mean_auc_styled_normals'))}"
                     + f" | {r['mean_auc_lungs_blanked']:.3f} | {r['mean_auc_lungs_only']:.3f}"
                     + f" | {seconds:.0f} |")
    lines += ["", "Fold sizes (test covid / test normal): " + ", ".join(
        f"{short[s]} {f['n_covid']}/{f['n_normal']}" for s, f in next(iter(results.values()))["folds"].items())]
    lines += ["", "Candidate settings (overrides of the recipe's defaults):", ""]
    for name in sorted(results):
        lines.append(f"- `{name}`: `{json.dumps(CANDIDATES.get(name, {}), sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def _optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the dev set (class folders + manifest.csv with source_repo)")
    parser.add_argument("--candidates", default="paper-resnet50,robust-small-clahe",
                        help=f"comma-separated, from: {', '.join(CANDIDATES)}")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--results", default="benchmarks/results/loso.json")
    parser.add_argument("--markdown", default="benchmarks/results/loso.md")
    parser.add_argument("--epochs", type=int, default=None, help="override the robust candidates' epochs (screening; the paper's stays as the issue ran it)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    from trainer.datasets import load_dataset

    samples = load_dataset(args.data)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    cache: dict = {}
    for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        if name not in CANDIDATES:
            parser.error(f"unknown candidate {name!r}")
        screening = args.epochs and CANDIDATES[name].get("recipe") == "robust"
        overrides = {**CANDIDATES[name], **({"epochs": args.epochs} if screening else {})}
        results[name] = run_candidate(name, overrides, samples, args.seed, cache, args.progress)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
        Path(args.markdown).write_text(render_markdown(results))
        print(f"{name}: mean AUC {results[name]['mean_auc']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
