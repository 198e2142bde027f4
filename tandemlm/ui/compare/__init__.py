"""The Compare tab: policy and reference answer one conversation side by side, then where they diverge.

Top down: ``layout`` lays the tab out and wires ``events`` (its Gradio handlers); the two agree
through ``outputs`` (each event's outputs by name, and the finished turn the votes act on). A turn
is ``turn``: both sides streamed at once (``stream_merge``), each keeping its own ``conversation``,
with the ``judges`` under each answer. The arena (blind battles, seeds, the same-model warning) is
``arena``; the divergence is ``divergence`` (per-token log π/π_ref and its view) over
``divergence_scoring`` (each answer scored under both models). Under the answers: ``vote_panel``,
``leaderboard_panel`` and ``training_panel``, over :mod:`tandemlm.ui.votes`.
"""
