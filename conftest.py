"""Shared by every test: deterministic cuBLAS allowed (set before CUDA starts), and the doctests of the package
docstrings find ``torch`` in their namespace and start from seed 0."""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch.use_deterministic_algorithms on CUDA needs it

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
