"""Assemble a WhiFlash folder from trained drafters: what the package ships for its default target.

    python recipes/ship.py --eagle3 runs/eagle3-smollm2/final --dflash runs/dflash-smollm2/final \
        --out hf_whiflash/checkpoints/SmolLM2-135M-Instruct

The drafters are stored in bfloat16 (half the size; attach() casts them to the target's dtype), each
in its Hub layout, next to whiflash_config.json (draft lengths and the entropy policy's defaults).
`--update` replaces only the drafters given in an existing folder and keeps everything else (the other
drafter, the router, whiflash_config.json): re-profile the new drafter and retune the router afterwards.
`recipes/train_router.py --install` later adds the neural router to the same folder, and
`recipes/profile_acceptance.py` the acceptance profiles from which each machine picks its draft lengths.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from hf_whiflash import DFlashDrafter, Eagle3Drafter
from hf_whiflash.assistant import write_settings
from hf_whiflash.names import DFLASH, EAGLE
from hf_whiflash.routing import EntropyPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eagle3", help="trained EAGLE-3 folder")
    parser.add_argument("--dflash", help="trained DFlash folder")
    parser.add_argument("--eagle-steps", type=int, help="EAGLE-3 chain length per round, fixed for every machine "
                        "(default: each machine picks its own, see profile_acceptance.py)")
    parser.add_argument("--block-size", type=int, help="DFlash block size, fixed for every machine (default: as above)")
    parser.add_argument("--out", required=True, help="WhiFlash folder to write (replaced as a whole)")
    parser.add_argument("--update", action="store_true", help="replace only the given drafters in the existing --out")
    args = parser.parse_args()
    if not (args.eagle3 or args.dflash):
        parser.error("give at least one drafter: --eagle3 FOLDER and/or --dflash FOLDER")
    out = Path(args.out)
    if args.update and not (out / "whiflash_config.json").is_file():
        parser.error(f"--update: {out} is not a WhiFlash folder (no whiflash_config.json); leave out --update")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))  # never a half folder
    try:
        if args.update:
            shutil.copytree(out, tmp, dirs_exist_ok=True)
        for route, cls, source in ((EAGLE, Eagle3Drafter, args.eagle3), (DFLASH, DFlashDrafter, args.dflash)):
            if source:
                drafter = cls.from_pretrained(source, dtype=torch.bfloat16)
                shutil.rmtree(tmp / route, ignore_errors=True)  # the old drafter's acceptance profile goes too
                drafter.save_pretrained(tmp / route)
        if not args.update:
            write_settings(tmp, args.eagle_steps, args.block_size, EntropyPolicy())
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)  # the old folder aside, the new one in, then the old one out
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: " + ", ".join(f"{p.relative_to(out)} {p.stat().st_size / 2**20:.1f} MB"
                                       for p in sorted(out.rglob("*")) if p.is_file()))


if __name__ == "__main__":
    main()
