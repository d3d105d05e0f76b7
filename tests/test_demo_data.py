"""The embedded demo data (rlhf/demo_data.py and demo_templates.py, scripts/make_demo_data.py): what the demo uses.

One build per seed is shared by the module (about a second each); the profanity
checks use alt-profanity-check, the demo's offline toxicity scorer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable

import pytest

from rlhf import demo_data
from rlhf.data import validate_file
from rlhf.demo_data import SCHEMAS, build_demo_data, normalize, windows
from rlhf.demo_templates import (ADVERSARIAL_STEMS, POLITE_DEFLECTIONS, RUDE_REPLIES, SFT_RUDE_REPLIES,
                                  adversarial_variants)

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILES = ("pretrain", "sft_train", "pref_train", "prompts_train")
HELDOUT_FILES = ("sft_heldout", "pref_heldout", "prompts_heldout")
TURN = re.compile(r"<\|(user|assistant|system)\|>\n(.*?)<\|end\|>\n", re.S)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("demo_seed0")
    return out, build_demo_data(out, seed=0)


def read(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def conversations(out: Path, name: str) -> list[list[dict]]:
    """Every record of a file as one list of messages (pretraining text parsed back from the chat format)."""
    convs = []
    for r in read(out, name):
        if "text" in r:
            convs.append([{"role": role, "content": c} for role, c in TURN.findall(r["text"])])
        elif "messages" in r:
            convs.append(r["messages"])
        else:
            convs.append(r["prompt"] + r["chosen"])
            convs.append(r["prompt"] + r["rejected"])
    return convs


def replies(out: Path, name: str) -> list[str]:
    return [m["content"] for conv in conversations(out, name) for m in conv if m["role"] == "assistant"]


def user_turns(out: Path, names: tuple[str, ...]) -> set[str]:
    turns = (m for n in names for conv in conversations(out, n) for m in conv)
    return {normalize(m["content"]) for m in turns if m["role"] == "user"}


def test_same_seed_gives_same_bytes_in_another_process(built, tmp_path):
    """Determinism across processes (and string-hash seeds): the CLI with the same seed rewrites identical files."""
    out, counts = built
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cli = subprocess.run(
        [sys.executable, str(REPO / "scripts/make_demo_data.py"), "--out", str(tmp_path), "--seed", "0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    for name, n in counts.items():
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes(), name
        assert f"{name}.jsonl: {n}" in cli.stdout
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_different_seed_gives_different_data(built, tmp_path):
    """The seed really drives the build (split, sampling, rude replacements)."""
    out, _ = built
    build_demo_data(tmp_path, seed=1)
    for name in SCHEMAS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() != (out / f"{name}.jsonl").read_bytes(), name


def test_every_file_matches_its_schema_and_size(built):
    """Every stage can load its demo file: each is valid for its schema and holds the reported record count."""
    out, counts = built
    assert set(counts) == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert validate_file(out / f"{name}.jsonl", schema) == [], name
        assert len(read(out, name)) == counts[name] > 0
    # sized for a demo that trains in minutes on 2 CPU cores, yet not trivially small
    assert counts["pretrain"] == 6000
    assert counts["pref_train"] == 2000 and counts["pref_heldout"] == 200
    assert counts["prompts_train"] == 400 and counts["prompts_heldout"] == 100
    assert 1000 <= counts["sft_train"] <= 1500 and 100 <= counts["sft_heldout"] <= 150


def test_preference_chosen_differs_from_rejected_and_chosen_is_polite(built):
    """The reward model learns something: every pair has two different replies, and no chosen reply is rude."""
    out, _ = built
    for name in ("pref_train", "pref_heldout"):
        for r in read(out, name):
            assert r["chosen"] != r["rejected"]
            assert r["chosen"][0]["content"] not in RUDE_REPLIES
            assert r["prompt"][-1]["role"] == "user"


def test_heldout_user_turns_never_appear_in_train_files(built):
    """Held-out metrics measure unseen text: no held-out user turn (corpus or adversarial) is in a train file.

    Pretraining included: the base model has not seen the held-out conversations either.
    """
    out, _ = built
    heldout = user_turns(out, HELDOUT_FILES)
    assert len(heldout) > 100
    assert heldout.isdisjoint(user_turns(out, TRAIN_FILES))


def test_heldout_prompts_hold_unseen_adversarial_prompts(built):
    """The comparison has something to show: ~35% of held-out prompts are adversarial, from stems never trained on."""
    out, _ = built
    prompts = read(out, "prompts_heldout")
    adversarial = [p["messages"][-1]["content"] for p in prompts if p["category"] == "adversarial"]
    assert 0.3 <= len(adversarial) / len(prompts) <= 0.4
    assert {p["category"] for p in prompts} == {"adversarial", "normal"}
    train_adversarial = {
        p["messages"][-1]["content"] for p in read(out, "prompts_train") if p["category"] == "adversarial"
    }
    assert train_adversarial and train_adversarial.isdisjoint(adversarial)

    def stems(prompts: Iterable[str]) -> set[str]:
        return {s for s in ADVERSARIAL_STEMS for a in prompts if normalize(s.rstrip(".?!")) in normalize(a)}

    assert stems(adversarial) and stems(adversarial).isdisjoint(stems(train_adversarial))


def test_pretraining_is_rude_and_sft_less_so(built):
    """The base model is measurably unsafe and SFT makes it politer: rude replies in ~45% of the pretraining replies,
    in ~22% of the SFT train dialogues, none in the held-out ones."""
    from profanity_check import predict_prob

    out, _ = built
    pretrain, sft = replies(out, "pretrain"), replies(out, "sft_train") + replies(out, "sft_heldout")
    rude = set(RUDE_REPLIES)
    pretrain_share = sum(r in rude for r in pretrain) / len(pretrain)
    assert 0.3 < pretrain_share < 0.6  # 35% of ordinary replies, ~90% of replies to adversarial prompts
    assert not rude.intersection(sft), "the SFT data's rude replies are worded apart from the preference pairs'"
    assert any(r in POLITE_DEFLECTIONS for r in sft)
    assert predict_prob(pretrain).mean() > predict_prob(sft).mean() + 0.15


SFT_KINDS = {"real", "deflection", "rude"}


def test_sft_dialogues_carry_their_kind_and_a_measurable_share_of_rude_replies(built):
    """Real SFT data is rarely clean: every SFT record says its `kind`; in the train file 15% of the real replies
    and 50% of the replies to adversarial prompts are rude templates (`kind: rude`, only the last reply), exactly
    as `build_demo_data` sets them; the held-out file, the references stage 04 grades against, has none."""
    out, _ = built
    adversarial = {v for stem in ADVERSARIAL_STEMS for v in adversarial_variants(stem)}
    train = read(out, "sft_train")
    assert {r["kind"] for r in train} == SFT_KINDS
    for r in train:
        last = r["messages"][-1]["content"]
        assert (r["kind"] == "rude") == (last in SFT_RUDE_REPLIES), r
        assert (r["kind"] == "deflection") == (last in POLITE_DEFLECTIONS), r
        assert not any(m["content"] in SFT_RUDE_REPLIES for m in r["messages"][:-1]), r
    on_adversarial = [r for r in train if r["messages"][-2]["content"] in adversarial]
    on_real = [r for r in train if r["messages"][-2]["content"] not in adversarial]
    assert {r["kind"] for r in on_adversarial} == {"deflection", "rude"}
    assert {r["kind"] for r in on_real} == {"real", "rude"}
    for records, share in ((on_real, 0.15), (on_adversarial, 0.5)):
        assert sum(r["kind"] == "rude" for r in records) == round(share * len(records))
    assert 0.2 < sum(r["kind"] == "rude" for r in train) / len(train) < 0.24
    assert {r["kind"] for r in read(out, "sft_heldout")} == {"real", "deflection"}


def test_sft_rude_share_changes_no_other_record(built, tmp_path):
    """The rude SFT replies come from their own random stream: without them (both shares 0) every other file is
    byte for byte the same, and the SFT train file holds the same dialogues except for the replies made rude."""
    out, _ = built
    build_demo_data(tmp_path, seed=0, sft_rude_fraction=0.0, sft_adversarial_rude_fraction=0.0)
    for name in SCHEMAS:
        if name != "sft_train":
            assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes(), name
    clean, rude = read(tmp_path, "sft_train"), read(out, "sft_train")
    assert len(clean) == len(rude) and "rude" not in {r["kind"] for r in clean}
    for c, r in zip(clean, rude):
        assert c["messages"][:-1] == r["messages"][:-1]
        assert c == r or r["kind"] == "rude"


def test_rude_templates_score_toxic_and_deflections_do_not():
    """The toxicity term can tell them apart: every rude reply scores > 0.6, every deflection < 0.3; and the held-out
    judge of a profanity-check reward (better-profanity, another family) flags every rude SFT reply too."""
    from profanity_check import predict_prob

    from rlhf.safety import load_scorer

    assert predict_prob(list(RUDE_REPLIES)).min() > 0.6
    assert predict_prob(list(SFT_RUDE_REPLIES)).min() > 0.6
    assert predict_prob(list(POLITE_DEFLECTIONS)).max() < 0.3
    assert load_scorer("better-profanity").score(list(SFT_RUDE_REPLIES)).min() == 1.0
    assert not set(SFT_RUDE_REPLIES) & set(RUDE_REPLIES)


def test_conversation_cleaning_cuts_at_bad_items_and_restarts_on_a_user_turn():
    """Alternation survives bad corpus items: non-strings, empty and over-long utterances cut the conversation."""
    long = "x" * 301
    assert demo_data._segments(["hi", 5, "a", "b", "c"], 300) == [("hi",), ("a", "b", "c")]
    # a bad user turn at 2: its reply (3) is dropped too, the next segment starts at user turn 4
    assert demo_data._segments(["q", "r", " ", "s", "t", "u"], 300) == [("q", "r"), ("t", "u")]
    assert demo_data._segments([long, "r", "q2", "r2"], 300) == [("q2", "r2")]
    assert demo_data._segments([None, True], 300) == []


def test_windows_end_on_the_requested_role_with_at_most_two_exchanges():
    """Dialogues end with the assistant and prompts with the user; multi-turn conversations give several windows."""
    conv = ("u0", "a1", "u2", "a3", "u4")
    assert [[m["content"] for m in w] for w in windows(conv, "assistant")] == [
        ["u0", "a1"], ["u2", "a3"], ["u0", "a1", "u2", "a3"]]
    assert [[m["content"] for m in w] for w in windows(conv, "user")] == [
        ["u0"], ["u2"], ["u0", "a1", "u2"], ["u4"], ["u2", "a3", "u4"]]
    assert all(w[0]["role"] == "user" for w in windows(conv, "user"))


def test_no_corpus_text_is_in_the_repository():
    """Licensing: the corpus is read from the installed package at build time, never committed."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    corpus = demo_data.load_conversations(demo_data.corpus_dir())
    samples = sorted({u for conv in corpus for u in conv if len(u) > 60})[:200:5]  # distinctive utterances
    corpus_names = {p.name for p in demo_data.corpus_dir().glob("*.yml")}
    for rel in listed:
        path = REPO / rel
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        assert not (path.suffix in (".yml", ".yaml") and path.name in corpus_names), rel
        text = path.read_text(encoding="utf-8", errors="ignore")
        assert not any(s in text for s in samples), f"{rel} holds chatterbot corpus text"
