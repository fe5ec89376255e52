"""The built-in task: a new preference a rule can check, and a knowledge probe to measure retention.

The preference: *answers open with a one-line "TL;DR:" summary*. A deterministic rule checks it
(:func:`follows_rule`). Pairs come from the embedded model's own greedy answers to the prompts
below: the rejected response is the answer as the model gives it, the chosen response is the
same answer with its first sentence set apart as a TL;DR line (:func:`make_chosen`), so
the pair differs only in the preference, never in content. The knowledge probe holds
short-answer questions; retention is the fraction still answered correctly.

A second preference, for a stack trained on the first (:mod:`qadapter.library.stack`): *the answer
goes on as a bulleted list after its opening line* (:func:`follows_bullets`), its pairs made from the
same answers (:func:`bullet_pairs`).

``python -m qadapter.experiments.task --output DIR`` regenerates the shipped data (seeded, greedy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TLDR = "TL;DR:"
PROMPT_LENGTH = 64  # prompt tokens the task's pairs keep by default: its prompts are long, its answers short
DATA_FILE = Path(__file__).with_name("task_data.json")

PROMPTS = [
    "Why is the sky blue?", "How do plants make their food?", "What causes the seasons on Earth?",
    "Why do we need sleep?", "How does a refrigerator keep food cold?", "What is inflation in economics?",
    "Why is exercise good for the heart?", "How do vaccines work?", "What is the water cycle?",
    "Why do leaves change color in autumn?", "How does a rainbow form?", "What is photosynthesis?",
    "Why should I drink enough water?", "How do bees make honey?", "What does a computer's CPU do?",
    "Why do cats purr?", "How do airplanes stay in the air?", "What is recycling and why does it matter?",
    "Why is the ocean salty?", "How does the internet work?", "What makes a good night's sleep?",
    "How can I learn a new language faster?", "Give me tips for studying for an exam.",
    "How do I make a cup of tea?", "What are the benefits of reading books?", "How can I save money each month?",
    "What should I pack for a day hike?", "How can I be more productive at work?",
    "Give me advice for a job interview.", "How do I start running as a beginner?",
    "What is a healthy breakfast?", "How can I reduce stress?", "How do I care for a houseplant?",
    "What is the best way to learn to cook?", "How can I improve my handwriting?",
    "How do I write a good email?", "What are some ways to stay focused?", "How do I plan a small party?",
    "How can I make new friends in a new city?", "What should I know before adopting a dog?",
    "Explain what gravity is.", "Explain what a volcano is.", "Explain how a battery works.",
    "Explain what DNA is.", "Explain what the moon does to the tides.", "Explain what a black hole is.",
    "Explain how soap cleans dirt.", "Explain why ice floats on water.", "Explain what an atom is.",
    "Explain what climate change is.", "Explain how a bicycle stays upright.", "Explain what a fraction is.",
    "Explain what a noun is.", "Explain what electricity is.", "Explain how the heart pumps blood.",
    "Explain what a map scale is.", "Explain why we have time zones.", "Explain what a budget is.",
    "Explain what an ecosystem is.", "Explain how sound travels.", "Describe a typical day of a farmer.",
    "Describe how bread is made.", "Describe the life cycle of a butterfly.", "Describe how a bill becomes a law.",
    "Describe what a library offers.", "Describe how to tie a shoelace.", "Describe a healthy lunch.",
    "Describe the job of a firefighter.", "Describe how clouds form.", "Describe the role of a teacher.",
    "What is the difference between weather and climate?", "What is the difference between a virus and bacteria?",
    "What is the difference between a lake and a sea?", "What is the difference between speed and velocity?",
    "What is the difference between a fruit and a vegetable?", "What is a good way to start a morning routine?",
    "How can I keep my phone battery healthy?", "Why do we celebrate birthdays?", "How do fish breathe underwater?",
    "Why do birds migrate?", "How do magnets work?", "Why do we yawn?", "How do glasses help people see?",
    "What is a healthy way to lose weight?", "Why is the Mona Lisa famous?", "How do trees help the environment?",
    "What is the purpose of a resume?", "How do I choose a good book to read?", "Why is teamwork important?",
    "How do solar panels make electricity?", "What makes a good friend?", "How do I keep my room tidy?",
    "Why is breakfast important?", "How do I learn to play the guitar?", "What is a good way to memorize facts?",
    "How do I stay safe when swimming?", "Why do we have laws?", "What is the purpose of a museum?",
    "How can I help the environment at home?", "How do I prepare for a long flight?", "Why do stars twinkle?",
    "How do I make a simple salad?", "What is a healthy snack?", "How can I become a better listener?",
    "Why is it important to wash our hands?", "How does a compass work?", "What do bees do for flowers?",
    "How do I write a short story?", "Why do we need vitamins?", "How can I sleep better at night?",
    "What is a good hobby to start?", "How do I keep a plant alive in winter?", "Why do dogs wag their tails?",
]

PROBE = [
    ("What is the capital of France?", ["paris"]), ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]), ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]), ("What is the capital of the United Kingdom?", ["london"]),
    ("What is the capital of Russia?", ["moscow"]), ("What is the capital of Egypt?", ["cairo"]),
    ("What is the capital of China?", ["beijing"]), ("What is the capital of Canada?", ["ottawa"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("Which planet is known as the Red Planet?", ["mars"]), ("What is the chemical symbol for water?", ["h2o", "h₂o"]),
    ("How many days are there in a week?", ["seven", "7"]), ("How many legs does a spider have?", ["eight", "8"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "co2"]),
    ("What is the freezing point of water in Celsius?", ["0", "zero"]),
    ("What is the boiling point of water in Celsius?", ["100"]), ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]), ("What is the largest ocean on Earth?", ["pacific"]),
    ("What is the closest star to Earth?", ["sun"]), ("How many continents are there?", ["seven", "7"]),
    ("What is the hardest natural substance?", ["diamond"]), ("What is the primary language spoken in Brazil?", ["portuguese"]),
    ("What organ pumps blood through the body?", ["heart"]), ("What is 5 plus 7?", ["12", "twelve"]),
    ("What is 9 times 3?", ["27", "twenty-seven", "twenty seven"]), ("How many hours are in a day?", ["24", "twenty-four"]),
    ("What is the tallest mountain in the world?", ["everest"]), ("What is the longest river in Africa?", ["nile"]),
    ("What do bees make?", ["honey"]), ("What is the main ingredient in guacamole?", ["avocado"]),
    ("Which animal is known as the king of the jungle?", ["lion"]), ("What color do you get by mixing blue and yellow?", ["green"]),
    ("What is the currency of Japan?", ["yen"]), ("Who was the first person to walk on the moon?", ["armstrong"]),
    ("What is the largest mammal?", ["blue whale", "whale"]), ("How many sides does a triangle have?", ["three", "3"]),
    ("What is the opposite of hot?", ["cold"]),
]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def follows_rule(response: str) -> bool:
    """The preference: the response opens with a ``TL;DR:`` line that says something."""
    first_line = response.lstrip().split("\n", 1)[0]
    return first_line.startswith(TLDR) and len(first_line[len(TLDR) :].strip()) >= 3


def split_first_sentence(text: str) -> tuple[str, str]:
    text = text.strip()
    end = _SENTENCE_END.search(text)
    return (text, "") if end is None else (text[: end.start()], text[end.end() :].strip())


def make_chosen(response: str) -> str:
    """The same answer, its first sentence set apart as the TL;DR line: same words, new format."""
    first, rest = split_first_sentence(response)
    return f"{TLDR} {' '.join(first.split())}\n\n{rest}".rstrip()


def sentences(text: str) -> list[str]:
    """The sentences of a text, across its lines (list markers and blank lines dropped)."""
    parts = [line.strip().removeprefix("- ").strip() for line in text.strip().split("\n")]
    return [sentence for line in parts if line for sentence in _SENTENCE_END.split(line) if sentence.strip()]


def follows_bullets(response: str) -> bool:
    """The second preference (for stacking on the first): after its opening line, the answer goes on
    as a bulleted list, its next non-empty line starting with ``- ``."""
    lines = [line.strip() for line in response.strip().split("\n") if line.strip()]
    return len(lines) >= 2 and lines[1].startswith("- ") and len(lines[1]) > 3


def make_bulleted(response: str) -> str:
    """The same answer, its first sentence as the opening line and every later one a ``- `` item."""
    first, *rest = sentences(response)
    return first + "\n\n" + "\n".join(f"- {sentence}" for sentence in rest)


def bullet_pairs(rows: list[dict], answers: str = "chosen") -> list[dict]:
    """Pairs of the second preference from the task's pairs: an answer bulleted against the answer as
    it is, so a pair differs only in that preference. ``answers``: which response of the task's pair
    is the answer: ``"chosen"``, as a policy customized to the first preference writes it (its TL;DR
    line first), or ``"rejected"``, as the base model writes it. An answer of one sentence has no list
    to make and is left out."""
    return [{"prompt": row["prompt"], "chosen": make_bulleted(row[answers]), "rejected": row[answers]}
            for row in rows if len(sentences(row[answers])) >= 2]


def probe_correct(answer: str, accepted: list[str]) -> bool:
    answer = answer.lower()
    return any(a in answer for a in accepted)


def load_task(path: Path | str = DATA_FILE) -> dict:
    """The shipped task: train/held-out pairs and the probe questions the base model answers right."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("train", "heldout", "probe"):
        if key not in data:
            raise ValueError(f"task data {path} lacks '{key}'")
    return data


def whole_sentences(text: str) -> str:
    """Drops a trailing unfinished sentence (generation stopped at the token limit)."""
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    if text.rstrip().endswith((".", "!", "?")) or cut < 0:
        return text.strip()
    return text[: cut + 1].strip()


def build_task_data(model, tokenizer, *, heldout: int = 20, seed: int = 0, max_new_tokens: int = 96) -> dict:
    """Pairs from the model's own answers, a seeded held-out split, and the probe questions it gets right."""
    import random

    from ..evaluation.measures import answers as greedy_answers

    prompts = list(PROMPTS)
    random.Random(seed).shuffle(prompts)
    answers = [whole_sentences(a) for a in greedy_answers(model, tokenizer, prompts, customized=False,
                                                           max_new_tokens=max_new_tokens)]
    pairs = [
        {"prompt": p, "chosen": make_chosen(a), "rejected": a}
        for p, a in zip(prompts, answers)
        if a and not follows_rule(a)
    ]
    probe_answers = greedy_answers(model, tokenizer, [q for q, _ in PROBE], customized=False, max_new_tokens=48)
    probe = [{"question": q, "answers": acc} for (q, acc), a in zip(PROBE, probe_answers) if probe_correct(a, acc)]
    return {"seed": seed, "train": pairs[heldout:], "heldout": pairs[:heldout], "probe": probe}


def main(argv: list[str] | None = None) -> None:
    """Regenerates the task data from the embedded default's own greedy answers."""
    import argparse

    from ..library.defaults import load_base

    parser = argparse.ArgumentParser(prog="python -m qadapter.experiments.task", description=main.__doc__)
    parser.add_argument("--output", type=Path, default=DATA_FILE, help="where to write (default: the shipped file)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = load_base()
    data = build_task_data(model, tokenizer, seed=args.seed)
    args.output.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(data['train'])} train, {len(data['heldout'])} held-out pairs, {len(data['probe'])} probe questions")


if __name__ == "__main__":
    main()
