from tandemlm.deploy.textstream import ReasoningSplitter, StopStringFilter, prompt_opens_reasoning


def feed_all(filt: StopStringFilter, pieces: list[str]) -> str:
    out = "".join(filt.feed(p) for p in pieces)
    return out + filt.flush()


def test_stop_string_split_across_pieces_is_cut_and_not_emitted():
    filt = StopStringFilter(["###"])
    assert feed_all(filt, ["Hello #", "#", "# world"]) == "Hello "
    assert filt.stopped


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    filt = StopStringFilter(["STOP"])
    assert filt.feed("ab ST") == "ab "
    assert filt.feed("ART") == "START"
    assert not filt.stopped


def test_earliest_of_several_stop_strings_wins():
    filt = StopStringFilter(["b", "a"])
    assert feed_all(filt, ["xxab"]) == "xx"


def test_reasoning_split_with_tags_split_across_pieces():
    splitter = ReasoningSplitter()
    answer, reasoning = "", ""
    for piece in ["<th", "ink>plan it</thi", "nk>\n\nThe answer", " is 4"]:
        a, r = splitter.feed(piece)
        answer, reasoning = answer + a, reasoning + r
    a, r = splitter.flush()
    assert (answer + a, reasoning + r) == ("The answer is 4", "plan it")


def test_r1_prompt_starts_inside_reasoning_without_opening_tag():
    assert prompt_opens_reasoning("<|Assistant|><think>\n")
    splitter = ReasoningSplitter(starts_in_reasoning=True)
    a1, r1 = splitter.feed("hmm, 2+2")
    a2, r2 = splitter.feed("</think>4")
    assert (a1 + a2, r1 + r2) == ("4", "hmm, 2+2")


def test_unfinished_reasoning_is_flushed_as_reasoning():
    splitter = ReasoningSplitter(starts_in_reasoning=True)
    splitter.feed("still thinking </thi")
    assert splitter.flush() == ("", "</thi")
