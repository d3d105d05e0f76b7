"""Toxicity scorers: profanity-check offline, detoxify through its own loader on a tiny checkpoint built here,
`auto` selection both ways, bad input, and the RealToxicityPrompts measures worked out by hand."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from rlhf.errors import ConfigError
from rlhf.safety import load_scorer

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["toxic", "insult", "threat"]  # detoxify's raw names; it renames toxic -> toxicity
BIASES = [-2.0, 0.0, 2.0]  # classifier bias per class, so the classes score apart: ~0.12, ~0.5, ~0.88
WORDS = "you are a kind nice idiot stupid hello thanks the is have day".split()
ORIGINAL_FILE = "toxic_original-c1212f89.ckpt"  # basename of detoxify's MODEL_URLS["original"]

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
    heavy = ("torch", "transformers", "detoxify", "sklearn", "profanity_check")
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


def test_detoxify_checkpoint_with_config_folder(tiny):
    """Through Detoxify's own loader, offline although the checkpoint names the hub id bert-base-uncased."""
    import torch

    folder, hub_ckpt, _, model = tiny
    texts = ["you are kind", "", "idiot " * 20_000, "have a nice day"]
    spec = f"detoxify:{hub_ckpt}?config={folder}"
    scorer = load_scorer(spec, device="cpu", batch_size=2)
    assert scorer.spec == spec and scorer.requested == spec
    assert scorer.detox.class_names == ["toxicity", "insult", "threat"]
    assert torch.equal(scorer.detox.model.classifier.weight, model.classifier.weight)
    assert scorer.detox.tokenizer.model_max_length == 64  # clamped to max_position_embeddings

    toxicity = scorer.score(texts)
    assert toxicity.shape == (4,) and toxicity[1] == 0.0
    assert ((toxicity >= 0) & (toxicity <= 1)).all()
    expected = scorer.detox.predict([texts[0], texts[3]])["toxicity"]
    np.testing.assert_allclose(toxicity[[0, 3]], expected, rtol=1e-5)

    threat = load_scorer(spec, device="cpu", label="threat").score(texts)
    highest = load_scorer(spec, device="cpu", label="max").score(texts)
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
    assert "using detoxify:original" in caplog.text
    assert scorer.score(["hello", ""]).shape == (2,)


def test_auto_falls_back_to_profanity_check(tmp_path, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with caplog.at_level(logging.INFO, logger="rlhf.safety"):
        scorer = load_scorer("auto")
        missing = load_scorer(f"auto:{tmp_path / 'missing.ckpt'}")
    assert scorer.spec == missing.spec == "profanity-check"
    assert scorer.describe() == {"spec": "profanity-check", "requested": "auto", "label": "toxicity", "threshold": 0.5}
    assert "using profanity-check" in caplog.text


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
