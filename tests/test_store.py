"""Model store: lookup order, offline errors, downloads with checksums, status and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from hybrid.cli import add_models_cli
from hybrid.models import store
from hybrid.models.store import ChecksumError, MissingWeightsError, WeightSpec
from tests.conftest import model_path

PAYLOAD = b"toy weights\n"


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """A registered 'toy' file whose URL is a local file:// source with the right sha256."""
    src = tmp_path / "upstream" / "toy.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    spec = WeightSpec("toy", "toyfam", "sub/toy.bin", url=src.as_uri(),
                      sha256=hashlib.sha256(PAYLOAD).hexdigest(), licence="MIT")
    monkeypatch.setitem(store.REGISTRY, "toy", spec)
    return spec


def put(root, spec, data=PAYLOAD):
    p = root / spec.relpath
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_lookup_order(model_dir, tmp_path, toy):
    cached = put(store.cache_dir(), toy)
    assert store.locate("toy") == cached
    in_model_dir = put(model_dir, toy)
    assert store.locate("toy") == in_model_dir
    explicit = tmp_path / "mine.bin"
    explicit.write_bytes(b"my own fine-tuned file")  # explicit paths are the user's: not checksummed
    assert store.locate("toy", explicit) == explicit
    with pytest.raises(MissingWeightsError, match="does-not-exist.pth"):
        store.locate("toy", tmp_path / "does-not-exist.pth")


def test_offline_missing_says_what_and_where(model_dir):
    with pytest.raises(FileNotFoundError) as info:
        store.locate("pidinet")
    msg = str(info.value)
    assert isinstance(info.value, MissingWeightsError)
    for part in ("table5_pidinet.pth", store.REGISTRY["pidinet"].url, "hybrid models fetch pidinet",
                 str(model_dir / "pidinet" / "table5_pidinet.pth"),
                 str(store.cache_dir() / "pidinet" / "table5_pidinet.pth")):
        assert part in msg


def test_hf_offline_missing(model_dir, monkeypatch):
    monkeypatch.delenv("HYBRID_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as info:
        store.locate("dinov2_small")
    assert "facebook/dinov2-small" in str(info.value)
    assert str(model_dir / "dinov2" / "dinov2-small") in str(info.value)
    snapshot = model_dir / "dinov2" / "dinov2-small"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert store.locate("dinov2_small") == snapshot


def test_download_checks_and_logs(model_dir, monkeypatch, toy, caplog):
    monkeypatch.delenv("HYBRID_OFFLINE")
    with caplog.at_level(logging.INFO, logger="hybrid.models.store"):
        p = store.locate("toy")
    assert p == store.cache_dir() / "toyfam" / "sub" / "toy.bin"
    assert p.read_bytes() == PAYLOAD
    assert list(p.parent.iterdir()) == [p]  # no temp file left
    assert any("downloading toy" in r.getMessage() for r in caplog.records)


def test_checksum_mismatch_deletes_download(model_dir, monkeypatch, toy):
    monkeypatch.delenv("HYBRID_OFFLINE")
    monkeypatch.setitem(store.REGISTRY, "toy", replace(toy, sha256="0" * 64))
    with pytest.raises(ChecksumError, match="sha256"):
        store.locate("toy")
    folder = store.cache_dir() / "toyfam" / "sub"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_hash_prefix_is_accepted(model_dir, monkeypatch, toy):
    monkeypatch.delenv("HYBRID_OFFLINE")
    monkeypatch.setitem(store.REGISTRY, "toy", replace(toy, sha256=toy.sha256[:8]))
    assert store.locate("toy").read_bytes() == PAYLOAD


def test_failed_download_is_missing_weights(model_dir, monkeypatch, toy, tmp_path):
    monkeypatch.delenv("HYBRID_OFFLINE")
    gone = (tmp_path / "nowhere.bin").as_uri()
    monkeypatch.setitem(store.REGISTRY, "toy", replace(toy, url=gone))
    with pytest.raises(MissingWeightsError, match="download failed"):
        store.locate("toy")


def test_found_file_with_wrong_checksum(model_dir, toy):
    bad = put(model_dir, toy, b"corrupted")
    with pytest.raises(ChecksumError, match=str(bad)):
        store.locate("toy")
    assert bad.exists()  # files we did not download are never deleted
    assert store.locate("toy", verify=False) == bad


def test_status_present_and_missing(model_dir):
    rows = {r["name"]: r for r in store.status()}
    assert set(rows) == set(store.REGISTRY)
    assert not rows["pidinet"]["present"]
    p = put(model_dir, store.REGISTRY["pidinet"], b"x")
    rows = {r["name"]: r for r in store.status()}
    assert rows["pidinet"]["present"] and rows["pidinet"]["path"] == str(p)
    assert rows["pidinet"]["source"] == "model_dir"
    assert rows["depth_anything_base"]["licence"] == "CC-BY-NC-4.0"
    table = store.format_status()
    assert "pidinet" in table and "dinov2_giant" in table


def test_cli_list_and_fetch(model_dir, capsys):
    parser = argparse.ArgumentParser(prog="hybrid")
    add_models_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "list"])
    assert args.func(args) == 0
    assert "lpips_vgg" in capsys.readouterr().out
    args = parser.parse_args(["models", "fetch", "pidinet", "vgg19"])
    assert args.names == ["pidinet", "vgg19"]
    with pytest.raises(MissingWeightsError) as info:  # offline: both reported, then the CLI exits non-zero
        args.func(args)
    assert "could not fetch 2 model(s)" in str(info.value) and "vgg19-dcbb9e9d.pth" in str(info.value)


def test_registry_entries_are_complete():
    for spec in store.REGISTRY.values():
        assert spec.licence and spec.family and spec.filename
        if spec.kind == "file":
            assert spec.url.startswith("https://") and not spec.hub_id
        else:
            assert spec.kind == "hf" and spec.hub_id and not spec.url and not spec.sha256
    assert len(store.REGISTRY["pidinet"].sha256) == 64
    with pytest.raises(KeyError, match="unknown model"):
        store.get_spec("resnet1000")


def test_shared_model_dir_layout_works_unchanged(monkeypatch, tmp_path):
    expected = model_path("pidinet", "table5_pidinet.pth")
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HYBRID_OFFLINE", "1")
    assert store.locate("pidinet") == expected  # checksummed on the way (small file)
    assert store.locate("lpips_vgg") == model_path("lpips", "v0.1", "vgg.pth")


def test_hf_download_lands_complete(model_dir, monkeypatch):
    import huggingface_hub

    def fake_snapshot(repo_id, local_dir, **kwargs):
        assert repo_id == "facebook/dinov2-small"
        (Path(local_dir) / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
        return str(local_dir)

    monkeypatch.delenv("HYBRID_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    p = store.locate("dinov2_small")
    assert p == store.cache_dir() / "dinov2" / "dinov2-small" and (p / "config.json").is_file()
    assert [q.name for q in p.parent.iterdir()] == ["dinov2-small"]  # the temp directory was renamed
