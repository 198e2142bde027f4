"""What the Compare tab's votes become, without Gradio: preference records in a JSONL file TRL reads
(``records``), the arena leaderboard's Bradley-Terry ratings (``leaderboard``), and a DPO run on them
in the background (``training``). The panels that show them live in :mod:`tandemlm.ui.compare`;
nothing here imports it.
"""
