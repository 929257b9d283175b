import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

WORDS = "a red green blue circle square triangle and does this image show is there here yes no describe".split()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads slow down badly on a shared CPU. Use it
    in a module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_janus():
    """A fresh random tiny Janus model and processor (32x32 images, 4x4 image tokens)."""
    from srum_trl.models.janus import build_tiny_janus

    torch.manual_seed(0)
    return build_tiny_janus(WORDS, seed=0)


@pytest.fixture
def tiny_backend(tiny_janus):
    from srum_trl.models import JanusBackend

    model, processor = tiny_janus
    return JanusBackend(model, processor)


@pytest.fixture
def tiny_checkpoint(tiny_backend, tmp_path):
    """The tiny model saved as a checkpoint folder."""
    path = tmp_path / "tiny-janus"
    tiny_backend.save_pretrained(str(path))
    return str(path)
