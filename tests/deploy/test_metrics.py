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


def test_engine_counters_are_summed_over_distinct_engines_and_exported_as_totals():
    from tandemlm.deploy.engine import AdapterView
    from tandemlm.deploy.mock_engine import MockEngine
    from tandemlm.deploy.server.context import ServeContext

    class Counting(MockEngine):
        def __init__(self, model_id: str, prefilled: int) -> None:
            super().__init__(model_id=model_id)
            self.prefilled = prefilled

        def counters(self) -> dict[str, int]:
            return {"prompt_tokens_prefilled": self.prefilled, "spec_draft_tokens": 2}

    first, second = Counting("a", 5), Counting("b", 7)
    # "a" is also served under a second name and through an adapter view: counted once.
    ctx = ServeContext({"a": first, "a-again": first, "b": second, "a-policy": AdapterView(first, "policy", "a")}, 1, 0)
    try:
        text = ctx.metrics.render().decode()
        assert _value(text, "tandem_prompt_tokens_prefilled_total") == 12
        assert _value(text, "tandem_spec_draft_tokens_total") == 4
        first.prefilled = 10  # read at scrape time
        assert _value(ctx.metrics.render().decode(), "tandem_prompt_tokens_prefilled_total") == 17
    finally:
        ctx.close()
