"""Zero-shot alone: templates, the probabilities against a hand-computed softmax, the ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from altclip_fast.apps import zeroshot


def test_label_texts():
    assert zeroshot.label_texts(["cat", "一只狗"], None) == ["cat", "一只狗"]
    assert zeroshot.label_texts(["cat"], "a {} and a {}") == ["a cat and a cat"]
    with pytest.raises(zeroshot.TemplateError) as caught:
        zeroshot.label_texts(["cat"], "a photo")
    assert str(caught.value) == "must contain {} where the label goes, got 'a photo'"


def test_probabilities_are_the_softmax_of_scaled_cosines():
    # Unit rows with cosines chosen by hand: image 0 against the labels is 1, 0 and -1; image 1 is 0.6, 0.8, 0.
    labels = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0]], dtype=np.float32)
    images = np.array([[1, 0, 0], [0.6, 0.8, 0]], dtype=np.float32)
    scale = 2.0
    e = math.exp
    expected = [
        [e(2) / (e(2) + e(0) + e(-2)), e(0) / (e(2) + e(0) + e(-2)), e(-2) / (e(2) + e(0) + e(-2))],
        [e(1.2) / (e(1.2) + e(1.6) + e(-1.2)), e(1.6) / (e(1.2) + e(1.6) + e(-1.2)), e(-1.2) / (e(1.2) + e(1.6) + e(-1.2))],
    ]
    probs = zeroshot.probabilities(images, labels, scale)
    assert probs.dtype == np.float32 and probs.shape == (2, 3)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)


def test_a_large_scale_does_not_overflow():
    labels = np.eye(2, dtype=np.float32)
    probs = zeroshot.probabilities(np.array([[1, 0]], dtype=np.float32), labels, 1e4)
    assert np.isfinite(probs).all() and probs[0, 0] == 1.0


def test_ranking_is_most_probable_first_and_stable_on_ties():
    row = np.array([0.1, 0.4, 0.1, 0.4], dtype=np.float32)
    assert zeroshot.ranking(row) == [1, 3, 0, 2]
    assert zeroshot.ranking(row, 3) == [1, 3, 0]
    assert zeroshot.ranking(row, 10) == [1, 3, 0, 2]
