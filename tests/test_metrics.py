"""core/metrics.py: the most probable classes of a prediction, ties in class order."""
from __future__ import annotations

import numpy as np
import pytest

from cnnlab.core.errors import CnnlabError


def test_most_probable_orders_by_probability_and_keeps_ties_in_class_order():
    from cnnlab.core.metrics import most_probable
    probs = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    first, second = most_probable(probs, ["a", "b", "c"], 2)
    assert [t["class"] for t in first] == ["b", "c"] and first[0]["probability"] == 0.6
    assert [t["class"] for t in second] == ["a", "c"]                     # 0.4 tie: class order
    assert len(most_probable(probs, ["a", "b", "c"], 9)[0]) == 3           # k beyond the classes
    with pytest.raises(CnnlabError, match="--top-k must be at least 1"):
        most_probable(probs, ["a", "b", "c"], 0)
