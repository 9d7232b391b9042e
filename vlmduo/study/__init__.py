"""Studies: where the time goes (``bench``, ``latency_model``, ``ask_timing``), the
paper's sweep over reasoning lengths (``sweep``) on real-size simulated weights
(``realsize``), and accuracy (``eval_run``, ``evaluation``, ``datasets``).

Uses the public API and the layers below it; ``vlmduo bench`` and ``vlmduo eval``
render what it returns.
"""
