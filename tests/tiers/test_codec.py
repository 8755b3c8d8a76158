"""Page codec: exact round trips, the compression KV pages get, and writes straight into the slot."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zstandard

from polarkvd.tiers.codec import Codec, GroupedBlob, checksum, decode_into, encode, encode_groups


def bf16_kv(n_values: int, seed: int = 0) -> bytes:
    """KV-like bf16: normal float32 values truncated to their top 16 bits."""
    f = np.random.default_rng(seed).standard_normal(n_values, dtype=np.float32) * 0.5
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def roundtrip(data: bytes, itemsize: int) -> tuple[int, bytes, bytes]:
    codec, blob = encode(data, itemsize)
    out = bytearray(len(data))
    decode_into(codec, blob, memoryview(out), itemsize)
    return codec, blob, bytes(out)


SAMPLES = {
    "empty": b"",
    "one": b"\x07",
    "odd-bf16": bf16_kv(1001)[:2001],
    "bf16": bf16_kv(4096),
    "zeros": bytes(12_288),
    "random": np.random.default_rng(1).bytes(10_000),
    "text": b"the same prefix again and again " * 300 + b"!",
}


@pytest.mark.parametrize("itemsize", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_is_exact(name: str, itemsize: int) -> None:
    data = SAMPLES[name]
    _, blob, out = roundtrip(data, itemsize)
    assert out == data
    assert len(blob) <= len(data)


def test_empty_page_is_raw_and_empty() -> None:
    assert encode(b"", 2) == (Codec.RAW, b"")
    decode_into(Codec.RAW, b"", memoryview(bytearray()), 2)


def test_incompressible_page_is_stored_raw() -> None:
    data = SAMPLES["random"]
    codec, blob, _ = roundtrip(data, 2)
    assert codec == Codec.RAW
    assert blob == data


def test_bf16_kv_compresses_better_with_planes_than_plain_zstd() -> None:
    data = bf16_kv(512 * 1024)  # a 1 MiB page
    codec, blob, out = roundtrip(data, 2)
    plain = zstandard.ZstdCompressor(level=1).compress(data)
    assert out == data
    assert codec == Codec.PLANES
    ratio = len(data) / len(blob)
    assert ratio >= 1.4, ratio
    assert len(blob) < len(plain) * 0.95, (len(blob), len(plain))


def test_fp32_with_short_mantissas_compresses_its_zero_planes() -> None:
    # bf16 values upcast to fp32: the two low byte planes are all zeros.
    data = np.frombuffer(bf16_kv(64 * 1024), dtype=np.uint16).astype(np.uint32) << 16
    raw = data.astype("<u4").tobytes()
    codec, blob, out = roundtrip(raw, 4)
    assert out == raw
    assert codec == Codec.PLANES
    assert len(raw) / len(blob) > 2.5


def fp32_kv(n_values: int, seed: int = 0) -> bytes:
    """KV-like fp32: full-precision normal values (only the sign/exponent byte plane compresses)."""
    return (np.random.default_rng(seed).standard_normal(n_values, dtype=np.float32) * 0.5).tobytes()


def test_a_page_that_compresses_less_than_min_ratio_is_stored_raw() -> None:
    fp32 = fp32_kv(256 * 1024)  # 1 MiB
    codec, blob = encode(fp32, 4)  # compress whenever smaller: planes, ~1.2x
    assert codec == Codec.PLANES and 1.1 < len(fp32) / len(blob) < 1.25
    codec, blob = encode(fp32, 4, min_ratio=1.25)  # not worth a decompression on every read
    assert codec == Codec.RAW and blob == fp32
    bf16 = bf16_kv(512 * 1024)  # ~1.46x: stays compressed
    assert encode(bf16, 2, min_ratio=1.25)[0] == Codec.PLANES
    text = SAMPLES["text"]  # plain zstd follows the same rule
    assert encode(text, 1, min_ratio=1.25)[0] == Codec.ZSTD
    assert encode(text, 1, min_ratio=10_000.0)[0] == Codec.RAW
    # layer groups decide range by range, and every range still verifies
    codec, blob = encode_groups(fp32 + bf16[: len(fp32)], 4, [len(fp32), 2 * len(fp32)], min_ratio=1.25)
    grouped = GroupedBlob(blob, 2 * len(fp32))
    assert [r.codec for r in grouped.ranges] == [Codec.RAW, Codec.PLANES]
    out = bytearray(2 * len(fp32))
    for i in range(2):
        grouped.decode(i, memoryview(out), 4)
    assert bytes(out) == fp32 + bf16[: len(fp32)]


def test_non_multiple_length_uses_plain_zstd() -> None:
    data = SAMPLES["text"]  # odd length, compressible
    codec, _, out = roundtrip(data, 2)
    assert codec == Codec.ZSTD
    assert out == data


def test_decode_writes_into_a_slice_of_a_larger_arena() -> None:
    data = bf16_kv(8192)
    codec, blob = encode(data, 2)
    arena = np.full(3 * len(data), 0xAB, dtype=np.uint8)
    slot = memoryview(arena)[len(data) : 2 * len(data)]
    decode_into(codec, blob, slot, 2)
    assert arena[len(data) : 2 * len(data)].tobytes() == data
    assert (arena[: len(data)] == 0xAB).all() and (arena[2 * len(data) :] == 0xAB).all()


def test_decode_into_a_buffer_of_the_wrong_size_fails() -> None:
    data = bf16_kv(1024)
    for codec_id, blob in (encode(data, 2), encode(SAMPLES["text"], 1)):
        with pytest.raises(ValueError):
            decode_into(codec_id, blob, memoryview(bytearray(len(data) + 2)), 2)


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_blob_fails_to_decode(cut: int) -> None:
    data = bf16_kv(8192)
    codec, blob = encode(data, 2)
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_into(codec, blob[:-cut], memoryview(bytearray(len(data))), 2)


def test_unknown_codec_id_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_into(99, b"xx", memoryview(bytearray(2)), 2)


def test_codecs_are_exact_from_four_threads() -> None:
    pages = [bf16_kv(4096 + 17 * i, seed=i) for i in range(8)]
    errors: list[str] = []

    def work(t: int) -> None:
        for r in range(20):
            data = pages[(t + r) % len(pages)]
            _, _, out = roundtrip(data, 2)
            if out != data:
                errors.append(f"thread {t} round {r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


def test_checksum_is_stable_across_processes_and_buffer_types() -> None:
    # A fixed value: pages written by one process (or host) are verified by another.
    assert checksum(b"polarkvd page") == 0x1E9FD3437F5D8220
    data = bf16_kv(100)
    assert checksum(memoryview(data)) == checksum(data) == checksum(bytearray(data))


def test_layer_groups_decode_and_verify_one_at_a_time() -> None:
    page = bf16_kv(4 * 4096)  # 4 "layers" of 8 KiB
    ends = [8192, 16384, 24576, 32768]
    codec_id, blob = encode_groups(page, 2, ends)
    assert codec_id == Codec.GROUPS and len(blob) < len(page)  # each group still compressed
    grouped = GroupedBlob(blob, len(page))
    assert [(lo, hi) for lo, hi, *_ in grouped.ranges] == list(zip([0, *ends[:-1]], ends))
    out = memoryview(bytearray(len(page)))
    for i in (2, 0, 3, 1):  # any order; each lands in its place
        grouped.decode(i, out, 2)
    assert bytes(out) == page
    whole = memoryview(bytearray(len(page)))
    decode_into(codec_id, blob, whole, 2)  # a reader that wants the whole page at once
    assert bytes(whole) == page
    # a flipped byte in group 1's blob: groups 0, 2 and 3 still verify, group 1 does not
    bad = bytearray(blob)
    lo_blob = grouped.ranges[1][3]
    bad[lo_blob + 5] ^= 0xFF
    broken = GroupedBlob(bytes(bad), len(page))
    for i in (0, 2, 3):
        broken.decode(i, out, 2)
    with pytest.raises((ValueError, zstandard.ZstdError)):
        broken.decode(1, out, 2)


def test_group_ends_must_cut_the_page() -> None:
    page = bytes(1000)
    for ends in ([500], [500, 900], [600, 500, 1000], []):  # short of the end, not increasing, none
        with pytest.raises(ValueError):
            encode_groups(page, 2, ends)
    assert encode_groups(page, 2, [1000]) == encode(page, 2)  # one group: the plain encoding
