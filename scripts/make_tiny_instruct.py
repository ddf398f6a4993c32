"""Build `data/tiny_instruct/`: a small, deterministic instruction dataset for the embedded default.

    python scripts/make_tiny_instruct.py            # writes data/tiny_instruct/{train,eval}.jsonl

Eight templated tasks (arithmetic, copying, reversal, lookup facts, antonyms, counting, sorting,
next number) with several phrasings each. A tiny random-weight model learns them only through its
LoRA adapters, so eval loss moves visibly with learning rate and rank. Eval rows are held out: no
(instruction, response) pair of the eval split appears in the train split.
"""
import argparse
import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger lemon piano rocket garden candle silver orange window "
         "forest bridge mirror pencil castle dragon planet".split())
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Peru": "Lima", "Kenya": "Nairobi", "Chile": "Santiago", "Norway": "Oslo", "Greece": "Athens",
            "Cuba": "Havana", "Nepal": "Kathmandu"}
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
            "open": "closed", "early": "late", "full": "empty", "hard": "soft", "wet": "dry", "old": "new"}


def make_row(rng: random.Random) -> dict:
    task = rng.randrange(8)
    if task == 0:
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        q = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}."])
        r = str(a + b)
    elif task == 1:
        w = rng.sample(WORDS, 2)
        q = rng.choice([f"Repeat after me: {w[0]} {w[1]}", f"Say exactly: {w[0]} {w[1]}"])
        r = f"{w[0]} {w[1]}"
    elif task == 2:
        w = rng.sample(WORDS, 3)
        q = rng.choice([f"Reverse the order: {' '.join(w)}", f"Write backwards: {' '.join(w)}"])
        r = " ".join(reversed(w))
    elif task == 3:
        c = rng.choice(sorted(CAPITALS))
        q = rng.choice([f"What is the capital of {c}?", f"Name the capital city of {c}.", f"{c}'s capital?"])
        r = CAPITALS[c]
    elif task == 4:
        w = rng.choice(sorted(ANTONYMS))
        q = rng.choice([f"What is the opposite of {w}?", f"Give an antonym of {w}.", f"Opposite: {w}"])
        r = ANTONYMS[w]
    elif task == 5:
        w = rng.choice(WORDS)
        n = rng.randint(1, 5)
        q = rng.choice([f"Write {w} {n} times.", f"Repeat {w} {n} times."])
        r = " ".join([w] * n)
    elif task == 6:
        w = rng.sample(WORDS, 3)
        q = rng.choice([f"Sort alphabetically: {' '.join(w)}", f"Put in order: {' '.join(w)}"])
        r = " ".join(sorted(w))
    else:
        n = rng.randint(0, 98)
        q = rng.choice([f"What number comes after {n}?", f"Next number after {n}?"])
        r = str(n + 1)
    if rng.random() < 0.5:  # half the rows in chat form, half as instruction/response: both formats load
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
    return {"instruction": q, "response": r}


def key(row: dict) -> tuple[str, str]:
    if "messages" in row:
        return row["messages"][0]["content"], row["messages"][1]["content"]
    return row["instruction"], row["response"]


def build(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    eval_rows, seen = [], set()
    while len(eval_rows) < n_eval:
        row = make_row(rng)
        if key(row) not in seen:
            seen.add(key(row))
            eval_rows.append(row)
    train_rows = []
    while len(train_rows) < n_train:
        row = make_row(rng)
        if key(row) not in seen:  # held out: eval pairs never appear in train
            train_rows.append(row)
    return train_rows, eval_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "tiny_instruct"))
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "eval"), build(a.train, a.eval, a.seed), strict=True):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
