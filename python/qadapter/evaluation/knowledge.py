"""A knowledge probe large enough to show forgetting, and general text and prompts to measure drift.

The built-in task's probe (:data:`qadapter.experiments.task.PROBE`) holds a few dozen questions: too few to tell
one fine-tuning method's retention from another's. This module generates several hundred easy
multiple-choice questions from small tables (capitals, chemical symbols, opposites, plurals,
small sums, ...), seeded so that the same seed always gives the same list, and keeps the ones the
embedded base model answers right twice over: its most likely option (summed log-probability of the
option as its reply) is the correct one, and its greedy answer names the correct one. Whatever a
fine-tuned model gets wrong on that probe it has forgotten.

Scoring takes the model as a function, ``logprobs_fn(input_ids, attention_mask, position_ids, targets)``,
the log-probabilities of given next tokens (:class:`qadapter.evaluation.measures.Targets`;
:func:`qadapter.evaluation.measures.likelihood`, a compare policy's ``target_logprobs``), and greedy answers as
``answer_fn(questions) -> texts``, so the same code scores the base model, a LoRA model and the
Q-Adapter combined policy.

:data:`GENERAL_PROMPTS` (chat prompts unrelated to the task) and :func:`general_passages`
(original plain prose) measure how far a fine-tuned model moved from the base on everything else:
KL to the base on general chat and perplexity on general text.

``python -m qadapter.evaluation.knowledge --output PATH --seed 0`` regenerates the shipped probe.
"""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

from ..library.atomic import read_json, write_json

DATA_FILE = Path(__file__).with_name("knowledge_data.json")
GENERAL_TEXT_FILE = Path(__file__).with_name("general_text.txt")
N_OPTIONS = 4
ANSWER_TOKENS = 32  # greedy answer length the probe was built with; score with the same

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_accepted(n: int) -> list[str]:
    """The ways an answer may write ``n``: digits (with a thousands comma) and, below 100, words."""
    forms = [str(n)] + ([f"{n:,}"] if n >= 1000 else [])
    if n < 20:
        forms.append(_UNITS[n])
    elif n < 100:
        tens, unit = divmod(n, 10)
        forms += [_TENS[tens]] if unit == 0 else [f"{_TENS[tens]}-{_UNITS[unit]}", f"{_TENS[tens]} {_UNITS[unit]}"]
    elif n in (100, 1000):
        forms += ["one hundred", "a hundred"] if n == 100 else ["one thousand", "a thousand"]
    return forms


_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _order_rows(names: list[str]) -> list[tuple]:
    """``(("after", X), next)`` and ``(("before", X), previous)`` for a cycle of names."""
    n = len(names)
    return ([(("after", names[i]), names[(i + 1) % n]) for i in range(n)]
            + [(("before", names[i]), names[i - 1]) for i in range(n)])


def _number_row(args: tuple, n: int) -> tuple:
    return (args, str(n), *number_accepted(n)[1:])


_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"),
    ("Hungary", "Budapest"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Russia", "Moscow"), ("Ukraine", "Kyiv", "kiev"),
    ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("India", "New Delhi", "delhi"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Canada", "Ottawa"),
    ("the United States", "Washington, D.C.", "washington"), ("Australia", "Canberra"),
    ("Brazil", "Brasília", "brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Cuba", "Havana"),
    ("Switzerland", "Bern", "berne"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Pakistan", "Islamabad"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Malaysia", "Kuala Lumpur"),
    ("New Zealand", "Wellington"), ("Mexico", "Mexico City"), ("Chile", "Santiago"), ("Colombia", "Bogotá", "bogota"),
    ("Venezuela", "Caracas"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
    ("Ghana", "Accra"), ("Iceland", "Reykjavik", "reykjavík"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
    ("Jordan", "Amman"), ("Jamaica", "Kingston"),
]
_COUNTRY_NAMES = {"the United Kingdom": ("United Kingdom", "uk", "britain", "england"),
                  "the United States": ("United States", "usa", "america", "u.s.")}


def _country(name: str) -> tuple[str, ...]:
    """A country as an answer: its option text and other accepted names."""
    return _COUNTRY_NAMES.get(name, (name.removeprefix("the "),))


# Each table: (category, question template, rows of (subject, answer, *other accepted strings), extra distractors).
# The correct option is the answer; the distractors are other answers of the same category (or the extras).
_TABLES = [
    ("capital", "What is the capital of {}?", _CAPITALS, ()),
    ("country_of_capital", "{} is the capital of which country?",
     [(capital, *_country(country)) for country, capital, *_ in _CAPITALS[:30]], ()),
    ("chemical_symbol", "What is the chemical symbol for {}?", [
        ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"), ("sodium", "Na"),
        ("magnesium", "Mg"), ("aluminum", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"),
        ("chlorine", "Cl"), ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"),
        ("silver", "Ag"), ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"), ("tin", "Sn"), ("uranium", "U"),
        ("neon", "Ne"), ("nickel", "Ni"), ("platinum", "Pt"), ("fluorine", "F"), ("argon", "Ar"), ("lithium", "Li"),
        ("titanium", "Ti"),
    ], ()),
    ("language", "What language do most people speak in {}?", [
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Portugal", "Portuguese"), ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Argentina", "Spanish"),
        ("Japan", "Japanese"), ("China", "Chinese", "mandarin"), ("Russia", "Russian"), ("Greece", "Greek"),
        ("Turkey", "Turkish"), ("Poland", "Polish"), ("the Netherlands", "Dutch"), ("Sweden", "Swedish"),
        ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Finland", "Finnish"), ("Egypt", "Arabic"),
        ("Saudi Arabia", "Arabic"), ("Iran", "Persian", "farsi"), ("South Korea", "Korean"),
        ("Vietnam", "Vietnamese"), ("Thailand", "Thai"), ("Israel", "Hebrew"), ("Hungary", "Hungarian"),
        ("Ukraine", "Ukrainian"), ("Indonesia", "Indonesian"), ("the United States", "English"),
        ("England", "English"), ("Australia", "English"), ("Chile", "Spanish"), ("Colombia", "Spanish"),
        ("Peru", "Spanish"), ("Cuba", "Spanish"), ("Austria", "German"), ("Iceland", "Icelandic"),
    ], ()),
    ("continent", "On which continent is {}?", [
        *[(c, "Africa") for c in ("Kenya", "Nigeria", "Ghana", "Ethiopia", "Morocco", "Egypt", "Algeria",
                                  "Tanzania", "Uganda", "Senegal")],
        *[(c, "Asia") for c in ("Japan", "China", "India", "Thailand", "Vietnam", "South Korea", "Pakistan",
                                "Nepal", "Mongolia", "the Philippines")],
        *[(c, "Europe") for c in ("France", "Germany", "Italy", "Spain", "Sweden", "Norway", "Poland",
                                  "Portugal", "Greece", "Ireland")],
        *[(c, "North America") for c in ("Canada", "Mexico", "the United States", "Cuba", "Jamaica")],
        *[(c, "South America") for c in ("Brazil", "Argentina", "Peru", "Chile", "Colombia", "Venezuela",
                                         "Bolivia", "Ecuador", "Uruguay", "Paraguay")],
    ], ("Antarctica", "Australia")),
    ("opposite", "What is the opposite of {}?", [
        row for a, b in [
            ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
            ("happy", "sad"), ("open", "closed"), ("young", "old"), ("full", "empty"), ("light", "dark"),
            ("long", "short"), ("wet", "dry"), ("hard", "soft"), ("easy", "difficult"), ("rich", "poor"),
            ("early", "late"), ("left", "right"), ("true", "false"), ("win", "lose"), ("good", "bad"),
            ("push", "pull"), ("black", "white"), ("top", "bottom"), ("love", "hate"), ("first", "last"),
            ("clean", "dirty"), ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"), ("north", "south"),
            ("east", "west"), ("buy", "sell"), ("always", "never"), ("inside", "outside"), ("asleep", "awake"),
            ("alive", "dead"), ("friend", "enemy"), ("question", "answer"), ("sweet", "sour"), ("cheap", "expensive"),
        ] for row in ((a, b), (b, a))
    ], ()),
    ("plural", "What is the plural of {}?", [
        ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("tooth", "teeth"),
        ("foot", "feet"), ("goose", "geese"), ("person", "people"), ("ox", "oxen"), ("cactus", "cacti", "cactuses"),
        ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("half", "halves"), ("life", "lives"),
        ("wife", "wives"), ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"), ("box", "boxes"),
        ("bus", "buses", "busses"), ("baby", "babies"), ("city", "cities"), ("party", "parties"),
        ("story", "stories"), ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("car", "cars"),
        ("tree", "trees"), ("house", "houses"), ("apple", "apples"), ("bird", "birds"), ("chair", "chairs"),
        ("church", "churches"), ("dish", "dishes"), ("glass", "glasses"), ("fox", "foxes"), ("watch", "watches"),
        ("toy", "toys"),
    ], ()),
    ("color", "What color is {}?", [
        ("grass", "green"), ("a clear daytime sky", "blue"), ("snow", "white"), ("coal", "black"),
        ("blood", "red"), ("a ripe banana", "yellow"), ("a carrot", "orange"), ("a ripe tomato", "red"),
        ("a lemon", "yellow"), ("a ripe strawberry", "red"), ("milk", "white"), ("chocolate", "brown"),
        ("a pumpkin", "orange"), ("a crow", "black"), ("a polar bear", "white"), ("a flamingo", "pink"),
        ("a cucumber", "green"), ("an eggplant", "purple"), ("a fire truck", "red"), ("a lime", "green"),
        ("cotton", "white"), ("a tree trunk", "brown"), ("an emerald", "green"), ("a ruby", "red"),
        ("a sapphire", "blue"), ("lavender", "purple"), ("an elephant", "gray", "grey"), ("the sun", "yellow"),
        ("a school bus", "yellow"), ("a frog", "green"),
    ], ()),
    ("animal_young", "What is a baby {} called?", [
        ("cat", "kitten", "kitty"), ("dog", "puppy", "pup"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
        ("goat", "kid"), ("pig", "piglet"), ("duck", "duckling"), ("frog", "tadpole", "froglet"),
        ("kangaroo", "joey"), ("bear", "cub"), ("lion", "cub"), ("deer", "fawn"), ("goose", "gosling"),
        ("chicken", "chick"), ("swan", "cygnet"), ("owl", "owlet"), ("butterfly", "caterpillar", "larva"),
        ("eagle", "eaglet"), ("whale", "calf"), ("elephant", "calf"), ("seal", "pup"),
    ], ()),
    ("animal_sound", "What sound does a {} make?", [
        (animal, sound, *forms) for animal, sound, *forms in [
            ("dog", "bark", "barks", "barking", "woof"), ("cat", "meow", "meows", "meowing", "miaow"),
            ("cow", "moo", "moos", "mooing"), ("sheep", "baa", "bleat", "bleats", "bleating"),
            ("pig", "oink", "oinks", "grunt", "grunts"), ("duck", "quack", "quacks", "quacking"),
            ("horse", "neigh", "neighs", "neighing", "whinny"), ("lion", "roar", "roars", "roaring"),
            ("snake", "hiss", "hisses", "hissing"), ("owl", "hoot", "hoots", "hooting"),
            ("bee", "buzz", "buzzes", "buzzing"), ("rooster", "cock-a-doodle-doo", "crow", "crows"),
            ("frog", "croak", "croaks", "croaking", "ribbit"), ("mouse", "squeak", "squeaks", "squeaking"),
            ("donkey", "bray", "brays", "braying", "hee-haw"), ("wolf", "howl", "howls", "howling"),
            ("turkey", "gobble", "gobbles", "gobbling"), ("hen", "cluck", "clucks", "clucking"),
            ("elephant", "trumpet", "trumpets", "trumpeting"), ("bird", "chirp", "chirps", "tweet", "tweets"),
        ]
    ], ()),
    ("day_order", "What day of the week comes {} {}?", _order_rows(_DAYS), ()),
    ("month_order", "What month comes {} {}?", _order_rows(_MONTHS), ()),
    ("addition", "What is {} plus {}?", [_number_row((a, b), a + b) for a in range(1, 10) for b in range(a, 10)], ()),
    ("multiplication", "What is {} times {}?",
     [_number_row((a, b), a * b) for a in range(2, 10) for b in range(a, 10)], ()),
    ("next_number", "What number comes after {}?", [_number_row((n,), n + 1) for n in range(1, 31)], ()),
    # A and I are left out as answers: as words ("a", "I") they are in almost any answer.
    ("letter_order", "What letter comes after {} in the alphabet?",
     [((chr(c - 1),), chr(c)) for c in range(ord("B"), ord("Z") + 1) if chr(c) != "I"], ()),
    ("author", "Who wrote {}?", [
        ("Romeo and Juliet", "William Shakespeare", "shakespeare"), ("Hamlet", "William Shakespeare", "shakespeare"),
        ("Macbeth", "William Shakespeare", "shakespeare"), ("Pride and Prejudice", "Jane Austen", "austen"),
        ("Nineteen Eighty-Four", "George Orwell", "orwell"), ("Animal Farm", "George Orwell", "orwell"),
        ("the Harry Potter books", "J. K. Rowling", "rowling"), ("The Hobbit", "J. R. R. Tolkien", "tolkien"),
        ("The Lord of the Rings", "J. R. R. Tolkien", "tolkien"), ("Oliver Twist", "Charles Dickens", "dickens"),
        ("A Christmas Carol", "Charles Dickens", "dickens"), ("Great Expectations", "Charles Dickens", "dickens"),
        ("The Adventures of Tom Sawyer", "Mark Twain", "twain"), ("War and Peace", "Leo Tolstoy", "tolstoy"),
        ("Don Quixote", "Miguel de Cervantes", "cervantes"), ("Moby-Dick", "Herman Melville", "melville"),
        ("the Odyssey", "Homer"), ("Frankenstein", "Mary Shelley", "shelley"), ("Dracula", "Bram Stoker", "stoker"),
        ("the Sherlock Holmes stories", "Arthur Conan Doyle", "conan doyle", "doyle"),
        ("The Great Gatsby", "F. Scott Fitzgerald", "fitzgerald"),
        ("The Old Man and the Sea", "Ernest Hemingway", "hemingway"),
        ("To Kill a Mockingbird", "Harper Lee", "lee"),
        ("Alice's Adventures in Wonderland", "Lewis Carroll", "carroll"),
        ("Charlie and the Chocolate Factory", "Roald Dahl", "dahl"), ("The Cat in the Hat", "Dr. Seuss", "seuss"),
        ("Crime and Punishment", "Fyodor Dostoevsky", "dostoevsky", "dostoyevsky"),
        ("The Divine Comedy", "Dante Alighieri", "dante"), ("Les Misérables", "Victor Hugo", "hugo"),
        ("The Raven", "Edgar Allan Poe", "poe"),
    ], ()),
    ("painter", "Who painted {}?", [
        ("the Mona Lisa", "Leonardo da Vinci", "leonardo", "da vinci"),
        ("The Last Supper", "Leonardo da Vinci", "leonardo", "da vinci"),
        ("The Starry Night", "Vincent van Gogh", "van gogh"), ("Sunflowers", "Vincent van Gogh", "van gogh"),
        ("the ceiling of the Sistine Chapel", "Michelangelo"), ("The Creation of Adam", "Michelangelo"),
        ("The Scream", "Edvard Munch", "munch"), ("Guernica", "Pablo Picasso", "picasso"),
        ("Girl with a Pearl Earring", "Johannes Vermeer", "vermeer"), ("Water Lilies", "Claude Monet", "monet"),
        ("The Persistence of Memory", "Salvador Dalí", "dali", "dalí"),
        ("The Birth of Venus", "Sandro Botticelli", "botticelli"), ("The Night Watch", "Rembrandt"),
    ], ()),
    ("discoverer", "Who {}?", [
        ("discovered penicillin", "Alexander Fleming", "fleming"),
        ("developed the theory of relativity", "Albert Einstein", "einstein"),
        ("invented the telephone", "Alexander Graham Bell", "bell"),
        ("invented the practical light bulb", "Thomas Edison", "edison"),
        ("formulated the law of universal gravitation", "Isaac Newton", "newton"),
        ("proposed the theory of evolution by natural selection", "Charles Darwin", "darwin"),
        ("flew the first powered airplane", "The Wright brothers", "wright"),
        ("discovered radium", "Marie Curie", "curie"),
        ("was the first person to walk on the Moon", "Neil Armstrong", "armstrong"),
        ("was the first president of the United States", "George Washington", "washington"),
    ], ()),
    ("si_unit", "What is the SI unit of {}?", [
        ("electric current", "ampere", "amp", "amperes", "amps"), ("power", "watt", "watts"),
        ("force", "newton", "newtons"), ("energy", "joule", "joules"), ("frequency", "hertz"),
        ("electrical resistance", "ohm", "ohms"), ("voltage", "volt", "volts"), ("length", "meter", "metre", "meters"),
        ("mass", "kilogram", "kilograms"), ("pressure", "pascal", "pascals"),
    ], ()),
    ("how_many", "How many {}?", [
        _number_row(subject, n) for subject, n in [
            ("minutes are in an hour", 60), ("seconds are in a minute", 60), ("hours are in a day", 24),
            ("days are in a week", 7), ("months are in a year", 12),
            ("days are in a year that is not a leap year", 365),
            ("weeks are in a year", 52), ("years are in a decade", 10), ("years are in a century", 100),
            ("centimeters are in a meter", 100), ("millimeters are in a centimeter", 10),
            ("meters are in a kilometer", 1000), ("grams are in a kilogram", 1000), ("inches are in a foot", 12),
            ("feet are in a yard", 3), ("ounces are in a pound", 16), ("eggs are in a dozen", 12),
            ("cents are in a dollar", 100), ("players does a soccer team have on the field", 11),
            ("strings does a standard guitar have", 6), ("sides does a triangle have", 3),
            ("sides does a square have", 4), ("sides does a pentagon have", 5), ("sides does a hexagon have", 6),
            ("sides does an octagon have", 8), ("sides does a decagon have", 10), ("legs does a spider have", 8),
            ("legs does an insect have", 6), ("legs does a dog have", 4), ("legs does a bird have", 2),
            ("arms does an octopus have", 8), ("wheels does a bicycle have", 2), ("wheels does a tricycle have", 3),
            ("continents are there on Earth", 7), ("planets are in our solar system", 8),
        ]
    ], ()),
    ("currency", "What is the currency of {}?", [
        ("Japan", "yen"), ("the United Kingdom", "pound", "pounds", "sterling"),
        ("the United States", "dollar", "dollars"),
        ("Germany", "euro", "euros"), ("India", "rupee", "rupees"), ("China", "yuan", "renminbi"),
        ("Russia", "ruble", "rubles", "rouble"), ("Mexico", "peso", "pesos"), ("Switzerland", "franc", "francs"),
        ("South Korea", "won"), ("Brazil", "real", "reais"), ("Turkey", "lira"), ("Thailand", "baht"),
        ("Sweden", "krona", "kronor"), ("Poland", "zloty", "złoty"),
    ], ()),
    ("planet", "Which planet {}?", [
        ("is closest to the Sun", "Mercury"), ("is the largest in our solar system", "Jupiter"),
        ("is known as the Red Planet", "Mars"), ("is famous for its bright rings", "Saturn"),
        ("do we live on", "Earth"), ("is farthest from the Sun", "Neptune"),
    ], ("Venus", "Uranus")),
    ("body", "{}", [
        ("Which organ pumps blood through the body?", "heart"), ("Which organs do we breathe with?", "lungs", "lung"),
        ("Which organ do we think with?", "brain"), ("Which organ digests food after we swallow it?", "stomach"),
        ("Which organs filter the blood to make urine?", "kidneys", "kidney"), ("What do we see with?", "eyes", "eye"),
        ("What do we hear with?", "ears", "ear"), ("What do we smell with?", "nose"),
        ("What do we taste with?", "tongue"), ("What is the largest organ of the human body?", "skin"),
    ], ()),
    ("animal_class", "What type of animal is a {}?", [
        *[(a, "mammal") for a in ("dolphin", "whale", "bat", "dog", "horse", "cow")],
        *[(a, "bird") for a in ("eagle", "penguin", "owl", "ostrich", "parrot", "robin")],
        *[(a, "fish") for a in ("shark", "salmon", "trout", "tuna")],
        *[(a, "reptile") for a in ("snake", "crocodile", "lizard", "turtle")],
        *[(a, "amphibian") for a in ("frog", "toad", "salamander")],
        *[(a, "insect") for a in ("bee", "ant", "butterfly", "beetle")],
    ], ()),
    ("landmark", "In which country is {}?", [
        (landmark, *_country(country)) for landmark, country in [
            ("the Eiffel Tower", "France"), ("the Colosseum", "Italy"), ("the Great Wall", "China"),
            ("the Taj Mahal", "India"), ("the Statue of Liberty", "the United States"),
            ("Big Ben", "the United Kingdom"), ("the Great Pyramid of Giza", "Egypt"), ("Machu Picchu", "Peru"),
            ("the Sydney Opera House", "Australia"), ("the Kremlin", "Russia"), ("the Acropolis", "Greece"),
            ("the Christ the Redeemer statue", "Brazil"), ("Mount Fuji", "Japan"),
            ("the Leaning Tower of Pisa", "Italy"), ("the Sagrada Família", "Spain"),
            ("the Brandenburg Gate", "Germany"), ("Stonehenge", "the United Kingdom"), ("Petra", "Jordan"),
            ("Angkor Wat", "Cambodia"), ("Chichen Itza", "Mexico"),
        ]
    ], ()),
]

def candidates(seed: int = 0) -> list[dict]:
    """Every candidate question, in table order: four options (one correct, three distractors drawn from
    the same category with ``random.Random(seed)``, shuffled by it) and the strings that count as correct."""
    rng = random.Random(seed)
    out = []
    for category, template, table, extras in _TABLES:
        pool = list(dict.fromkeys([answer for _, answer, *_ in table] + list(extras)))
        for subject, answer, *also in table:
            accepted = list(dict.fromkeys(s.lower() for s in (answer, *also)))
            wrong = [p for p in pool if p.lower() not in accepted]
            options = [answer, *rng.sample(wrong, N_OPTIONS - 1)]
            rng.shuffle(options)
            question = template.format(*subject) if isinstance(subject, tuple) else template.format(subject)
            out.append({"category": category, "question": question, "options": options,
                        "answer": options.index(answer), "accepted": accepted})
    return out


def _contains(text: str, phrase: str) -> bool:
    """``phrase`` in ``text`` as whole words: not inside a longer word or number ("12" is not in "112")."""
    return re.search(rf"(?<![\w'’]){re.escape(phrase)}(?![\w'’])", text) is not None


def greedy_correct(answer_texts: list[str], items: list[dict]) -> list[bool]:
    """Per item, whether its answer names one of the accepted strings (case-insensitive, whole words)."""
    if len(answer_texts) != len(items):
        raise ValueError(f"{len(answer_texts)} answers for {len(items)} items")
    return [any(_contains(text.lower(), a) for a in item["accepted"]) for text, item in zip(answer_texts, items)]


def option_scores(logprobs_fn, tokenizer, items: list[dict], batch_size: int = 16,
                  template_options: dict | None = None) -> list[list[float]]:
    """Per item, the summed log-probability of each option's tokens as the assistant's reply.

    ``logprobs_fn(input_ids, attention_mask, position_ids, targets)`` returns the log-probs of ``targets``
    (:class:`qadapter.evaluation.measures.Targets`: rows, positions and token ids, one per scored token).
    It sees right-padded rows, one per option (an item's options side by side), ``batch_size`` at a
    time, and ``position_ids`` None: a padding-free model runs each item's prompt once
    (:mod:`qadapter.library.packing`), several times fewer tokens on the shipped probe.
    """
    import torch

    from .measures import Targets, answer_tokens, chat_prompts

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    prompts = [tokenizer(p, add_special_tokens=False).input_ids
               for p in chat_prompts(tokenizer, [it["question"] for it in items], template_options)]
    flat = answer_tokens(tokenizer, [it["question"] for it in items for _ in it["options"]],
                         [option for it in items for option in it["options"]], template_options)
    ends = list(itertools.accumulate(len(it["options"]) for it in items))
    options = [flat[end - len(it["options"]):end] for it, end in zip(items, ends)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # One row per option: its tokens, the (item, option) it scores and the positions predicting them.
    rows = [(prompt + o, i, k, range(len(prompt) - 1, len(prompt) + len(o) - 1), o)
            for i, (prompt, opts) in enumerate(zip(prompts, options)) for k, o in enumerate(opts)]
    scores = [[0.0] * len(opts) for opts in options]
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(tokens) for tokens, *_ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (tokens, *_) in enumerate(chunk):
                input_ids[r, : len(tokens)] = torch.tensor(tokens)
                attention_mask[r, : len(tokens)] = 1
            at = [(r, position, token) for r, (_, _, _, positions, o) in enumerate(chunk)
                  for position, token in zip(positions, o)]
            targets = Targets(*(torch.tensor(column) for column in zip(*at)))
            logprobs = logprobs_fn(input_ids, attention_mask, None, targets).float().cpu().tolist()
            offset = 0  # the chunk's targets, option by option
            for _, i, k, positions, _ in chunk:
                scores[i][k] = sum(logprobs[offset : offset + len(positions)])
                offset += len(positions)
    return scores


def likeliest_options(logprobs_fn, tokenizer, items: list[dict], batch_size: int = 16,
                          template_options: dict | None = None) -> list[int]:
    """Per item, the index of the option with the highest :func:`option_scores` (the first on a tie)."""
    return [max(range(len(s)), key=s.__getitem__)
            for s in option_scores(logprobs_fn, tokenizer, items, batch_size, template_options)]


def loglik_accuracy(logprobs_fn, tokenizer, items: list[dict], template_options: dict | None = None) -> float:
    """Fraction of items whose most likely option is the correct one (:func:`likeliest_options`),
    the questions rendered with ``template_options`` (an adapter's ``chat_template_kwargs``)."""
    picked = likeliest_options(logprobs_fn, tokenizer, items, template_options=template_options)
    return sum(p == it["answer"] for p, it in zip(picked, items)) / len(items)


def score_probe(logprobs_fn, answer_fn, tokenizer, items: list[dict]) -> dict:
    """Fraction of items whose most likely option is the correct one (``loglik_accuracy``,
    :func:`option_scores`) and whose greedy answer (``answer_fn(questions) -> texts``) names it
    (``greedy_accuracy``)."""
    if not items:
        raise ValueError("score_probe needs at least one item")
    greedy = greedy_correct(answer_fn([it["question"] for it in items]), items)
    return {"loglik_accuracy": loglik_accuracy(logprobs_fn, tokenizer, items),
            "greedy_accuracy": sum(greedy) / len(items), "n": len(items)}


def build_probe(model, tokenizer, *, seed: int = 0, max_new_tokens: int = ANSWER_TOKENS) -> list[dict]:
    """The candidates the plain base ``model`` gets right under both scorings, in candidate order."""
    from .measures import answers, likelihood

    items = candidates(seed)
    picked = likeliest_options(likelihood(model), tokenizer, items)
    texts = answers(model, tokenizer, [it["question"] for it in items], customized=False,
                    max_new_tokens=max_new_tokens)
    greedy = greedy_correct(texts, items)
    return [it for it, p, g in zip(items, picked, greedy) if p == it["answer"] and g]


def _check_question(q, k: int, path) -> None:
    where = f"knowledge probe {path}: question {k}"
    if not isinstance(q, dict):
        raise ValueError(f"{where} is not an object")
    missing = [key for key in ("question", "options", "answer", "accepted") if key not in q]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(repr(m) for m in missing)}")
    if not isinstance(q["question"], str) or not q["question"].strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    options = q["options"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"{where}: 'options' must be a list of at least two non-empty strings")
    if isinstance(q["answer"], bool) or not isinstance(q["answer"], int) or not 0 <= q["answer"] < len(options):
        raise ValueError(f"{where}: 'answer' must be an option index in [0, {len(options)}); got {q['answer']!r}")
    if not isinstance(q["accepted"], list) or not q["accepted"] or not all(isinstance(a, str) and a
                                                                         for a in q["accepted"]):
        raise ValueError(f"{where}: 'accepted' must be a non-empty list of non-empty strings")


def load_probe(path: Path | str = DATA_FILE) -> list[dict]:
    """The shipped probe's questions (see :func:`build_probe`), checked."""
    data = read_json(path, "knowledge probe")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"knowledge probe {path} must be a JSON object with a 'questions' list")
    for k, q in enumerate(data["questions"]):
        _check_question(q, k, path)
    return data["questions"]


GENERAL_PROMPTS = [
    "Name three fruits that are red.", "What is a good name for a pet goldfish?",
    "Suggest a fun activity for a rainy afternoon.", "What can I cook with rice and eggs?",
    "Tell me a short joke about cats.", "What are some good board games for a family?",
    "How do I say thank you in Spanish?", "What should I bring to a picnic?",
    "Write a haiku about the ocean.", "What are the colors of the rainbow?",
    "Give me an idea for a birthday present for my sister.", "What is your favorite season and why?",
    "Name a few animals that live in the desert.", "What is a nice way to greet a new neighbor?",
    "Describe the taste of a lemon.", "Recommend a movie for a cozy night in.",
    "What are some popular sports played around the world?", "Write one sentence about a sunny morning.",
    "What is the difference between a cup and a mug?", "List three things you might find in a kitchen.",
    "What do people usually eat for breakfast in England?", "Make up a name for a friendly dragon.",
    "What games can children play outside?", "What is a fun fact about octopuses?",
    "How would you describe a forest to someone who has never seen one?", "Name some instruments in an orchestra.",
    "What are good toppings for a pizza?", "Give me a short motivational quote.",
    "What does a gardener do in spring?", "Name three famous cities in Europe.",
    "Write a two-line poem about the moon.", "What are some things to do at the beach?",
    "What is a good snack for a long car trip?", "Tell me something interesting about the moon.",
    "What clothes should I wear on a cold day?", "Name a few vegetables that grow underground.",
    "What makes a good birthday party?", "Describe a cat in three words.",
    "What are some common pets?", "Suggest a name for a small bakery.",
]


def general_passages(path: Path | str = GENERAL_TEXT_FILE) -> list[str]:
    """The paragraphs of the shipped general prose (for perplexity), blank-line separated."""
    text = Path(path).read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time
    from collections import Counter

    from ..library.defaults import DEFAULT_MODEL, load_base

    parser = argparse.ArgumentParser(description="Regenerate the knowledge probe from the embedded base model.")
    parser.add_argument("--output", default=str(DATA_FILE), help="where to write the probe (JSON)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distractors and option order")
    parser.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS, help="length of the greedy answers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = load_base()
    questions = build_probe(model, tokenizer, seed=args.seed, max_new_tokens=args.max_new_tokens)
    write_json(args.output, {"seed": args.seed, "model": DEFAULT_MODEL, "questions": questions})
    total, kept = Counter(c["category"] for c in candidates(args.seed)), Counter(q["category"] for q in questions)
    for category in total:
        print(f"  {category}: {kept[category]}/{total[category]}")
    print(f"kept {len(questions)} of {sum(total.values())} candidates in {time.perf_counter() - started:.0f} s; "
          f"wrote {args.output}")


if __name__ == "__main__":
    main()
