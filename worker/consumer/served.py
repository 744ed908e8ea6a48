"""The models a worker serves: each bundle in LUNGCAM_MODELS loaded, verified and warmed up once at start."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from shared.bundle import Bundle, load_bundle
from shared.domain import ModelKey
from shared.errors import LungcamError
from shared.gradcam import GradCam
from shared.imaging.preprocess import preprocessing_key
from shared.settings import Settings

log = logging.getLogger(__name__)


class NoModelsConfigured(LungcamError, RuntimeError):
    """The worker was started without any model bundle to serve."""


@dataclass
class ServedModel:
    """A loaded bundle with its compiled Grad-CAM pass."""

    bundle: Bundle
    gradcam: GradCam

    @property
    def covid_index(self) -> int:
        """Output index of the covid class."""
        return self.bundle.class_names.index("covid")

    @property
    def input_key(self) -> str:
        """Which preprocessed input this model takes (bundles with the same key share one array)."""
        return preprocessing_key(self.bundle.preprocessing, self.bundle.input_size)

    @property
    def key(self) -> ModelKey:
        """(name, version): what a prediction row, an overlay and a batch record name the model by."""
        return ModelKey(self.bundle.name, self.bundle.version)

    @property
    def demonstration(self) -> bool:
        """Whether the bundle's manifest says it is a demonstration model (trained on synthetic images)."""
        return bool(self.bundle.manifest.get("demonstration"))


def require_models_configured(settings: Settings) -> list[str]:
    """The bundle URIs of LUNGCAM_MODELS; raises NoModelsConfigured when there are none."""
    uris = settings.model_uris()
    if not uris:
        raise NoModelsConfigured(
            "no model bundles configured: set LUNGCAM_MODELS to one or more bundle folders or s3:// prefixes"
        )
    return uris


def load_served_models(settings: Settings) -> list[ServedModel]:
    """Load and verify every bundle in LUNGCAM_MODELS and warm up its compiled pass."""
    uris = require_models_configured(settings)
    served = []
    for uri in uris:
        bundle = load_bundle(uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        gradcam = bundle.gradcam(positive_gradients_only=settings.positive_gradients_only)
        started = time.perf_counter()
        gradcam.warm_up(settings.batch_size)
        log.info("model %s/%s ready (warm-up %.1f s)", bundle.name, bundle.version, time.perf_counter() - started)
        warning = bundle.audit_warning
        if warning:
            log.warning("model %s/%s: %s", bundle.name, bundle.version, warning)
        served.append(ServedModel(bundle, gradcam))
    return served
