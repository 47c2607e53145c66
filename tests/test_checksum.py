import hashlib
import os

from infra.checksum import BLOCK_BYTES, sha256_file


def test_segment_digest_is_the_blocks_digests_in_order_and_any_changed_byte_changes_it(tmp_path):
    data = os.urandom(2 * BLOCK_BYTES + 5)  # two whole blocks and a short last one
    path = tmp_path / "seg.mp4"
    path.write_bytes(data)
    expected = hashlib.sha256(f"{len(data)}:{BLOCK_BYTES}".encode())
    for o in range(0, len(data), BLOCK_BYTES):
        expected.update(hashlib.sha256(data[o:o + BLOCK_BYTES]).digest())
    digest = sha256_file(str(path))
    assert digest == expected.hexdigest() == sha256_file(str(path), threads=1)
    for at in (0, BLOCK_BYTES - 1, BLOCK_BYTES, len(data) - 1):
        flipped = bytearray(data)
        flipped[at] ^= 1
        path.write_bytes(bytes(flipped))
        assert sha256_file(str(path)) != digest, at
    path.write_bytes(data[:-1])  # a truncated copy
    assert sha256_file(str(path)) != digest
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(str(empty)) == hashlib.sha256(f"0:{BLOCK_BYTES}".encode()).hexdigest()
