"""DecodingOptions.parse: what clients may send, and the errors they get otherwise."""

import pytest

from conette_engine.decoding import MAX_BEAM_SIZE, DecodingOptions
from conette_engine.errors import OptionError

TASKS = ["clotho", "audiocaps", "macs"]


def test_defaults_when_nothing_is_given():
    assert DecodingOptions.parse({}, TASKS) == DecodingOptions(task="clotho")


def test_values_arrive_as_bytes_strings_or_json_numbers():
    options = DecodingOptions.parse(
        {"task": b"macs", "beam_size": "5", "min_pred_size": 0, "max_pred_size": bytearray(b"12"),
         "forbid_rep_mode": "all", "threshold": "0.25"}, TASKS)
    assert options == DecodingOptions(task="macs", beam_size=5, min_pred_size=0, max_pred_size=12,
                                      forbid_rep_mode="all", threshold=0.25)


@pytest.mark.parametrize("values, message", [
    ({"task": "youtube"}, "task must be one of"),
    ({"beam_size": "0"}, r"beam_size must be an integer in \[1, 16\]"),
    ({"beam_size": str(MAX_BEAM_SIZE + 1)}, "beam_size"),
    ({"beam_size": "2.5"}, "beam_size"),
    ({"beam_size": True}, "beam_size"),
    ({"max_pred_size": "0"}, "max_pred_size"),
    ({"max_pred_size": "101"}, "max_pred_size"),
    ({"min_pred_size": "-1"}, "min_pred_size"),
    ({"min_pred_size": "9", "max_pred_size": "8"}, "must not exceed"),
    ({"forbid_rep_mode": "some"}, "forbid_rep_mode must be one of"),
    ({"threshold": "nan"}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": "high"}, "threshold"),
    ({"temperature": "1"}, "unknown option"),
])
def test_bad_values_are_refused_with_the_accepted_range(values, message):
    with pytest.raises(OptionError, match=message) as error:
        DecodingOptions.parse(values, TASKS)
    assert error.value.http_status == 400 and error.value.type in ("invalid_option", "unknown_option")


@pytest.mark.parametrize("values, message", [
    ({"beam_size": "²"}, "beam_size must be an integer"),  # str.isdigit() is True, int() refuses it
    ({"beam_size": "+-3"}, "beam_size must be an integer"),
    ({"beam_size": "9" * 5000}, "beam_size must be an integer"),  # beyond Python's int-digit limit
    ({"beam_size": 10**5000}, "a huge integer"),
    ({"threshold": "9" * 401}, "threshold must be a number"),
    ({"threshold": 10**401}, "threshold must be a number"),  # float() raises OverflowError
    ({"threshold": "1e999"}, "threshold must be a number"),
    ({"threshold": "0x1p-2"}, "threshold must be a number"),
])
def test_hostile_number_texts_are_option_errors(values, message):
    with pytest.raises(OptionError, match=message) as error:
        DecodingOptions.parse(values, TASKS)
    assert len(error.value.message) < 200


def test_option_names_and_ranges_come_from_the_dataclass():
    from conette_engine.decoding import OPTION_NAMES, describe_option
    assert OPTION_NAMES == ("task", "beam_size", "min_pred_size", "max_pred_size", "forbid_rep_mode", "threshold",
                            "segment_s", "hop_s")
    assert describe_option("segment_s") == "a number in [1.0, 29.0]"
    assert describe_option("beam_size") == f"an integer in [1, {MAX_BEAM_SIZE}]"
    assert describe_option("threshold") == "a number in [0.0, 1.0]"
    assert describe_option("forbid_rep_mode") == "one of ['none', 'content_words', 'all']"
