"""vlmduo: a small VLM reasons, a large VLM answers, on your own machine."""

import os

__version__ = "0.1.0"

# llama.cpp's CPU backend uses OpenMP. By default idle OpenMP threads spin, so
# the thread teams left behind by one agent (the duo runs two models from two
# threads) or any other busy process starve the team doing the work: measured
# here, decode fell from ~350 to 2-110 tokens/s under contention. Passive
# waiting kept it at 220-350. libgomp reads this when llama.cpp's library is
# loaded, so it must be set before the first ``import llama_cpp``; a value the
# user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
