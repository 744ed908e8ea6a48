"""Model bundles: `model.keras` + `manifest.json`, saved to a folder or an S3 prefix, verified on load."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.calibration import OperatingPoint, audit_status
from shared.domain import (
    MANIFEST_REQUIRED_KEYS,
    Manifest,
    ManifestBackbone,
    ManifestUpdate,
    manifest_from_json,
    manifest_to_json,
)
from shared.errors import LungcamError
from shared.hashing import sha256_bytes
from shared.store import ObjectStore, open_store

if TYPE_CHECKING:
    import keras

    from shared.gradcam import GradCam

MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class BundleError(LungcamError, RuntimeError):
    """A bundle that is missing, malformed or fails verification."""


@dataclass
class Bundle:
    """A loaded, verified model with its manifest."""

    model: keras.Model
    manifest: Manifest
    uri: str

    @property
    def name(self) -> str:
        """The model's name, e.g. "resnet50-covid"."""
        return self.manifest["name"]

    @property
    def version(self) -> str:
        """The model's version string."""
        return self.manifest["version"]

    @property
    def input_size(self) -> int:
        """Side length of the square input, in pixels."""
        return int(self.manifest["input_size"])

    @property
    def class_names(self) -> list[str]:
        """Class names in the order of the model's outputs."""
        return list(self.manifest["class_names"])

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        """The manifest's preprocessing entry, for `shared.imaging.preprocess_for_manifest` (None: version 1)."""
        return self.manifest.get("preprocessing")

    @property
    def operating_point(self) -> OperatingPoint:
        """Temperature, threshold and indeterminate band (T=1, threshold 0.5 for bundles without calibration)."""
        return OperatingPoint.from_manifest(self.manifest)

    @property
    def audit_warning(self) -> str | None:
        """The warning to log at start when the bundle failed or never ran the shortcut audit, else None."""
        return audit_status(self.manifest)

    def gradcam(self, *, positive_gradients_only: bool = False) -> GradCam:
        """A compiled Grad-CAM pass on the manifest's layer."""
        from shared.gradcam import GradCam

        return GradCam(
            self.model,
            self.manifest["gradcam_layer"],
            positive_gradients_only=positive_gradients_only,
            smoothing_cells=float(self.manifest.get("gradcam_smoothing_cells", 0.0)),
        )


def _store_for(uri: str, endpoint_url: str | None, region: str) -> ObjectStore:
    return open_store(str(uri), endpoint_url=endpoint_url, region=region)


def save_bundle(
    model: keras.Model,
    manifest: Manifest,
    dest: str | Path,
    *,
    extra_files: dict[str, bytes] | None = None,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
) -> Manifest:
    """Write model.keras + manifest.json (with the model's sha256) to a folder or s3:// prefix."""
    for required in MANIFEST_REQUIRED_KEYS:
        if required not in manifest:
            raise BundleError(f"manifest lacks {required!r}")
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / MODEL_FILE
        # A bundle naming its frozen backbone stores only the head; the caller passes the head.
        model.save(model_path)
        model_bytes = model_path.read_bytes()
    full_manifest: Manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "model_sha256": sha256_bytes(model_bytes),
    }
    store = _store_for(str(dest), endpoint_url, region)
    store.put(MODEL_FILE, model_bytes, "application/octet-stream")
    for name, data in (extra_files or {}).items():
        store.put(name, data)
    # The manifest goes last: a reader that sees it can trust the model file is complete.
    store.put(MANIFEST_FILE, manifest_to_json(full_manifest), "application/json")
    return full_manifest


def read_manifest(uri: str | Path, *, endpoint_url: str | None = None, region: str = "us-east-1") -> Manifest:
    """Read a bundle's manifest without loading the model."""
    store = _store_for(str(uri), endpoint_url, region)
    try:
        return manifest_from_json(store.get(MANIFEST_FILE))
    except KeyError as exc:
        raise BundleError(f"no {MANIFEST_FILE} in bundle {uri}") from exc
    except ValueError as exc:  # not JSON (json.JSONDecodeError), or not a JSON object
        raise BundleError(f"malformed {MANIFEST_FILE} in bundle {uri}: {exc}") from exc


# Manifest keys that may be added or replaced after publishing (the model file is untouched, so the
# sha256 still verifies): the shortcut audit's verdict, and the mark of a demonstration model.
UPDATABLE_MANIFEST_KEYS = frozenset(ManifestUpdate.__annotations__)


def update_manifest(
    uri: str | Path, updates: ManifestUpdate, *, endpoint_url: str | None = None, region: str = "us-east-1"
) -> Manifest:
    """Merge `updates` (only UPDATABLE_MANIFEST_KEYS) into a published bundle's manifest and rewrite it."""
    unknown = set(updates) - UPDATABLE_MANIFEST_KEYS
    if unknown:
        raise BundleError(f"manifest keys {sorted(unknown)} cannot be changed after publishing")
    manifest: Manifest = {**read_manifest(uri, endpoint_url=endpoint_url, region=region), **updates}
    store = _store_for(str(uri), endpoint_url, region)
    store.put(MANIFEST_FILE, manifest_to_json(manifest), "application/json")
    return manifest


def copy_bundle(
    source: str | Path,
    dest: str | Path,
    manifest: Manifest,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
) -> Manifest:
    """Publish a new version of a bundle: every file of `source` copied unchanged, then `manifest` at `dest`.

    The model file is not touched, so the manifest's model_sha256 still verifies it.
    """
    if str(source).rstrip("/") == str(dest).rstrip("/"):
        raise BundleError(f"the new bundle must go to another place than {source}")
    source_store = _store_for(str(source), endpoint_url, region)
    dest_store = _store_for(str(dest), endpoint_url, region)
    if dest_store.exists(MANIFEST_FILE):
        raise BundleError(f"{dest} already holds a bundle; choose an empty destination")
    for key in source_store.list():
        if key != MANIFEST_FILE:
            dest_store.put(key, source_store.get(key))
    # The manifest goes last: a reader that sees it can trust the other files are complete.
    dest_store.put(MANIFEST_FILE, manifest_to_json(manifest), "application/json")
    return manifest


def load_bundle(uri: str | Path, *, endpoint_url: str | None = None, region: str = "us-east-1") -> Bundle:
    """Load a bundle, refusing it if the model file's sha256 differs from the manifest's."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url, region=region)
    store = _store_for(str(uri), endpoint_url, region)
    try:
        model_bytes = store.get(manifest.get("model_file", MODEL_FILE))
    except KeyError as exc:
        raise BundleError(f"bundle {uri} has a manifest but no model file") from exc
    actual = sha256_bytes(model_bytes)
    if actual != manifest.get("model_sha256"):
        raise BundleError(
            f"bundle {uri}: model file sha256 {actual[:12]}… does not match the manifest's "
            f"{str(manifest.get('model_sha256'))[:12]}…; refusing a modified or corrupt model"
        )
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / MODEL_FILE
        model_path.write_bytes(model_bytes)
        # Keras only here: reading a manifest (start-up checks, `lungcam screen`) needs no TensorFlow.
        import keras

        import shared.zoo  # noqa: F401  (registers the custom layers load_model needs)

        model = keras.saving.load_model(model_path, compile=False)
    backbone = named_backbone(manifest)
    if backbone is not None:
        model = _with_named_backbone(model, backbone, manifest, uri)
    return Bundle(model=model, manifest=manifest, uri=str(uri))


def named_backbone(manifest: Mapping[str, Any]) -> ManifestBackbone | None:
    """The manifest's "backbone" entry when the bundle names its frozen backbone instead of embedding it."""
    entry: ManifestBackbone | None = manifest.get("backbone")
    if not entry or entry.get("embedded", True):
        return None
    for key in ("weights", "sha256", "output_layer"):
        if not entry.get(key):
            raise BundleError(f"manifest 'backbone' lacks {key!r}")
    return entry


def _with_named_backbone(
    head: keras.Model, backbone: ManifestBackbone, manifest: Manifest, uri: str | Path
) -> keras.Model:
    """The bundle's head on the packaged backbone it names, refused if the installed file's sha256 differs."""
    from shared.pretrained import PretrainedWeightsError
    from shared.zoo import attach_head, build_packaged_backbone

    try:
        built = build_packaged_backbone(
            manifest["architecture"],
            backbone["weights"],
            int(manifest["input_size"]),
            backbone["output_layer"],
            expected_sha256=backbone["sha256"],
        )
    except PretrainedWeightsError as exc:
        raise BundleError(f"bundle {uri}: {exc}") from exc
    return attach_head(built, head)
