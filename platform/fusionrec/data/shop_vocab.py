"""The synthetic dress shop's vocabulary: attribute levels and the words that describe them.

Each attribute is shown by exactly one modality, so each modality's share of the rating signal
is known: text-only factors (fabric, vibe, occasion) appear in descriptions and self-intros,
image-only factors (style, colour, pattern) in pictures, and structured factors in columns.
"""

from __future__ import annotations

# --- text-only factors: phrase variants per level (synonyms, so texts are not one sentence) ---
FABRICS = {
    "cotton": ["cotton", "soft cotton", "breathable cotton"],
    "linen": ["linen", "airy linen", "washed linen"],
    "silk": ["silk", "pure silk", "lustrous silk"],
    "chiffon": ["chiffon", "floaty chiffon", "sheer chiffon"],
    "denim": ["denim", "sturdy denim", "soft-washed denim"],
    "velvet": ["velvet", "plush velvet", "crushed velvet"],
    "satin": ["satin", "glossy satin", "smooth satin"],
    "jersey": ["jersey", "stretchy jersey", "easy-care jersey"],
}
VIBES = {
    "romantic": ["romantic", "dreamy", "soft and romantic"],
    "minimalist": ["minimalist", "clean-lined", "understated"],
    "bohemian": ["bohemian", "boho", "free-spirited"],
    "vintage": ["vintage", "retro", "old-school"],
    "sporty": ["sporty", "athletic", "active"],
    "glamorous": ["glamorous", "show-stopping", "red-carpet"],
    "playful": ["playful", "quirky", "fun"],
    "classic": ["classic", "timeless", "elegant"],
}
OCCASIONS = {
    "office": ["the office", "work days", "business meetings"],
    "wedding": ["weddings", "wedding season", "a friend's wedding"],
    "beach": ["the beach", "seaside holidays", "sunny resorts"],
    "party": ["parties", "nights out", "cocktail evenings"],
    "everyday": ["everyday wear", "errands and coffee", "any ordinary day"],
    "travel": ["travel", "long trips", "city breaks"],
}

# --- image-only factors ---
STYLES = ["a-line", "bodycon", "shift", "wrap", "fit-and-flare", "slip"]
COLOURS = {
    "black": (25, 25, 28), "white": (246, 244, 238), "red": (200, 32, 44), "navy": (28, 42, 104),
    "green": (42, 140, 72), "yellow": (238, 198, 44), "pink": (238, 140, 182), "beige": (214, 190, 150),
    "purple": (118, 62, 150), "sky blue": (118, 180, 230),
}
PATTERNS = ["solid", "striped", "polka dot", "floral", "checked", "geometric"]

# --- structured factors (columns) ---
BRANDS = ["Aurelia", "Bloomfield", "Cordelle", "Dunmore", "Elara", "Fenwick",
          "Giselle", "Harlow", "Isla & Co", "Juniper", "Kestrel", "Lumen"]
SLEEVES = ["sleeveless", "short", "three-quarter", "long"]
LENGTHS = ["mini", "knee", "midi", "maxi"]
AGE_RANGES = ["18-24", "25-34", "35-44", "45+"]
PRICE_BANDS = ["budget", "mid", "premium", "luxury"]
PRICE_BASE = [25.0, 60.0, 140.0, 320.0]
GENDERS = ["female", "male", "non-binary"]
GENDER_WEIGHTS = [0.85, 0.10, 0.05]
SIZES = ["XS", "S", "M", "L", "XL"]
REGIONS = ["north", "south", "east", "west", "coast", "mountains"]

# --- free text around the signal ---
ITEM_TEMPLATES = [
    "A {vibe} dress in {fabric}, made for {occasion}.",
    "{Fabric} meets a {vibe} mood in this piece, perfect for {occasion}.",
    "Designed for {occasion}: {vibe} details and {fabric} throughout.",
    "Our {vibe} favourite, cut from {fabric}. Wear it to {occasion}.",
    "If you love {vibe} looks, this {fabric} number is ready for {occasion}.",
    "{Fabric}, {vibe}, and made with {occasion} in mind.",
]
ITEM_FILLERS = ["", "Machine washable.", "Fully lined.", "A new arrival this season.", "Pockets included.",
                "Runs true to size.", "Hand finished seams.", "Ships in recycled packaging."]
USER_OPENERS = ["Hi! I'm a {job} from the {region}.", "{Job} here, based in the {region}.",
                "Hello! {Job} by day, and I love {hobby}.", "I'm a {job} who spends weekends {hobby}."]
USER_FACTOR_SENTENCES = {
    "fabric": ["I always reach for {fabric}.", "{Fabric} is my favourite fabric.", "Nothing beats {fabric} for me."],
    "vibe": ["My style is {vibe}.", "Friends call my look {vibe}.", "I lean towards {vibe} outfits."],
    "occasion": ["I mostly shop for {occasion}.", "I need dresses for {occasion}.",
                 "Most of what I buy is for {occasion}."],
}
USER_FILLERS = ["", "I love {hobby}.", "Weekends are for {hobby}.", "Always happy to try something new."]
JOBS = ["teacher", "nurse", "designer", "engineer", "student", "lawyer", "chef", "photographer", "accountant",
        "writer", "pharmacist", "architect"]
HOBBIES = ["hiking", "reading", "baking", "doing yoga", "painting", "gardening", "cycling", "dancing", "travelling"]
