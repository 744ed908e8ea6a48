"""`lungcam-train`: train a model with the paper's recipe and publish it, or re-evaluate a published bundle."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence

# Before anything imports TensorFlow: silence its C++ INFO/WARNING start-up chatter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_USAGE = 2
ARCH_CHOICES = ("vgg16", "densenet121", "resnet50")  # shared.zoo.ARCHITECTURES, without importing Keras


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for both subcommands (defaults are the paper's recipe)."""
    parser = argparse.ArgumentParser(prog="lungcam-train", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate on the test split and publish a bundle")
    train.add_argument("--data", action="append", required=True, metavar="PATH",
                       help="dataset folder (class folders, ieee8023 metadata.csv, or Kermany chest_xray); repeatable")
    train.add_argument("--arch", choices=ARCH_CHOICES, default="vgg16", help="backbone (default: vgg16)")
    train.add_argument("--weights", default="imagenet",
                       help="initial backbone weights: imagenet (default), none, or a local weights file")
    train.add_argument("--epochs", type=int, default=15, help="default: 15")
    train.add_argument("--batch-size", type=int, default=8, help="default: 8")
    train.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default: 1e-3)")
    train.add_argument("--rotation", type=float, default=15.0, help="max augmentation rotation in degrees (default: 15)")
    train.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default: 224)")
    train.add_argument("--test-fraction", type=float, default=0.2, help="default: 0.2")
    train.add_argument("--seed", type=int, default=42, help="split and training seed (default: 42)")
    train.add_argument("--no-group-by-patient", dest="group_by_patient", action="store_false",
                       help="split by image exactly as the paper (default: keep each patient on one side)")
    train.add_argument("--fine-tune", dest="fine_tune", action="store_true",
                       help="train the backbone too (default: frozen, as the paper)")
    train.add_argument("--gradcam-layer", default=None, help="default: the paper's layer for the architecture")
    train.add_argument("--finding", default="COVID-19",
                       help="ieee8023 metadata: keep rows whose finding contains this ('any' keeps all)")
    train.add_argument("--view", default="PA", help="ieee8023 metadata: keep this view ('any' keeps all)")
    train.add_argument("--name", default=None, help="model name (default: ARCH-covid)")
    train.add_argument("--version", default=None, help="model version (default: UTC timestamp)")
    train.add_argument("--out", required=True, help="bundle destination: a folder or s3://bucket/prefix")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="re-evaluate a published bundle on a dataset")
    evaluate.add_argument("--bundle", required=True, help="bundle folder or s3:// prefix")
    evaluate.add_argument("--data", action="append", required=True, metavar="PATH", help="dataset folder; repeatable")
    evaluate.add_argument("--split", choices=("test", "all"), default="test",
                          help="test: the bundle's own test split (default); all: every image")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON object on the last stdout line")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def _any_to_none(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("any", "all", "") else value


def _run_train(args: argparse.Namespace) -> int:
    from trainer.train import TrainConfig, train

    config = TrainConfig(
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
        freeze_backbone=not args.fine_tune,
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
            result = evaluate_bundle(args.bundle, args.data, split=args.split, progress=args.progress)
    else:
        result = evaluate_bundle(args.bundle, args.data, split=args.split, progress=args.progress)
    print(format_metrics_table(result["metrics"], title=f"{result['bundle']['name']} {result['bundle']['version']}, {args.split} split"))
    if len(result["metrics_by_source"]) > 1:
        print(format_by_source(result["metrics_by_source"]))
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, reported in one line; anything else is a bug and keeps its traceback."""
    from shared.errors import LungcamError

    return (LungcamError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lungcam-train` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from shared.tensorflow_quiet import import_tensorflow

    import_tensorflow(verbose=args.verbose)  # first, so CUDA probing on a CPU-only machine stays quiet
    run = _run_train if args.command == "train" else _run_evaluate
    try:
        return run(args)
    except _expected_errors() as exc:
        print(f"lungcam-train {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
