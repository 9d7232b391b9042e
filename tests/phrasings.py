"""Questions as benchmark harnesses really send them, scaffolding and all, with the format
a user expects (the table of tests/test_benchmark_phrasings.py and benchmarks/answer_path.py).

Each row is a question as an evaluation harness writes it, with the format a user
expects. Sources (read from the harnesses' published code and data):

- POPE: questions from AoiDragon/POPE ``output/coco/coco_pope_adversarial.json``;
  suffixes from lmms-eval ``tasks/pope/pope.yaml`` ("\\nAnswer the question using a
  single word or phrase."), VLMEvalKit ``vlm/qwen3_vl/prompt.py`` (" Please answer yes
  or no.") and evalscope ``docs/en/benchmarks/pope.md``.
- MMBench: VLMEvalKit ``dataset/image_mcq.py`` ``build_prompt`` (Hint:/Question:/Options:
  and "Please select the correct answer from the options above. \\n"), items printed from
  MMBench dev; lmms-eval ``tasks/mmbench/en_utils.py`` ("There are several options:" and
  "Answer with the option's letter from the given choices directly."); LLaVA
  ``llava/eval/model_vqa_mmbench.py`` (hint, question, options, no labels).
- ChartQA: lmms-eval ``tasks/chartqa/chartqa.yaml`` ("\\nAnswer the question with a
  single word." and qwen_vl's " Answer:"); evalscope ``docs/en/benchmarks/chartqa.md``.
- TextVQA: lmms-eval ``tasks/textvqa/utils.py`` (optional "\\nReference OCR token: ...").
- DocVQA / InfoVQA: lmms-eval ``docvqa``/``infovqa`` yaml; evalscope samples.
- RealWorldQA: the question text carries its options and "Please answer directly with
  only the letter of the correct option and nothing else." or "Please answer directly
  with a single word or number." (lmms-eval ``tasks/realworldqa/utils.py``, olmo_eval);
  Qwen3-VL's own eval (``evaluation/RealWorldQA/dataset_utils.py``) uses VLMEvalKit's layout.
- GQA / VQAv2: lmms-eval ``gqa.yaml``/``vqav2`` yaml; questions from a public Qwen3-VL-8B
  sample log and evalscope ``docs/en/benchmarks/vqav2.md``.
- LLaVA: ``llava/eval/model_vqa_loader.py`` puts ``<image>\\n`` before the question.
- Others: Qwen3-VL cookbook ``spatial_understanding.ipynb`` ("Answer options:\\nA.chair",
  inline "Choices: A. Red. B. Blue."), BLINK ("Select from the following choices.\\n(A) ..."),
  MathVerse ("Choices:\\nA:40°"), MathVista hints (lmms-eval ``mathvista_evals.py``).
"""

from __future__ import annotations

MMBENCH_HINT = (
    "Hint: Native copper has the following properties:\nsolid\nnot made by living things\n"
    "found in nature\nfixed crystal structure\nmade of the metal copper\nQuestion: Is native copper a "
    "mineral?\nOptions:\nA. no\nB. yes\nPlease select the correct answer from the options above. \n"
)
SNOWBOARD = (
    "Hint: The passage below describes an experiment. Read the passage and then follow the instructions "
    "below.\n\nMadelyn applied a thin layer of wax to the underside of her snowboard and rode the board "
    "straight down a hill. Her friend Tucker timed each ride.\nFigure: snowboarding down a hill.\n"
    "Question: Identify the question that Madelyn and Tucker's experiment can best answer.\nOptions:\n"
    "A. Does Madelyn's snowboard slide down a hill in less time when it has a thin layer of wax or a "
    "thick layer of wax?\nB. Does Madelyn's snowboard slide down a hill in less time when it has a layer "
    "of wax or when it does not have a layer of wax?\nPlease select the correct answer from the options "
    "above. \n"
)

WORD = "\nAnswer the question using a single word or phrase."  # lmms-eval's default post_prompt
LETTER = "\nAnswer with the option's letter from the given choices directly."  # LLaVA, lmms-eval MMBench

PHRASINGS = [
    # POPE
    ("Is there a snowboard in the image?" + WORD, "yesno"),
    ("Is there a person in the image? Please answer yes or no.", "yesno"),
    ("Is there a snowboard in the image?\nPlease answer YES or NO without an explanation.", "yesno"),
    ("Question: Is there a dog in the image?", "yesno"),
    ("<image>\nIs there a traffic light in the image?", "yesno"),
    ("Based on the image, is the door open?", "yesno"),
    ("Q: Is the light on?", "yesno"),
    # MMBench
    (SNOWBOARD, "choice"),
    (MMBENCH_HINT, "choice"),
    (
        "Question: Which one is the correct caption of this image?\nOptions:\nA. A man rides a surfboard on "
        "a large wave.\nB. a young boy barefoot holding an umbrella touching the horn of a cow\nC. A giraffe "
        "standing by a stall in a field.\nD. A stop sign that has been vandalized with graffiti.\nPlease "
        "select the correct answer from the options above. \n",
        "choice",
    ),
    (
        "Question: In this picture, are the two dolphins the same size?\nOptions:\nA. same\nB. Not the same"
        "\nC. Can't judge\nPlease select the correct answer from the options above. \n",
        "choice",
    ),
    (
        "Native copper has the following properties:\nsolid\nmade of the metal copper Is native copper a "
        "mineral? There are several options:\nA. no\nB. yes\n" + LETTER,
        "choice",
    ),
    (
        "The passage describes an experiment.\nWhich property do these objects have in common?\nA. soft\n"
        "B. hard\nAnswer with the option's letter from the given choices directly.",
        "choice",
    ),
    # Options in other layouts
    (
        "Which object, in relation to your current position, holds the farthest placement in the image?\n"
        "Answer options:\nA.chair\nB.plant\nC.window\nD.tv stand.",
        "choice",
    ),
    (
        "What color arrow should the robot follow to move the apple in between the green can and the "
        "orange? Choices: A. Red. B. Blue. C. Green. D. Orange.",
        "choice",
    ),
    (
        "Two points are circled on the image, labeled by A and B beside each circle. Which point is closer "
        "to the camera?\nSelect from the following choices.\n(A) A is closer\n(B) B is closer",
        "choice",
    ),
    (
        "Please directly answer the question and provide the correct option letter, e.g., A, B, C, D.\n"
        "Question: As shown in the figure, in triangle ABC, angle A = 80.0, angle B = 60.0, DE parallel BC, "
        "then the size of angle CED is ()\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°",
        "choice",
    ),
    # ChartQA
    ("How many food item is shown in the bar graph?\nAnswer the question with a single word.", "number"),
    ("How many food item is shown in the bar graph? Answer:", "number"),
    (
        "\nHow many food item is shown in the bar graph?\n\nThe last line of your response should be of the "
        'form "ANSWER: [ANSWER]" (without quotes) where [ANSWER] is the a single word answer or number '
        "to the problem.\n",
        "number",
    ),
    ("What is the value of the highest bar?" + WORD, "number"),
    ("What's the difference between the highest and the lowest value?", "number"),
    ("Which year has the highest value?\nAnswer the question with a single word.", "short"),
    # TextVQA, DocVQA, InfoVQA
    ("What is the brand of this camera?" + WORD, "short"),
    (
        "What time is it?\nReference OCR token: 10:10, SEIKO, quartz" + WORD,
        "short",
    ),
    ("What does the sign say?" + WORD, "short"),
    (
        "What is the \u2018actual\u2019 value per 1000, during the year 1975?\nAnswer the question using a "
        "single word or phrase.",
        "number",
    ),
    (
        "Answer the question according to the image using a single word or phrase.\nWhich social platform "
        'has heavy female audience?\nThe last line of your response should be of the form "ANSWER: [ANSWER]" '
        "(without quotes) where [ANSWER] is the answer to the question.",
        "short",
    ),
    # RealWorldQA
    (
        "In which direction is the front wheel of the car on the right side facing?\nA. Left\nB. Straight\n"
        "C. Right\nPlease answer directly with only the letter of the correct option and nothing else.",
        "choice",
    ),
    (
        "Question: In which direction is the front wheel of the car on the right side facing?\nOptions:\n"
        "A. Left\nB. Straight\nC. Right\nPlease select the correct answer from the options above. \n",
        "choice",
    ),
    ("How many pedestrians are there?\nPlease answer directly with a single word or number.", "number"),
    # GQA, VQAv2
    ("What is this bird called?" + WORD, "short"),
    ("What color is the helmet in the middle of the image?" + WORD, "short"),
    ("Where is he looking?" + WORD, "short"),
    ("Is the man wearing a hat?" + WORD, "yesno"),
    ("How many people are in the photo?" + WORD, "number"),
    ("Is the cup to the left or to the right of the plate?" + WORD, "short"),
    ("Who is wearing the hat, the man or the woman?", "short"),
    (
        "Answer the question according to the image using a short phrase.\nWhere is he looking?\nThe last "
        'line of your response should be of the form "ANSWER: [ANSWER]" (without quotes).',
        "short",
    ),
    # LLaVA-style and hints
    ("<image>\nWhat is the man holding?" + WORD, "short"),
    ("According to the image, how many apples are on the table?", "number"),
    ("In the image, what is the man holding?", "short"),
    ("Describe the image in detail.", "free"),
    ("What is unusual about this image?", "free"),
    (
        "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, "
        "2, 3, at the end.\nQuestion: What is the total volume of the measuring cup?",
        "number",
    ),
    ("Question: How many cats are there? Answer:", "number"),
]
