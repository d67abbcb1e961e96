"""Zero-shot classification, shared by ``altclip-fast classify`` and the server's ``/v1/classify``:
labels put into a prompt template, probabilities (a softmax over ``logit_scale`` times the cosine of each
image with each label, as CLIP's ``logits_per_image``) and their ranking.

Pure NumPy on L2-normalised rows, so both callers get the same numbers; each caller words its own errors
(``TemplateError`` says what is wrong, the caller names the flag or the field).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TemplateError", "label_texts", "probabilities", "ranking"]


class TemplateError(ValueError):
    """A template without the ``{}`` slot; the message reads on after the flag or field name."""


def label_texts(labels: list[str], template: str | None) -> list[str]:
    """What the text tower embeds: each label, or the template with ``{}`` replaced by the label."""
    if template is None:
        return list(labels)
    if "{}" not in template:
        raise TemplateError(f"must contain {{}} where the label goes, got {template!r}")
    return [template.replace("{}", label) for label in labels]


def probabilities(image_rows: np.ndarray, label_rows: np.ndarray, logit_scale: float) -> np.ndarray:
    """``[images, labels]`` probabilities from L2-normalised float32 rows: softmax over the labels of
    ``logit_scale * cosine`` (shifted by each row's maximum first, so large scales cannot overflow)."""
    logits = logit_scale * image_rows @ label_rows.T
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def ranking(probs: np.ndarray, k: int | None = None) -> list[int]:
    """Label indices of one image's probabilities, most probable first (ties keep label order); the
    first ``k`` when given."""
    order = np.argsort(-probs, kind="stable")
    return order[:k].tolist() if k is not None else order.tolist()
