import math

import pytest

from tandemlm.deploy.types import SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be between 0"),
        ("temperature", math.nan, "temperature must be a finite number"),
        ("top_p", 1.5, "top_p must be between 0"),
        ("top_p", 0.0, "top_p must be greater than 0"),
        ("top_k", -1, "top_k must be a non-negative integer"),
        ("max_tokens", 0, "max_tokens must be a positive integer"),
        ("repetition_penalty", math.inf, "repetition_penalty must be a finite number"),
        ("stop", [""], "stop must be a list of non-empty strings"),
        ("seed", 1.5, "seed must be an integer"),
    ],
)
def test_bad_sampling_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_single_stop_string_becomes_a_list_and_zero_temperature_is_greedy():
    params = SamplingParams(stop="\n", temperature=0)
    assert params.stop == ["\n"]
    assert params.greedy
