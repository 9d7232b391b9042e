"""The duo method: modes, policies, key-reasoning selection, the transfer.

``pipeline`` answers a question in a mode with the agents it needs (``duo``: both
at once, mutual verification, the transfer); ``selection`` picks the reasoning to
transfer; ``workers`` runs agents off the main thread. Uses agents and answers.
"""
