"""Doctests of the package docstrings: ``torch`` is in their namespace and every example starts from seed 0."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
