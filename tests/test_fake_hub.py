"""The fake Hugging Face Hub (tests/fixtures/fake_hub.py) serves the real huggingface_hub client, in
this process and in child processes: downloads, a download stopped midway, a missing repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from tests.fixtures.fake_hub import FakeHub

WANTED = ["config.json", "tokenizer*", "*.safetensors"]
DOWNLOADED = ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    (folder / "original").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "model.safetensors").write_bytes(os.urandom(100_000))
    (folder / "original" / "x.bin").write_bytes(os.urandom(1000))
    return folder


def test_snapshot_download(fake_hub: FakeHub, model_folder, tmp_path):
    commit = fake_hub.add("org/x", model_folder)
    for revision in ("main", commit):
        snapshot = Path(snapshot_download("org/x", revision=revision, cache_dir=tmp_path / "cache",
                                          allow_patterns=WANTED, ignore_patterns=["*/*"]))
        assert snapshot.name == commit
        assert sorted(p.name for p in snapshot.iterdir()) == DOWNLOADED
        for name in DOWNLOADED:
            assert (snapshot / name).read_bytes() == (model_folder / name).read_bytes()
    assert not any("original" in request for request in fake_hub.requests), fake_hub.requests


def test_hf_hub_download_of_a_file_in_a_subfolder(fake_hub: FakeHub, model_folder, tmp_path):
    commit = fake_hub.add("org/x", model_folder)
    path = Path(hf_hub_download("org/x", "original/x.bin", revision="main", cache_dir=tmp_path / "cache"))
    assert path.parent.parent.name == commit
    assert path.read_bytes() == (model_folder / "original" / "x.bin").read_bytes()


def test_a_child_process_downloads_from_it(fake_hub: FakeHub, model_folder, tmp_path):
    commit = fake_hub.add("org/x", model_folder)
    code = ("from huggingface_hub import snapshot_download; "
            f"print(snapshot_download('org/x', cache_dir={str(tmp_path / 'cache')!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stderr, fake_hub.requests)
    snapshot = Path(done.stdout.strip())
    assert snapshot.name == commit
    for name in ("config.json", "original/x.bin"):
        assert (snapshot / name).read_bytes() == (model_folder / name).read_bytes()


def test_it_sees_a_killed_downloader_go(fake_hub: FakeHub, model_folder, tmp_path):
    fake_hub.add("org/x", model_folder)
    fake_hub.trickle("org/x", "model.safetensors")
    code = ("from huggingface_hub import hf_hub_download; "
            f"hf_hub_download('org/x', 'model.safetensors', cache_dir={str(tmp_path / 'cache')!r})")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert fake_hub.started.wait(30), fake_hub.requests
        assert child.poll() is None
        assert not fake_hub.disconnected.is_set()
    finally:
        child.kill()
        child.wait()
    assert fake_hub.disconnected.wait(10), fake_hub.requests


def test_an_unknown_repository(fake_hub: FakeHub, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", cache_dir=tmp_path / "cache")


def test_a_file_of_a_dataset_repository(fake_hub: FakeHub, tmp_path):
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "valid.jsonl").write_text('{"prompt": "a", "reference": "b"}\n')
    commit = fake_hub.add("org/tasks", folder, repo_type="dataset")
    path = Path(hf_hub_download("org/tasks", "data/valid.jsonl", repo_type="dataset", cache_dir=tmp_path / "cache"))
    assert path.read_text() == (folder / "data" / "valid.jsonl").read_text() and path.parent.parent.name == commit
    assert "HEAD /datasets/org/tasks/resolve/main/data/valid.jsonl" in fake_hub.requests
    with pytest.raises(RepositoryNotFoundError):  # a dataset is not a model of the same name
        hf_hub_download("org/tasks", "data/valid.jsonl", cache_dir=tmp_path / "cache")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/tasks", "data/test.jsonl", repo_type="dataset", cache_dir=tmp_path / "cache")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/tasks", "data/valid.jsonl", repo_type="dataset", revision="v2", cache_dir=tmp_path / "cache")
    assert [p.rfilename for p in _dataset_info("org/tasks").siblings] == ["data/valid.jsonl"]


def _dataset_info(repo: str):
    from huggingface_hub import HfApi

    return HfApi().dataset_info(repo)
