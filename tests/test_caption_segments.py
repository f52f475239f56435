"""conette-caption --segment: long recordings and video cut into windows on the client side, sent as requests of
their own, reassembled into exactly the server-side segmented answer, and written as text, JSON, CSV, SRT, WebVTT.

The recordings are made here: about 75 s of espeak-ng speech, SoX pink noise and a tone (longer than one 60 s
resampling block), as AAC in mp4 and as Opus in mkv, each with an FFmpeg `testsrc` video track.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import subprocess

import pytest
import srt
import webvtt

from conette_client.timeline import SAMPLE_RATE, cues, timestamp
from conette_engine.audio import load_audio
from conette_engine.segments import stream_windows
from conftest import checkout_env
from test_caption_cli import CAPTION, ScriptedServer, run_caption

SEGMENT_S, HOP_S = 10.0, 5.0


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("recordings")
    speech = folder / "speech.wav"
    run_tool("espeak-ng", "-w", str(speech), "a person talks in the street while a car passes and music plays, "
             "then the wind blows over a microphone for a long while")
    parts = [folder / "speech_44k.wav", folder / "noise.wav", folder / "tone.wav"]
    run_tool("sox", str(speech), "-r", "44100", "-c", "2", str(parts[0]))
    run_tool("sox", "-n", "-r", "44100", "-c", "2", str(parts[1]), "synth", "22", "pinknoise", "vol", "0.3")
    run_tool("sox", "-n", "-r", "44100", "-c", "2", str(parts[2]), "synth", "17.3", "sine", "440", "vol", "0.4")
    mix = folder / "mix.wav"
    run_tool("sox", str(parts[0]), str(parts[1]), str(parts[2]), str(parts[0]), str(parts[1]), str(mix))
    videos = {}
    for name, codec in (("street.mp4", "aac"), ("street_opus.mkv", "libopus")):
        videos[name] = folder / name
        run_tool("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                 "testsrc=s=64x48:r=2", "-i", str(mix), "-shortest", "-map", "0:v", "-map", "1:a",
                 "-c:v", "libx264", "-preset", "ultrafast", "-c:a", codec, str(videos[name]))
    return videos


def server_side(engine, path, **options) -> dict:
    """What a server computes for the whole file segmented: the in-process engine on the whole decoded file."""
    opts = engine.parse_options({"segment_s": SEGMENT_S, "hop_s": HOP_S, **options})
    return engine.caption_segments([engine.load_audio(path, options=opts)], [opts])[0].to_dict()


def assert_close(got, want, path="answer"):
    """Equal, floats within 1e-4 (the server and the test process may run the model on different thread counts)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), path
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for index, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{index}]")
    else:
        assert got == want, path


def caption_args(ts_server, *args: str) -> list[str]:
    return ["--url", ts_server.inference_url, "--key-file", str(ts_server.key_file), "--segment", str(SEGMENT_S),
            "--hop", str(HOP_S), "--concurrency", "4", *args]


def test_json_is_the_server_side_segmented_answer(ts_server, engine, recordings):
    paths = [recordings["street.mp4"], recordings["street_opus.mkv"]]
    csv_path = paths[0].parent / "windows.csv"
    result = run_caption("--audio", *map(str, paths), *caption_args(ts_server, "--json", "--beam_size", "2",
                                                                    "--csv_export", str(csv_path)))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == list(map(str, paths))
    for line, path in zip(lines, paths):
        want = server_side(engine, path, beam_size=2)
        assert len(want["segments"]) > 10 and want["audio"]["duration_s"] > 60  # over 60 s, overlapping windows
        # The real server's answer for the whole file, segmented server-side, model included.
        served = ts_server.predict(files={"audio": (path.name, path.read_bytes())},
                                   data={"segment_s": str(SEGMENT_S), "hop_s": str(HOP_S), "beam_size": "2"})
        assert served.status_code == 200, served.text
        line.pop("file")
        assert_close(line, served.json())
        assert line.pop("model")["name"]
        assert_close(line, want)
        # times exact to the sample
        assert [(s["start_s"], s["end_s"]) for s in line["segments"]] == [
            (s["start_s"], s["end_s"]) for s in want["segments"]]
    with open(csv_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["file"], row["caption"]) for row in rows] == [
        (line_file, s["caption"]) for line_file, line in zip(map(str, paths), lines) for s in line["segments"]]


def test_srt_and_vtt_parse_and_play_in_ffmpeg(ts_server, recordings, tmp_path):
    video = recordings["street.mp4"]
    answer = run_caption("--audio", str(video), *caption_args(ts_server, "--json"))
    assert answer.returncode == 0, answer.stderr
    segments = json.loads(answer.stdout)["segments"]

    result = run_caption("--audio", str(video), *caption_args(ts_server, "--format", "srt", "--tags", "2"))
    assert result.returncode == 0, result.stderr
    subtitles = list(srt.parse(result.stdout))
    assert len(subtitles) == len(segments)
    for index, (cue, segment) in enumerate(zip(subtitles, segments)):
        tags = ", ".join(tag["label"] for tag in segment["tags"][:2])
        assert cue.content == segment["caption"] + (f"\n[{tags}]" if tags else "")
        assert cue.start.total_seconds() == pytest.approx(segment["start_s"], abs=5e-4)
        # Windows overlap (hop 5 s, window 10 s): a cue ends where the next window starts.
        end_s = segments[index + 1]["start_s"] if index + 1 < len(segments) else segment["end_s"]
        assert cue.end.total_seconds() == pytest.approx(end_s, abs=5e-4)
    srt_path = tmp_path / "street.srt"
    srt_path.write_text(result.stdout)

    out_dir = tmp_path / "vtt"
    both = [recordings["street.mp4"], recordings["street_opus.mkv"]]
    result = run_caption("--audio", *map(str, both), *caption_args(ts_server, "--format", "vtt", "--out-dir",
                                                                   str(out_dir)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in out_dir.iterdir()) == ["street.vtt", "street_opus.vtt"]
    vtt_cues = webvtt.read(str(out_dir / "street.vtt"))
    assert [cue.text for cue in vtt_cues] == [s["caption"] for s in segments]
    assert vtt_cues[1].start == "00:00:05.000"

    # FFmpeg takes both: the SRT muxed as an mp4 subtitle stream, the WebVTT burnt into the video with libass.
    muxed = tmp_path / "muxed.mp4"
    run_tool("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(video), "-i", str(srt_path),
             "-map", "0", "-map", "1", "-c", "copy", "-c:s", "mov_text", str(muxed))
    probe = run_tool("ffprobe", "-v", "error", "-select_streams", "s", "-count_packets", "-show_entries",
                     "stream=codec_name,nb_read_packets", "-of", "json", str(muxed))
    [stream] = json.loads(probe.stdout)["streams"]
    assert stream["codec_name"] == "mov_text" and int(stream["nb_read_packets"]) >= len(segments)
    run_tool("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(recordings["street_opus.mkv"]),
             "-vf", f"subtitles={out_dir / 'street_opus.vtt'}", "-an", "-f", "null", "-")


def test_text_output_and_the_progress_bar_counts_windows(ts_server, recordings):
    """The progress bar is drawn on a terminal only: stderr is a pseudo-terminal here."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*CAPTION, "--audio", str(recordings["street_opus.mkv"]), *caption_args(ts_server)],
        stdout=subprocess.PIPE, stderr=terminal, text=True, env=checkout_env(),
    )
    os.close(terminal)
    drawn = b""
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # the command exited and closed the terminal
            break
        if not data:
            break
        drawn += data
    stdout = process.stdout.read()
    assert process.wait(timeout=120) == 0, drawn
    os.close(controller)
    windows = list(stream_windows(recordings["street_opus.mkv"], SEGMENT_S, HOP_S))
    lines = stdout.splitlines()
    assert lines[0] == f"{recordings['street_opus.mkv']} [clotho]"
    assert lines[1].startswith("[00:00:00.000 --> 00:00:10.000] ") and len(lines) == 1 + len(windows)
    assert lines[-1].startswith(f"[{timestamp(windows[-1].start_s)} --> {timestamp(windows[-1].end_s)}] ")
    n = len(windows)
    counts = [(int(done), int(total)) for done, total in re.findall(rb"\] (\d+)/(\d+) windows, 0 failed", drawn)]
    # One step per answered window; the total is estimated from the container's duration until the file is read.
    assert [done for done, _ in counts if done] == list(range(1, n + 1)) + [n] and counts[-1] == (n, n)


# ------------------------------------------------------------------------------ scripted server


def test_each_window_is_sent_as_its_exact_samples_and_reassembled(recordings):
    """The bodies decode (as a server decodes them) to exactly the streamed windows; clip tags are the max."""

    def answer(n, request):
        samples = load_audio(request["body"], max_duration_s=30.0).waveform.shape[0]
        return 200, {"caption": f"window of {samples} samples", "score": -1.0 - n / 100, "task": "clotho",
                     "candidates": [{"caption": "c", "score": -1.0}], "model": {"name": "conette"},
                     "tags": [{"label": "Speech", "score": 0.45 + n / 100}, {"label": f"Label {n % 3}", "score": 0.5}],
                     "audio": {"duration_s": samples / SAMPLE_RATE, "sample_rate": SAMPLE_RATE, "channels": 1}}

    path = recordings["street.mp4"]
    with ScriptedServer(answer) as server:
        result = run_caption("--audio", str(path), "--url", server.url, "--segment", "10", "--hop", "5", "--json",
                             "--concurrency", "3", "--format", "json")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    windows = list(stream_windows(path, SEGMENT_S, HOP_S))
    bodies = {request["body"] for request in server.requests}
    assert len(server.requests) == len(windows) == len(bodies) > 10
    for window in windows:
        [body] = [b for b in bodies if load_audio(b, max_duration_s=30.0).waveform.equal(window.waveform)]
        assert load_audio(body, max_duration_s=30.0).sample_rate == SAMPLE_RATE
    assert [(s["start_s"], s["end_s"]) for s in line["segments"]] == [(w.start_s, w.end_s) for w in windows]
    assert [s["caption"] for s in line["segments"]] == [f"window of {w.stop - w.start} samples" for w in windows]
    assert line["tags"][0] == {"label": "Speech", "score": 0.45 + (len(windows) - 1) / 100}  # the max
    assert sorted(tag["label"] for tag in line["tags"]) == ["Label 0", "Label 1", "Label 2", "Speech"]
    whole = load_audio(path, max_duration_s=100.0, segmented=True)
    assert line["audio"] == {"duration_s": whole.duration_s, "sample_rate": 44100, "channels": 2}
    assert all("segment_s" not in r["params"] and "hop_s" not in r["params"] for r in server.requests)


def test_a_failed_window_fails_its_file_and_the_run_goes_on(recordings, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    error = {"error": {"type": "internal_error", "message": "the server failed on this request"}}
    with ScriptedServer(lambda n, request: (500, error)) as server:
        result = run_caption("--audio", str(recordings["street_opus.mkv"]), str(bad), "--url", server.url,
                             "--segment", "10", "--format", "csv")
    assert result.returncode == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["file"] for row in rows] == [str(recordings["street_opus.mkv"]), str(bad)]
    assert rows[0]["error"].startswith("internal_error: window 00:00:") and rows[1]["error"].startswith("undecodable")
    assert len(server.requests) <= 2 * 4 + 1  # stopped sending once a window failed
    assert "2 files, 0 captioned, 2 failed" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--format", "srt"], "need --segment"),
    (["--tags", "2"], "need --segment"),
    (["--segment", "10", "--hop", "11"], "hop_s (11) must be between"),
    (["--hop", "5"], "hop_s needs segment_s"),
    (["--segment", "40"], "--segment_s must be"),
    (["--segment", "10", "--format", "text", "--json"], "--json is --format json"),
    (["--segment", "10", "--out-dir", "x"], "--out-dir goes with"),
])
def test_usage_errors(tmp_path, args, message):
    result = run_caption("--audio", str(tmp_path / "a.mp4"), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_several_inputs_as_subtitles_need_an_output_folder(tmp_path):
    result = run_caption("--audio", str(tmp_path / "a.mp4"), str(tmp_path / "b.mkv"), "--segment", "10",
                         "--format", "vtt")
    assert result.returncode == 2 and "needs --out-dir" in result.stderr
    (tmp_path / "b").mkdir()
    result = run_caption("--audio", str(tmp_path / "a.mp4"), str(tmp_path / "b" / "a.mkv"), "--segment", "10",
                         "--format", "srt", "--out-dir", str(tmp_path / "subtitles"))
    assert result.returncode == 2 and "would share a subtitle file" in result.stderr


def test_cues_of_overlapping_windows_do_not_overlap():
    tags = [{"label": "Music", "score": 0.9}, {"label": "Speech", "score": 0.5}, {"label": "Wind", "score": 0.4}]
    answer = {"segments": [{"start_s": 0.0, "end_s": 10.0, "caption": "a", "tags": tags},
                           {"start_s": 2.5, "end_s": 12.5, "caption": "b", "tags": []},
                           {"start_s": 5.0, "end_s": 13.25, "caption": "c", "tags": tags}]}
    assert cues(answer, 2) == [(0.0, 2.5, "a\n[Music, Speech]"), (2.5, 5.0, "b"), (5.0, 13.25, "c\n[Music, Speech]")]
