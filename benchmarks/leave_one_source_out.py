"""Leave-one-source-out (LOSO) validation on BOTH classes: hold out a (covid source, normal source) pair.

The dev set (cxr-dev v2) has three covid sources and three normal sources. For each of the nine
pairs, a candidate is trained on every image whose source is neither of the pair and tested on the
pair's covid and normal images (trainer/loso.py), so the test films come from hospitals the model
never saw, for both classes. The table gives each pair's AUC, the mean and the worst pair, and the
shortcut audit's lungs-blanked AUC (trainer/audit.py: near 0.5 is good; near the full AUC means the
model reads outside the lungs).

Frozen candidates extract pooled backbone features once per preprocessing (cached on disk under
--feature-cache) and fit only the linear head per fold; trained candidates (robust, paper) train a
network per fold, which takes minutes each.

    nice -n 5 python benchmarks/leave_one_source_out.py --data ../shared/data/cxr-dev \\
        --candidates frozen-b4-mask,frozen-b4-full --results benchmarks/results/loso.json

Each candidate's results are merged into the JSON file (re-running a candidate replaces it) and the
markdown table `benchmarks/results/loso.md` is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from sklearn.metrics import roc_auc_score

# Candidates: a TrainConfig (recipe + overrides). frozen-b4-mask is the frozen recipe's defaults.
CANDIDATES: dict[str, dict[str, Any]] = {
    "frozen-b4-mask": {"recipe": "frozen"},
    "frozen-b4-mask-class": {"recipe": "frozen", "balance": "class"},
    "frozen-b4-mask-c0.003": {"recipe": "frozen", "head_c": 0.003},
    "frozen-b4-mask-c0.03": {"recipe": "frozen", "head_c": 0.03},
    "frozen-b4-mask-288": {"recipe": "frozen", "input_size": 288},
    "frozen-b4-mask-square": {"recipe": "frozen", "square": "centre_crop"},
    "frozen-b5-mask": {"recipe": "frozen", "gradcam_layer": "block5_conv3"},
    "frozen-b4-full": {"recipe": "frozen", "lung_mask": False},
    "frozen-b5-full": {"recipe": "frozen", "lung_mask": False, "gradcam_layer": "block5_conv3"},
    "robust-small-clahe": {"recipe": "robust"},
    "robust-small-clahe-mask": {"recipe": "robust", "lung_mask": True},
    "robust-small-clahe-64": {"recipe": "robust", "input_size": 64},
    "paper-vgg16-hed": {"recipe": "paper", "arch": "vgg16", "weights": "hed-vgg16"},
}


def run_candidate(
    name: str,
    overrides: dict[str, Any],
    samples: list,
    seed: int,
    images_cache: dict,
    feature_cache: Path,
    progress: bool,
) -> dict:
    """LOSO over every (covid source, normal source) pair for one candidate."""
    from trainer.loading import load_images
    from trainer.train import TrainConfig, preprocessing_for

    config = TrainConfig(
        **{"seed": seed, "progress": progress, "feature_cache": str(feature_cache), **overrides}
    ).resolved()
    preprocessing = preprocessing_for(config)
    key = json.dumps([preprocessing, config.input_size], sort_keys=True)
    started = time.perf_counter()
    if key not in images_cache:
        loaded = load_images(samples, config.input_size, preprocessing=preprocessing, progress=progress, desc=name)
        images_cache[key] = (loaded.samples, loaded.images)
    kept, images = images_cache[key]
    runner = _frozen_folds if config.recipe == "frozen" else _trained_folds
    pairs = runner(config, kept, images, preprocessing, progress)
    aucs = {pair: fold["auc"] for pair, fold in pairs.items()}
    worst = min(aucs, key=aucs.__getitem__)
    return {
        "candidate": name,
        "config": {
            k: v for k, v in asdict(config).items() if k not in ("progress", "name", "version", "feature_cache")
        },
        "pairs": pairs,
        "mean_auc": float(np.mean(list(aucs.values()))),
        "worst_pair": [worst, aucs[worst]],
        "mean_auc_lungs_blanked": float(np.mean([fold["auc_lungs_blanked"] for fold in pairs.values()])),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _frozen_folds(config: Any, samples: list, images: np.ndarray, preprocessing: dict, progress: bool) -> dict:
    """Features once (and once more with the lungs blanked), then a head per pair."""
    from shared.pretrained import PACKAGED_WEIGHTS
    from shared.zoo import build_packaged_backbone
    from trainer.audit import blanked
    from trainer.features import FeatureCache, extract_features, feature_set_key, pooled_feature_model
    from trainer.frozen import out_of_source_scores
    from trainer.loading import LoadedImages
    from trainer.train_frozen import cached_features

    backbone = build_packaged_backbone(config.arch, config.weights, config.input_size, config.gradcam_layer)
    model = pooled_feature_model(backbone, [config.gradcam_layer])
    cache = FeatureCache(Path(config.feature_cache))
    key = feature_set_key(
        preprocessing, config.input_size, PACKAGED_WEIGHTS[config.weights].sha256, config.gradcam_layer
    )
    features = cached_features(cache, key, model, LoadedImages(samples, images, []), progress=progress)
    blank = blanked(images, "lungs_blanked")
    if (blank == blank[:1]).all():
        # With the lung mask, everything outside the box is already one constant: once the audit
        # blanks the box, every image is the same, so one pass stands for all (AUC 0.5).
        blank_features = np.repeat(extract_features(model, blank[:1], progress=False), len(images), axis=0)
    else:
        blank_features = extract_features(model, blank, progress=progress, desc="lungs blanked")
    scores = out_of_source_scores(
        samples, features, c=config.head_c, balance=config.balance, variants={"lungs_blanked": blank_features}
    )
    return scores.pairs


def _trained_folds(config: Any, samples: list, images: np.ndarray, preprocessing: dict, progress: bool) -> dict:
    """Train a network per pair (minutes each), then score the pair and its lungs-blanked copies."""
    import keras

    from trainer.audit import audit_aucs
    from trainer.datasets import split_samples
    from trainer.evaluate import COVID_INDEX, covid_targets, predict_probabilities
    from trainer.loso import source_pair_folds
    from trainer.train import build_for, fit_on_arrays

    row = {id(sample): index for index, sample in enumerate(samples)}
    pairs = {}
    for fold in source_pair_folds(samples, min_per_class=5):
        keras.backend.clear_session()
        keras.utils.set_random_seed(config.seed)
        if config.val_fraction > 0:
            fit_part, val_part = split_samples(fold.train, test_fraction=config.val_fraction, seed=config.seed + 1)
        else:
            # The paper's recipe only draws curves on its validation data: a few test images keep that cheap.
            fit_part, val_part = fold.train, fold.test[:: max(1, len(fold.test) // 16)]
        stack = lambda part: images[[row[id(s)] for s in part]]  # noqa: E731
        model = build_for(config, None if config.weights == "none" else config.weights)
        started = time.perf_counter()
        fit_on_arrays(
            config, model, stack(fit_part), [s.label for s in fit_part], stack(val_part), [s.label for s in val_part]
        )
        test_images, y = stack(fold.test), covid_targets(fold.test)
        p = predict_probabilities(model, test_images)[:, COVID_INDEX]

        def predict(batch: np.ndarray) -> np.ndarray:
            return predict_probabilities(model, batch)[:, COVID_INDEX]

        audit = audit_aucs(predict, test_images, y)
        pairs[fold.name] = {
            "auc": float(roc_auc_score(y, p)),
            "auc_lungs_blanked": audit["lungs_blanked"],
            "n_covid": int(y.sum()),
            "n_normal": int(len(y) - y.sum()),
            "n_train": len(fold.train),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"  {fold.name}: {pairs[fold.name]}", file=sys.stderr, flush=True)
    return pairs


def render_markdown(results: dict[str, dict]) -> str:
    """The results table: one row per candidate, one column per held-out pair."""
    pair_names = sorted({pair for r in results.values() for pair in r["pairs"]})
    lines = [
        "# Leave-one-source-out AUC on both classes (dev set cxr-dev v2)",
        "",
        "Produced by `benchmarks/leave_one_source_out.py` (see its docstring for the command). Each column holds",
        "out one (covid source x normal source) pair: trained on every image whose source is neither, tested on",
        "the pair's covid and normal films. Cell: AUC (AUC with the lung box blanked: the shortcut audit, near",
        "0.5 is good). Sources: covid armiro/COVID-CXNet, ml-workgroup/covid-19-image-repository (Hannover),",
        "muhammedtalo/COVID-19 (ieee8023 copies); normal muhammedtalo/COVID-19 (NIH), pi-null-mezon/OpenIST",
        "(US teaching set), huoweiliang/Study (JSRT, Japan). s: wall time of the candidate (features or training).",
        "",
        "| candidate | mean AUC | worst pair | mean blanked | " + " | ".join(pair_names) + " | s |",
        "|---|---|---|---|" + "---|" * (len(pair_names) + 1),
    ]
    for name, r in sorted(results.items(), key=lambda item: -item[1]["mean_auc"]):
        cells = []
        for pair in pair_names:
            fold = r["pairs"].get(pair)
            cells.append("n/a" if fold is None else f"{fold['auc']:.3f} ({fold['auc_lungs_blanked']:.2f})")
        worst_name, worst_auc = r["worst_pair"]
        lines.append(
            f"| {name} | {r['mean_auc']:.3f} | {worst_auc:.3f} ({worst_name}) | "
            f"{r['mean_auc_lungs_blanked']:.3f} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |"
        )
    first = next(iter(results.values()))["pairs"]
    lines += [
        "",
        "Pair sizes (test covid / test normal / train): "
        + ", ".join(
            f"{pair} {fold['n_covid']}/{fold['n_normal']}/{fold['n_train']}" for pair, fold in sorted(first.items())
        ),
    ]
    lines += ["", "Candidate settings (overrides of the recipe's defaults):", ""]
    for name in sorted(results):
        lines.append(f"- `{name}`: `{json.dumps(CANDIDATES.get(name, {}), sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen candidates, merge their results into the JSON file and rewrite the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the dev set (class folders + manifest.csv with source_repo)")
    parser.add_argument(
        "--candidates", default="frozen-b4-mask", help=f"comma-separated, from: {', '.join(CANDIDATES)}"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--results", default="benchmarks/results/loso.json")
    parser.add_argument("--markdown", default="benchmarks/results/loso.md")
    parser.add_argument("--feature-cache", type=Path, default=Path.home() / ".cache" / "lungcam" / "features")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    from trainer.datasets import load_dataset

    samples = load_dataset(args.data)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = {name: r for name, r in results.items() if "pairs" in r}  # drop the covid-only LOSO of old runs
    images_cache: dict = {}
    for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        if name not in CANDIDATES:
            parser.error(f"unknown candidate {name!r}")
        results[name] = run_candidate(
            name, CANDIDATES[name], samples, args.seed, images_cache, args.feature_cache, args.progress
        )
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
        Path(args.markdown).write_text(render_markdown(results))
        worst_name, worst_auc = results[name]["worst_pair"]
        print(
            f"{name}: mean AUC {results[name]['mean_auc']:.3f}, worst pair {worst_name} {worst_auc:.3f}, "
            f"mean lungs-blanked AUC {results[name]['mean_auc_lungs_blanked']:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
