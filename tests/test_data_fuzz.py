"""Fuzz-style test of the shard pipeline: hundreds of seeded bad samples mixed with good ones.

No exception may escape; every bad sample is counted once, under the reason its kind calls for; every
good sample arrives exactly once. What a sample is:
  - one key's files in a row in a tar (webdataset grouping); a bad sample counts 1 under its reason;
  - a repeated file name inside one sample (KEY.mp4 twice) counts 1 `bad_tar_entry`: the repeat is
    dropped and the sample arrives with its first copy;
  - a key that comes again later in the same shard (other keys' files between) counts 1
    `duplicate_key` per repeat; its first occurrence arrives;
  - a truncated tar counts 1 `truncated_tar` for its tail (the member cut and anything after it, which
    cannot be seen); every sample whose video member lies wholly before the cut arrives.
Damaged mp4s whose fate depends on the decoder (bytes flipped or overwritten mid-file, cut
anywhere, random bytes, a handler name that is not UTF-8) are judged by `decode_clip` on the payload
alone: what it raises gives the reason, and a payload it decodes must arrive. With this PyAV a
non-UTF-8 name raises UnicodeDecodeError (counted as corrupt_video). Some damaged payloads decode to
frames that differ from the original without any error (H.264 error concealment): undetectable
here, they arrive; see test_decoder_judged_kinds_are_counted_or_decode.
"""

import io
import json
import re
import struct
import tarfile
from collections import Counter
from pathlib import Path
from random import Random

import numpy as np
import pytest
import torch
from PIL import Image

from data import SkippedSamples, build_dataloader, build_video_dataset, video_to_clip_tensor
from data.demo import encode_mp4
from data.pipeline import SKIP_REASONS
from data.video import VideoDecodeError, VideoTooShortError, decode_clip

NUM_FRAMES, RESOLUTION = 9, 32
SEED = 20240611
GOOD_PER_MIXED_SHARD = 12
# Bad samples per kind, over all mixed shards (kinds with a fixed reason, then decoder-judged ones).
BAD_KINDS = {
    "mp4_cut_before_moov": 24,
    "mp4_header_destroyed": 24,
    "zero_bytes": 12,
    "text_payload": 12,
    "png_payload": 12,
    "missing_video": 16,
    "bad_json": 24,
    "too_short": 16,
    "duplicate_member": 12,
    "duplicate_key": 12,
    "mp4_cut_anywhere": 24,
    "mp4_bytes_flipped": 40,
    "mp4_bytes_overwritten": 40,
    "random_bytes": 20,
    "mp4_metadata_not_utf8": 12,  # PyAV raises UnicodeDecodeError reading the handler name
}
FIXED_REASON = {
    "mp4_cut_before_moov": "corrupt_video",  # no moov box: nothing to demux
    "mp4_header_destroyed": "corrupt_video",
    "zero_bytes": "corrupt_video",
    "text_payload": "corrupt_video",
    "png_payload": "video_too_short",  # a still image decodes as a one-frame video
    "missing_video": "missing_video",
    "bad_json": "bad_json",
    "too_short": "video_too_short",
    "duplicate_member": "bad_tar_entry",
    "duplicate_key": "duplicate_key",
}
BAD_JSONS = [
    b"{not json",
    b'{"frames": 12',
    b"\xff\xfe{}",
    b"",
    b"[" * 100_000,  # RecursionError in json
    b'{"frames": 12}\x00garbage',
    '{"caption": "caf\xe9"}'.encode("latin-1"),
]
# Parseable json that is no use for the frame count: the sample is fine, the count is ignored.
ODD_JSONS = [b"null", b"[1, 2]", b'"text"', b'{"frames": "many"}', b'{"frames": Infinity}', b'{"frames": -3}']
ODD_JSONS += [
    b'{"frames": 1e400}',
    b'{"video_metadata": {"streams": [{"codec_type": "video", "nb_frames": "x"}]}}',
]
MIXED_SHARDS = 6  # plus 3 truncated ones; with 2 workers each gets 4 or 5 shards


def moving_video(frames: int, seed: int) -> bytes:
    """32x32 H.264 mp4 of a smooth random pattern drifting sideways."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 4, 4, generator=g) * 255
    base = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear")[0].permute(1, 2, 0)
    video = torch.stack([torch.roll(base, shifts=2 * i, dims=1) for i in range(frames)])
    return encode_mp4(video.round().to(torch.uint8).contiguous(), fps=8)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def moov_offset(mp4: bytes) -> int:
    """Offset of the top-level moov box (libx264 via PyAV writes it after mdat)."""
    offset = 0
    while offset + 8 <= len(mp4):
        size, kind = struct.unpack(">I4s", mp4[offset : offset + 8])
        if kind == b"moov":
            return offset
        if size < 8:
            break
        offset += size
    raise AssertionError("no moov box")


def judged_reason(payload: bytes) -> str | None:
    """What the decoder makes of a payload on its own: a skip reason, or None when it decodes."""
    try:
        decode_clip(payload, NUM_FRAMES, start=0)
    except VideoTooShortError:
        return "video_too_short"
    except (VideoDecodeError, UnicodeDecodeError):
        return "corrupt_video"
    return None


def clip_of(payload: bytes) -> torch.Tensor:
    return video_to_clip_tensor(decode_clip(payload, NUM_FRAMES, start=0), RESOLUTION, train=False)


class Corpus:
    """Seeded shards and the ground truth: good keys (with their video payloads) and bad counts."""

    def __init__(self, directory: Path) -> None:
        self.rng = Random(SEED)
        self.goods = [moving_video(12, seed) for seed in range(3)]
        self.short = moving_video(5, 99)
        self.png = png_bytes()
        self.next_key = 0
        self.good: dict[tuple[str, str], bytes] = {}  # (shard, key) -> the video payload that must arrive
        self.bad: Counter[str] = Counter()  # reason -> count
        self.bad_by_kind: Counter[str] = Counter()
        self.bad_by_shard: Counter[str] = Counter()
        self.reference_clips = [clip_of(video) for video in self.goods]
        self.decoded: Counter[tuple[str, str]] = Counter()  # (kind, harmless | silently_damaged)
        self.paths: list[Path] = []
        kinds = [kind for kind, n in BAD_KINDS.items() for _ in range(n)]
        self.rng.shuffle(kinds)
        per_shard = [kinds[i::MIXED_SHARDS] for i in range(MIXED_SHARDS)]
        names = [f"shard-{i:02d}.tar" for i in range(MIXED_SHARDS + 3)]
        # Truncated shards at 1, 3, 4: never a worker's last shard (2 workers take every other one),
        # whose skips after its last clip no batch could carry.
        truncated = {names[1]: "mid_video", names[3]: "mid_header", names[4]: "mid_json"}
        mixed = iter(per_shard)
        for name in names:
            path = directory / name
            if name in truncated:
                self._write_truncated(path, truncated[name])
            else:
                self._write_mixed(path, next(mixed))
            self.paths.append(path)

    def key(self) -> str:
        self.next_key += 1
        return f"{self.next_key:09d}"

    def good_sample(self, shard: str) -> list[tuple[str, bytes]]:
        key, video = self.key(), self.rng.choice(self.goods)
        self.good[(shard, key)] = video
        members = [(f"{key}.mp4", video)]
        roll = self.rng.random()
        if roll < 0.6:
            members.append((f"{key}.json", json.dumps({"frames": 12, "key": key}).encode()))
        elif roll < 0.8:
            members.append((f"{key}.json", self.rng.choice(ODD_JSONS)))
        if self.rng.random() < 0.7:
            members.append((f"{key}.txt", b"a caption"))
        return members

    def count_bad(self, shard: str, kind: str, reason: str) -> None:
        self.bad[reason] += 1
        self.bad_by_kind[kind] += 1
        self.bad_by_shard[shard] += 1

    def damaged_mp4(self, kind: str) -> bytes:
        rng, original = self.rng, self.rng.choice(self.goods)
        data = bytearray(original)
        size = len(data)
        if kind == "mp4_cut_before_moov":
            return original[: rng.randrange(0, moov_offset(original) + 1)]
        if kind == "mp4_cut_anywhere":
            return original[: rng.randrange(1, size)]
        if kind == "mp4_metadata_not_utf8":
            at = original.index(b"VideoHandler")  # the hdlr box's name string
            data[at : at + 12] = bytes(rng.randrange(0x80, 0x100) for _ in range(12))
        elif kind == "mp4_header_destroyed":
            width = rng.randint(8, 64)
            data[:width] = rng.randbytes(width)
        elif kind == "mp4_bytes_flipped":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(size // 4, 3 * size // 4)] ^= 1 << rng.randrange(8)
        elif kind == "mp4_bytes_overwritten":
            at, width = rng.randrange(size // 4, 3 * size // 4), rng.randint(4, 64)
            data[at : at + width] = rng.randbytes(len(data[at : at + width]))
        return bytes(data)

    def bad_sample(self, shard: str, kind: str, members: list[list[tuple[str, bytes]]]) -> None:
        """Append the sample(s) of one bad `kind` to `members` (a list of samples' member lists)."""
        key = self.key()
        meta = (f"{key}.json", json.dumps({"frames": 12}).encode())
        if kind == "duplicate_member":
            # The repeat is junk: the sample must arrive with its first copy.
            sample = self.good_sample(shard)
            sample.insert(self.rng.randint(1, len(sample)), (sample[0][0], b"junk, not the first copy"))
            members.append(sample)
            self.count_bad(shard, kind, FIXED_REASON[kind])
            return
        if kind == "duplicate_key":
            # A good sample, another sample, then the first key again (a valid video: still a repeat).
            first = self.good_sample(shard)
            members += [first, self.good_sample(shard), [(first[0][0], self.rng.choice(self.goods))]]
            self.count_bad(shard, kind, FIXED_REASON[kind])
            return
        if kind == "missing_video":
            sample = [meta, (f"{key}.txt", b"caption only")][: self.rng.randint(1, 2)]
        elif kind == "bad_json":
            sample = [
                (f"{key}.mp4", self.rng.choice(self.goods)),
                (f"{key}.json", self.rng.choice(BAD_JSONS)),
            ]
        elif kind == "too_short":
            sample = [(f"{key}.mp4", self.short), meta]
        elif kind == "zero_bytes":
            sample = [(f"{key}.mp4", b""), meta]
        elif kind == "text_payload":
            sample = [(f"{key}.mp4", b"This is a caption, not a video.\n" * self.rng.randint(1, 40))]
        elif kind == "png_payload":
            sample = [(f"{key}.mp4", self.png), meta]
        elif kind == "random_bytes":
            sample = [(f"{key}.mp4", self.rng.randbytes(self.rng.randint(1, 4000)))]
        else:
            sample = [(f"{key}.mp4", self.damaged_mp4(kind)), meta]
        reason = FIXED_REASON.get(kind) or judged_reason(sample[0][1])
        if reason is None:  # the decoder takes it: a good sample after all
            self.good[(shard, key)] = sample[0][1]
            # Decoded frames equal to an original's: the damage missed them; else silently damaged.
            clip = clip_of(sample[0][1])
            harmless = any(torch.equal(clip, reference) for reference in self.reference_clips)
            self.decoded[kind, "harmless" if harmless else "silently_damaged"] += 1
        else:
            if kind in FIXED_REASON and kind not in ("missing_video", "bad_json"):
                assert judged_reason(sample[0][1]) == reason, kind
            self.count_bad(shard, kind, reason)
        members.append(sample)

    def _write_mixed(self, path: Path, kinds: list[str]) -> None:
        # Chunks of samples kept together: a duplicate key's repeat must follow its first occurrence.
        chunks = [[self.good_sample(path.name)] for _ in range(GOOD_PER_MIXED_SHARD)]
        for kind in kinds:
            chunk: list[list[tuple[str, bytes]]] = []
            self.bad_sample(path.name, kind, chunk)
            chunks.insert(self.rng.randint(0, len(chunks)), chunk)
        chunks.append(
            [self.good_sample(path.name)]
        )  # ends with a clip: the worker's batches carry every skip
        write_tar(path, [member for chunk in chunks for sample in chunk for member in sample])

    def _write_truncated(self, path: Path, where: str) -> None:
        samples = [self.good_sample(path.name)[:1] for _ in range(6)]  # KEY.mp4 then KEY.json
        for sample in samples:
            sample.append(
                (f"{sample[0][0][:-4]}.json", json.dumps({"frames": 12, "pad": "x" * 700}).encode())
            )
        entries = [member for sample in samples for member in sample]
        header_at, offset = [], 0  # offset of each member's header block
        for _, data in entries:
            header_at.append(offset)
            offset += 512 + -(-len(data) // 512) * 512
        mp4_at, json_at = header_at[2 * 3], header_at[2 * 3 + 1]  # the 4th sample's members
        arrive = 3
        if where == "mid_video":  # inside the 4th sample's mp4 data
            cut = mp4_at + 512 + len(entries[6][1]) // 2
        elif where == "mid_header":  # inside the 4th sample's mp4 header block: tarfile ends quietly
            cut = mp4_at + 100
        else:  # inside the 4th sample's json: its mp4 is whole, so it arrives (without its json)
            cut, arrive = json_at + 512 + 300, 4
        for sample in samples[arrive:]:
            del self.good[(path.name, sample[0][0][:-4])]
        path.write_bytes(tar_bytes(entries)[:cut])
        self.count_bad(path.name, f"truncated_tar_{where}", "truncated_tar")


def tar_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    path.write_bytes(tar_bytes(entries))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus(tmp_path_factory.mktemp("fuzz"))


def dataset_of(corpus):
    return build_video_dataset(
        str(corpus.paths[0].parent / "shard-*.tar"),
        num_frames=NUM_FRAMES,
        resolution=RESOLUTION,
        train=False,
        rank=0,
        world_size=1,
    )


def test_corpus_is_big_enough(corpus):
    assert corpus.bad.total() >= 200
    assert len(corpus.good) >= 80
    for kind, n in BAD_KINDS.items():
        if kind in FIXED_REASON:
            assert corpus.bad_by_kind[kind] == n, kind  # every one of these kinds is bad
    # The decoder-judged kinds are mostly caught.
    for kind in ("mp4_cut_anywhere", "mp4_bytes_flipped", "mp4_bytes_overwritten", "random_bytes"):
        assert corpus.bad_by_kind[kind] >= BAD_KINDS[kind] // 4, kind


def test_direct_iteration_counts_every_bad_sample_and_keeps_every_good_one(corpus):
    dataset = dataset_of(corpus)
    samples = list(dataset)
    by_key = {s["key"]: s for s in samples}
    assert len(by_key) == len(samples)
    assert sorted(by_key) == sorted(key for _, key in corpus.good)  # keys are unique over the corpus
    assert dataset.skip_counter.counts == dict(corpus.bad)
    assert dataset.skip_counter.total == corpus.bad.total()
    for (_, key), payload in corpus.good.items():
        assert torch.equal(by_key[key]["video"], clip_of(payload)), key  # its own payload, the first copy
    assert samples[-1]["skipped"] == corpus.bad.total()
    assert samples[-1]["skipped_by_reason"] == {reason: corpus.bad[reason] for reason in SKIP_REASONS}


def test_dataloader_with_two_workers_delivers_the_same(corpus):
    dataset = dataset_of(corpus)
    loader = build_dataloader(dataset, batch_size=4, num_workers=2, drop_last=False)
    skipped = SkippedSamples()
    keys = []
    for batch in loader:
        assert batch["video"].shape[1:] == (3, NUM_FRAMES, RESOLUTION, RESOLUTION)
        keys += batch["key"]
        skipped.update(batch)
    assert sorted(keys) == sorted(key for _, key in corpus.good)
    # Worker w reads shards w, w + 2, ...: its last batch carries the skips of all of them.
    names = [path.name for path in corpus.paths]
    expected = {w: sum(corpus.bad_by_shard[name] for name in names[w::2]) for w in range(2)}
    assert skipped.latest == expected
    assert skipped.total == corpus.bad.total()
    # per reason: every reason a key (0 when none), summed over the workers, adding up to the total
    by_reason = skipped.by_reason()
    assert list(by_reason) == list(SKIP_REASONS)
    assert by_reason == {reason: corpus.bad[reason] for reason in SKIP_REASONS}
    assert sum(by_reason.values()) == skipped.total
    assert set(corpus.bad) <= set(SKIP_REASONS)


def test_every_skip_reason_in_the_data_package_is_in_skip_reasons():
    """SKIP_REASONS lists exactly the reasons data/*.py skips for (each call names its reason literally)."""
    sources = "".join(path.read_text() for path in sorted((Path(__file__).parents[1] / "data").glob("*.py")))
    used = re.findall(r"\.skip\(\s*\"([a-z_]+)\"", sources)
    assert len(used) == sources.count(".skip("), "a skip reason that is not a string literal"
    assert set(used) == set(SKIP_REASONS)
    assert len(set(SKIP_REASONS)) == len(SKIP_REASONS)


def test_decoder_judged_kinds_are_counted_or_decode(corpus):
    """Each damaged payload is counted or decodes (then it arrives, as the tests above check)."""
    for kind in [kind for kind in BAD_KINDS if kind not in FIXED_REASON]:
        decoded = corpus.decoded[kind, "harmless"] + corpus.decoded[kind, "silently_damaged"]
        assert corpus.bad_by_kind[kind] + decoded == BAD_KINDS[kind], kind
    print("decoder-judged:", dict(corpus.decoded), "counted:", dict(corpus.bad_by_kind))
