"""Regenerate sample_data/reviews.jsonl and reviews.parquet (300 product reviews).

python sample_data/make_reviews.py
"""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PRODUCTS = {
    "wireless earbuds": ["battery life", "sound", "fit", "pairing", "case"],
    "robot vacuum": ["suction", "mapping", "noise", "app", "battery"],
    "espresso machine": ["crema", "steam wand", "warm-up time", "cleaning", "build"],
    "running shoes": ["cushioning", "grip", "sizing", "breathability", "durability"],
    "office chair": ["lumbar support", "armrests", "assembly", "fabric", "wheels"],
    "4K monitor": ["colours", "stand", "brightness", "ports", "text sharpness"],
    "air fryer": ["capacity", "crispiness", "basket coating", "controls", "noise"],
    "backpack": ["zippers", "straps", "laptop sleeve", "water resistance", "pockets"],
}
GOOD = [
    "The {a} is excellent and exceeded what I expected.",
    "Really impressed with the {a}; worth every penny.",
    "After three weeks of daily use the {a} still feels great.",
    "Best {a} I have had on any {p} so far.",
]
BAD = [
    "The {a} stopped working after two weeks. Very disappointed.",
    "Honestly the {a} is terrible and customer service never replied.",
    "I returned it because the {a} was far worse than advertised.",
    "Do not buy: the {a} is flimsy and felt cheap out of the box.",
]
MIXED = [
    "The {a} is fine, nothing special, but the {b} could be better.",
    "Decent {p}. The {a} is good, the {b} is average.",
    "It does the job. I have no strong feelings about the {a}.",
    "The {a} is great but the {b} is a letdown, so three stars.",
]


def reviews(n: int = 300, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        product = rng.choice(sorted(PRODUCTS))
        a, b = rng.sample(PRODUCTS[product], 2)
        stars, pool = rng.choice([(5, GOOD), (4, GOOD), (1, BAD), (2, BAD), (3, MIXED)])
        text = rng.choice(pool).format(a=a, b=b, p=product)
        rows.append({"id": f"r{i:04d}", "product": product, "stars": stars, "text": text})
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    rows = reviews()
    with (here / "reviews.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), here / "reviews.parquet")
