"""Leave-one-source-out folds on both classes: hold out a (covid source, normal source) pair.

A model is judged on hospitals it never saw, so validation must hold out whole sources of BOTH
classes: with only the covid side held out, the test normals share a hospital with the training
normals and every model looks better than it is. For each pair (covid source C, normal source N):

- test: the covid images of C and the normal images of N;
- train: every image whose source is neither C nor N (a source that gives both classes, such as a
  repository redistributing covid and NIH films, leaves training entirely when either is held out).

So no source ever appears on both sides of a fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.datasets import Sample


@dataclass(frozen=True)
class SourcePairFold:
    """One fold: the held-out pair and the two sides."""

    covid_source: str
    normal_source: str
    train: list[Sample]
    test: list[Sample]

    @property
    def name(self) -> str:
        """ "covid-source-owner x normal-source-owner", short enough for a table."""
        return f"{self.covid_source.split('/')[0]} x {self.normal_source.split('/')[0]}"


def sources_by_class(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """{label: sorted sources that give images of that label}."""
    out: dict[str, set[str]] = {}
    for sample in samples:
        # An image of unknown source is never held out (it trains every fold's head).
        if sample.source is not None:
            out.setdefault(sample.label, set()).add(sample.source)
    return {label: sorted(sources) for label, sources in out.items()}


def source_pair_folds(samples: Sequence[Sample], *, min_per_class: int = 1) -> list[SourcePairFold]:
    """Every (covid source, normal source) fold whose training part still has both classes."""
    by_class = sources_by_class(samples)
    folds = []
    for covid_source in by_class.get("covid", []):
        for normal_source in by_class.get("normal", []):
            held_out = {covid_source, normal_source}
            test = [
                s
                for s in samples
                if (s.label == "covid" and s.source == covid_source)
                or (s.label == "normal" and s.source == normal_source)
            ]
            train = [s for s in samples if s.source not in held_out]
            train_labels = {s.label for s in train}
            test_counts = [sum(s.label == label for s in test) for label in ("covid", "normal")]
            if train_labels >= {"covid", "normal"} and min(test_counts) >= min_per_class:
                folds.append(SourcePairFold(covid_source, normal_source, train, test))
    return folds
