"""The export cache's admin: entries by last use, pruning by size and age, `mirror-sd cache`."""

import os

import pytest

from mirror_sd.cli import main
from mirror_sd.graphs import export_cache

DAY = 86400.0


def _entry(root, name, mb, days_ago, now):
    d = root / name
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"x" * 1000)
    (d / "model.onnx.data").write_bytes(b"x" * int(mb * 1e6 - 1000))
    os.utime(d, (now - days_ago * DAY, now - days_ago * DAY))
    return d


@pytest.fixture
def cache(tmp_path):
    now = 1_800_000_000.0
    root = tmp_path / "onnx"
    for name, mb, age in (("old-a", 3, 30), ("mid-b", 2, 5), ("new-c", 1, 0.5)):
        _entry(root, name, mb, age, now)
    (root / ".new-d.tmp-123").mkdir()  # a half-written export: never an entry
    (root / "stray").mkdir()  # no model.onnx: not an entry
    return root, now


def test_entries_are_least_recently_used_first(cache):
    root, _ = cache
    got = export_cache.entries(root)
    assert [e.name for e in got] == ["old-a", "mid-b", "new-c"]
    assert [round(e.bytes / 1e6) for e in got] == [3, 2, 1]
    assert export_cache.entries(root / "missing") == []


def test_prune_by_size_removes_the_least_recently_used(cache):
    root, now = cache
    gone = export_cache.prune(root, max_gb=0.0035, now=now)
    assert [e.name for e in gone] == ["old-a"]
    assert sorted(p.name for p in root.iterdir()) == [".new-d.tmp-123", "mid-b", "new-c", "stray"]


def test_prune_by_age_and_dry_run(cache):
    root, now = cache
    listed = export_cache.prune(root, older_than_days=1, dry_run=True, now=now)
    assert [e.name for e in listed] == ["old-a", "mid-b"]
    assert (root / "old-a").is_dir()  # dry run: nothing removed
    assert [e.name for e in export_cache.prune(root, older_than_days=1, now=now)] == [
        "old-a",
        "mid-b",
    ]
    assert [e.name for e in export_cache.entries(root)] == ["new-c"]


def test_prune_needs_a_limit(cache):
    root, _ = cache
    with pytest.raises(ValueError, match="prune needs a limit"):
        export_cache.prune(root)
    with pytest.raises(ValueError, match=">= 0"):
        export_cache.prune(root, max_gb=-1)


def test_cli_list_and_prune(cache, capsys):
    root, _ = cache
    assert main(["cache", "list", "--onnx-dir", str(root)]) == 0
    assert "in 3 entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--onnx-dir", str(root), "--max-gb", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would remove") and "old-a" in out and (root / "old-a").is_dir()
    assert main(["cache", "prune", "--onnx-dir", str(root)]) == 2
    assert "prune needs a limit" in capsys.readouterr().err
