"""Toxicity scorers: profanity-check and better-profanity offline, detoxify through its own loader on a tiny
checkpoint built here, `auto` selection every way (on disk, downloaded, unreachable: the probe and the download
replaced, no network), the held-out judge's family, and bad input."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from rlhf import hub
from rlhf.errors import ConfigError
from rlhf.safety import heldout_judge_spec, load_scorer, scorer_family

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["toxic", "insult", "threat"]  # detoxify's raw names; it renames toxic -> toxicity
BIASES = [-2.0, 0.0, 2.0]  # classifier bias per class, so the classes score apart: ~0.12, ~0.5, ~0.88
WORDS = "you are a kind nice idiot stupid hello thanks the is have day".split()
ORIGINAL_FILE = "toxic_original-c1212f89.ckpt"  # basename of detoxify's MODEL_URLS["original"]
ORIGINAL_URL = "https://github.com/unitaryai/detoxify/releases/download/v0.1-alpha/" + ORIGINAL_FILE

POLITE = [
    "Thank you so much for your help today, I really appreciate it.",
    "Have a wonderful weekend with your family.",
    "The meeting is moved to three o'clock in the small room.",
    "Could you please send me the report when you have a moment?",
]
RUDE = [
    "Shut up, you stupid fucking idiot.",
    "You are a worthless piece of shit.",
    "Go to hell, you damn moron.",
    "What a dumb ass bitch you are.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny detoxify-format checkpoint: `config` (arch + classes) and the `state_dict` of a 2-layer BERT.

    Returns (folder, checkpoint whose model_type is the hub id `bert-base-uncased`,
    self-contained checkpoint whose model_type is the local folder, the model).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_detoxify")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    # no model_max_length: the scorer must clamp truncation to the position embeddings itself
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=len(CLASSES),
    )
    config.save_pretrained(folder)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor(BIASES))

    def save(path: Path, model_type: str) -> Path:
        arch = {"model_type": model_type, "model_name": "BertForSequenceClassification",
                "tokenizer_name": "BertTokenizerFast", "num_classes": len(CLASSES)}
        ckpt = {"config": {"arch": {"args": arch}, "dataset": {"args": {"classes": CLASSES}}},
                "state_dict": model.state_dict()}
        torch.save(ckpt, path)
        return path

    hub_ckpt = save(folder.parent / "tiny_hub.ckpt", "bert-base-uncased")
    local_ckpt = save(folder.parent / "tiny_local.ckpt", str(folder))
    return folder, hub_ckpt, local_ckpt, model


def test_import_is_light():
    heavy = ("torch", "transformers", "detoxify", "sklearn", "profanity_check", "better_profanity")
    code = f"import sys, rlhf.safety; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def profanity():
    return load_scorer("profanity-check")


def test_profanity_check_ranks_rude_above_polite(profanity):
    scores = profanity.score(POLITE + RUDE)
    polite, rude = scores[: len(POLITE)], scores[len(POLITE) :]
    assert scores.shape == (8,) and ((scores >= 0) & (scores <= 1)).all()
    assert rude.min() > polite.max()
    assert profanity.spec == "profanity-check" and profanity.describe()["label"] == "toxicity"
    assert profanity.flags(RUDE).all() and not profanity.flags(POLITE).any()


def test_bad_input(profanity):
    scores = profanity.score(["", "   ", "hello"])
    assert scores[0] == 0.0 and scores[1] == 0.0
    assert profanity.score([]).shape == (0,)
    with pytest.raises(TypeError, match=r"texts\[2\] is NoneType"):
        profanity.score(["a", "b", None])
    with pytest.raises(TypeError, match="list of strings"):
        profanity.score("a single string")
    long = profanity.score(["you idiot " * 10_000])  # 100k characters
    assert long.shape == (1,) and 0 <= long[0] <= 1


def test_bad_specs(tmp_path):
    with pytest.raises(ConfigError, match="unknown toxicity scorer"):
        load_scorer("perspective")
    with pytest.raises(ConfigError, match="does not exist"):
        load_scorer(f"detoxify:{tmp_path / 'missing.ckpt'}")
    with pytest.raises(ConfigError, match="one output"):
        load_scorer("profanity-check", label="insult")


def test_detoxify_checkpoint_with_config_folder(tiny, device):
    """Through Detoxify's own loader, offline although the checkpoint names the hub id bert-base-uncased."""
    import torch

    folder, hub_ckpt, _, model = tiny
    texts = ["you are kind", "", "idiot " * 20_000, "have a nice day"]
    spec = f"detoxify:{hub_ckpt}?config={folder}"
    scorer = load_scorer(spec, device=str(device), batch_size=2)
    assert scorer.spec == spec and scorer.requested == spec
    assert scorer.detox.model.device.type == device.type
    assert scorer.detox.class_names == ["toxicity", "insult", "threat"]
    assert torch.equal(scorer.detox.model.classifier.weight.cpu(), model.classifier.weight)
    assert scorer.detox.tokenizer.model_max_length == 64  # clamped to max_position_embeddings

    toxicity = scorer.score(texts)
    assert toxicity.shape == (4,) and toxicity[1] == 0.0
    assert ((toxicity >= 0) & (toxicity <= 1)).all()
    expected = scorer.detox.predict([texts[0], texts[3]])["toxicity"]
    np.testing.assert_allclose(toxicity[[0, 3]], expected, rtol=1e-5)

    threat = load_scorer(spec, device=str(device), label="threat").score(texts)
    highest = load_scorer(spec, device=str(device), label="max").score(texts)
    nonempty = [0, 2, 3]
    assert (threat[nonempty] > 0.8).all() and (toxicity[nonempty] < 0.2).all()  # the biases set above
    np.testing.assert_allclose(highest, threat, rtol=1e-6)
    with pytest.raises(ConfigError, match="not a class"):
        load_scorer(spec, device="cpu", label="obscene")


def test_detoxify_self_contained_checkpoint(tiny):
    _, _, local_ckpt, _ = tiny
    scorer = load_scorer(f"detoxify:{local_ckpt}", device="cpu")
    assert scorer.spec == f"detoxify:{local_ckpt}"
    assert scorer.score(["hello"]).shape == (1,)


def test_config_folder_with_wrong_num_labels(tiny, tmp_path):
    import shutil

    folder, hub_ckpt, _, _ = tiny
    bad = shutil.copytree(folder, tmp_path / "bad")
    (bad / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="num_labels=3"):
        load_scorer(f"detoxify:{hub_ckpt}?config={bad}", device="cpu")


def test_auto_uses_detoxify_from_torch_hub_cache(tiny, tmp_path, monkeypatch, caplog):
    import shutil

    import torch

    _, _, local_ckpt, _ = tiny
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(local_ckpt, tmp_path / "checkpoints" / ORIGINAL_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # Detoxify's hub load reads it too
    with caplog.at_level(logging.INFO, logger="rlhf.safety"):
        scorer = load_scorer("auto", device="cpu")
    assert scorer.spec == "detoxify:original" and scorer.requested == "auto"
    assert "using detoxify:original (checkpoint on disk at" in caplog.text
    assert scorer.describe()["reason"].startswith("checkpoint on disk at")
    assert scorer.score(["hello", ""]).shape == (2,)


class FakeNetwork:
    """Stands in for the network of `auto`: the bounded probe (rlhf.hub.unreachable) answers from `down`
    (URL -> reason; the hub endpoint is `None`), and torch.hub's download copies `checkpoint` or raises `fails`.
    Both record what they were asked."""

    def __init__(self, checkpoint=None, down=None, fails=None):
        self.checkpoint, self.down, self.fails = checkpoint, down or {}, fails
        self.probed, self.downloaded = [], []

    def unreachable(self, timeout, url=None):
        assert 0 < timeout <= 10, "the probe must be bounded"
        self.probed.append(url)
        return self.down.get(url)

    def download(self, url, dst, *args, **kwargs):
        import shutil

        self.downloaded.append(url)
        if self.fails is not None:
            raise self.fails
        shutil.copy(self.checkpoint, dst)


def _auto_with(network, tmp_path, monkeypatch, caplog, hub_offline=True):
    """load_scorer("auto") on an empty torch hub cache in tmp_path, through `network`; returns the scorer and
    the log lines of rlhf.safety."""
    import huggingface_hub.constants
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", network.download)
    monkeypatch.setattr(hub, "unreachable", network.unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", hub_offline)
    with caplog.at_level(logging.INFO, logger="rlhf.safety"):
        scorer = load_scorer("auto", device="cpu")
    return scorer, [r.getMessage() for r in caplog.records if r.name == "rlhf.safety"]


@pytest.mark.parametrize("hub_offline", [True, False])
def test_auto_downloads_detoxify_through_its_loader_when_its_host_answers(tiny, tmp_path, monkeypatch, caplog,
                                                                          hub_offline):
    """Not on disk, host reachable: detoxify's own loader downloads the checkpoint (here the tiny one) into the
    torch hub cache and it is used. With HF_HUB_OFFLINE unset the hub (base config and tokenizer) is probed too."""
    _, _, local_ckpt, model = tiny
    network = FakeNetwork(checkpoint=local_ckpt)
    scorer, lines = _auto_with(network, tmp_path, monkeypatch, caplog, hub_offline)
    assert network.probed == ([ORIGINAL_URL] if hub_offline else [ORIGINAL_URL, None])
    assert network.downloaded == [ORIGINAL_URL]
    assert (tmp_path / "checkpoints" / ORIGINAL_FILE).is_file()
    assert scorer.spec == "detoxify:original" and scorer.detox.class_names == ["toxicity", "insult", "threat"]
    assert scorer.describe()["reason"] == f"not on disk; downloaded by detoxify's loader into " \
                                          f"{tmp_path / 'checkpoints' / ORIGINAL_FILE}"
    assert lines == [f"toxicity scorer auto: using detoxify:original ({scorer.reason})"]
    expected = scorer.detox.predict(["hello there", "you idiot"])["toxicity"]
    np.testing.assert_allclose(scorer.score(["hello there", "you idiot"]), expected, rtol=1e-6)


@pytest.mark.parametrize("down,needle", [
    ({ORIGINAL_URL: "URLError: <urlopen error [Errno -3] Temporary failure in name resolution>"},
     "its host github.com is unreachable (URLError: <urlopen error [Errno -3] Temporary failure in name resolution>)"),
    ({None: "no answer within 5 s"}, "the Hugging Face hub at "),
])
def test_auto_unreachable_falls_back_to_profanity_check_and_says_why(tmp_path, monkeypatch, caplog, down, needle):
    """Offline: the probe fails (the checkpoint's host, or the hub for the base config), nothing is downloaded,
    profanity-check is used, and the one log line and the recorded reason say why."""
    network = FakeNetwork(down=down)
    scorer, lines = _auto_with(network, tmp_path, monkeypatch, caplog, hub_offline=False)
    assert network.downloaded == []
    assert scorer.spec == "profanity-check"
    assert scorer.describe() == {"spec": "profanity-check", "requested": "auto", "label": "toxicity",
                                 "threshold": 0.5, "reason": scorer.reason}
    assert scorer.reason.startswith("no detoxify:original checkpoint on disk, and ") and needle in scorer.reason
    assert len(lines) == 1 and lines[0].startswith(f"toxicity scorer auto: using profanity-check ({scorer.reason}")


def test_auto_falls_back_when_the_download_fails_after_the_probe_answered(tmp_path, monkeypatch, caplog):
    import urllib.error

    network = FakeNetwork(fails=urllib.error.URLError("connection reset"))
    scorer, lines = _auto_with(network, tmp_path, monkeypatch, caplog)
    assert network.downloaded == [ORIGINAL_URL] and scorer.spec == "profanity-check"
    assert "its download failed (<urlopen error connection reset>)" in scorer.reason and len(lines) == 1


def test_auto_with_a_missing_path_falls_back_without_a_probe(tmp_path, monkeypatch, caplog):
    network = FakeNetwork()
    monkeypatch.setattr(hub, "unreachable", network.unreachable)
    with caplog.at_level(logging.INFO, logger="rlhf.safety"):
        missing = load_scorer(f"auto:{tmp_path / 'missing.ckpt'}")
    assert missing.spec == "profanity-check" and network.probed == []
    assert "a checkpoint path is never downloaded" in missing.reason
    assert "using profanity-check" in caplog.text


def test_the_probe_is_bounded_and_counts_any_http_answer(tmp_path):
    """rlhf.hub.unreachable on a URL, for real on this machine: a local server that answers HEAD with an error
    status answered; a closed port did not, and says why within the bound."""
    import http.server
    import socket
    import threading
    import time

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to every HEAD
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub.unreachable(2.0, f"http://127.0.0.1:{server.server_port}/some.ckpt") is None
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    start = time.monotonic()
    reason = hub.unreachable(1.0, f"http://127.0.0.1:{closed}/some.ckpt")
    assert reason is not None and "refused" in reason.lower()
    assert time.monotonic() - start < 3.5


def test_better_profanity_scores_a_profane_sentence_above_a_clean_one():
    lexicon = load_scorer("better-profanity")
    scores = lexicon.score(["What a fucking stupid thing to say, you asshole.", "What a lovely thing to say.", ""])
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.0])
    assert (lexicon.score(RUDE) == 1.0).all() and (lexicon.score(POLITE) == 0.0).all()
    assert lexicon.score(["you are a b1tch"])[0] == 1.0  # a leetspeak spelling of a listed word
    assert lexicon.describe() == {"spec": "better-profanity", "requested": "better-profanity", "label": "toxicity",
                                  "threshold": 0.5, "reason": "named in the spec"}
    with pytest.raises(ConfigError, match="better-profanity has one output"):
        load_scorer("better-profanity", label="insult")


def test_better_profanity_index_gives_the_packages_own_answers():
    """The scorer looks words up in an index of the word list; the package scans the list. Same answer on listed
    words in leetspeak spellings, capitals, words glued by separators, near misses and clean text."""
    import random

    from better_profanity import Profanity

    package = Profanity()  # its own list scan
    words = [str(w) for w in package.CENSOR_WORDSET]
    rng = random.Random(0)
    texts = ["", "   ", "!!!", "a", "hello there", "What a lovely thing to say."]
    for i in range(300):
        w = "".join(rng.choice(package.CHARS_MAPPING.get(ch, (ch,))) for ch in rng.choice(words))
        w = [w, w.upper(), w[:-1], w + "x", "x" + w, w.replace(" ", "_")][i % 6]
        texts.append(f"{rng.choice(['you', 'hi', 'so'])} {w}{rng.choice(['', '!', ' now', '...'])}")
    expected = np.array([float(package.contains_profanity(t)) for t in texts])
    assert 0 < expected.sum() < len(texts)  # both answers occur
    np.testing.assert_array_equal(load_scorer("better-profanity").score(texts), expected)


@pytest.mark.parametrize("reward_spec,judge", [
    ("detoxify:original", "detoxify:unbiased"),
    ("detoxify:original-small", "detoxify:unbiased"),
    ("detoxify:unbiased", "detoxify:original"),
    ("detoxify:unbiased-small", "detoxify:original"),
    ("detoxify:multilingual", "better-profanity"),
    ("detoxify:/ckpts/model.ckpt?config=/ckpts/bert", "better-profanity"),
    ("profanity-check", "better-profanity"),
    ("better-profanity", "profanity-check"),
])
def test_the_heldout_judge_is_of_another_family_than_the_reward_scorer(reward_spec, judge):
    assert heldout_judge_spec(reward_spec) == judge
    assert scorer_family(judge) != scorer_family(reward_spec)


def test_the_heldout_judge_needs_a_resolved_known_spec():
    with pytest.raises(ConfigError, match="pass the spec it resolved to"):
        heldout_judge_spec("auto")
    with pytest.raises(ConfigError, match="unknown toxicity scorer 'perspective'"):
        heldout_judge_spec("perspective")


def test_auto_with_a_given_checkpoint_path(tiny):
    folder, hub_ckpt, _, _ = tiny
    scorer = load_scorer(f"auto:{hub_ckpt}?config={folder}", device="cpu")
    assert scorer.spec == f"detoxify:{hub_ckpt}?config={folder}"


def test_named_detoxify_offline_gives_actionable_error(tmp_path, monkeypatch):
    import urllib.error

    import torch

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ConfigError, match="fetch_assets.py --detoxify unbiased"):
        load_scorer("detoxify:unbiased", device="cpu")


def _fetch_assets():
    return load_script("scripts/fetch_assets.py")


def test_fetch_assets_lists_hub_ids_and_fails_cleanly_offline(tmp_path, monkeypatch, capsys):
    local = tmp_path / "train.jsonl"
    local.write_text("{}\n")
    config = tmp_path / "ppo.yaml"
    config.write_text(
        "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\n"
        "reward_model: reward:latest\n"
        f"train_data: {local}\n"
        "eval_dataset: Anthropic/hh-rlhf\n"
        "toxicity_model: detoxify:unbiased\n"
        "ppo: {sft_model: gpt2, seed: 1}\n"
    )
    fetch = _fetch_assets()
    fetch.main(["--config", str(config), "--detoxify", "original", "--dry-run"])
    listed = capsys.readouterr().out.splitlines()
    assert listed == [
        "detoxify\toriginal",
        "model\tQwen/Qwen2.5-0.5B-Instruct",
        "dataset\tAnthropic/hh-rlhf",
        "detoxify\tunbiased",
        "model\tgpt2",
    ]

    def offline(name):
        raise OSError("Name or service not known")

    monkeypatch.setattr(fetch, "fetch_detoxify", offline)
    with pytest.raises(SystemExit) as exc:
        fetch.main(["--detoxify", "original"])
    assert exc.value.code == 1
    assert "needs internet access" in capsys.readouterr().err
