"""Stage 01 (SFT) on the tiny pretrain entry: loss mask, the three modes through the CLI, bad references,
determinism.

Every run works on its own copy of the session's `pretrained_registry`, so rows
never leak between tests; the full-mode run is shared by the tests that only read it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from torch.testing import assert_close as torch_testing_assert_close

from conftest import load_script, run_script
from rlhf import chat_format
from rlhf.registry import Entry, Registry

pytestmark = pytest.mark.slow

# Small and quick: 4 optimizer steps of 8 dialogues, short replies for BLEU/ROUGE-L.
TINY_SFT = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--gen_eval_samples", "4",
            "--max_new_tokens", "8", "--logging_steps", "2"]
# One intra-op thread: the models are tiny, and on a busy 2-core machine a second thread only adds CPU time.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SFT_METRICS = ("eval_loss", "eval_perplexity", "base_eval_perplexity", "bleu", "rouge_l")


def _copy(registry: Path, dst: Path) -> Path:
    shutil.copytree(registry, dst)
    return dst


def _sft(reg: Path, data: dict[str, Path], *extra: str, model: str = "pretrain:latest"):
    return run_script("stages/01_sft.py", "--model", model, "--data", str(data["sft"]),
                      "--eval_data", str(data["sft_eval"]), "--registry", str(reg), *TINY_SFT, *extra, env=ONE_THREAD)


def _only_sft_entry(reg: Path) -> Entry:
    (entry,) = Registry(reg).entries("sft")
    return entry


def _changed_tensors(base_dir: Path, tuned_dir: Path) -> tuple[set[str], set[str]]:
    """(names whose values differ, names compared) between two saved model.safetensors."""
    import torch
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    tuned = load_file(tuned_dir / "model.safetensors")
    common = set(base) & set(tuned)
    changed = {k for k in common if base[k].shape != tuned[k].shape or not torch.equal(base[k], tuned[k].to(base[k].dtype))}
    return changed, common


@pytest.fixture(scope="module")
def sft_full(pretrained_registry, tiny_data, tmp_path_factory) -> tuple[Path, Entry]:
    """One full-mode SFT run through the CLI, shared by the tests that only read its entry."""
    reg = _copy(pretrained_registry, tmp_path_factory.mktemp("sft_full") / "runs")
    res = _sft(reg, tiny_data, "--mode", "full")
    assert res.returncode == 0, res.stderr[-3000:]
    return reg, _only_sft_entry(reg)


# ------------------------------------------------------------------------------------ loss mask


def _assistant_token_flags(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered dialogue and, per token, whether it lies in an assistant reply (+ its `<|end|>`).

    Worked out from character offsets of the rendered text, independently of TRL.
    """
    text, spans = "", []
    for m in messages:
        piece = chat_format.render_messages([m])
        if m["role"] == "assistant":
            start = len(text) + len(chat_format.ROLE_TOKENS["assistant"] + "\n")
            spans.append((start, start + len(m["content"] + chat_format.EOS)))
        text += piece
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    flags = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], flags


def test_loss_mask_covers_only_assistant_turns_and_their_eos(pretrained_registry, tmp_path):
    """SFTTrainer as 01_sft.py builds it (its `sft_dataset`): system/user/role-header tokens get label -100,
    assistant replies (including each closing `<|end|>`) keep their ids, in a multi-turn dialogue; padding is
    -100 too. (Every architecture family's template: tests/test_arch_matrix.py.)"""
    from trl import SFTConfig, SFTTrainer

    from rlhf.models import fit_embeddings, load_model, load_tokenizer

    entry = Registry(pretrained_registry).get("pretrain:latest")
    tokenizer = load_tokenizer(str(entry.path))
    model = load_model(str(entry.path))
    fit_embeddings(model, tokenizer)
    dialogue = [
        {"role": "system", "content": "you are kind"},
        {"role": "user", "content": "hello how are you"},
        {"role": "assistant", "content": "fine thanks"},
        {"role": "user", "content": "tell me about tea"},
        {"role": "assistant", "content": "I like tea"},
    ]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good day"}]
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=256, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, dataloader_num_workers=0)
    dataset = _sft_module().sft_dataset(tokenizer, [{"messages": dialogue}, {"messages": short}])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)

    examples = [trainer.train_dataset[i] for i in range(2)]
    for example, messages in zip(examples, (dialogue, short)):
        ids, is_assistant = _assistant_token_flags(tokenizer, messages)
        assert example["input_ids"] == ids
        assert example["labels"] == [t if a else -100 for t, a in zip(ids, is_assistant)]

    # The long dialogue, read token by token.
    labels, ids = examples[0]["labels"], examples[0]["input_ids"]
    kept = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tokenizer.decode(kept) == "fine thanks<|end|>I like tea<|end|>"
    end_id = tokenizer.convert_tokens_to_ids(chat_format.EOS)
    end_labels = [lab for t, lab in zip(ids, labels) if t == end_id]
    assert end_labels == [-100, -100, end_id, -100, end_id]  # system, user, assistant, user, assistant
    for role_token in chat_format.ROLE_TOKENS.values():
        role_id = tokenizer.convert_tokens_to_ids(role_token)
        assert all(lab == -100 for t, lab in zip(ids, labels) if t == role_id)

    # What the model sees: the collator keeps those labels and masks the short row's right padding.
    batch = trainer.data_collator(examples)
    n_short = len(examples[1]["input_ids"])
    assert batch["labels"][0].tolist() == labels
    assert batch["labels"][1, :n_short].tolist() == examples[1]["labels"]
    assert (batch["labels"][1, n_short:] == -100).all() and (batch["input_ids"][1, n_short:] == tokenizer.pad_token_id).all()


# ------------------------------------------------------------------------------------ modes


def test_full_sft_registers_child_of_pretrain_with_metrics(pretrained_registry, sft_full):
    """Full mode: an `sft` entry whose parent is the pretrain entry, with eval and generation metrics."""
    reg, entry = sft_full
    (base,) = Registry(pretrained_registry).entries("pretrain")
    assert entry.parents == [base.ref]
    assert [e.ref for e in Registry(reg).lineage(entry.ref)] == [entry.ref, base.ref]
    assert entry.config["mode"] == "full" and entry.config["base_model"] == base.ref
    for key in SFT_METRICS:
        assert isinstance(entry.metrics[key], float), key
    assert entry.metrics["steps"] == 4
    assert set(entry.data_fingerprints) == {"data", "eval_data"}
    assert Registry(reg).verify() == {}


def test_full_sft_changes_every_transformer_weight(pretrained_registry, sft_full):
    """Full mode trains the whole model: every transformer-block tensor differs from the base's."""
    _, entry = sft_full
    (base,) = Registry(pretrained_registry).entries("pretrain")
    changed, common = _changed_tensors(base.path, entry.path)
    blocks = {k for k in common if k.startswith("transformer.h.")}
    assert blocks and blocks <= changed, sorted(blocks - changed)


def test_same_seed_gives_identical_eval_loss(pretrained_registry, tiny_data, sft_full, tmp_path):
    """Determinism: a second full run with the same seed reproduces eval_loss (and train_loss) exactly."""
    _, first = sft_full
    reg = _copy(pretrained_registry, tmp_path / "runs")
    res = _sft(reg, tiny_data, "--mode", "full")
    assert res.returncode == 0, res.stderr[-3000:]
    second = _only_sft_entry(reg)
    assert second.metrics["eval_loss"] == first.metrics["eval_loss"]
    assert second.metrics["train_loss"] == first.metrics["train_loss"]


def test_on_the_cpu_sft_computes_in_fp32(pretrained_registry, tiny_data, sft_full):
    """TRL's SFTConfig turns bf16 on by default: on the CPU the stage must train and evaluate in fp32 (bf16
    autocast made SFT ~9x slower here and rounds the loss). The eval_loss it registers equals the loss of
    the registered model evaluated the same way in fp32."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlhf.data import load_records
    from rlhf.models import load_model, load_tokenizer

    _, entry = sft_full
    assert entry.config["gradient_checkpointing"] is True  # TRL's default, kept as ours
    records = load_records(str(tiny_data["sft_eval"]), "dialogue")
    args = SFTConfig(output_dir=str(entry.path.parent / "fp32-eval"), assistant_only_loss=True, max_length=256,
                     per_device_eval_batch_size=8, report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0)
    held_out = Dataset.from_list([{"messages": r["messages"]} for r in records])
    trainer = SFTTrainer(model=load_model(str(entry.path)), args=args, train_dataset=held_out, eval_dataset=held_out,
                         processing_class=load_tokenizer(str(entry.path)))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(entry.metrics["eval_loss"], rel=1e-6)


def test_lora_keeps_adapter_and_saves_a_merged_plain_model(pretrained_registry, tiny_data, tmp_path):
    """LoRA: `adapter/` is kept; the entry itself is a plain merged model that AutoModelForCausalLM loads,
    with no LoRA weights left in it, and it differs from the base."""
    from transformers import AutoModelForCausalLM

    reg = _copy(pretrained_registry, tmp_path / "runs")
    res = _sft(reg, tiny_data, "--mode", "lora", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
               "--max_steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    entry = _only_sft_entry(reg)
    assert (entry.path / "adapter" / "adapter_config.json").is_file()
    assert (entry.path / "adapter" / "adapter_model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(entry.path)
    assert not any("lora" in name for name, _ in model.named_parameters())
    (base,) = Registry(pretrained_registry).entries("pretrain")
    changed, _ = _changed_tensors(base.path, entry.path)
    assert any(k.startswith("transformer.h.") for k in changed), "merging the adapter changed nothing"
    for key in SFT_METRICS:
        assert key in entry.metrics, key


def _base_without_chat_template(folder: Path) -> Path:
    """A hub-like base: tiny GPT-2 whose own BPE tokenizer has no chat template, pad or role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["hello there, how are you?", "I am fine, thanks. And you?"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_new_token_rows_are_the_same_on_every_load_and_in_the_merged_lora_model(tiny_data, tmp_path):
    """A base without a chat template gets pad, role and end-of-turn tokens with new embedding rows. LoRA keeps
    them frozen and the merged SFT model is rebuilt from a fresh load of the base, so the rows must not depend
    on the random state: the merged entry holds exactly the rows training saw, distinct per token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import fit_embeddings, load_model, load_tokenizer

    base = _base_without_chat_template(tmp_path / "base")
    n_base = len(AutoTokenizer.from_pretrained(base))
    tok = load_tokenizer(str(base))
    rows = []
    for seed in (0, 1):  # two loads in different random states
        torch.manual_seed(seed)
        model = load_model(str(base))
        fit_embeddings(model, tok)
        rows.append(model.get_input_embeddings().weight.detach()[n_base:].clone())
    torch_testing_assert_close(rows[0], rows[1])
    new = rows[0]
    gaps = (new[:, None] - new[None]).norm(dim=-1) + torch.eye(len(new)) * 1e9  # (n, n) distances between rows
    assert len(new) >= 3 and gaps.min() > 0.1 * new.norm(dim=-1).mean(), "new tokens share one embedding"

    reg = tmp_path / "runs"
    res = _sft(reg, tiny_data, "--mode", "lora", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
               "--max_steps", "2", "--gen_eval_samples", "0", model=str(base))
    assert res.returncode == 0, res.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(_only_sft_entry(reg).path)
    torch_testing_assert_close(merged.get_input_embeddings().weight.detach()[n_base:], rows[0])


def test_qlora_runs_end_to_end_on_cpu(pretrained_registry, tiny_data, tmp_path):
    """QLoRA (4-bit NF4 base + LoRA) trains on the CPU and registers a merged full-precision model."""
    import torch
    from transformers import AutoModelForCausalLM

    reg = _copy(pretrained_registry, tmp_path / "runs")
    res = _sft(reg, tiny_data, "--mode", "qlora", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    entry = _only_sft_entry(reg)
    assert entry.config["mode"] == "qlora" and entry.config["load_in_4bit"] is True
    assert (entry.path / "adapter" / "adapter_model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(entry.path)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the merged model must not stay quantized"
    from safetensors.torch import load_file

    adapter = load_file(entry.path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}, "on the CPU the adapter trains in fp32"
    for key in SFT_METRICS:
        assert key in entry.metrics, key


# ------------------------------------------------------------------------------------ bad input


def _sft_module():
    """stages/01_sft.py as a module, to drive its command line in-process (the heavy imports are paid once)."""
    return load_script("stages/01_sft.py", reuse=True)


def _fake_reward_entry(reg: Path) -> Entry:
    registry = Registry(reg)
    staged = registry.staging_dir("reward")
    (staged / "config.json").write_text("{}")
    return registry.register("reward", staged, parents=[], config={}, metrics={})


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("sft:latest", "error: sft:latest: no 'sft' entry in the registry"),
        ("reward:latest", "error: reward:latest: is a 'reward' entry, but this needs a 'pretrain' or 'sft' entry"),
    ],
    ids=["no-sft-entry", "reward-entry"],
)
def test_unusable_registry_reference_fails_with_one_line(pretrained_registry, tiny_data, tmp_path, capsys, model, expected):
    """`--model sft:latest` with no sft entry, or a `reward` entry as the base: exit non-zero, one `error:`
    line (no traceback), no new row, no work folder. Runs the script's CLI entry (`run_cli`) in-process."""
    from rlhf.config import parse_config
    from rlhf.errors import run_cli

    reg = _copy(pretrained_registry, tmp_path / "runs")
    if model.startswith("reward"):
        _fake_reward_entry(reg)
    before = [e.ref for e in Registry(reg).entries()]
    sft = _sft_module()
    argv = ["--model", model, "--data", str(tiny_data["sft"]), "--eval_data", str(tiny_data["sft_eval"]),
            "--registry", str(reg), *TINY_SFT]
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: sft.main(parse_config(sft.SFTStageConfig, argv)))
    assert exited.value.code not in (0, None)
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(expected), err
    assert [e.ref for e in Registry(reg).entries()] == before
    assert not any((reg / ".work").glob("*")) and not any((reg / ".staging").glob("*"))


def _labelled(records: list[dict], rude_every: int) -> list[dict]:
    """Every `rude_every`-th record rude (`kind: rude`, a rude reply), one without the field, the rest `kind: real`."""
    out = []
    for i, r in enumerate(records):
        if i % rude_every == 0:
            out.append({"messages": [*r["messages"][:-1], {"role": "assistant", "content": "shut up you idiot"}],
                        "kind": "rude"})
        else:
            out.append({**r, "kind": "real"} if i != 1 else dict(r))
    return out


def test_exclude_labels_filters_training_and_heldout_dialogues(pretrained_registry, tiny_data, tmp_path, capsys,
                                                               monkeypatch):
    """`--exclude_labels rude`: no `kind: rude` dialogue reaches the trainer, in training or held-out data; records
    without the field stay; the entry records the counts. A label no record has is said in the log; excluding
    everything is one `error:` line and no row. Runs the stage in-process (one optimizer step)."""
    import json

    from rlhf.config import parse_config
    from rlhf.data import load_records
    from rlhf.errors import run_cli

    train = _labelled(load_records(str(tiny_data["sft"]), "dialogue"), rude_every=4)
    held_out = _labelled(load_records(str(tiny_data["sft_eval"]), "dialogue"), rude_every=4)
    paths = {}
    for name, rows in (("train", train), ("eval", held_out)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_rude = {name: sum(r.get("kind") == "rude" for r in rows)
              for name, rows in (("data", train), ("eval_data", held_out))}
    assert n_rude["data"] > 0 and n_rude["eval_data"] > 0

    sft = _sft_module()
    seen: list[list[dict]] = []
    real_dataset = sft.sft_dataset
    monkeypatch.setattr(sft, "sft_dataset", lambda tok, records: (seen.append(records), real_dataset(tok, records))[1])
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # the stage sets it: restored after the test
    reg = _copy(pretrained_registry, tmp_path / "runs")
    argv = ["--data", str(paths["train"]), "--eval_data", str(paths["eval"]), "--registry", str(reg),
            "--max_steps", "1", "--per_device_train_batch_size", "8", "--gen_eval_samples", "0", "--logging_steps", "1"]
    run_cli(lambda: sft.main(parse_config(sft.SFTStageConfig, [*argv, "--exclude_labels", "rude,spam"])))

    trained, evaluated = seen
    assert len(trained) == len(train) - n_rude["data"] and len(evaluated) == len(held_out) - n_rude["eval_data"]
    assert not any(r.get("kind") == "rude" for r in trained + evaluated)
    assert any("kind" not in r for r in trained), "a record without the label field was dropped"
    entry = _only_sft_entry(reg)
    assert entry.config["exclude_labels"] == ["rude", "spam"] and entry.config["label_field"] == "kind"
    assert entry.config["data_excluded"] == {"field": "kind", "data": {"rude": n_rude["data"], "spam": 0},
                                             "eval_data": {"rude": n_rude["eval_data"], "spam": 0}}
    err = capsys.readouterr().err
    assert f"dropped {n_rude['data']} training and {n_rude['eval_data']} held-out record(s)" in err
    assert "no record has 'kind' = 'spam'; the values present are 'real', 'rude'" in err

    rude_only = tmp_path / "rude_only.jsonl"
    rude_only.write_text("".join(json.dumps(r) + "\n" for r in train if r.get("kind") == "rude"))
    argv[1] = str(rude_only)
    with pytest.raises(SystemExit) as exited:  # nothing left to train on
        run_cli(lambda: sft.main(parse_config(sft.SFTStageConfig, [*argv, "--exclude_labels", "rude"])))
    assert exited.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (f"error: exclude_labels ['rude'] on 'kind' left no training record "
                                    f"(all {n_rude['data']} dropped)"), err
    assert [e.stage for e in Registry(reg).entries()] == ["pretrain", "sft"]


def test_missing_model_folder_fails_with_one_line_through_the_cli(pretrained_registry, tiny_data, tmp_path):
    """`python stages/01_sft.py --model <no such folder>`: exit non-zero, one `error:` line naming the path,
    no traceback, no new row."""
    reg = _copy(pretrained_registry, tmp_path / "runs")
    missing = tmp_path / "no_such_model"
    res = _sft(reg, tiny_data, model=str(missing))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: no such folder, and not a registry reference (stage:latest, stage:<id>) or hub id"], res.stderr[-2000:]
    assert [e.stage for e in Registry(reg).entries()] == ["pretrain"]
