"""Fitness hooks that tests load by ``module:function``, as a user would with --fitness."""

import numpy as np


def logit_distance(outputs, teacher, labels):
    """Mean absolute logit error against the teacher (lower is better)."""
    return float(np.mean(np.abs(outputs[0] - teacher[0])))


def returns_nan(outputs, teacher, labels):
    return float("nan")


def returns_text(outputs, teacher, labels):
    return "good"


def raises(outputs, teacher, labels):
    raise KeyError("no such layer 'head'")


def exits(outputs, teacher, labels):
    import sys

    sys.exit(0)
