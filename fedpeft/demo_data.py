"""A generated customer-support intent dataset for the quickstart (our own text and generator).

Deterministic from a seed, four intents, shared openers/closers and product names across intents so
that no single word gives the label away. A third of the messages add a side remark from another
intent ("Also, ..."); the label is the main request, so the model has to weigh the two. The
held-out split is drawn from the same generator with a different seed stream.
"""

from __future__ import annotations

import random

LABELS = ["billing", "delivery", "technical", "account"]

_PRODUCTS = [
    "the blender",
    "my headphones",
    "the router",
    "the standing desk",
    "the e-reader",
    "the coffee grinder",
    "my order",
    "the air purifier",
    "the smart watch",
    "the camera",
]
_OPENERS = [
    "Hi,",
    "Hello team,",
    "Good morning.",
    "Hey there,",
    "Quick question:",
    "Hi support,",
    "Not happy right now.",
    "Sorry to bother you again,",
    "",
    "",
    "",
]
_CLOSERS = [
    "Thanks.",
    "Please help.",
    "Any update would be great.",
    "Cheers.",
    "I need this sorted today.",
    "Thank you in advance.",
    "",
    "",
    "",
]
_TIMES = ["yesterday", "last week", "on Monday", "two days ago", "this morning", "since March"]

_TEMPLATES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for {p} {t}.",
        "The invoice for {p} shows the wrong amount.",
        "Can I get a refund for {p}? The money has not come back to my card.",
        "Why did my card get billed {t} when I cancelled {p}?",
        "The discount code was not applied when I paid for {p}.",
        "I see a pending payment for {p} that I never authorised.",
        "Please send me a receipt for {p}, I need it for my expenses.",
        "My subscription price went up {t} without any notice.",
    ],
    "delivery": [
        "{P} still has not arrived, tracking has not moved since {t}.",
        "The courier left {p} at the wrong address {t}.",
        "Can you change the shipping address for {p} before it is dispatched?",
        "The parcel with {p} came damaged, the box was crushed.",
        "Tracking says {p} was delivered {t} but nothing is here.",
        "How long does shipping take for {p} to my country?",
        "Only half of my order arrived {t}, {p} is missing from the box.",
        "The delivery slot for {p} was missed and nobody called.",
    ],
    "technical": [
        "{P} stopped working {t}, it will not turn on.",
        "The app keeps crashing when I try to connect {p}.",
        "{P} makes a loud noise after a few minutes of use.",
        "The firmware update for {p} failed halfway and now it is stuck.",
        "The battery in {p} drains in an hour since {t}.",
        "{P} does not pair over bluetooth any more.",
        "I get an error code E42 on {p} every time I start it.",
        "The screen on {p} flickers and then goes black.",
    ],
    "account": [
        "I cannot log in, the password reset email never arrives.",
        "Please change the email address on my account, I bought {p} with the old one.",
        "How do I delete my account and all my data?",
        "Someone else seems to have accessed my account {t}.",
        "My account got locked after I tried to check the status of {p}.",
        "I want to merge my two accounts, one of them has {p} registered.",
        "The two-factor code is not being sent to my phone since {t}.",
        "Can I update my name and phone number on my profile?",
    ],
}


SIDE_REMARK_RATE = 0.35


def _request(rng: random.Random, label: str) -> str:
    product = rng.choice(_PRODUCTS)
    return rng.choice(_TEMPLATES[label]).format(
        p=product, P=product[0].upper() + product[1:], t=rng.choice(_TIMES)
    )


def _sentence(rng: random.Random, label: str) -> str:
    parts = [rng.choice(_OPENERS), _request(rng, label)]
    if rng.random() < SIDE_REMARK_RATE:
        other = rng.choice([name for name in LABELS if name != label])
        remark = _request(rng, other)
        parts.append(f"Also, {remark[0].lower()}{remark[1:]}")
    parts.append(rng.choice(_CLOSERS))
    return " ".join(p for p in parts if p)


def generate(num_rows: int, seed: int) -> dict[str, list]:
    """``num_rows`` labelled support messages, balanced over ``LABELS``, shuffled by ``seed``."""
    rng = random.Random(seed)
    labels = [i % len(LABELS) for i in range(num_rows)]
    rng.shuffle(labels)
    return {"text": [_sentence(rng, LABELS[y]) for y in labels], "label": labels}


def demo_splits(train_rows: int, test_rows: int, seed: int) -> tuple[dict[str, list], dict[str, list]]:
    """(train, test) from independent seed streams of the same generator."""
    return generate(train_rows, seed * 2 + 1), generate(test_rows, seed * 2 + 2)
