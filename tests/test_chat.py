"""scripts/chat.py: one-shot mode for scripts, the toxicity filter on replies, and the interactive commands.

The model is the session's tiny `pretrain` entry (chat only reads the registry).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import load_script, run_script

pytestmark = pytest.mark.slow


def _chat_module():
    return load_script("scripts/chat.py")


class _FixedScorer:
    """A toxicity scorer that returns the same score for every text."""

    def __init__(self, value: float):
        self.value = value

    def score(self, texts):
        return np.full(len(texts), self.value)


def test_one_shot_prints_only_the_reply(pretrained_registry):
    chat = _chat_module()
    out = io.StringIO()
    chat.main(["--model", "pretrain:latest", "--registry", str(pretrained_registry), "--prompt", "hello how are you",
               "--max_new_tokens", "8", "--toxicity", "profanity-check", "--threshold", "1.0"], stdout=out)
    assert len(out.getvalue().splitlines()) == 1 and "[filtered" not in out.getvalue()  # usable from scripts


def test_one_shot_exits_0_and_a_reply_over_the_threshold_is_replaced_by_the_refusal_and_flagged(pretrained_registry):
    # Threshold 0: every score is >= 0, so the filter must fire whatever the model says.
    res = run_script("scripts/chat.py", "--model", "pretrain:latest", "--registry", str(pretrained_registry),
                     "--prompt", "hello", "--max_new_tokens", "8", "--toxicity", "profanity-check",
                     "--threshold", "0", "--refusal", "No comment.", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("No comment. [filtered: toxicity ")
    assert len(res.stdout.splitlines()) == 1


def test_chat_with_an_unknown_reference_fails_with_one_line(pretrained_registry):
    chat = _chat_module()
    from rlhf.errors import RegistryError

    with pytest.raises(RegistryError, match="no entry with id"):
        chat.main(["--model", "sft:nope", "--registry", str(pretrained_registry), "--prompt", "hi",
                   "--toxicity", "profanity-check"])


def test_filter_keeps_replies_under_the_threshold_and_refuses_at_or_over_it():
    chat = _chat_module()
    kept = chat.filter_reply("have a nice day", _FixedScorer(0.49), threshold=0.5)
    assert (kept.text, kept.filtered, kept.render()) == ("have a nice day", False, "have a nice day")
    refused = chat.filter_reply("you idiot", _FixedScorer(0.93), threshold=0.5, refusal="Sorry.")
    assert (refused.text, refused.filtered) == ("Sorry.", True)
    assert refused.render() == "Sorry. [filtered: toxicity 0.93]"
    assert chat.filter_reply("x", _FixedScorer(0.5), threshold=0.5).filtered  # at the threshold counts


def test_interactive_session_keeps_history_reset_clears_it_and_exit_stops(pretrained_registry, monkeypatch):
    chat = _chat_module()
    args = chat.parse_args(["--model", "pretrain:latest", "--registry", str(pretrained_registry),
                            "--max_new_tokens", "4", "--toxicity", "profanity-check", "--system", "be kind"])
    session = chat.open_session(args)
    session.scorer = _FixedScorer(0.0)
    sent: list[list[dict]] = []
    original = session.send

    def spy(text):
        reply = original(text)
        sent.append(list(session.history))
        return reply

    monkeypatch.setattr(session, "send", spy)
    out = io.StringIO()
    chat.interact(session, io.StringIO("first\nsecond\n/reset\nthird\n/exit\nnever read\n"), out)
    assert len(out.getvalue().splitlines()) == 3  # one line per message; /exit stops before "never read"
    roles = [[m["role"] for m in h] for h in sent]
    assert roles[0] == ["system", "user", "assistant"]
    assert roles[1] == ["system", "user", "assistant", "user", "assistant"]  # history kept
    assert roles[2] == ["system", "user", "assistant"]  # /reset cleared it, the system message stays
    assert sent[2][1]["content"] == "third"


def test_filtered_reply_is_what_the_history_keeps(pretrained_registry):
    chat = _chat_module()
    args = chat.parse_args(["--model", "pretrain:latest", "--registry", str(pretrained_registry),
                            "--max_new_tokens", "4", "--toxicity", "profanity-check"])
    session = chat.open_session(args)
    session.scorer = _FixedScorer(0.99)
    reply = session.send("hello")
    assert reply.filtered and session.history[-1] == {"role": "assistant", "content": chat.REFUSAL}
