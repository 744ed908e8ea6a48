"""The shortcut audit (trainer/audit.py, `lungcam-train audit`): real training runs on synthetic films.

A model trained where the covid cue is a burnt-in marker in the border must fail; one trained where
the cue is an opacity in the lungs must pass. Both are trained with the robust recipe at 64 px.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.calibration import OperatingPoint, audit_status
from shared.imaging import LUNG_BOX, lung_box_mask
from shared.synthetic import write_synthetic_dataset
from trainer.audit import blanked, verdict

TRAIN_CLI = [sys.executable, "-m", "trainer.cli"]
SIZE = 64


def _train(data: Path, out: Path, **overrides) -> dict:
    from trainer.train import TrainConfig, train

    config = TrainConfig(
        recipe="robust",
        input_size=SIZE,
        working_size=SIZE,
        epochs=12,
        patience=12,
        batch_size=16,
        version="audit-test",
        progress=False,
        seed=1,
        **overrides,
    )
    return train(config, [data], out)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """cue -> (bundle, fresh audit data) for a border-cue and a lung-cue model."""
    root = tmp_path_factory.mktemp("audit")
    out = {}
    for cue, seed in (("border", 11), ("lungs", 21)):
        data = write_synthetic_dataset(root / f"{cue}-train", n_per_class=80, size=96, seed=seed, cue=cue)
        fresh = write_synthetic_dataset(root / f"{cue}-audit", n_per_class=40, size=96, seed=seed + 1, cue=cue)
        # The robust recipe's random crops often cut a corner marker away; without augmentation the
        # border model learns the shortcut quickly, which is what this test needs.
        overrides = {"augment_strength": 0.0, "rotation_degrees": 0.0} if cue == "border" else {}
        _train(data, root / f"{cue}-bundle", **overrides)
        out[cue] = (root / f"{cue}-bundle", fresh)
    return out


def test_blanking_touches_only_its_region() -> None:
    images = np.full((2, 40, 40, 3), 200, np.uint8)
    images[:, 0, 0] = 0
    mask = lung_box_mask(40)
    lungs_blanked = blanked(images, "lungs_blanked", fill=0.25)
    lungs_only = blanked(images, "lungs_only", fill=0.25)
    assert np.all(lungs_blanked[:, mask] == 0.25) and np.allclose(lungs_blanked[:, ~mask][:, 1:], 200 / 255)
    assert np.all(lungs_only[:, ~mask] == 0.25) and np.allclose(lungs_only[:, mask], 200 / 255)
    assert LUNG_BOX[0] < LUNG_BOX[2] and LUNG_BOX[1] < LUNG_BOX[3]


def test_verdict_rule() -> None:
    assert verdict({"full": 0.95, "lungs_blanked": 0.93, "lungs_only": 0.5})[0] == "fail"
    assert verdict({"full": 0.95, "lungs_blanked": 0.55, "lungs_only": 0.9})[0] == "pass"
    assert verdict({"full": 0.55, "lungs_blanked": 0.55, "lungs_only": 0.5})[0] == "inconclusive"


@pytest.mark.slow
def test_audit_fails_a_border_cue_model_and_passes_a_lung_cue_model(bundles) -> None:
    from trainer.audit import run_audit

    border = run_audit(str(bundles["border"][0]), [str(bundles["border"][1])], progress=False)["audit"]
    lungs = run_audit(str(bundles["lungs"][0]), [str(bundles["lungs"][1])], progress=False)["audit"]
    assert border["auc"]["full"] > 0.9, border
    assert border["verdict"] == "fail", border
    assert lungs["auc"]["full"] > 0.8, lungs
    assert lungs["verdict"] == "pass", lungs
    assert lungs["auc"]["lungs_blanked"] < border["auc"]["lungs_blanked"]
    # The verdict is in each manifest, and the worker-side helper reads it.
    border_manifest = json.loads((bundles["border"][0] / "manifest.json").read_text())
    lungs_manifest = json.loads((bundles["lungs"][0] / "manifest.json").read_text())
    assert "FAILED" in audit_status(border_manifest)
    assert audit_status(lungs_manifest) is None


@pytest.mark.slow
def test_robust_bundle_carries_its_operating_point(bundles) -> None:
    from shared.bundle import load_bundle

    bundle = load_bundle(bundles["lungs"][0])  # the sha256 still verifies after the audit rewrote the manifest
    manifest = bundle.manifest
    assert manifest["recipe"] == "robust" and manifest["preprocessing"]["version"] == 2
    point = OperatingPoint.from_manifest(manifest)
    assert point.temperature > 0 and 0 < point.threshold < 1
    fitted = manifest["calibration"]["fitted_on"]
    assert fitted["sensitivity"] >= 0.90  # on the validation split it was chosen on
    assert manifest["metrics"]["threshold"] == pytest.approx(point.threshold)
    for name in ("ece", "brier", "auc_ci95", "sensitivity_at_specificity"):
        assert name in manifest["metrics"], name


@pytest.mark.slow
def test_cli_audit_prints_the_verdict_and_json(bundles, tmp_path: Path) -> None:
    bundle, data = bundles["border"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [*TRAIN_CLI, "audit", "--bundle", str(bundle), "--data", str(data), "--json", "--no-progress", "--no-write"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verdict: FAIL" in result.stdout
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["audit"]["verdict"] == "fail" and record["written"] is False
