"""Chat with any model reference; every reply passes a toxicity filter.

    python scripts/chat.py --model ppo:latest                      # interactive: /reset, /exit (or EOF)
    python scripts/chat.py --model sft:latest --prompt "Hello!"    # one-shot: print the reply, exit 0
    python scripts/chat.py --model gpt2 --temperature 0            # hub ids and folders work too (greedy here)

The conversation goes through the model's chat template (rlhf.generation). A reply
whose toxicity (rlhf.safety, `--toxicity`, default `auto`) is >= `--threshold` is
replaced by a refusal and flagged, e.g. `I'd rather not say that. [filtered: toxicity 0.93]`;
the refusal, not the filtered text, is what the conversation history keeps.
Sampling is seeded once per session (`--seed`), so a scripted session repeats.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.errors import ConfigError, run_cli  # noqa: E402

REFUSAL = "I'd rather not say that."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registry ref (ppo:latest, sft:<id>), model folder or hub id")
    parser.add_argument("--registry", default="runs", help="registry folder for registry refs (default: runs)")
    parser.add_argument("--prompt", help="one-shot: answer this message, print the reply and exit")
    parser.add_argument("--system", help="system message that starts the conversation (kept by /reset)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0: greedy (default 0.7)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="reply length limit in tokens (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for the session (default 0)")
    parser.add_argument("--toxicity", default="auto", help="toxicity scorer spec (rlhf.safety; default auto)")
    parser.add_argument("--threshold", type=float, default=0.5, help="filter replies scoring >= this (default 0.5)")
    parser.add_argument("--refusal", default=REFUSAL, help=f"text shown instead of a filtered reply ({REFUSAL!r})")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    parser.add_argument("--verbose", action="store_true",
                        help="show every warning, also the known ones that say nothing actionable (rlhf.console)")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise ConfigError("need --temperature >= 0, 0 < --top_p <= 1 and --max_new_tokens >= 1")
    if not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    return args


@dataclass
class Reply:
    text: str  # what is shown and kept in the history
    toxicity: float
    filtered: bool

    def render(self) -> str:
        return f"{self.text} [filtered: toxicity {self.toxicity:.2f}]" if self.filtered else self.text


def filter_reply(text: str, scorer: Any, threshold: float, refusal: str = REFUSAL) -> Reply:
    """The reply as shown: the refusal, flagged, when the text's toxicity is >= threshold."""
    toxicity = float(scorer.score([text])[0])
    if toxicity >= threshold:
        return Reply(refusal, toxicity, True)
    return Reply(text, toxicity, False)


@dataclass
class ChatSession:
    """One conversation: the history (messages), the model, and the filter."""

    model: Any
    tokenizer: Any
    scorer: Any
    args: argparse.Namespace
    max_prompt_length: int
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def send(self, user_text: str) -> Reply:
        from rlhf.generation import generate_replies

        self.history.append({"role": "user", "content": user_text})
        sample = self.args.temperature > 0
        (text,), _ = generate_replies(
            self.model, self.tokenizer, [self.history], max_new_tokens=self.args.max_new_tokens, do_sample=sample,
            temperature=self.args.temperature if sample else 1.0, top_p=self.args.top_p if sample else 1.0,
            max_prompt_length=self.max_prompt_length)
        reply = filter_reply(text, self.scorer, self.args.threshold, self.args.refusal)
        self.history.append({"role": "assistant", "content": reply.text})
        return reply


def open_session(args: argparse.Namespace) -> ChatSession:
    import torch

    from rlhf.models import context_length, is_registry_ref, load_chat_model
    from rlhf.registry import Registry
    from rlhf.safety import load_scorer

    scorer = load_scorer(args.toxicity, threshold=args.threshold)
    # Folders and hub ids never touch the registry, so none is opened (or created) for them.
    registry = Registry(args.registry, create=False) if is_registry_ref(args.model) else None
    model, tokenizer, _ = load_chat_model(args.model, registry, trust_remote_code=args.trust_remote_code)
    torch.manual_seed(args.seed)
    # The newest turns are kept when the conversation outgrows the context.
    max_prompt = max(1, context_length(model, 100_000) - args.max_new_tokens)
    return ChatSession(model, tokenizer, scorer, args, max_prompt_length=max_prompt)


def interact(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """Read user lines until EOF or /exit; /reset starts a new conversation."""
    tty = stdin.isatty()
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        print(session.send(text).render(), file=stdout, flush=True)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    args = parse_args(argv)
    session = open_session(args)
    stdout = stdout or sys.stdout
    if args.prompt is not None:
        print(session.send(args.prompt).render(), file=stdout, flush=True)
        return
    interact(session, stdin or sys.stdin, stdout)


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    console.install(verbose="--verbose" in sys.argv[1:])
    run_cli(main)
