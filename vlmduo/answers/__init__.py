"""Answers: formats, what a reply's answer is, whether two answers agree, grammars.

Pure logic with no model calls, shared by every agent (to ask and to read) and by
the duo (to verify): ``formats`` (inferred from a question), ``extract`` (the answer
in model text), ``agree`` (normalised comparison), ``grammars`` (llama.cpp GBNF).
Uses nothing of vlmduo but ``errors``.

(DESIGN.md puts answers and grammars in ``duo/``; they sit below the agents here
because each agent uses them to prompt, constrain and read its own model.)
"""
