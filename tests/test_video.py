import numpy as np
import pytest

from actavatar_core.errors import ImageInputError, OutputPathError
from actavatar_core.video import Mp4Writer, fit_image, load_image, probe_video, read_video, safe_output_path, write_mp4


def test_mp4_has_expected_streams(tmp_path, speech):
    tt, yy, xx = np.mgrid[0:21, 0:48, 0:64]
    frames = np.stack([(xx * 4 + tt * 5) % 256, (yy * 5) % 256, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    path = write_mp4(tmp_path / "v.mp4", frames, 24, speech(0.5, 22050), 22050, metadata={"prompt": {"1": "x"}})
    info = probe_video(path)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (21, 64, 48, 24.0)
    # audio padded from 0.5 s to the video's 0.875 s (AAC rounds up to whole 1024-sample frames)
    assert 21 / 24 <= info["audio_duration"] < 21 / 24 + 1024 / 22050 + 1e-6
    assert info["metadata"]["prompt"] == '{"1": "x"}'
    decoded, fps, audio, rate = read_video(path)
    assert decoded.shape == frames.shape and fps == 24.0 and rate == 22050
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6  # lossy, but the same pictures


def test_failure_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous good file")
    with pytest.raises(RuntimeError):
        with Mp4Writer(target, 25, 32, 32) as w:
            w.add(np.zeros((3, 32, 32, 3), np.uint8))
            raise RuntimeError("cancelled")
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_refuses_to_overwrite_unless_asked(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="already exists"):
        write_mp4(tmp_path / "a.mp4", np.zeros((1, 32, 32, 3), np.uint8), 25, overwrite=False)


@pytest.mark.parametrize("prefix", ["../evil", "/etc/passwd", "a/../../b", "C:/x"])
def test_prefix_cannot_escape_the_output_folder(tmp_path, prefix):
    with pytest.raises(OutputPathError, match="outside the output folder"):
        safe_output_path(tmp_path, prefix)


def test_prefix_counter_and_subfolders(tmp_path):
    a = safe_output_path(tmp_path, "video/ActAvatar")
    assert not a.parent.exists()  # nothing is made until a video is written (a queue-time check may call this)
    a.parent.mkdir()
    a.write_bytes(b"1")
    b = safe_output_path(tmp_path, "video/ActAvatar")
    assert a.parent == tmp_path / "video" and a.name == "ActAvatar_00001_.mp4" and b.name == "ActAvatar_00002_.mp4"


def test_images(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").shape == (40, 60, 3)
    (tmp_path / "b.png").write_text("not an image")
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(tmp_path / "b.png")
    with pytest.raises(ImageInputError, match="shape"):
        load_image(np.zeros((5, 5)))
    assert load_image(np.ones((1, 4, 4, 3), np.float32)).dtype == np.uint8
    fitted = fit_image(np.zeros((100, 50, 3), np.uint8), 64, 32)
    assert fitted.shape == (32, 64, 3)


def test_finished_video_gets_normal_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = write_mp4(tmp_path / "p.mp4", np.zeros((1, 32, 32, 3), np.uint8), 25)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_a_failed_write_removes_the_folders_it_made_and_keeps_older_ones(tmp_path):
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper" / "out.mp4"
    with pytest.raises(RuntimeError):
        with Mp4Writer(target, 25, 32, 32) as w:
            w.add(np.zeros((2, 32, 32, 3), np.uint8))
            assert target.parent.is_dir()  # made for the temporary file
            raise RuntimeError("cancelled")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["kept"]
    path = write_mp4(target, np.zeros((1, 32, 32, 3), np.uint8), 25)  # a successful write keeps them
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["out.mp4"]


def test_output_checks_make_nothing(tmp_path):
    from actavatar_core.video import atomic_target, check_writable_folder

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        atomic_target(tmp_path / "file" / "sub" / "out.mp4")
    with pytest.raises(OutputPathError, match="is a folder"):
        atomic_target(tmp_path)
    assert atomic_target(tmp_path / "a" / "b" / "out.mp4") == tmp_path / "a" / "b" / "out.mp4"
    check_writable_folder(tmp_path / "c")
    with pytest.raises(OutputPathError, match="cannot be written"):
        check_writable_folder("/proc/actavatar-nowhere")  # not writable, even for root
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_directory_is_not_called_missing(tmp_path):
    with pytest.raises(ImageInputError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("rate, channels", [(44100, 2), (22050, 1)])
def test_speech_track_keeps_the_original_rate_and_channels(tmp_path, speech, rate, channels):
    import torch

    from actavatar_core.audio import Waveform
    from actavatar_core.video import speech_track

    source = speech(0.5, rate, channels)
    fallback = Waveform(torch.zeros(800), 16000)
    for given in ({"waveform": torch.from_numpy(source)[None], "sample_rate": rate},
                  write_mp4(tmp_path / "in.mp4", np.zeros((3, 32, 32, 3), np.uint8), 5, source, rate)):
        audio, got_rate = speech_track(given, fallback)
        assert got_rate == rate and audio.shape[0] == channels and audio.dtype == np.float32
    audio, got_rate = speech_track(np.zeros(800, np.float32), fallback)  # a bare array: the pipeline's waveform
    assert got_rate == 16000 and audio.shape == (1, 800)
    # written through the writer: the MP4's audio stream has the speech's rate and channels
    path = write_mp4(tmp_path / "out.mp4", np.zeros((5, 32, 32, 3), np.uint8), 10, *speech_track(
        {"waveform": torch.from_numpy(source)[None], "sample_rate": rate}))
    info = probe_video(path)
    assert (info["sample_rate"], info["audio_channels"]) == (rate, channels)


@pytest.mark.parametrize("rate, written", [(192000, 96000), (37800, 44100), (11025, 11025)])
def test_speech_at_a_rate_aac_lacks_is_written_at_the_next_aac_rate(tmp_path, speech, rate, written):
    path = write_mp4(tmp_path / "v.mp4", np.zeros((5, 32, 32, 3), np.uint8), 5, speech(1.0, rate, 2), rate)
    info = probe_video(path)
    assert (info["sample_rate"], info["audio_channels"]) == (written, 2)
    assert 1.0 <= info["audio_duration"] < 1.0 + 2048 / written
    _, _, audio, _ = read_video(path)
    assert np.abs(audio).max() > 0.1  # the speech, not silence
