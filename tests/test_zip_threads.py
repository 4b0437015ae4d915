"""The decoding threads never share a ZipFile: on Python 3.12 and later, threads reading one shared
ZipFile race and get corrupt members (on the 16-core GPU machine, with Python 3.12.3, byol.py's default
run stopped at "cannot read image ...zip:... (invalid stored block lengths)"). The race does not show
on Python 3.11, so the test watches which handle each thread reads through."""

import threading
import zipfile

import numpy as np
import pytest
import torch

from tiny_data import MODULES, SCRIPTS, jpeg_bytes, random_image


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_decoding_thread_reads_its_own_zipfile(script, tmp_path, monkeypatch):
    module = MODULES[script]
    rng = np.random.default_rng(0)
    archive = tmp_path / "images.zip"
    images = [random_image(rng) for _ in range(64)]
    with zipfile.ZipFile(archive, "w") as zf:
        for i, img in enumerate(images):
            zf.writestr(f"img{i:02d}.jpg", jpeg_bytes(img))
    readers, lock = {}, threading.Lock()
    start = threading.Barrier(4, timeout=10)  # the first four reads wait for each other: four threads at once
    calls = []
    real_read = zipfile.ZipFile.read

    def watched_read(self, name, pwd=None):
        with lock:
            calls.append(name)
            first = len(calls) <= 4
            readers.setdefault(id(self), set()).add(threading.get_ident())
        if first:
            start.wait()
        return real_read(self, name, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "read", watched_read)
    names = [f"img{i:02d}.jpg" for i in range(64)]
    sources = module.zip_sources(archive, names)
    decoded = module.decode_all(sources, 24, workers=4)
    threads = set().union(*readers.values())
    assert len(threads) >= 2, "the pool should have used several threads"
    assert all(len(ids) == 1 for ids in readers.values()), f"a ZipFile read from several threads: {readers}"
    reference = torch.stack([module.decode_image(lambda b=jpeg_bytes(img): b, "x", 24) for img in images])
    assert torch.equal(decoded, reference)
