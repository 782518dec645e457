"""Shared test setup: headless plotting, quiet TensorFlow, repo paths, XLA without op determinism."""

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def without_op_determinism():
    """Op determinism off for one test, as it was after.

    The training harness turns TensorFlow's op determinism on (``--deterministic``), and earlier
    tests in the process leave it on; while it is on, Keras silently compiles without XLA. A test
    of an XLA-compiled step needs it off. TensorFlow's public API can switch it on only, so this
    uses the module Keras itself reads the flag from.
    """
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    yield
    if was_on:
        tf_config.enable_op_determinism()
