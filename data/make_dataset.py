"""Generate the bundled synthetic instruction dataset ``data/instructions.jsonl.gz``.

Why this exists: the toolkit's smoke tests, examples and routing-specialisation demos need a
training set that ships with the repository (no network, no licence questions), is big enough to
survive a 5% eval split while still exceeding a 10,000-example minimum, and is made of clearly
separated task *domains* so that a Mixture-of-Experts router has something to specialise on.

Every completion is computed (or looked up in a hand-checked table below), never random text, so a
model that learns the data learns something true. The generator is deterministic: fixed seeds,
pure standard library, and a gzip container written with a fixed header (mtime 0), so rerunning it
reproduces the file byte for byte on the same zlib.

Usage::

    python data/make_dataset.py            # (re)write data/instructions.jsonl.gz
    python data/make_dataset.py --check    # exit 1 if the file on disk is stale
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import random
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

SEED = 20240611
"""Master seed; each domain derives its own generator from it so domains stay independent."""

PER_DOMAIN = 1300
"""Rows per domain: 10 domains x 1,300 = 13,000 rows, i.e. 12,350 left after a 5% eval split."""

MAX_PROMPT_CHARS = 120
MAX_COMPLETION_CHARS = 80
"""Hard caps so every example fits comfortably in a 128-token context for tiny test models."""

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "instructions.jsonl.gz"

Example = tuple[str, str]
Generator = Callable[[random.Random], Example]


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def fmt_exact(value: Fraction) -> str:
    """Format a terminating rational exactly (``Fraction(7, 2)`` -> ``"3.5"``).

    Why: converting via ``float`` can print artefacts such as ``2.3499999``; exact arithmetic keeps
    every unit-conversion answer provably right.
    """
    if value.denominator == 1:
        return str(value.numerator)
    for places in range(1, 12):
        scaled = value * 10**places
        if scaled.denominator == 1:
            sign = "-" if scaled < 0 else ""
            digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
            return f"{sign}{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
    raise ValueError(f"{value} is not a short terminating decimal")


def fmt_rounded(value: Fraction, places: int) -> str:
    """Round half away from zero to ``places`` decimals and always show them (``21.0``).

    Why: Python's ``round`` uses banker's rounding, which surprises people reading the answers.
    """
    scaled = abs(value) * 10**places
    rounded = int(scaled + Fraction(1, 2))
    sign = "-" if value < 0 and rounded != 0 else ""
    if places == 0:
        return f"{sign}{rounded}"
    digits = str(rounded).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def join_numbers(values: list[int], bracketed: bool) -> str:
    """Render a list either as ``[3, 1, 2]`` or ``3, 1, 2`` (answers mirror the prompt's style)."""
    body = ", ".join(str(v) for v in values)
    return f"[{body}]" if bracketed else body


# --------------------------------------------------------------------------------------------
# Domain: arithmetic
# --------------------------------------------------------------------------------------------

ARITH_SYMBOLIC = [
    "What is {a} {s} {b}?",
    "Compute {a} {s} {b}.",
    "Calculate {a} {s} {b}.",
    "Evaluate {a} {s} {b}.",
]
ARITH_WORDS = {
    "add": ["What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?"],
    "sub": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "What is {b} less than {a}?"],
    "mul": ["What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"],
}


def gen_arithmetic(rng: random.Random) -> Example:
    """Small-integer add/sub/mul; symbolic and worded phrasings share one answer format."""
    op = rng.choice(["add", "sub", "mul"])
    if op == "mul":
        a, b = rng.randint(0, 99), rng.randint(0, 20)
        if rng.random() < 0.5:
            a, b = b, a
        result, symbol = a * b, rng.choice(["*", "×"])
    elif op == "add":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        result, symbol = a + b, "+"
    else:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        result, symbol = a - b, "-"
    template = rng.choice(ARITH_SYMBOLIC if rng.random() < 0.5 else ARITH_WORDS[op])
    return template.format(a=a, b=b, s=symbol), str(result)


# --------------------------------------------------------------------------------------------
# Domain: unit conversion
# --------------------------------------------------------------------------------------------

UNIT_TEMPLATES = [
    "Convert {v} {src} to {dst}.",
    "How many {dst} are in {v} {src}?",
    "{V} {src} is how many {dst}?",
    "Express {v} {src} in {dst}.",
]
# (source unit plural, target unit plural, singular of target, exact factor, value sampler)
LINEAR_UNITS: list[tuple[str, str, str, Fraction, Callable[[random.Random], Fraction]]] = [
    ("kilometers", "meters", "meter", Fraction(1000), lambda r: Fraction(r.randint(1, 400), 4)),
    ("meters", "kilometers", "kilometer", Fraction(1, 1000), lambda r: Fraction(r.randint(1, 200) * 50)),
    ("meters", "centimeters", "centimeter", Fraction(100), lambda r: Fraction(r.randint(1, 200), 4)),
    ("centimeters", "meters", "meter", Fraction(1, 100), lambda r: Fraction(r.randint(1, 400) * 5)),
    ("kilograms", "grams", "gram", Fraction(1000), lambda r: Fraction(r.randint(1, 400), 4)),
    ("grams", "kilograms", "kilogram", Fraction(1, 1000), lambda r: Fraction(r.randint(1, 400) * 25)),
    ("hours", "minutes", "minute", Fraction(60), lambda r: Fraction(r.randint(1, 96), 4)),
    ("minutes", "hours", "hour", Fraction(1, 60), lambda r: Fraction(r.randint(1, 96) * 15)),
    ("minutes", "seconds", "second", Fraction(60), lambda r: Fraction(r.randint(1, 240))),
    ("liters", "milliliters", "milliliter", Fraction(1000), lambda r: Fraction(r.randint(1, 200), 4)),
    ("milliliters", "liters", "liter", Fraction(1, 1000), lambda r: Fraction(r.randint(1, 400) * 25)),
    ("inches", "centimeters", "centimeter", Fraction(254, 100), lambda r: Fraction(r.randint(1, 120))),
    ("days", "hours", "hour", Fraction(24), lambda r: Fraction(r.randint(1, 365))),
]
SINGULAR_UNIT = {
    "kilometers": "kilometer",
    "meters": "meter",
    "centimeters": "centimeter",
    "kilograms": "kilogram",
    "grams": "gram",
    "hours": "hour",
    "minutes": "minute",
    "liters": "liter",
    "milliliters": "milliliter",
    "inches": "inch",
    "days": "day",
}
TEMPERATURE_TEMPLATES = [
    "Convert {v} degrees {src} to {dst}.",
    "What is {v} °{s} in degrees {dst}?",
    "{V} degrees {src} is how many degrees {dst}?",
]


def gen_units(rng: random.Random) -> Example:
    """Metric/time/volume conversions with exact answers, plus temperatures rounded to 0.1."""
    if rng.random() < 0.2:
        template = rng.choice(TEMPERATURE_TEMPLATES)
        if rng.random() < 0.5:
            celsius = rng.randint(-40, 120)
            fahrenheit = Fraction(celsius * 9, 5) + 32
            prompt = template.format(v=celsius, V=celsius, src="Celsius", s="C", dst="Fahrenheit")
            return prompt, f"{fmt_rounded(fahrenheit, 1)} °F"
        fahrenheit_in = rng.randint(-40, 250)
        celsius_out = Fraction((fahrenheit_in - 32) * 5, 9)
        prompt = template.format(v=fahrenheit_in, V=fahrenheit_in, src="Fahrenheit", s="F", dst="Celsius")
        return prompt, f"{fmt_rounded(celsius_out, 1)} °C"
    src, dst, dst_singular, factor, sampler = rng.choice(LINEAR_UNITS)
    value = sampler(rng)
    result = value * factor
    src_word = SINGULAR_UNIT[src] if value == 1 else src
    v = fmt_exact(value)
    prompt = rng.choice(UNIT_TEMPLATES).format(v=v, V=v, src=src_word, dst=dst)
    return prompt, f"{fmt_exact(result)} {dst_singular if result == 1 else dst}"


# --------------------------------------------------------------------------------------------
# Domain: translation (and the shared English word pool)
# --------------------------------------------------------------------------------------------

# (English, French, Spanish). Words with ambiguous translations were left out on purpose.
TRANSLATIONS: list[tuple[str, str, str]] = [
    ("dog", "chien", "perro"),
    ("cat", "chat", "gato"),
    ("house", "maison", "casa"),
    ("water", "eau", "agua"),
    ("bread", "pain", "pan"),
    ("apple", "pomme", "manzana"),
    ("book", "livre", "libro"),
    ("tree", "arbre", "árbol"),
    ("sun", "soleil", "sol"),
    ("moon", "lune", "luna"),
    ("star", "étoile", "estrella"),
    ("sea", "mer", "mar"),
    ("mountain", "montagne", "montaña"),
    ("city", "ville", "ciudad"),
    ("school", "école", "escuela"),
    ("friend", "ami", "amigo"),
    ("mother", "mère", "madre"),
    ("father", "père", "padre"),
    ("brother", "frère", "hermano"),
    ("sister", "sœur", "hermana"),
    ("man", "homme", "hombre"),
    ("woman", "femme", "mujer"),
    ("day", "jour", "día"),
    ("night", "nuit", "noche"),
    ("week", "semaine", "semana"),
    ("red", "rouge", "rojo"),
    ("blue", "bleu", "azul"),
    ("green", "vert", "verde"),
    ("black", "noir", "negro"),
    ("white", "blanc", "blanco"),
    ("yellow", "jaune", "amarillo"),
    ("small", "petit", "pequeño"),
    ("hot", "chaud", "caliente"),
    ("cold", "froid", "frío"),
    ("good", "bon", "bueno"),
    ("new", "nouveau", "nuevo"),
    ("old", "vieux", "viejo"),
    ("happy", "heureux", "feliz"),
    ("one", "un", "uno"),
    ("two", "deux", "dos"),
    ("three", "trois", "tres"),
    ("four", "quatre", "cuatro"),
    ("five", "cinq", "cinco"),
    ("six", "six", "seis"),
    ("seven", "sept", "siete"),
    ("eight", "huit", "ocho"),
    ("nine", "neuf", "nueve"),
    ("ten", "dix", "diez"),
    ("cheese", "fromage", "queso"),
    ("milk", "lait", "leche"),
    ("egg", "œuf", "huevo"),
    ("bird", "oiseau", "pájaro"),
    ("horse", "cheval", "caballo"),
    ("cow", "vache", "vaca"),
    ("chicken", "poulet", "pollo"),
    ("flower", "fleur", "flor"),
    ("garden", "jardin", "jardín"),
    ("door", "porte", "puerta"),
    ("window", "fenêtre", "ventana"),
    ("chair", "chaise", "silla"),
    ("bed", "lit", "cama"),
    ("kitchen", "cuisine", "cocina"),
    ("key", "clé", "llave"),
    ("hand", "main", "mano"),
    ("head", "tête", "cabeza"),
    ("eye", "œil", "ojo"),
    ("mouth", "bouche", "boca"),
    ("heart", "cœur", "corazón"),
    ("rain", "pluie", "lluvia"),
    ("snow", "neige", "nieve"),
    ("wind", "vent", "viento"),
    ("fire", "feu", "fuego"),
    ("sky", "ciel", "cielo"),
    ("bridge", "pont", "puente"),
    ("money", "argent", "dinero"),
    ("work", "travail", "trabajo"),
    ("music", "musique", "música"),
    ("word", "mot", "palabra"),
    ("name", "nom", "nombre"),
    ("question", "question", "pregunta"),
    ("answer", "réponse", "respuesta"),
    ("market", "marché", "mercado"),
    ("church", "église", "iglesia"),
    ("island", "île", "isla"),
    ("forest", "forêt", "bosque"),
    ("beach", "plage", "playa"),
    ("winter", "hiver", "invierno"),
    ("summer", "été", "verano"),
    ("shirt", "chemise", "camisa"),
    ("shoe", "chaussure", "zapato"),
    ("hat", "chapeau", "sombrero"),
    ("cup", "tasse", "taza"),
    ("knife", "couteau", "cuchillo"),
    ("fork", "fourchette", "tenedor"),
    ("spoon", "cuillère", "cuchara"),
    ("salt", "sel", "sal"),
    ("sugar", "sucre", "azúcar"),
    ("wine", "vin", "vino"),
    ("rice", "riz", "arroz"),
    ("meat", "viande", "carne"),
    ("lemon", "citron", "limón"),
    ("strawberry", "fraise", "fresa"),
    ("fast", "rapide", "rápido"),
    ("slow", "lent", "lento"),
    ("strong", "fort", "fuerte"),
    ("easy", "facile", "fácil"),
    ("difficult", "difficile", "difícil"),
    ("expensive", "cher", "caro"),
    ("hello", "bonjour", "hola"),
    ("thank you", "merci", "gracias"),
    ("goodbye", "au revoir", "adiós"),
    ("yes", "oui", "sí"),
    ("to eat", "manger", "comer"),
    ("to drink", "boire", "beber"),
    ("to speak", "parler", "hablar"),
    ("to read", "lire", "leer"),
    ("to write", "écrire", "escribir"),
    ("to run", "courir", "correr"),
    ("to see", "voir", "ver"),
    ("to sing", "chanter", "cantar"),
    ("to dance", "danser", "bailar"),
    ("to open", "ouvrir", "abrir"),
    ("to close", "fermer", "cerrar"),
    ("to buy", "acheter", "comprar"),
    ("to learn", "apprendre", "aprender"),
    ("to swim", "nager", "nadar"),
]
TO_FOREIGN = [
    "Translate '{w}' into {lang}.",
    "What is the {lang} word for '{w}'?",
    "How do you say '{w}' in {lang}?",
    "Give the {lang} translation of '{w}'.",
    "In {lang}, what is '{w}'?",
    "English to {lang}: {w}",
]
TO_ENGLISH = [
    "Translate the {lang} word '{w}' into English.",
    "What does the {lang} word '{w}' mean in English?",
    "{lang} to English: {w}",
]


def gen_translation(rng: random.Random) -> Example:
    """English<->French/Spanish single-word translation from the table above."""
    english, french, spanish = rng.choice(TRANSLATIONS)
    lang, foreign = rng.choice([("French", french), ("Spanish", spanish)])
    if rng.random() < 0.7:
        return rng.choice(TO_FOREIGN).format(w=english, lang=lang), foreign
    return rng.choice(TO_ENGLISH).format(w=foreign, lang=lang), english


# --------------------------------------------------------------------------------------------
# Domain: grammar and spelling
# --------------------------------------------------------------------------------------------

PLURALS: dict[str, str] = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "bus": "buses", "church": "churches",
    "baby": "babies", "city": "cities", "knife": "knives", "leaf": "leaves", "wolf": "wolves",
    "wife": "wives", "child": "children", "man": "men", "woman": "women", "mouse": "mice",
    "goose": "geese", "tooth": "teeth", "foot": "feet", "person": "people", "sheep": "sheep",
    "deer": "deer", "ox": "oxen", "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes",
    "photo": "photos", "piano": "pianos", "day": "days", "key": "keys", "toy": "toys",
    "boy": "boys", "lady": "ladies", "party": "parties", "story": "stories", "class": "classes",
    "dish": "dishes", "watch": "watches", "fox": "foxes", "glass": "glasses", "kiss": "kisses",
    "bench": "benches", "brush": "brushes", "half": "halves", "shelf": "shelves", "loaf": "loaves",
    "thief": "thieves", "life": "lives", "roof": "roofs", "chief": "chiefs", "belief": "beliefs",
    "crisis": "crises", "analysis": "analyses", "phenomenon": "phenomena", "criterion": "criteria",
    "book": "books", "apple": "apples", "table": "tables", "house": "houses", "car": "cars",
    "tree": "trees", "bird": "birds", "river": "rivers", "family": "families",
    "country": "countries", "monkey": "monkeys", "valley": "valleys", "wish": "wishes",
    "tax": "taxes", "quiz": "quizzes", "echo": "echoes", "zoo": "zoos", "radio": "radios",
}  # fmt: skip
# base -> (simple past, past participle)
VERBS: dict[str, tuple[str, str]] = {
    "go": ("went", "gone"), "eat": ("ate", "eaten"), "see": ("saw", "seen"),
    "take": ("took", "taken"), "give": ("gave", "given"), "write": ("wrote", "written"),
    "speak": ("spoke", "spoken"), "break": ("broke", "broken"), "choose": ("chose", "chosen"),
    "drive": ("drove", "driven"), "ride": ("rode", "ridden"), "rise": ("rose", "risen"),
    "fly": ("flew", "flown"), "know": ("knew", "known"), "grow": ("grew", "grown"),
    "throw": ("threw", "thrown"), "draw": ("drew", "drawn"), "begin": ("began", "begun"),
    "drink": ("drank", "drunk"), "sing": ("sang", "sung"), "swim": ("swam", "swum"),
    "ring": ("rang", "rung"), "run": ("ran", "run"), "come": ("came", "come"),
    "become": ("became", "become"), "buy": ("bought", "bought"), "bring": ("brought", "brought"),
    "think": ("thought", "thought"), "teach": ("taught", "taught"), "catch": ("caught", "caught"),
    "fight": ("fought", "fought"), "seek": ("sought", "sought"), "sell": ("sold", "sold"),
    "tell": ("told", "told"), "find": ("found", "found"), "make": ("made", "made"),
    "have": ("had", "had"), "hear": ("heard", "heard"), "keep": ("kept", "kept"),
    "sleep": ("slept", "slept"), "feel": ("felt", "felt"), "leave": ("left", "left"),
    "meet": ("met", "met"), "send": ("sent", "sent"), "spend": ("spent", "spent"),
    "build": ("built", "built"), "lose": ("lost", "lost"), "pay": ("paid", "paid"),
    "say": ("said", "said"), "stand": ("stood", "stood"), "understand": ("understood", "understood"),
    "sit": ("sat", "sat"), "win": ("won", "won"), "hold": ("held", "held"), "read": ("read", "read"),
    "put": ("put", "put"), "cut": ("cut", "cut"), "hit": ("hit", "hit"), "let": ("let", "let"),
    "set": ("set", "set"), "shut": ("shut", "shut"), "forget": ("forgot", "forgotten"),
    "do": ("did", "done"), "wear": ("wore", "worn"), "tear": ("tore", "torn"),
    "steal": ("stole", "stolen"), "freeze": ("froze", "frozen"), "wake": ("woke", "woken"),
    "bite": ("bit", "bitten"), "hide": ("hid", "hidden"), "fall": ("fell", "fallen"),
    "shake": ("shook", "shaken"), "forgive": ("forgave", "forgiven"), "lay": ("laid", "laid"),
    "bend": ("bent", "bent"), "lend": ("lent", "lent"), "dig": ("dug", "dug"),
    "stick": ("stuck", "stuck"), "strike": ("struck", "struck"), "swing": ("swung", "swung"),
    "sting": ("stung", "stung"), "feed": ("fed", "fed"), "lead": ("led", "led"),
    "walk": ("walked", "walked"), "play": ("played", "played"), "jump": ("jumped", "jumped"),
    "cook": ("cooked", "cooked"), "stop": ("stopped", "stopped"), "plan": ("planned", "planned"),
    "try": ("tried", "tried"), "cry": ("cried", "cried"), "study": ("studied", "studied"),
    "carry": ("carried", "carried"), "love": ("loved", "loved"), "dance": ("danced", "danced"),
    "live": ("lived", "lived"), "hope": ("hoped", "hoped"), "open": ("opened", "opened"),
    "visit": ("visited", "visited"), "enjoy": ("enjoyed", "enjoyed"), "watch": ("watched", "watched"),
    "clean": ("cleaned", "cleaned"), "finish": ("finished", "finished"),
    "arrive": ("arrived", "arrived"), "smile": ("smiled", "smiled"), "help": ("helped", "helped"),
    "ask": ("asked", "asked"), "want": ("wanted", "wanted"), "need": ("needed", "needed"),
    "start": ("started", "started"), "wait": ("waited", "waited"), "rob": ("robbed", "robbed"),
    "admit": ("admitted", "admitted"), "prefer": ("preferred", "preferred"),
    "hug": ("hugged", "hugged"), "drop": ("dropped", "dropped"),
}  # fmt: skip
# adjective -> (comparative, superlative)
ADJECTIVES: dict[str, tuple[str, str]] = {
    "big": ("bigger", "biggest"), "small": ("smaller", "smallest"), "tall": ("taller", "tallest"),
    "short": ("shorter", "shortest"), "long": ("longer", "longest"), "fast": ("faster", "fastest"),
    "slow": ("slower", "slowest"), "old": ("older", "oldest"), "young": ("younger", "youngest"),
    "strong": ("stronger", "strongest"), "weak": ("weaker", "weakest"), "cold": ("colder", "coldest"),
    "hot": ("hotter", "hottest"), "warm": ("warmer", "warmest"), "happy": ("happier", "happiest"),
    "easy": ("easier", "easiest"), "busy": ("busier", "busiest"), "heavy": ("heavier", "heaviest"),
    "early": ("earlier", "earliest"), "funny": ("funnier", "funniest"), "pretty": ("prettier", "prettiest"),
    "lucky": ("luckier", "luckiest"), "dirty": ("dirtier", "dirtiest"), "thin": ("thinner", "thinnest"),
    "fat": ("fatter", "fattest"), "sad": ("sadder", "saddest"), "wet": ("wetter", "wettest"),
    "large": ("larger", "largest"), "nice": ("nicer", "nicest"), "safe": ("safer", "safest"),
    "wide": ("wider", "widest"), "good": ("better", "best"), "bad": ("worse", "worst"),
    "beautiful": ("more beautiful", "most beautiful"), "expensive": ("more expensive", "most expensive"),
    "interesting": ("more interesting", "most interesting"),
    "important": ("more important", "most important"), "difficult": ("more difficult", "most difficult"),
    "dangerous": ("more dangerous", "most dangerous"), "careful": ("more careful", "most careful"),
    "famous": ("more famous", "most famous"),
}  # fmt: skip
# misspelling -> correct spelling
MISSPELLINGS: dict[str, str] = {
    "recieve": "receive", "seperate": "separate", "definately": "definitely", "occured": "occurred",
    "untill": "until", "wierd": "weird", "beleive": "believe", "adress": "address",
    "calender": "calendar", "tommorow": "tomorrow", "begining": "beginning",
    "enviroment": "environment", "goverment": "government", "neccessary": "necessary",
    "accomodate": "accommodate", "embarass": "embarrass", "existance": "existence",
    "foriegn": "foreign", "freind": "friend", "garantee": "guarantee", "harrass": "harass",
    "independant": "independent", "knowlege": "knowledge", "libary": "library",
    "noticable": "noticeable", "occassion": "occasion", "persistant": "persistent",
    "posession": "possession", "publically": "publicly", "recomend": "recommend", "rythm": "rhythm",
    "succesful": "successful", "suprise": "surprise", "truely": "truly", "wich": "which",
    "writting": "writing", "arguement": "argument", "buisness": "business", "commited": "committed",
}  # fmt: skip

GRAMMAR_TEMPLATES: dict[str, list[str]] = {
    "plural": [
        "What is the plural of '{w}'?",
        "Give the plural form of the noun '{w}'.",
        "Plural of {w}?",
        "Write the plural of '{w}'.",
        "One {w}, two ...? Give the plural.",
    ],
    "singular": ["What is the singular of '{w}'?", "Give the singular form of '{w}'.", "Singular of {w}?"],
    "past": [
        "What is the past tense of '{w}'?",
        "Give the simple past of the verb '{w}'.",
        "Past tense of {w}?",
        "Yesterday I ___ (to {w}). Fill in the verb.",
        "Write the past tense form of '{w}'.",
    ],
    "participle": [
        "What is the past participle of '{w}'?",
        "Give the past participle of the verb '{w}'.",
        "Past participle of {w}?",
    ],
    "comparative": [
        "What is the comparative form of '{w}'?",
        "Comparative of {w}?",
        "Complete: this one is ___ ({w}) than that one.",
    ],
    "superlative": [
        "What is the superlative form of '{w}'?",
        "Superlative of {w}?",
        "Complete: it is the ___ ({w}) of all.",
    ],
    "spelling": [
        "Which spelling is correct: '{a}' or '{b}'?",
        "Choose the correct spelling: {a} / {b}",
        "Is it spelled '{a}' or '{b}'?",
    ],
}


def gen_grammar(rng: random.Random) -> Example:
    """Noun number, verb tenses, adjective degrees and common misspellings, all from tables."""
    kind = rng.choice(list(GRAMMAR_TEMPLATES))
    template = rng.choice(GRAMMAR_TEMPLATES[kind])
    if kind == "spelling":
        wrong, right = rng.choice(list(MISSPELLINGS.items()))
        a, b = (wrong, right) if rng.random() < 0.5 else (right, wrong)
        return template.format(a=a, b=b), right
    if kind in ("plural", "singular"):
        singular, plural = rng.choice(list(PLURALS.items()))
        if kind == "plural":
            return template.format(w=singular), plural
        return template.format(w=plural), singular
    if kind in ("past", "participle"):
        base, (past, participle) = rng.choice(list(VERBS.items()))
        return template.format(w=base), past if kind == "past" else participle
    adjective, (comparative, superlative) = rng.choice(list(ADJECTIVES.items()))
    return template.format(w=adjective), comparative if kind == "comparative" else superlative


# --------------------------------------------------------------------------------------------
# Domain: string manipulation
# --------------------------------------------------------------------------------------------


def _word_pool() -> list[str]:
    """Lower-case alphabetic words of length >= 3 reused from the other tables (sorted, stable)."""
    words: set[str] = set()
    words.update(english for english, _, _ in TRANSLATIONS)
    words.update(PLURALS)
    words.update(PLURALS.values())
    words.update(VERBS)
    words.update(ADJECTIVES)
    words.update(MISSPELLINGS.values())
    return sorted(w for w in words if w.isalpha() and w.isascii() and len(w) >= 3)


WORDS = _word_pool()
VOWELS = "aeiou"
STRING_TEMPLATES: dict[str, list[str]] = {
    "reverse": [
        "Reverse the word '{w}'.",
        "Spell '{w}' backwards.",
        "What is '{w}' written in reverse?",
        "Reverse the letters of {w}.",
    ],
    "upper": ["Write '{w}' in uppercase.", "Convert '{w}' to capital letters.", "Uppercase: {w}"],
    "title": ["Capitalize the first letter of '{w}'.", "Write '{w}' with an initial capital."],
    "count": [
        "How many times does the letter '{c}' appear in '{w}'?",
        "Count the letter '{c}' in the word '{w}'.",
        "How many '{c}'s are in '{w}'?",
    ],
    "length": [
        "How many letters are in the word '{w}'?",
        "What is the length of '{w}'?",
        "Count the letters in '{w}'.",
    ],
    "first": ["What is the first letter of '{w}'?", "Which letter does '{w}' start with?"],
    "last": ["What is the last letter of '{w}'?", "Which letter does '{w}' end with?"],
    "sorted": [
        "Sort the letters of '{w}' alphabetically.",
        "Arrange the letters of '{w}' in alphabetical order.",
    ],
    "vowels": ["How many vowels are in '{w}'?", "Count the vowels (a, e, i, o, u) in '{w}'."],
}


def gen_strings(rng: random.Random) -> Example:
    """Character-level operations on real English words; answers computed with str methods."""
    kind = rng.choice(list(STRING_TEMPLATES))
    template = rng.choice(STRING_TEMPLATES[kind])
    word = rng.choice(WORDS)
    if kind == "count":
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        return template.format(w=word, c=letter), str(word.count(letter))
    answers: dict[str, Callable[[str], str]] = {
        "reverse": lambda w: w[::-1],
        "upper": str.upper,
        "title": lambda w: w[0].upper() + w[1:],
        "length": lambda w: str(len(w)),
        "first": lambda w: w[0],
        "last": lambda w: w[-1],
        "sorted": lambda w: "".join(sorted(w)),
        "vowels": lambda w: str(sum(ch in VOWELS for ch in w)),
    }
    return template.format(w=word), answers[kind](word)


# --------------------------------------------------------------------------------------------
# Domain: list operations
# --------------------------------------------------------------------------------------------

LIST_TEMPLATES: dict[str, list[str]] = {
    "asc": [
        "Sort in ascending order: {xs}",
        "Sort these numbers from smallest to largest: {xs}",
        "Arrange {xs} in increasing order.",
    ],
    "desc": [
        "Sort in descending order: {xs}",
        "Sort these numbers from largest to smallest: {xs}",
        "Arrange {xs} in decreasing order.",
    ],
    "max": ["What is the largest number in {xs}?", "Find the maximum of {xs}.", "Which is biggest: {xs}?"],
    "min": ["What is the smallest number in {xs}?", "Find the minimum of {xs}.", "Which is smallest: {xs}?"],
    "count": ["How many numbers are in {xs}?", "Count the items in the list {xs}."],
    "even": [
        "Keep only the even numbers from {xs}, in order.",
        "List the even numbers in {xs} in their original order.",
    ],
}


def gen_lists(rng: random.Random) -> Example:
    """Sorting and selecting over short integer lists; answer style mirrors the prompt's style."""
    kind = rng.choice(list(LIST_TEMPLATES))
    values = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    if kind == "even" and not any(v % 2 == 0 for v in values):
        values[rng.randrange(len(values))] = rng.randrange(0, 100, 2)
    bracketed = rng.random() < 0.5
    prompt = rng.choice(LIST_TEMPLATES[kind]).format(xs=join_numbers(values, bracketed))
    if kind == "asc":
        return prompt, join_numbers(sorted(values), bracketed)
    if kind == "desc":
        return prompt, join_numbers(sorted(values, reverse=True), bracketed)
    if kind == "max":
        return prompt, str(max(values))
    if kind == "min":
        return prompt, str(min(values))
    if kind == "count":
        return prompt, str(len(values))
    return prompt, join_numbers([v for v in values if v % 2 == 0], bracketed)


# --------------------------------------------------------------------------------------------
# Domain: dates and calendar
# --------------------------------------------------------------------------------------------

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DATE_MIN = dt.date(1950, 1, 1)
DATE_SPAN_DAYS = (dt.date(2049, 12, 31) - DATE_MIN).days


def fmt_date(day: dt.date, iso: bool) -> str:
    """ISO ``2021-03-14`` or ``March 14, 2021`` without strftime, which is locale dependent."""
    return day.isoformat() if iso else f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def gen_dates(rng: random.Random) -> Example:
    """Weekdays, day differences, date offsets and leap years, computed with ``datetime``."""
    kind = rng.choice(["weekday", "between", "add", "subtract", "leap"])
    day = DATE_MIN + dt.timedelta(days=rng.randint(0, DATE_SPAN_DAYS))
    iso = rng.random() < 0.5
    d = fmt_date(day, iso)
    if kind == "weekday":
        template = rng.choice(
            [
                "What day of the week was {d}?",
                "Which weekday is {d}?",
                "On what day of the week does {d} fall?",
            ]
        )
        return template.format(d=d), WEEKDAYS[day.weekday()]
    if kind == "between":
        other = day + dt.timedelta(days=rng.randint(1, 400))
        template = rng.choice(
            [
                "How many days are there from {a} to {b}?",
                "Count the days between {a} and {b}.",
                "Days from {a} to {b}?",
            ]
        )
        return template.format(a=d, b=fmt_date(other, iso)), str((other - day).days)
    if kind in ("add", "subtract"):
        n = rng.randint(1, 365)
        if kind == "add":
            template = rng.choice(
                ["What date is {n} days after {d}?", "Add {n} days to {d}.", "{d} plus {n} days is?"]
            )
            result = day + dt.timedelta(days=n)
        else:
            template = rng.choice(["What date is {n} days before {d}?", "Subtract {n} days from {d}."])
            result = day - dt.timedelta(days=n)
        return template.format(n=n, d=d), fmt_date(result, iso)
    year = day.year
    is_leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    template = rng.choice(
        ["Is {y} a leap year?", "Was {y} a leap year? Answer yes or no.", "Leap year check: {y}"]
    )
    return template.format(y=year), "Yes" if is_leap else "No"


# --------------------------------------------------------------------------------------------
# Domain: Python code
# --------------------------------------------------------------------------------------------

# (description, function name, parameters, return expression)
CODE_FIXED: list[tuple[str, str, str, str]] = [
    ("returns the square of x", "square", "x", "x * x"),
    ("returns the cube of x", "cube", "x", "x * x * x"),
    ("returns the absolute value of x", "absolute", "x", "abs(x)"),
    ("returns True if x is even", "is_even", "x", "x % 2 == 0"),
    ("returns True if x is odd", "is_odd", "x", "x % 2 == 1"),
    ("returns True if x is negative", "is_negative", "x", "x < 0"),
    ("returns x negated", "negate", "x", "-x"),
    ("returns half of x", "half", "x", "x / 2"),
    ("returns the sum of a and b", "add", "a, b", "a + b"),
    ("returns a minus b", "subtract", "a, b", "a - b"),
    ("returns the product of a and b", "multiply", "a, b", "a * b"),
    ("returns the larger of a and b", "larger", "a, b", "max(a, b)"),
    ("returns the smaller of a and b", "smaller", "a, b", "min(a, b)"),
    ("returns the reverse of the string s", "reverse", "s", "s[::-1]"),
    ("returns s in uppercase", "to_upper", "s", "s.upper()"),
    ("returns s in lowercase", "to_lower", "s", "s.lower()"),
    ("returns the length of the string s", "length", "s", "len(s)"),
    ("returns True if s is a palindrome", "is_palindrome", "s", "s == s[::-1]"),
    ("returns the number of words in s", "word_count", "s", "len(s.split())"),
    ("returns s without leading and trailing spaces", "strip", "s", "s.strip()"),
    ("returns the sum of the list xs", "total", "xs", "sum(xs)"),
    ("returns the largest item of xs", "largest", "xs", "max(xs)"),
    ("returns the smallest item of xs", "smallest", "xs", "min(xs)"),
    ("returns the average of the list xs", "average", "xs", "sum(xs) / len(xs)"),
    ("returns the number of items in xs", "count", "xs", "len(xs)"),
    ("returns the first element of xs", "first", "xs", "xs[0]"),
    ("returns the last element of xs", "last", "xs", "xs[-1]"),
    ("returns a sorted copy of xs", "sorted_copy", "xs", "sorted(xs)"),
    ("returns xs in reverse order", "reversed_list", "xs", "xs[::-1]"),
    ("returns True if xs is empty", "is_empty", "xs", "len(xs) == 0"),
    ("returns the unique items of xs as a set", "unique", "xs", "set(xs)"),
]
# (description, function name, parameters, return expression, smallest n, largest n)
CODE_PARAMETRIC: list[tuple[str, str, str, str, int, int]] = [
    ("returns x plus {n}", "add_{n}", "x", "x + {n}", 1, 100),
    ("returns x minus {n}", "subtract_{n}", "x", "x - {n}", 1, 100),
    ("returns x multiplied by {n}", "times_{n}", "x", "x * {n}", 2, 100),
    ("returns True if x is divisible by {n}", "divisible_by_{n}", "x", "x % {n} == 0", 2, 50),
    ("returns x raised to the power {n}", "power_{n}", "x", "x ** {n}", 2, 20),
    ("returns the remainder of x divided by {n}", "mod_{n}", "x", "x % {n}", 2, 50),
    ("returns True if x is greater than {n}", "greater_than_{n}", "x", "x > {n}", 0, 100),
    ("returns the first {n} characters of s", "first_{n}_chars", "s", "s[:{n}]", 1, 30),
    ("returns the last {n} items of xs", "last_{n}", "xs", "xs[-{n}:]", 1, 30),
    ("returns the string s repeated {n} times", "repeat_{n}", "s", "s * {n}", 2, 20),
]
CODE_TEMPLATES = [
    "Write a Python function that {desc}.",
    "Write a one-line Python function named {name} that {desc}.",
    "In Python, define a function that {desc}.",
    "Implement a Python function which {desc}.",
    "Give me a Python function that {desc}.",
]


def gen_code(rng: random.Random) -> Example:
    """Tiny one-line Python functions; the expression is fixed by the description, so it is correct."""
    if rng.random() < 0.2:
        desc, name, params, expr = rng.choice(CODE_FIXED)
    else:
        desc_t, name_t, params, expr_t, lo, hi = rng.choice(CODE_PARAMETRIC)
        n = rng.randint(lo, hi)
        desc, name, expr = desc_t.format(n=n), name_t.format(n=n), expr_t.format(n=n)
    prompt = rng.choice(CODE_TEMPLATES).format(desc=desc, name=name)
    return prompt, f"def {name}({params}):\n    return {expr}"


# --------------------------------------------------------------------------------------------
# Domain: geography
# --------------------------------------------------------------------------------------------

# (country, capital, continent). Countries with disputed/split capitals or that straddle
# continents in common usage (e.g. Russia, Turkey, South Africa, Bolivia) were left out.
COUNTRIES: list[tuple[str, str, str]] = [
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"),
    ("the United Kingdom", "London", "Europe"), ("Ireland", "Dublin", "Europe"),
    ("the Netherlands", "Amsterdam", "Europe"), ("Belgium", "Brussels", "Europe"),
    ("Switzerland", "Bern", "Europe"), ("Austria", "Vienna", "Europe"), ("Poland", "Warsaw", "Europe"),
    ("the Czech Republic", "Prague", "Europe"), ("Hungary", "Budapest", "Europe"),
    ("Greece", "Athens", "Europe"), ("Sweden", "Stockholm", "Europe"), ("Norway", "Oslo", "Europe"),
    ("Denmark", "Copenhagen", "Europe"), ("Finland", "Helsinki", "Europe"),
    ("Iceland", "Reykjavik", "Europe"), ("Romania", "Bucharest", "Europe"), ("Ukraine", "Kyiv", "Europe"),
    ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"), ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"),
    ("the Philippines", "Manila", "Asia"), ("Malaysia", "Kuala Lumpur", "Asia"),
    ("Pakistan", "Islamabad", "Asia"), ("Bangladesh", "Dhaka", "Asia"), ("Nepal", "Kathmandu", "Asia"),
    ("Iran", "Tehran", "Asia"), ("Iraq", "Baghdad", "Asia"), ("Saudi Arabia", "Riyadh", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Asia"), ("Afghanistan", "Kabul", "Asia"), ("Jordan", "Amman", "Asia"),
    ("Qatar", "Doha", "Asia"), ("Laos", "Vientiane", "Asia"), ("Cambodia", "Phnom Penh", "Asia"),
    ("Egypt", "Cairo", "Africa"), ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"), ("Morocco", "Rabat", "Africa"), ("Ghana", "Accra", "Africa"),
    ("Algeria", "Algiers", "Africa"), ("Tunisia", "Tunis", "Africa"), ("Senegal", "Dakar", "Africa"),
    ("Uganda", "Kampala", "Africa"), ("Zimbabwe", "Harare", "Africa"), ("Angola", "Luanda", "Africa"),
    ("Mali", "Bamako", "Africa"), ("Rwanda", "Kigali", "Africa"),
    ("the United States", "Washington, D.C.", "North America"), ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"), ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"), ("Brazil", "Brasília", "South America"),
    ("Argentina", "Buenos Aires", "South America"), ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"), ("Colombia", "Bogotá", "South America"),
    ("Venezuela", "Caracas", "South America"), ("Ecuador", "Quito", "South America"),
    ("Uruguay", "Montevideo", "South America"), ("Paraguay", "Asunción", "South America"),
    ("Australia", "Canberra", "Oceania"), ("New Zealand", "Wellington", "Oceania"),
    ("Fiji", "Suva", "Oceania"), ("Papua New Guinea", "Port Moresby", "Oceania"),
]  # fmt: skip
GEO_TEMPLATES: dict[str, list[str]] = {
    "capital": [
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
        "Capital of {c}?",
        "What city is {c}'s capital?",
    ],
    "country": [
        "{k} is the capital of which country?",
        "Which country has {k} as its capital?",
        "Of which country is {k} the capital?",
    ],
    "continent": [
        "On which continent is {c}?",
        "Which continent is {c} in?",
        "{C} is located on which continent?",
        "On which continent is {k}, the capital of {c}?",
    ],
    "check": ["Is {k} the capital of {c}? Answer yes or no.", "True or false: {k} is the capital of {c}."],
    "choice": ["Which is the capital of {c}: {o}?", "Pick the capital of {c} from: {o}."],
}


def _cap_first(text: str) -> str:
    """Capitalise the first character only (``the Netherlands`` -> ``The Netherlands``)."""
    return text[:1].upper() + text[1:]


def gen_geography(rng: random.Random) -> Example:
    """Capitals, continents, yes/no and multiple-choice capital questions from the table above."""
    kind = rng.choices(list(GEO_TEMPLATES), weights=[4, 2, 3, 2, 3])[0]
    template = rng.choice(GEO_TEMPLATES[kind])
    country, capital, continent = rng.choice(COUNTRIES)
    if kind == "check":
        truthful = rng.random() < 0.5
        shown = capital if truthful else rng.choice([k for _, k, _ in COUNTRIES if k != capital])
        prompt = _cap_first(template.format(k=shown, c=country))
        yes, no = ("True", "False") if template.startswith("True or false") else ("Yes", "No")
        return prompt, yes if truthful else no
    if kind == "choice":
        options = rng.sample([k for _, k, _ in COUNTRIES if k != capital], 2) + [capital]
        rng.shuffle(options)
        prompt = _cap_first(template.format(c=country, o=" / ".join(options)))
        return prompt, capital
    prompt = _cap_first(template.format(c=country, C=_cap_first(country), k=capital))
    if kind == "capital":
        return prompt, capital
    if kind == "country":
        return prompt, _cap_first(country)
    return prompt, continent


# --------------------------------------------------------------------------------------------
# Domain: number words and Roman numerals
# --------------------------------------------------------------------------------------------

ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ROMAN = [
    (1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
    (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"),
]  # fmt: skip


def number_to_words(n: int) -> str:
    """American English words for 0..9999 without "and" (``347`` -> ``three hundred forty-seven``)."""
    if not 0 <= n <= 9999:
        raise ValueError(n)
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    rest = n % 1000
    return ONES[n // 1000] + " thousand" + ("" if rest == 0 else " " + number_to_words(rest))


def to_roman(n: int) -> str:
    """Standard subtractive Roman numerals for 1..3999."""
    if not 1 <= n <= 3999:
        raise ValueError(n)
    out = []
    for value, symbol in ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


NUMBER_TEMPLATES: dict[str, list[str]] = {
    "to_words": [
        "Write {n} in words.",
        "Spell out the number {n}.",
        "How do you write {n} in English words?",
    ],
    "from_words": ["Write '{w}' as a number.", "Convert '{w}' to digits.", "What number is '{w}'?"],
    "to_roman": [
        "Write {n} in Roman numerals.",
        "Convert {n} to a Roman numeral.",
        "What is {n} in Roman numerals?",
    ],
    "from_roman": [
        "What number is the Roman numeral {r}?",
        "Convert the Roman numeral {r} to an integer.",
        "Roman numeral {r} equals?",
    ],
}


def gen_number_words(rng: random.Random) -> Example:
    """Numbers <-> English words and numbers <-> Roman numerals (small values more likely)."""
    kind = rng.choice(list(NUMBER_TEMPLATES))
    template = rng.choice(NUMBER_TEMPLATES[kind])
    n = rng.randint(0, 100) if rng.random() < 0.3 else rng.randint(0, 3999)
    if kind in ("to_roman", "from_roman"):
        n = max(n, 1)
    if kind == "to_words":
        return template.format(n=n), number_to_words(n)
    if kind == "from_words":
        return template.format(w=number_to_words(n)), str(n)
    if kind == "to_roman":
        return template.format(n=n), to_roman(n)
    return template.format(r=to_roman(n)), str(n)


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------

DOMAINS: dict[str, Generator] = {
    "arithmetic": gen_arithmetic,
    "unit_conversion": gen_units,
    "string_manipulation": gen_strings,
    "list_operations": gen_lists,
    "dates": gen_dates,
    "translation": gen_translation,
    "python_code": gen_code,
    "geography": gen_geography,
    "grammar": gen_grammar,
    "number_words": gen_number_words,
}


def _validate_tables() -> None:
    """Fail loudly if a table edit makes reverse look-ups ambiguous (two words, one answer)."""
    for column, lang in ((1, "French"), (2, "Spanish")):
        words = [row[column] for row in TRANSLATIONS]
        duplicates = sorted(w for w, n in Counter(words).items() if n > 1)
        if duplicates:
            raise ValueError(f"ambiguous {lang} words in TRANSLATIONS: {duplicates}")
    if len({english for english, _, _ in TRANSLATIONS}) != len(TRANSLATIONS):
        raise ValueError("duplicate English words in TRANSLATIONS")
    for name, values in (("plurals", list(PLURALS.values())), ("capitals", [k for _, k, _ in COUNTRIES])):
        if len(set(values)) != len(values):
            raise ValueError(f"duplicate {name}; reverse questions would be ambiguous")


def build_rows(seed: int = SEED, per_domain: int = PER_DOMAIN) -> list[dict[str, object]]:
    """Draw ``per_domain`` unique-prompt examples per domain, then shuffle domains together.

    Each domain gets its own ``random.Random`` seeded from a string (hashed with SHA-512 by
    ``random``, so it does not depend on PYTHONHASHSEED); prompts already used anywhere are redrawn.
    """
    _validate_tables()
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    for name, generate in DOMAINS.items():
        rng = random.Random(f"{seed}:{name}")
        made, attempts = 0, 0
        while made < per_domain:
            attempts += 1
            if attempts > per_domain * 100:
                raise RuntimeError(f"domain {name!r} cannot produce {per_domain} unique prompts")
            prompt, completion = generate(rng)
            if prompt in seen:
                continue
            if not prompt or not completion:
                raise ValueError(f"empty field in {name}: {prompt!r} -> {completion!r}")
            if len(prompt) > MAX_PROMPT_CHARS or len(completion) > MAX_COMPLETION_CHARS:
                raise ValueError(f"over-long example in {name}: {prompt!r} -> {completion!r}")
            seen.add(prompt)
            # A leading space on the completion makes the prompt end on a token boundary for byte-level
            # BPE tokenizers, so TRL's prompt/completion split tokenizes the prompt the same both ways.
            rows.append({"domain": name, "prompt": prompt, "completion": " " + completion})
            made += 1
    random.Random(seed).shuffle(rows)
    return [{"id": i, **row} for i, row in enumerate(rows)]


def serialize(rows: list[dict[str, object]]) -> bytes:
    """JSON Lines, UTF-8, compact separators, one object per line with a fixed key order."""
    lines = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in rows)
    return ("\n".join(lines) + "\n").encode("utf-8")


def gzip_deterministic(payload: bytes) -> bytes:
    """Gzip ``payload`` with a fixed header (no file name, mtime 0, OS byte 255).

    Why not ``gzip.compress``: its header differs between Python versions (3.11+ lets zlib write
    the header, with the host's OS byte), which would make the bundled file flap between machines.
    """
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x02\xff"
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_DEFAULT_STRATEGY)
    body = compressor.compress(payload) + compressor.flush()
    trailer = struct.pack("<II", zlib.crc32(payload) & 0xFFFFFFFF, len(payload) & 0xFFFFFFFF)
    return header + body + trailer


def domain_counts(rows: list[dict[str, object]]) -> dict[str, int]:
    """Rows per domain in ``DOMAINS`` order (used for the summary line and the README)."""
    counts = Counter(str(row["domain"]) for row in rows)
    return {name: counts[name] for name in DOMAINS}


def check(path: Path) -> int:
    """Return 0 if ``path`` holds exactly what the generator produces now, else 1.

    The comparison is on the decompressed JSON Lines: that is the dataset. Compressed bytes are
    also compared, but a mismatch there only yields a note, because a different zlib build (e.g.
    zlib-ng) may legitimately encode the same content differently.
    """
    if not path.is_file():
        print(f"{path} is missing; run `python data/make_dataset.py`", file=sys.stderr)
        return 1
    payload = serialize(build_rows())
    on_disk = path.read_bytes()
    try:
        disk_payload = gzip.decompress(on_disk)
    except (OSError, EOFError) as exc:
        print(f"{path} is not a valid gzip file: {exc}", file=sys.stderr)
        return 1
    if disk_payload != payload:
        print(f"{path} is stale; rerun `python data/make_dataset.py`", file=sys.stderr)
        return 1
    if on_disk != gzip_deterministic(payload):
        print(f"note: {path} content matches, but this zlib compresses it to different bytes")
    print(f"{path} is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: write the dataset, or verify it with ``--check``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file on disk is out of date")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the .jsonl.gz goes")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.output)
    rows = build_rows()
    blob = gzip_deterministic(serialize(rows))
    args.output.write_bytes(blob)
    summary = ", ".join(f"{name}={n}" for name, n in domain_counts(rows).items())
    print(f"wrote {len(rows)} rows ({len(blob)} bytes) to {args.output}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
