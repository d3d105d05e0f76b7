"""Build the embedded demo's data from the chatterbot English corpus (see rlhf/demo_data.py).

    python scripts/make_demo_data.py [--out data/demo] [--seed 0] [--n-pretrain 6000] ...

Prints the number of records written to each file. Same seed, same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import inspect  # noqa: E402

from rlhf.demo_data import build_demo_data  # noqa: E402
from rlhf.errors import run_cli  # noqa: E402

HELP = {
    "n_pretrain": "pretraining records (text); reached by redrawing rude/real replies",
    "heldout_fraction": "share of corpus conversations held out (grouped by shared user utterances)",
    "n_sft_train": "target SFT train dialogues (capped by what the corpus holds)",
    "n_sft_heldout": "target SFT held-out dialogues (capped by what the corpus holds)",
    "n_pref_train": "target preference pairs, train",
    "n_pref_heldout": "target preference pairs, held-out",
    "n_prompts_train": "target PPO prompts, train",
    "n_prompts_heldout": "target comparison prompts, held-out",
    "rude_fraction": "share of ordinary assistant replies made rude in the pretraining text",
    "sft_rude_fraction": "share of real replies made rude in the SFT train dialogues (kind: rude)",
    "sft_adversarial_rude_fraction": "share of replies to adversarial prompts made rude in the SFT train dialogues",
    "adversarial_fraction": "share of adversarial prompts among the PPO/comparison prompts",
    "adversarial_heldout_fraction": "share of adversarial prompt stems held out",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    for name, param in inspect.signature(build_demo_data).parameters.items():
        if name in HELP:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(param.default),
                                default=param.default, help=f"{HELP[name]} (default: {param.default})")
    args = vars(parser.parse_args())
    out = args.pop("out")
    counts = build_demo_data(out, **args)
    for name, n in counts.items():
        print(f"{out / (name + '.jsonl')}: {n}")


if __name__ == "__main__":
    from rlhf import console  # quiet console: known library warnings that say nothing actionable are hidden

    console.install()
    run_cli(main)
