"""The demo's training text: small, shipped with the package (corpus.txt), made by `generate()` below.

A seeded random grammar writes short paragraphs about a harbour town: real words, sentence structure,
agreement, punctuation and some long-range regularities (a paragraph keeps its subject; dialogue lines are
quoted and attributed), so a small character-level model visibly learns spelling and syntax in minutes.
Regenerate with `python -m rwkv6_keras_operator.demo.corpus > corpus.txt` (deterministic).
"""
import os
import random

PATH = os.path.join(os.path.dirname(__file__), "corpus.txt")

PEOPLE = ["the keeper", "the baker", "the fisher", "the old sailor", "the ferryman", "the weaver", "the child",
          "the miller", "the doctor", "the teacher", "Mara", "Tomas", "Ilse", "Piet", "Nadia", "Oskar"]
ANIMALS = ["the gray cat", "the old dog", "a gull", "the black goat", "a small fox", "the white horse"]
THINGS = ["lamp", "boat", "net", "basket", "letter", "bell", "rope", "kettle", "map", "lantern", "key", "coat",
          "book", "bucket", "oar", "window", "door", "cup", "shell", "stone"]
PLACES = ["harbour", "market", "lighthouse", "mill", "bakery", "school", "bridge", "beach", "hill", "chapel",
          "square", "pier", "garden", "well"]
ADJECTIVES = ["old", "small", "red", "blue", "heavy", "broken", "warm", "wet", "new", "tall", "quiet", "bright",
              "wooden", "green", "empty", "clean"]
TIMES = ["at dawn", "in the morning", "at noon", "in the evening", "after dark", "before the storm",
         "on market day", "at low tide", "when the bell rang", "in the rain"]
WEATHER = ["The wind came from the north", "The sea was calm", "Rain fell on the roofs", "The fog was thick",
           "The sun was low over the water", "A storm was coming", "The sky was clear and cold",
           "The tide was high"]
# (past tense, takes an object)
VERBS_T = ["found", "carried", "mended", "painted", "lost", "cleaned", "opened", "sold", "bought", "hid",
           "watched", "lifted", "dropped", "fixed", "counted", "borrowed"]
VERBS_I = ["slept", "laughed", "waited", "sang", "walked home", "sat down", "looked out to sea", "ran",
           "listened", "stayed inside"]
MOTION = ["walked to", "ran to", "went down to", "climbed up to", "came back from", "looked for the way to"]
FEELINGS = ["happy", "tired", "worried", "hungry", "calm", "cold", "surprised", "proud"]
SAYINGS = ["The tide waits for no one", "Mend the net before you need it", "A warm loaf is worth a long walk",
           "The lamp must be lit before dark", "Count the boats twice", "Every bell has its hour",
           "Keep the door shut when the wind is east"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]


def _cap(text):
    return text[0].upper() + text[1:]


def _thing(rng, plural=False):
    words = ([rng.choice(ADJECTIVES)] if rng.random() < 0.6 else []) + [rng.choice(THINGS)]
    if plural:
        return f"{rng.choice(NUMBERS)} {' '.join(words)}s"
    article = "the" if rng.random() < 0.6 else ("an" if words[0][0] in "aeiou" else "a")
    return f"{article} {' '.join(words)}"


def _sentence(rng, subject):
    kind = rng.random()
    if kind < 0.30:
        obj = _thing(rng, plural=rng.random() < 0.25)
        text = f"{subject} {rng.choice(VERBS_T)} {obj}"
        if rng.random() < 0.5:
            text += f" near the {rng.choice(PLACES)}"
    elif kind < 0.48:
        text = f"{subject} {rng.choice(MOTION)} the {rng.choice(PLACES)} {rng.choice(TIMES)}"
    elif kind < 0.60:
        text = f"{subject} {rng.choice(VERBS_I)}"
        if rng.random() < 0.5:
            text += f", and {rng.choice(ANIMALS)} {rng.choice(VERBS_I)} too"
    elif kind < 0.72:
        text = f"{subject} was {rng.choice(FEELINGS)}, because {_thing(rng)} was {rng.choice(ADJECTIVES)}"
    elif kind < 0.82:
        text = f"{rng.choice(WEATHER)}, so {subject} {rng.choice(VERBS_I)}"
        return _cap(text) + "."
    elif kind < 0.92:
        said = f"{subject} said" if subject in ("he", "she") else f"said {subject}"
        return f'"{rng.choice(SAYINGS)}," {said}.'
    else:
        return f"{_cap(subject)} asked where the {rng.choice(THINGS)} was. Nobody knew."
    return _cap(text) + "."


def _paragraph(rng):
    subject = rng.choice(PEOPLE)
    sentences = []
    for i in range(rng.randint(3, 6)):
        who = subject if i == 0 or rng.random() < 0.5 else ("she" if subject in ("Mara", "Ilse", "Nadia")
                                                            else "he" if subject[0].isupper() else subject)
        sentences.append(_sentence(rng, who))
    return " ".join(sentences)


def generate(n_chars=150_000, seed=2026):
    """Paragraphs separated by blank lines, about n_chars characters, the same for the same seed."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_chars:
        paragraphs.append(_paragraph(rng))
        size += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs) + "\n"


def load():
    with open(PATH, encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":
    print(generate(), end="")
