"""The arena's leaderboard under the Compare tab: ratings and pairwise win rates from the votes file.

:func:`leaderboard_tables` is the handler (no browser needed to test it); the numbers come from
:mod:`tandemlm.ui.votes.leaderboard`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from tandemlm.ui.votes.leaderboard import battles_from_records, standings, win_rates
from tandemlm.ui.votes.records import read_records

LEADERBOARD_HEADERS = ["model", "rating", "95% CI", "battles", "wins", "ties", "losses"]
PAIR_HEADERS = ["model", "against", "win rate", "battles"]


class LeaderboardTables(NamedTuple):
    """What the leaderboard shows (its components, or their values)."""

    ratings: Any  # rows under LEADERBOARD_HEADERS, best first
    pairs: Any  # rows under PAIR_HEADERS
    note: Any  # one line: how many battles and how the ratings are made


def leaderboard_tables(votes_path: str, rounds: int = 100) -> LeaderboardTables:
    """The ratings rows, pairwise win-rate rows and one-line note for the votes file; never raises."""
    try:
        battles = battles_from_records(read_records(votes_path))
    except OSError:
        battles = []
    if not battles:
        return LeaderboardTables([], [], "No battles yet: vote on a comparison to start the leaderboard.")
    rows = [
        [s.model, round(s.rating, 1), f"{s.low:.0f} – {s.high:.0f}", s.battles, s.wins, s.ties, s.losses]
        for s in standings(battles, rounds=rounds)
    ]
    counts: dict[tuple[str, str], int] = {}
    for battle in battles:
        for pair in ((battle.model_a, battle.model_b), (battle.model_b, battle.model_a)):
            counts[pair] = counts.get(pair, 0) + 1
    pairs = [[a, b, f"{rate:.0%}", counts[(a, b)]] for (a, b), rate in sorted(win_rates(battles).items())]
    note = (
        f"{len(battles)} battles. Bradley-Terry ratings on the Elo scale (mean 1000, one virtual tie per pair), "
        f"95% intervals from {rounds} bootstrap refits; ties and both-bad count as half a win each."
    )
    return LeaderboardTables(rows, pairs, note)


def build_leaderboard(votes_path: str, refresh_after: Sequence[Any] = ()) -> None:
    """The leaderboard accordion (ratings, pairwise win rates, refresh), refreshed after each of ``refresh_after``'s events."""
    import gradio as gr

    def refresh() -> LeaderboardTables:
        return leaderboard_tables(votes_path)

    with gr.Accordion("Leaderboard (from the votes file)", open=False):
        ratings = gr.Dataframe(
            headers=LEADERBOARD_HEADERS, value=lambda: refresh().ratings, interactive=False, elem_id="leaderboard"
        )
        pairs = gr.Dataframe(headers=PAIR_HEADERS, value=lambda: refresh().pairs, interactive=False, label="win rate per pair")
        with gr.Row():
            note = gr.Markdown(lambda: refresh().note, elem_id="leaderboard-note")
            button = gr.Button("Refresh leaderboard", size="sm", scale=0, min_width=160)
    shown = LeaderboardTables(ratings=ratings, pairs=pairs, note=note)
    button.click(refresh, outputs=list(shown))
    for event in refresh_after:
        event.then(refresh, outputs=list(shown), show_progress="hidden")
