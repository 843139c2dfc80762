"""Test-wide settings: nothing may touch the network, and nothing writes outside tmp dirs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session", autouse=True)
def capvqa_home(tmp_path_factory: pytest.TempPathFactory):
    """A private CAPVQA_HOME per test session: the tiny zoo is built once there, and the default
    cache never lands in the user's home. Subprocesses (CLI tests) inherit it."""
    home = tmp_path_factory.mktemp("capvqa-home")
    previous = os.environ.get("CAPVQA_HOME")
    os.environ["CAPVQA_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("CAPVQA_HOME", None)
    else:
        os.environ["CAPVQA_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_zoo(capvqa_home):
    """{role: folder} of the offline tiny models, built once per session through the normal path."""
    from capvqa.synthetic.tiny_zoo import ensure_tiny_zoo

    return ensure_tiny_zoo()


@pytest.fixture(scope="session")
def cpu_runtime():
    from capvqa.engine.runtime import make_runtime

    return make_runtime("cpu")


@pytest.fixture
def torch_load_calls(monkeypatch):
    """The keyword arguments of every ``torch.load`` call made during the test (to check weights_only)."""
    import torch

    calls: list[dict] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    return calls
