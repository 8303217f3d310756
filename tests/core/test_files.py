"""sbpet.core.files: atomic writes (a failure leaves the old file whole, no temp file, unique temp
names), deleting only what sbpet wrote, the folder lock, content digests (issue 34)."""

import os
import threading

import pytest

from sbpet.core import files


def test_atomic_write_keeps_the_old_file_on_any_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    files.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as f:
            f.write('{"v": 2')  # half written, then the writer dies
            raise RuntimeError("crash")
    assert path.read_text() == '{"v": 1}'
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash at the rename")))
    with pytest.raises(OSError):
        files.write_text(path, "new")
    assert path.read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    """The study's run cache used a fixed `<file>.partial`: two studies on one --out collided."""
    path = tmp_path / "run.json"
    with files.atomic_write(path) as a, files.atomic_write(path) as b:
        temporary = sorted(p.name for p in tmp_path.iterdir())
        a.write("a")
        b.write("b")
    assert len(temporary) == 2 and all(n.startswith(".run.json.") for n in temporary)  # beside it, distinct
    assert path.read_text() == "a"  # the last to finish wins, whole


def test_remove_owned_names_a_foreign_file_and_deletes_nothing(tmp_path):
    folder = tmp_path / "fit"
    (folder / "checkpoint" / "engine").mkdir(parents=True)
    (folder / "checkpoint" / "fit_state.json").write_text("{}")
    (folder / "checkpoint" / "engine" / "optimizer.bin").write_bytes(b"x")
    allowed = ("checkpoint/", "checkpoint/fit_state.json", "checkpoint/engine/", "checkpoint/engine/optimizer.bin")
    (folder / "checkpoint" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt.*did not write"):
        files.remove_owned(folder, allowed)
    assert (folder / "checkpoint" / "notes.txt").read_text() == "mine"
    (folder / "checkpoint" / "notes.txt").unlink()
    (folder / "checkpoint" / "engine" / "mine").mkdir()  # a foreign folder where a file is expected
    with pytest.raises(ValueError, match="engine/mine/"):
        files.remove_owned(folder, allowed)
    (folder / "checkpoint" / "engine" / "mine").rmdir()
    assert files.remove_owned(folder, allowed) and not folder.exists()
    assert files.remove_owned(folder, allowed) is False  # nothing there
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        files.remove_owned(tmp_path / "file", allowed)


def test_folder_lock_refuses_or_waits(tmp_path):
    target = tmp_path / "g"
    with files.folder_lock(target):
        with pytest.raises(files.LockBusy, match="another process"):
            with files.folder_lock(target, wait=False):
                pass
    order = []
    held = threading.Event()

    def holder():
        with files.folder_lock(target):
            held.set()
            threading.Event().wait(0.3)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with files.folder_lock(target, on_wait=lambda: order.append("waiting")):
        order.append("second")
    thread.join()
    assert order == ["waiting", "first done", "second"]


def test_file_digest_follows_the_content_not_the_path(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"x" * 1000)
    assert files.file_digest(a) == files.file_digest(b)
    b.write_bytes(b"x" * 999 + b"y")
    assert files.file_digest(a) != files.file_digest(b)
    monkeypatch.setattr(files, "_FULL_HASH_LIMIT", 100)  # the sampled path of large files
    big = bytearray(os.urandom(200_000))
    a.write_bytes(bytes(big))
    before = files.file_digest(a)
    big[-5] ^= 1  # the last chunk is always read
    a.write_bytes(bytes(big))
    assert files.file_digest(a) != before
