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
        ("top_k", -2, "top_k must be a non-negative integer"),
        ("min_p", 1.5, "min_p must be between 0"),
        ("presence_penalty", 2.5, "presence_penalty must be between -2"),
        ("frequency_penalty", -3, "frequency_penalty must be between -2"),
        ("logit_bias", {"abc": 1.0}, "logit_bias keys must be token ids"),
        ("logit_bias", {5: 101}, r"logit_bias\[5\] must be between -100"),
        ("logprobs", 21, "top_logprobs must be an integer between 0 and 20"),
        ("max_tokens", 0, "max_tokens must be a positive integer"),
        ("repetition_penalty", math.inf, "repetition_penalty must be a finite number"),
        ("stop", [""], "stop must be a list of non-empty strings"),
        ("seed", 1.5, "seed must be an integer"),
    ],
)
def test_bad_sampling_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_top_k_minus_one_means_off_and_string_logit_bias_keys_become_ids():
    params = SamplingParams(top_k=-1, logit_bias={"42": -100, 7: 2.5})
    assert params.top_k == 0
    assert params.logit_bias == {42: -100.0, 7: 2.5}


def test_features_used_names_only_the_optional_settings_that_are_on():
    from tandemlm.deploy.types import OutputConstraint

    assert SamplingParams().features_used() == []
    params = SamplingParams(min_p=0.1, logit_bias={1: 1.0}, logprobs=0, constraint=OutputConstraint())
    assert params.features_used() == ["min_p", "logit_bias", "logprobs", "response_format"]
    assert SamplingParams(logprobs=3, frequency_penalty=0.5).features_used() == ["frequency_penalty", "logprobs", "top_logprobs"]


def test_single_stop_string_becomes_a_list_and_zero_temperature_is_greedy():
    params = SamplingParams(stop="\n", temperature=0)
    assert params.stop == ["\n"]
    assert params.greedy


def test_optional_features_name_exactly_what_a_request_can_turn_on():
    from tandemlm.deploy.types import OPTIONAL_FEATURES, OutputConstraint, SamplingParams

    everything = SamplingParams(
        min_p=0.1, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={1: 1.0}, logprobs=2,
        constraint=OutputConstraint(), adapter="a",
    )
    assert set(everything.features_used()) == OPTIONAL_FEATURES
    assert SamplingParams().features_used() == []
