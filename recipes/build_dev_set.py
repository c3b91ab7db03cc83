"""Build the dev set (hf_whiflash/data/dev_set.jsonl): 20 prompts per category, never used in training.

    python recipes/build_dev_set.py

Code, math and chat prompts are written here by hand; tool-call prompts are BFCL live_* items chosen
by a fixed stride and excluded from training data by id (see recipes/data.py).
"""

import argparse
import json
from pathlib import Path

from prompts import bfcl_live_items, tool_messages

OUT = Path(__file__).resolve().parents[1] / "hf_whiflash" / "data" / "dev_set.jsonl"
TOOL_COUNT, MAX_TOOL_PROMPT_CHARS = 20, 2500

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


def tool_items() -> list[dict]:
    """TOOL_COUNT items spread evenly over BFCL live_*, among those with a prompt a CPU prefills quickly."""
    items = [it for it in bfcl_live_items() if len(tool_messages(it)[0]["content"]) <= MAX_TOOL_PROMPT_CHARS]
    stride = len(items) // TOOL_COUNT
    return items[::stride][:TOOL_COUNT]


def main() -> None:
    rows = []
    for category, prompts in (("code", CODE), ("math", MATH), ("chat", CHAT)):
        rows += [{"id": f"{category}-{i}", "category": category,
                  "messages": [{"role": "user", "content": p}]} for i, p in enumerate(prompts)]
    rows += [{"id": item["id"], "category": "tool", "messages": tool_messages(item)} for item in tool_items()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {c: sum(r["category"] == c for r in rows) for c in ("code", "tool", "math", "chat")}
    print(f"wrote {len(rows)} prompts to {OUT}: {counts}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
