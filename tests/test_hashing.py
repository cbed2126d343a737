"""Canonical hashing: type tags, key stability, and the stat-keyed digest memo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rlhf_spec.files import sha256_file
from rlhf_spec.hashing import HashState, canonical_json, hash_json


def test_types_never_collide():
    values = [1, 1.0, "1", True, None, [1], {"a": 1}, {"a": "1"}, 0, False, ""]
    digests = {hash_json(v) for v in values}
    assert len(digests) == len(values)


def test_key_order_does_not_matter_but_list_order_does():
    assert hash_json({"a": 1, "b": 2}) == hash_json({"b": 2, "a": 1})
    assert hash_json([1, 2]) != hash_json([2, 1])


def test_floats_hash_exactly():
    assert hash_json(0.1 + 0.2) != hash_json(0.3)
    assert hash_json(1e6) == hash_json(1000000.0)


def test_unhashable_values_are_rejected():
    with pytest.raises(TypeError):
        canonical_json({"a": {1, 2}})
    with pytest.raises(TypeError):
        canonical_json({1: "x"})


def test_stable_across_processes():
    code = "from rlhf_spec.hashing import hash_json; print(hash_json({'b': [1, 2.5, 'x'], 'a': None}))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(s))).stdout for s in (1, 2)}
    assert len(outs) == 1 and outs.pop().strip() == hash_json({"b": [1, 2.5, "x"], "a": None})


def test_hash_state_memo_and_change_detection(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    st = HashState(tmp_path / "state")
    d1 = st.file_digest(f)
    assert d1 == sha256_file(f)
    # a fresh memo object serves the stored digest without reading the file: change the bytes in place but
    # keep size, mtime and inode, and the memo still answers the old digest (a rehash would not)
    st0 = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"c")
    os.utime(f, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    assert sha256_file(f) != d1
    assert HashState(tmp_path / "state").file_digest(f) == d1
    # a changed stat (mtime here) is noticed: the file is hashed again
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(1, 1))
    assert HashState(tmp_path / "state").file_digest(f) == sha256_file(f) != d1


def test_tree_digest_depends_on_names_and_content(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "x.txt").write_text("1")
    (a / "y.txt").write_text("2")
    st = HashState(None)
    d = st.tree_digest(a)
    (a / "y.txt").rename(a / "z.txt")
    assert HashState(None).tree_digest(a) != d
    with pytest.raises(FileNotFoundError):
        st.tree_digest(tmp_path / "missing")
