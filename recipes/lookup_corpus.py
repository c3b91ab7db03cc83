"""Give a WhiFlash folder's lookup drafter a corpus: the target's own responses from a data folder, which lookup
proposes from in rounds where the text repeats nothing (hf_whiflash/drafters/lookup.py, Corpus).

    python recipes/lookup_corpus.py runs/data/smollm2 --into hf_whiflash/checkpoints/SmolLM2-135M-Instruct

Writes FOLDER/lookup/corpus.safetensors (int32 token ids, responses separated by -1; 4 bytes a token) and
lookup/config.json (the folder's lookup settings, default ones unless it has them). The data folder's prompts
exclude the dev and held-out sets (recipes/data.py), so evaluation stays on text the corpus never saw. Then
profile lookup again (recipes/profile_acceptance.py --routes lookup: corpus drafts get their acceptance by share)
and retrain the router (recipes/train_router.py --install), whose features tell corpus matches apart.
"""

import argparse
from pathlib import Path

from jsonl import read_rows

from hf_whiflash import LookupDrafter
from hf_whiflash.drafters.lookup import Corpus
from hf_whiflash.names import LOOKUP


def responses(data: Path) -> list[list[int]]:
    """Every sample's response token ids (what the target wrote), in a fixed order."""
    rows = [row for path in sorted(data.glob("samples.*.jsonl")) for row in read_rows(path)]
    if not rows:
        raise SystemExit(f"no samples.*.jsonl in {data}: run recipes/data.py first")
    return [row["input_ids"][row["response_start"]:] for row in sorted(rows, key=lambda r: r["id"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a recipes/data.py output folder (samples.*.jsonl)")
    parser.add_argument("--into", type=Path, required=True, help="the WhiFlash folder whose lookup/ gets the corpus")
    args = parser.parse_args()
    folder = args.into / LOOKUP
    lookup = LookupDrafter.from_pretrained(folder) if folder.is_dir() else LookupDrafter()
    lookup.corpus = Corpus.from_documents(responses(args.data), lookup.corpus_max_match)
    lookup.save_pretrained(folder)
    print(f"{folder}: a corpus of {len(lookup.corpus)} tokens from {args.data}")


if __name__ == "__main__":
    main()
