"""The embedded demo's data: built at run time from the chatterbot English corpus plus our own templates.

    python scripts/make_demo_data.py --out data/demo --seed 0

Source. The dialogues are the YAML conversations inside the installed
`chatterbot-corpus` wheel (read from the package, never copied into this repo).
A conversation is a list of alternating utterances, the first one the user's.
Items that are not strings, empty, or longer than `MAX_UTTERANCE_CHARS` cut the
conversation into segments (each restarting on a user turn); identical
conversations (the corpus repeats many) are kept once.

Templates (written for this project, in `rlhf.demo_templates`): rude replies,
polite deflections, and adversarial prompts that invite a rude reply.

Split. Conversations that share a user utterance (after lower-casing and
dropping punctuation) form one group; whole groups go to held-out, so no
held-out user turn appears in any train file. Adversarial prompts are split by
stem (the core request), so held-out adversarial prompts are requests the
pipeline never trained on. The pretraining text is built from the train split
only: held-out numbers (SFT eval loss, reward accuracy, the final comparison)
measure text no stage has seen.

Files (all JSONL, one record a line, the schemas of `data_schemas/`):

- `pretrain.jsonl` (text): train dialogues rendered in the demo chat format
  (`rlhf.chat_format.render_messages`); `rude_fraction` of ordinary replies and
  `ADVERSARIAL_RUDE_PROB` of replies to adversarial prompts are rude templates,
  the rest real replies (or deflections).
- `sft_{train,heldout}.jsonl` (dialogue): real dialogues plus adversarial
  prompts answered with deflections, each record labelled by `kind`: "real",
  "deflection" or "rude". Real SFT data is rarely clean: in the train file
  `sft_rude_fraction` of the real replies and `sft_adversarial_rude_fraction` of
  the replies to adversarial prompts are rude templates of another wording than
  the preference pairs' (`SFT_RUDE_REPLIES`), so the SFT model stays measurably
  toxic and the PPO toxicity term has work to do; stage 01's `exclude_labels:
  [rude]` trains without them. The held-out file stays clean: its replies are
  the references stage 04 grades replies against.
- `pref_{train,heldout}.jsonl` (preference): chosen = the real reply (a
  deflection for adversarial prompts); rejected = a rude reply or a reply taken
  from another conversation (on-format but off-topic).
- `prompts_{train,heldout}.jsonl` (prompt): dialogue prefixes ending with a user
  turn, `category` "normal" or "adversarial" (`adversarial_fraction` of them).

Determinism: one `random.Random(seed)` drives everything, inputs are read in
sorted order and sets are sorted before use, so the same seed and corpus version
give the same bytes in any process. The rude SFT replies come from a second
stream seeded from `seed` (`_sft_rude_rng`), so their share changes no other
record: every other file is the same as with no rude SFT replies at all.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from rlhf.chat_format import render_messages
from rlhf.demo_templates import (ADVERSARIAL_STEMS, POLITE_DEFLECTIONS, RUDE_REPLIES, SFT_RUDE_REPLIES,
                                  adversarial_variants)
from rlhf.errors import ConfigError, DataError

Message = dict[str, str]

MAX_UTTERANCE_CHARS = 300  # the demo model has a ~256-token context
MAX_DIALOGUE_CHARS = 600  # a dialogue window (all turns) stays well inside that context
MAX_EXCHANGES = 2  # a window holds at most this many user/assistant exchanges
ADVERSARIAL_SHARE_SFT = 0.2  # of SFT dialogues: adversarial prompt -> polite deflection
ADVERSARIAL_SHARE_PREF = 0.25  # of preference pairs: deflection chosen over a rude reply
ADVERSARIAL_SHARE_PRETRAIN = 0.15  # of pretraining records
ADVERSARIAL_RUDE_PROB = 0.9  # pretraining: chance an adversarial prompt gets a rude reply
CONTEXT_PROB = 0.5  # chance an adversarial prompt follows one real exchange instead of opening

# ---------------------------------------------------------------------------- corpus


def corpus_dir() -> Path:
    """The English YAML folder of the installed chatterbot-corpus package."""
    import importlib.resources

    try:
        root = importlib.resources.files("chatterbot_corpus")
    except ModuleNotFoundError as exc:
        raise DataError("the demo data needs the chatterbot-corpus package: pip install chatterbot-corpus") from exc
    path = Path(str(root)) / "data" / "english"
    if not path.is_dir():
        raise DataError(f"chatterbot-corpus is installed but has no English data at {path}")
    return path


def _segments(utterances: list[object], max_chars: int) -> list[tuple[str, ...]]:
    """Cut a conversation at unusable items; every segment starts on a user turn (even index)."""
    segments, current, start = [], [], 0
    for i, item in enumerate(utterances):
        text = item.strip() if isinstance(item, str) else ""
        if text and len(text) <= max_chars:
            if i >= start:
                current.append(text)
            continue
        if current:
            segments.append(tuple(current))
        current = []
        start = i + 1 if (i + 1) % 2 == 0 else i + 2  # resume on the next user turn
    if current:
        segments.append(tuple(current))
    return segments


def load_conversations(corpus: Path, max_chars: int = MAX_UTTERANCE_CHARS) -> list[tuple[str, ...]]:
    """All conversations of the corpus folder as tuples of utterances, cleaned and de-duplicated, in file order."""
    import yaml

    conversations: dict[tuple[str, ...], None] = {}
    for path in sorted(corpus.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        items = (doc.get("conversations") or []) if isinstance(doc, dict) else []
        for utterances in items:
            if isinstance(utterances, list):
                for segment in _segments(utterances, max_chars):
                    conversations.setdefault(segment, None)
    if not conversations:
        raise DataError(f"no usable conversations in {corpus}")
    return list(conversations)


def normalize(text: str) -> str:
    """The key under which two utterances count as the same: lower case, letters and digits only."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def split_conversations(
    conversations: list[tuple[str, ...]], heldout_fraction: float, rng: random.Random
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Train/held-out split by group: conversations sharing a user utterance stay together."""
    parent = list(range(len(conversations)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, conv in enumerate(conversations):
        for text in conv[0::2]:
            j = owner.setdefault(normalize(text), i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(conversations)):
        groups.setdefault(find(i), []).append(i)
    members = sorted(groups.values())  # lists of indices: a process-independent order
    rng.shuffle(members)
    target = heldout_fraction * len(conversations)
    heldout: set[int] = set()
    for group in members:
        if len(heldout) >= target:
            break
        if len(group) <= max(1.0, target / 4):  # big hubs ("hello", "hi") stay in train
            heldout.update(group)
    train = [c for i, c in enumerate(conversations) if i not in heldout]
    return train, [c for i, c in enumerate(conversations) if i in heldout]


def _as_messages(turns: Iterable[str], start: int) -> list[Message]:
    return [{"role": "user" if (start + k) % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


def windows(conv: tuple[str, ...], end_role: str) -> list[list[Message]]:
    """Dialogue windows of one conversation that end on `end_role`.

    Each window ends at one turn of that role and starts on a user turn, with
    1..MAX_EXCHANGES exchanges (or the one plus a final user turn for prompts),
    as long as it stays under MAX_DIALOGUE_CHARS.
    """
    out = []
    ends = range(1, len(conv), 2) if end_role == "assistant" else range(0, len(conv), 2)
    for end in ends:
        for n_turns in range(2 if end_role == "assistant" else 1, 2 * MAX_EXCHANGES + 1, 2):
            start = end + 1 - n_turns
            if start < 0:
                break
            if sum(len(t) for t in conv[start : end + 1]) > MAX_DIALOGUE_CHARS:
                break
            out.append(_as_messages(conv[start : end + 1], start))
    return out


# ---------------------------------------------------------------------------- records


@dataclass
class _Split:
    """What one split (train or held-out) draws from."""

    dialogues: list[list[Message]]  # end with assistant; all real
    prompts: list[list[Message]]  # end with user; all real
    exchanges: list[list[Message]]  # one user+assistant exchange, for adversarial context
    adversarial: list[str]  # adversarial prompt wordings of this split's stems


def _make_split(conversations: list[tuple[str, ...]], stems: list[str]) -> _Split:
    def unique(items: Iterable[list[Message]]) -> list[list[Message]]:
        seen: dict[str, list[Message]] = {}
        for item in items:
            seen.setdefault(json.dumps(item, sort_keys=True), item)
        return list(seen.values())

    dialogues = unique(w for conv in conversations for w in windows(conv, "assistant"))
    return _Split(
        dialogues=dialogues,
        prompts=unique(w for conv in conversations for w in windows(conv, "user")),
        exchanges=[d for d in dialogues if len(d) == 2],
        adversarial=[v for stem in stems for v in adversarial_variants(stem)],
    )


def _adversarial_prompt(split: _Split, rng: random.Random) -> list[Message]:
    context = rng.choice(split.exchanges) if split.exchanges and rng.random() < CONTEXT_PROB else []
    return [*(dict(m) for m in context), {"role": "user", "content": rng.choice(split.adversarial)}]


def _fill(make: Callable[[], dict | None], n: int, max_tries: int) -> list[dict]:
    """Up to n distinct records from `make` (None = skip), giving up after max_tries draws."""
    seen: dict[str, dict] = {}
    for _ in range(max_tries):
        if len(seen) >= n:
            break
        record = make()
        if record is not None:
            seen.setdefault(json.dumps(record, sort_keys=True), record)
    return list(seen.values())


def _cycle(items: list, rng: random.Random) -> Callable[[], object]:
    """Draw items in shuffled passes: every item once before any repeats."""
    order: list = []

    def draw() -> object:
        if not order:
            order.extend(items)
            rng.shuffle(order)
        return order.pop()

    return draw


def _sft_records(split: _Split, n: int, rng: random.Random) -> list[dict]:
    n_adv = round(ADVERSARIAL_SHARE_SFT * n)
    real = list(split.dialogues)
    rng.shuffle(real)
    real = real[: n - n_adv]
    # keep the adversarial share when the corpus has fewer dialogues than asked for
    n_adv = min(n_adv, round(len(real) * ADVERSARIAL_SHARE_SFT / (1 - ADVERSARIAL_SHARE_SFT)))
    adv = _fill(
        lambda: {"messages": [*_adversarial_prompt(split, rng), _assistant(rng.choice(POLITE_DEFLECTIONS))],
                 "kind": "deflection"},
        n_adv,
        50 * n_adv,
    )
    records = [{"messages": d, "kind": "real"} for d in real] + adv
    rng.shuffle(records)
    return records


def _sft_rude_rng(seed: int) -> random.Random:
    """The stream that picks and words the rude SFT replies, apart from the main one (module docstring)."""
    return random.Random(f"sft-rude-{seed}")


def _make_rude(records: list[dict], rude_fraction: float, adversarial_rude_fraction: float,
               rng: random.Random) -> list[dict]:
    """Replace the last reply of a share of the records with a rude one, relabelled `kind: rude`: of the real
    dialogues `rude_fraction`, of the adversarial prompts' deflections `adversarial_rude_fraction`. Exact shares
    (rounded), records chosen at random; the order of the records is kept."""
    out = [dict(r) for r in records]
    for kind, fraction in (("real", rude_fraction), ("deflection", adversarial_rude_fraction)):
        indices = [i for i, r in enumerate(out) if r["kind"] == kind]
        for i in sorted(rng.sample(indices, round(fraction * len(indices)))):
            out[i] = {"messages": [*out[i]["messages"][:-1], _assistant(rng.choice(SFT_RUDE_REPLIES))], "kind": "rude"}
    return out


# Share of non-adversarial pairs whose rejected reply is an unrelated real reply (the rest are rude).
# Telling an on-topic reply from an off-topic one is beyond the demo's ~1M-parameter model (its RM is
# near chance on those pairs: eval_accuracy/off_topic), so they are a minority of the pairs.
OFF_TOPIC_SHARE = 0.2


def _pref_records(split: _Split, n: int, rng: random.Random) -> list[dict]:
    n_adv = round(ADVERSARIAL_SHARE_PREF * n)
    replies = sorted({d[-1]["content"] for d in split.dialogues})
    draw = _cycle(split.dialogues, rng)

    def real_pair() -> dict | None:
        dialogue = draw()
        prompt, chosen = dialogue[:-1], dialogue[-1]["content"]
        kind = "off_topic" if rng.random() < OFF_TOPIC_SHARE else "rude"
        if kind == "rude":
            rejected = rng.choice(RUDE_REPLIES)
        else:  # an off-topic reply from another conversation: on-format but unresponsive
            rejected = rng.choice(replies)
            if normalize(rejected) == normalize(chosen):
                return None
        return {"prompt": prompt, "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)], "kind": kind}

    def adversarial_pair() -> dict:
        return {
            "prompt": _adversarial_prompt(split, rng),
            "chosen": [_assistant(rng.choice(POLITE_DEFLECTIONS))],
            "rejected": [_assistant(rng.choice(RUDE_REPLIES))],
            "kind": "adversarial",
        }

    records = _fill(real_pair, n - n_adv, 50 * n) + _fill(adversarial_pair, n_adv, 50 * n)
    rng.shuffle(records)
    return records


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _prompt_records(split: _Split, n: int, adversarial_fraction: float, rng: random.Random) -> list[dict]:
    n_adv = round(adversarial_fraction * n)
    normal = list(split.prompts)
    rng.shuffle(normal)
    records = [{"messages": p, "category": "normal"} for p in normal[: n - n_adv]]
    records += _fill(lambda: {"messages": _adversarial_prompt(split, rng), "category": "adversarial"}, n_adv, 50 * n)
    rng.shuffle(records)
    return records


def _pretrain_records(split: _Split, n: int, rude_fraction: float, rng: random.Random) -> list[dict]:
    """Rendered dialogues where some replies are rude: what a model pretrained on web text has seen."""
    draw = _cycle(split.dialogues, rng)
    records = []
    for _ in range(n):
        if rng.random() < ADVERSARIAL_SHARE_PRETRAIN:
            reply = rng.choice(RUDE_REPLIES) if rng.random() < ADVERSARIAL_RUDE_PROB else rng.choice(POLITE_DEFLECTIONS)
            messages = [*_adversarial_prompt(split, rng), _assistant(reply)]
            replaceable = messages[:-1]  # the reply to the adversarial prompt is already decided
        else:
            messages = [dict(m) for m in draw()]
            replaceable = messages
        for m in replaceable:
            if m["role"] == "assistant" and rng.random() < rude_fraction:
                m["content"] = rng.choice(RUDE_REPLIES)
        records.append({"text": render_messages(messages)})
    return records


# ---------------------------------------------------------------------------- build

SCHEMAS = {
    "pretrain": "text",
    "sft_train": "dialogue",
    "sft_heldout": "dialogue",
    "pref_train": "preference",
    "pref_heldout": "preference",
    "prompts_train": "prompt",
    "prompts_heldout": "prompt",
}


def build_demo_data(
    out_dir: Path,
    seed: int = 0,
    n_pretrain: int = 6000,
    heldout_fraction: float = 0.12,
    n_sft_train: int = 1500,
    n_sft_heldout: int = 150,
    n_pref_train: int = 2000,
    n_pref_heldout: int = 200,
    n_prompts_train: int = 400,
    n_prompts_heldout: int = 100,
    rude_fraction: float = 0.35,
    sft_rude_fraction: float = 0.15,
    sft_adversarial_rude_fraction: float = 0.5,
    adversarial_fraction: float = 0.35,
    adversarial_heldout_fraction: float = 0.25,
) -> dict[str, int]:
    """Build and validate the demo's JSONL files in `out_dir`; return the record count of each file.

    `n_*` are targets: pretraining and preference files reach them by redrawing
    (a dialogue comes back with other rude or off-topic replies), SFT and normal
    prompts stop at what the corpus holds. `heldout_fraction` is the share of
    corpus conversations held out, `adversarial_heldout_fraction` the share of
    adversarial stems; `rude_fraction` the share of ordinary pretraining replies
    made rude; `sft_rude_fraction` and `sft_adversarial_rude_fraction` the shares
    of real replies and of replies to adversarial prompts made rude in the SFT
    train file; `adversarial_fraction` the share of adversarial PPO prompts.
    """
    fractions = {
        "heldout_fraction": heldout_fraction,
        "adversarial_heldout_fraction": adversarial_heldout_fraction,
        "rude_fraction": rude_fraction,
        "sft_rude_fraction": sft_rude_fraction,
        "sft_adversarial_rude_fraction": sft_adversarial_rude_fraction,
        "adversarial_fraction": adversarial_fraction,
    }
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    rng = random.Random(seed)
    train_convs, heldout_convs = split_conversations(load_conversations(corpus_dir()), heldout_fraction, rng)
    stems = list(ADVERSARIAL_STEMS)
    rng.shuffle(stems)
    n_heldout_stems = max(1, round(adversarial_heldout_fraction * len(stems)))
    train = _make_split(train_convs, stems[n_heldout_stems:])
    heldout = _make_split(heldout_convs, stems[:n_heldout_stems])

    records = {
        "pretrain": _pretrain_records(train, n_pretrain, rude_fraction, rng),
        "sft_train": _make_rude(_sft_records(train, n_sft_train, rng), sft_rude_fraction,
                                sft_adversarial_rude_fraction, _sft_rude_rng(seed)),
        "sft_heldout": _sft_records(heldout, n_sft_heldout, rng),
        "pref_train": _pref_records(train, n_pref_train, rng),
        "pref_heldout": _pref_records(heldout, n_pref_heldout, rng),
        "prompts_train": _prompt_records(train, n_prompts_train, adversarial_fraction, rng),
        "prompts_heldout": _prompt_records(heldout, n_prompts_heldout, adversarial_fraction, rng),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in records.items():
        _write_validated(out_dir / f"{name}.jsonl", rows, SCHEMAS[name])
    return {name: len(rows) for name, rows in records.items()}


def _write_validated(path: Path, rows: list[dict], schema: str) -> None:
    """Write JSONL to a temporary file, validate it, then rename it into place (never a partial or invalid file)."""
    from rlhf.data import validate_file

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps .jsonl: validation reads by extension
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    problems = validate_file(tmp, schema)
    if problems:
        tmp.unlink()
        problems = [p.replace(str(tmp), str(path)) for p in problems]
        raise DataError(f"demo data {path.name} does not match schema {schema!r}", problems)
    os.replace(tmp, path)
