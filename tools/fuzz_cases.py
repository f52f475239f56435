"""Request cases for fuzzing the running server (tests/test_fuzz.py, tools/fuzz_server.py).

A case is plain data (route, how the body is sent, what it holds) with its expected outcome known by
construction:
    "good"  valid audio and valid options: 200 with the clip's lone answer (the in-process engine's, same options)
    "bad"   a request that is wrong whatever the audio: 4xx with the JSON error {"error": {"type", "message"}}
    "junk"  random bytes as audio: a 4xx JSON error, or (should FFmpeg find something to decode) a valid answer
Whatever the case, the server never answers 5xx, never emits NaN/Infinity, and its worker never restarts.
"""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from audio_factory import b64
from hypothesis import strategies as st

TASKS = ("clotho", "audiocaps", "macs", "wavcaps_audioset_sl", "wavcaps_bbc_sound_effects", "wavcaps_freesound",
         "wavcaps_soundbible")
MAX_INSTANCES = 8  # handler: max_instances in handler/model-config.yaml
SCORE_ATOL = 1e-4
PROB_ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    kind: str  # "good", "bad" or "junk"
    style: str  # "raw", "json", "form", "v1", "v2", "json_text"
    clips: tuple = ()  # clip names (good) or raw bytes (junk)
    options: tuple = ()  # (name, value) pairs sent with the request
    body: str | None = None  # style "json_text": the exact body
    label: str = field(default="", compare=False)  # what makes a bad case bad



def send(server, case: Case, clips: dict[str, bytes]):
    """Send one case to a TorchServeInstance; returns the requests.Response."""
    audios = [clips[c] if isinstance(c, str) else c for c in case.clips]
    options = dict(case.options)
    if case.style == "raw":
        return server.predict(data=audios[0], headers={"Content-Type": "application/octet-stream"})
    if case.style == "json":
        return server.predict(json={"audio": b64(audios[0]), **options})
    if case.style == "json_text":
        return server.predict(data=case.body.encode(), headers={"Content-Type": "application/json"})
    if case.style == "form":
        return server.predict(files={"audio": ("clip", audios[0], "application/octet-stream")},
                              data={k: str(v) for k, v in options.items()})
    if case.style == "v1":
        return server.request("POST", f"/v1/models/{server.model_name}:predict",
                              json={"instances": [{"audio": {"b64": b64(a)}, **options} for a in audios]})
    if case.style == "v2":
        return server.request("POST", f"/v2/models/{server.model_name}/infer", json={
            "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [len(audios)],
                        "data": [b64(a) for a in audios]}],
            "parameters": options})
    raise ValueError(case.style)


def fire_together(server, cases: list[Case], clips: dict[str, bytes]) -> list:
    """Send the cases at the same moment from separate threads, so that the server batches them."""
    barrier = threading.Barrier(len(cases))

    def run(case):
        barrier.wait()
        return send(server, case, clips)

    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(run, cases))


def lone_answers(engine, clips: dict[str, bytes]):
    """lone_answer(clip_name, options) -> the in-process engine's answer dict for that clip alone (memoized)."""
    cache: dict = {}
    lock = threading.Lock()

    def lone_answer(clip: str, options: dict) -> dict:
        key = (clip, tuple(sorted(options.items())))
        with lock:
            if key not in cache:
                opts = engine.parse_options({"beam_size": 3, **options})  # the server's default beam_size is 3
                cache[key] = engine.caption([engine.load_audio(clips[clip])], [opts])[0].to_dict()
            return cache[key]

    return lone_answer


# ---- strategies -------------------------------------------------------------------------------------------------

def valid_options():
    """Valid values, kept cheap (the fuzz is about parsing and batching, not long beams)."""
    return st.fixed_dictionaries({}, optional={
        "task": st.sampled_from(TASKS),
        "beam_size": st.integers(1, 4),
        "max_pred_size": st.integers(3, 12),
        "forbid_rep_mode": st.sampled_from(["none", "content_words", "all"]),
        "threshold": st.floats(0.0, 1.0),
    })


# Values that are wrong for every numeric option: not numbers, non-finite, hostile number texts, out of range.
HOSTILE_NUMBER_TEXT = st.sampled_from(["²", "+-3", "٣", "9" * 5000, "1" * 401, "1e999", "nan", "inf", "0x10", "3 4",
                                       "", " ", "\x00", "3.5.1", "--1", "1_000"])
BAD_NUMBER = st.one_of(
    HOSTILE_NUMBER_TEXT,
    st.text(alphabet=st.characters(blacklist_categories=["Nd"]), min_size=1, max_size=20).filter(
        lambda t: not t.strip().lstrip("+-.").replace(".", "").replace("e", "").isdigit()),
    st.integers(min_value=10**3, max_value=10**400), st.integers(max_value=-1),
    st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def bad_option():
    return st.one_of(
        st.tuples(st.sampled_from(["beam_size", "max_pred_size", "min_pred_size", "threshold"]), BAD_NUMBER),
        st.tuples(st.just("beam_size"), st.one_of(st.integers(17, 10**6), st.just(0), st.just(2.5))),
        st.tuples(st.just("threshold"), st.one_of(st.floats(1.0001, 1e300), st.floats(-1e300, -0.0001))),
        st.tuples(st.sampled_from(["task", "forbid_rep_mode"]),
                  st.one_of(st.text(max_size=30).filter(lambda t: t not in TASKS + ("none", "content_words", "all")),
                            st.integers(), st.none())),
        st.tuples(st.text(min_size=1, max_size=20).filter(
            lambda t: t not in ("task", "beam_size", "min_pred_size", "max_pred_size", "forbid_rep_mode", "threshold",
                                "audio", "data", "model_name")), st.integers(1, 3)),
    )


def good_case(clip_names):
    clip = st.sampled_from(clip_names)
    return st.one_of(
        st.builds(lambda c, o, s: Case("good", s, (c,), tuple(sorted(o.items()))),
                  clip, valid_options(), st.sampled_from(["json", "form", "raw"])).map(
            lambda case: case if case.style != "raw" else Case("good", "raw", case.clips)),
        st.builds(lambda cs, o, s: Case("good", s, tuple(cs), tuple(sorted(o.items()))),
                  st.lists(clip, min_size=1, max_size=3), valid_options(), st.sampled_from(["v1", "v2"])),
    )


def bad_case(clip_names):
    clip = st.sampled_from(clip_names)
    option_error = st.builds(lambda c, opt, s: Case("bad", s, (c,), (opt,), label="option"),
                             clip, bad_option(), st.sampled_from(["json", "v1", "v2"]))
    # Form fields are text: only the text-valued bad options make sense there.
    form_error = st.builds(lambda c, opt: Case("bad", "form", (c,), (opt,), label="option"), clip,
                           st.tuples(st.sampled_from(["beam_size", "threshold", "max_pred_size"]), HOSTILE_NUMBER_TEXT))
    too_many = st.builds(lambda c, s: Case("bad", s, (c,) * (MAX_INSTANCES + 1), label="too_many_instances"),
                         clip, st.sampled_from(["v1", "v2"]))
    min_over_max = st.builds(lambda c: Case("bad", "json", (c,), (("max_pred_size", 3), ("min_pred_size", 5)),
                                            label="min_over_max"), clip)
    shapes = st.sampled_from([
        '{"audio": ', "[1, 2, 3]", '{"instances": []}', '{"instances": "x"}', '{"instances": [1]}',
        '{"instances": [{"audio": {"b64": "***"}}]}', '{"inputs": []}', '{"inputs": [{"name": "audio"}]}',
        '{"inputs": [{"name": "audio", "datatype": "FP32", "data": [1.0]}]}', '{"audio": "not base64!"}',
        '{"audio": 12}', '{"task": "clotho"}', '{"audio": null}', '{"audio": ""}',
    ]).map(lambda body: Case("bad", "json_text", body=body, label="shape"))
    return st.one_of(option_error, form_error, too_many, min_over_max, shapes)


def junk_case():
    return st.builds(lambda data, s: Case("junk", s, (data,)), st.binary(min_size=0, max_size=4096),
                     st.sampled_from(["raw", "json", "v1"]))


def mixed_cases(clip_names):
    return st.one_of(good_case(clip_names), bad_case(clip_names), junk_case())


# ---- checking an answer ----------------------------------------------------------------------------------------
def handler_error(body: dict) -> dict:
    """{"type", "message"} of one of the handler's JSON errors, asserting its shape: {"error": {"type", "message"}},
    or on the OIP v2 routes {"error": "<message>", "type": ...} (docs/api.md "Errors")."""
    if isinstance(body.get("error"), str):
        assert set(body) == {"error", "type"}, body
        body = {"error": {"type": body["type"], "message": body["error"]}}
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["message"], body
    return body["error"]



def parse_strict(text: str):
    """json.loads that refuses NaN and Infinity (Python's json accepts them; JSON does not)."""
    def refuse(name):
        raise ValueError(f"{name} in a JSON answer")
    return json.loads(text, parse_constant=refuse)


def check(case: Case, response, lone_answer) -> str:
    """Raises AssertionError when the response breaks the case's rule; returns the outcome's name.

    lone_answer(clip_name, options) -> the engine's answer dict for that clip alone.
    """
    status = response.status_code
    assert status < 500, f"{case}: {status} {response.text[:300]}"
    body = parse_strict(response.text)
    if status >= 400:
        assert case.kind in ("bad", "junk"), f"{case}: good request refused: {response.text[:300]}"
        return f"{status} {handler_error(body)['type']}"
    assert case.kind != "bad", f"{case}: bad request answered {status}: {response.text[:300]}"
    if case.kind == "good":
        options = dict(case.options)
        answers = answers_of(case, body)
        assert len(answers) == len(case.clips)
        for clip, got in zip(case.clips, answers):
            assert_same_answer(got, lone_answer(clip, options))
    else:
        for number in numbers_in(body):
            assert math.isfinite(number)
    return f"{status}"


def answers_of(case: Case, body: dict) -> list[dict]:
    """The per-clip answers of a 200 body, whatever the request style (v2: caption, score and tags only)."""
    if case.style == "v1":
        return body["predictions"]
    if case.style != "v2":
        return [body]
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    return [{"caption": c, "score": s, "tags": json.loads(t)}
            for c, s, t in zip(outputs["caption"], outputs["score"], outputs["tags"])]


def assert_same_answer(got: dict, want: dict) -> None:
    assert got["caption"] == want["caption"], (got["caption"], want["caption"])
    assert math.isclose(got["score"], want["score"], abs_tol=SCORE_ATOL), (got["score"], want["score"])
    assert [t["label"] for t in got["tags"]] == [t["label"] for t in want["tags"]]
    for g, w in zip(got["tags"], want["tags"]):
        assert math.isclose(g["score"], w["score"], abs_tol=PROB_ATOL)


def numbers_in(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers_in(item)
