"""``/metrics``' per-token latency histogram and load gauges, on numbers worked by hand (no engine)."""

from __future__ import annotations

from tandemlm.deploy.server.prometheus import ServerMetrics


def _value(text: str, name: str) -> float:
    """The sample ``name`` (with its labels, if any) of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_time_per_output_token_is_the_mean_gap_after_the_first_token():
    metrics = ServerMetrics(lambda: (0, 0))
    metrics.observe_choice(started=10.0, first_token=10.5, finished=11.5, tokens=5)  # 1.0 s over 4 tokens: 0.25
    metrics.observe_choice(started=20.0, first_token=20.1, finished=20.1, tokens=1)  # one token: no per-token gap
    metrics.observe_choice(started=30.0, first_token=None, finished=30.2, tokens=0)  # nothing generated
    text = metrics.render().decode()
    assert _value(text, "tandem_time_per_output_token_seconds_count") == 1
    assert _value(text, "tandem_time_per_output_token_seconds_sum") == 0.25
    assert _value(text, 'tandem_time_per_output_token_seconds_bucket{le="0.15"}') == 0
    assert _value(text, 'tandem_time_per_output_token_seconds_bucket{le="0.3"}') == 1
    assert _value(text, "tandem_time_to_first_token_seconds_count") == 2
    assert abs(_value(text, "tandem_time_to_first_token_seconds_sum") - 0.6) < 1e-9
    assert _value(text, "tandem_generation_tokens_total") == 6


def test_running_and_queued_gauges_read_the_admission_state_at_scrape_time():
    load = [(2, 3)]
    metrics = ServerMetrics(lambda: load[0])
    text = metrics.render().decode()
    assert _value(text, "tandem_requests_running") == 2 and _value(text, "tandem_requests_queued") == 3
    load[0] = (1, 0)
    text = metrics.render().decode()
    assert _value(text, "tandem_requests_running") == 1 and _value(text, "tandem_requests_queued") == 0
