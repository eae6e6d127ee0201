"""Core tests run tiny models and tiny faiss problems: op overhead dominates, and a second OpenMP thread
only adds sync cost (spin-waiting barriers) on a busy two-core machine. One torch thread and one faiss
thread per test, restored afterwards."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    torch = sys.modules.get("torch")  # only tests that imported torch pay for it
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    faiss = sys.modules.get("faiss")  # only tests that imported faiss
    if faiss is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
