"""The architecture matrix: the pipeline on tiny models of every family users bring (rlhf/testing/arch.py).

Per family, in the default suite (seconds each): the chat template as the library reads it (EOS = the
token that ends an assistant turn, pad, generation prompt), the SFT loss mask token by token on one
multi-turn dialogue with a system turn, generation (ours and PPO's rollout) stopping at the end-of-turn
token, left-padded batches giving each row's unpadded logprobs, the fused-roles probe, the rows of
added tokens. Qwen2 (EOS <|endoftext|> but turns end with <|im_end|>, a default system turn, tied
embeddings, a padded vocabulary) goes through every stage's command line, stages 01-03 from
configs/qwen2.5-0.5b/ as they are (model, data, toxicity scorer and steps overridden), and its
registered artifacts must load back and score what the stages recorded.

Every family through every command line runs with RLHF_ARCH_FULL=1 (README: "Your own model: the architectures
tested"; scripts/arch_matrix.py runs the same outside pytest):

    RLHF_ARCH_FULL=1 .venv/bin/python -m pytest tests/test_arch_matrix.py -m arch
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_stage
from rlhf.registry import Registry
from rlhf.testing.arch import FAMILIES, MATRIX_STAGES, build_model, run_family

ALL = list(FAMILIES)

DIALOGUE = [
    {"role": "system", "content": "you are kind"},
    {"role": "user", "content": "hello how are you"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "tell me about tea"},
    {"role": "assistant", "content": "I like tea"},
]
REPLIES = ["fine thanks", "I like tea"]

_DEMO = ("<|system|>\nyou are kind<|end|>\n<|user|>\nhello how are you<|end|>\n<|assistant|>\nfine thanks<|end|>\n"
         "<|user|>\ntell me about tea<|end|>\n<|assistant|>\nI like tea<|end|>\n")
_CHATML = ("<|im_start|>system\nyou are kind<|im_end|>\n<|im_start|>user\nhello how are you<|im_end|>\n"
           "<|im_start|>assistant\nfine thanks<|im_end|>\n<|im_start|>user\ntell me about tea<|im_end|>\n"
           "<|im_start|>assistant\nI like tea<|im_end|>\n")
_GEMMA = ("<bos><start_of_turn>user\nyou are kind\n\nhello how are you<end_of_turn>\n<start_of_turn>model\n"
          "fine thanks<end_of_turn>\n<start_of_turn>user\ntell me about tea<end_of_turn>\n<start_of_turn>model\n"
          "I like tea<end_of_turn>\n")
# The dialogue as each family's conventions write it (by hand, not by the templates under test), the text a
# generation prompt ends with, and the tokenizer's own EOS before load_tokenizer read the template.
EXPECTED = {
    "llama": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nyou are kind<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nhello how are you<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nfine thanks<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\ntell me about tea<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nI like tea<|eot_id|>",
              "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|end_of_text|>"),
    "qwen2": (_CHATML, "<|im_start|>assistant\n", "<|endoftext|>"),
    "qwen3": (_CHATML, "<|im_start|>assistant\n", "<|im_end|>"),
    "mistral": ("<s>[INST] you are kind\n\nhello how are you [/INST]fine thanks</s>[INST] tell me about tea "
                "[/INST]I like tea</s>", "tell me about tea [/INST]", "</s>"),
    "gemma2": (_GEMMA, "<start_of_turn>model\n", "<eos>"),  # no system role: folded into the first user turn
    "gemma3": (_GEMMA, "<start_of_turn>model\n", "<eos>"),
    "phi3": (_DEMO + "<|endoftext|>", "<|assistant|>\n", "<|endoftext|>"),  # Phi-3's layout is the demo's
    "opt": (_DEMO, "<|assistant|>\n", "</s>"),  # no template: the demo's, with <|end|> as EOS
    "gpt_neox": (_DEMO, "<|assistant|>\n", "<|endoftext|>"),
}

# Why the fused-roles probe falls back to one forward per role (None: it passes).
UNFUSED = {"gemma2": r"^reference logits differ"}  # final_logit_softcapping: logits are not the LM head's output


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {name: build_model(name, root / name) for name in ALL}


def _tokenizer(path: Path):
    from rlhf.models import load_tokenizer

    return load_tokenizer(str(path))


def _model(path: Path, tokenizer, load_in_4bit: bool = False):
    from rlhf.models import fit_embeddings, load_model

    model = load_model(str(path), load_in_4bit=load_in_4bit)
    fit_embeddings(model, tokenizer)
    return model.eval()


# ------------------------------------------------------------------------------------ template and loss mask


@pytest.mark.parametrize("family", ALL)
def test_template_eos_and_pad_as_the_pipeline_needs_them(models, family):
    """EOS is the token that ends an assistant turn (even where the tokenizer's own EOS is another), pad is a
    token of its own, the template renders the family's layout (the system turn folded where there is no system
    role) and generation prompts end with the assistant's header; the saved tokenizer still renders the same."""
    from transformers import AutoTokenizer

    from rlhf.chat_format import render

    text, generation_prompt, own_eos = EXPECTED[family]
    saved = AutoTokenizer.from_pretrained(models[family])
    assert saved.eos_token == own_eos
    tok = _tokenizer(models[family])
    assert tok.eos_token == FAMILIES[family].end_of_turn
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert render(tok, DIALOGUE) == text
    assert render(tok, DIALOGUE[:4], add_generation_prompt=True).endswith(generation_prompt)
    if family not in ("opt", "gpt_neox"):  # ours: the template the tokenizer was saved with, still rendering alike
        assert render(saved, DIALOGUE) == text


def _expected_mask(tokenizer, text: str, eos: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and, per token, whether it lies in a reply or in the EOS right after it: worked out
    from character offsets of the hand-written text, independently of the library."""
    spans, at = [], 0
    for reply in REPLIES:
        at = text.index(reply + eos, at)
        spans.append((at, at + len(reply + eos)))
        at += len(reply)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    flags = [int(e > s and any(a <= s and e <= b for a, b in spans)) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], flags


@pytest.mark.parametrize("family", ALL)
def test_sft_labels_are_the_assistant_replies_and_their_end_of_turn_token_by_token(models, family, tmp_path):
    """Stage 01's dataset through TRL's SFTTrainer as the stage builds it: the labels keep exactly the reply
    tokens and the EOS closing each reply; system and user turns, role headers, the EOS closing user turns and
    separators are -100."""
    from trl import SFTConfig, SFTTrainer

    sft = load_stage("01_sft.py")
    tok = _tokenizer(models[family])
    text, _, _ = EXPECTED[family]
    ids, flags = _expected_mask(tok, text, tok.eos_token)
    assert sum(flags) > len(REPLIES)

    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=256, report_to=[], use_cpu=True,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=_model(models[family], tok), args=args, processing_class=tok,
                         train_dataset=sft.sft_dataset(tok, [{"messages": DIALOGUE}]))
    example = trainer.train_dataset[0]
    assert example["input_ids"] == ids
    assert example["labels"] == [t if f else -100 for t, f in zip(ids, flags)]
    kept = [t for t in example["labels"] if t != -100]
    assert tok.decode(kept) == "".join(r + tok.eos_token for r in REPLIES)
    eos_labels = [lab for t, lab in zip(ids, example["labels"]) if t == tok.eos_token_id]
    assert eos_labels.count(tok.eos_token_id) == len(REPLIES)  # user/system turns' EOS are not trained


# ------------------------------------------------------------------------------------ stopping at the end of a turn


def _scripted(model, scripts: list[list[int]]):
    """A forward hook on a causal LM: forward k (generation step k) gives row i a logit of +1e4 for
    `scripts[i][k]` (the last entry once the script runs out) and -1e4 for every other token. The model's own
    stopping, padding and caching decide the rest."""
    step = {"k": 0}

    def hook(module, args, out):
        logits = torch.full_like(out.logits, -1e4)
        for i, script in enumerate(scripts):
            logits[i, -1, script[min(step["k"], len(script) - 1)]] = 1e4
        step["k"] += 1
        out.logits = logits
        return out

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("family", ALL)
def test_generation_stops_at_the_end_of_turn_token(models, family):
    """A reply that emits the family's end-of-turn token stops there (kept, marked ended), also where it is not
    the tokenizer's saved EOS; a reply that never emits it runs to the length limit, and decodes without it."""
    from rlhf.generation import encode_prompts, generate_ids, generate_replies

    tok = _tokenizer(models[family])
    eot = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    word = tok.convert_tokens_to_ids(tok.tokenize("tea")[0])
    scripts = [[word, word, eot, word], [word]]
    model = _model(models[family], tok)
    handle = _scripted(model, scripts)
    responses, ended = generate_ids(model, tok, encode_prompts(tok, [DIALOGUE[:2], DIALOGUE[:4]]),
                                    max_new_tokens=6, do_sample=False)
    handle.remove()
    assert responses == [[word, word, eot], [word] * 6] and ended == [True, False]

    handle = _scripted(model, scripts[:1])
    (text,), (done,) = generate_replies(model, tok, [DIALOGUE[:2]], max_new_tokens=6)
    handle.remove()
    assert done and text == tok.decode([word, word], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------ padding, fused roles, new rows


@pytest.mark.parametrize("family", ALL)
def test_left_padded_rows_get_the_logprobs_and_scores_of_unpadded_rows(models, family):
    """Stage 04's response logprobs (prompts left-padded, position ids from the mask) and the reward model's
    scores (right-padded) of each row are those of the row alone (PPO's, in 4-bit: the next test)."""
    from rlhf.eval.likelihood import response_logprob_sums
    from rlhf.generation import encode_prompts
    from rlhf.reward_model import score_ids

    tok = _tokenizer(models[family])
    model = _model(models[family], tok)
    prompts = encode_prompts(tok, [DIALOGUE[1:2], DIALOGUE[:4]])
    assert len(prompts[0]) + 5 < len(prompts[1])
    responses = [tok("fine thanks", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 tok("I like tea", add_special_tokens=False)["input_ids"]]
    together = response_logprob_sums(model, tok.pad_token_id, prompts, responses, 1.0, 2)
    alone = [response_logprob_sums(model, tok.pad_token_id, [p], [r], 1.0, 1)[0] for p, r in zip(prompts, responses)]
    assert together == pytest.approx(alone, abs=1e-4)

    hidden = model.get_input_embeddings().weight.shape[1]
    head = {"weight": torch.randn(1, hidden, generator=torch.Generator().manual_seed(0))}
    rows = [p + r for p, r in zip(prompts, responses)]
    padded = score_ids(model, rows, tok.pad_token_id, head=head, extra_padding=3)
    single = torch.cat([score_ids(model, [r], tok.pad_token_id, head=head) for r in rows])
    torch.testing.assert_close(padded, single, atol=1e-4, rtol=1e-4)


def _fake_reward_dir(model_dir: Path, folder: Path, tokenizer) -> Path:
    """What a reward entry of kind "adapter" holds: a random LoRA adapter on the causal LM and a score head."""
    from peft import LoraConfig, get_peft_model

    from rlhf.reward_model import adapter_dir, save_score_head

    torch.manual_seed(0)
    model = _model(model_dir, tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    peft_model.save_pretrained(str(adapter_dir(folder)))
    save_score_head({"weight": torch.randn(1, model.get_input_embeddings().weight.shape[1])}, folder)
    return folder


@pytest.mark.parametrize("family", ALL)
def test_ppo_on_the_4bit_base_fuses_roles_or_says_why_pads_and_stops_like_one_row(models, family, tmp_path):
    """Stage 03's actor-critic on the 4-bit base with policy, value and reward adapters: the probe fuses the roles
    (their results then equal one forward per role, which it checked) or says why not (UNFUSED); a left-padded
    row gets the reference logprobs, values and reward score it gets alone; the rollout, given what stage 03
    passes (tokenizer.eos_token_id), ends a response at the family's end-of-turn token."""
    from rlhf.generation import encode_prompts
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.ppo.losses import logprobs_from_logits
    from rlhf.ppo.rollout import rollout
    from rlhf.sequences import left_pad, right_pad

    tok = _tokenizer(models[family])
    reward = _fake_reward_dir(models[family], tmp_path / "reward", tok)
    ac = build_actor_critic(str(models[family]), tok, load_in_4bit=True, lora_r=4, lora_alpha=8,
                            lora_target_modules="all-linear", reward_dir=reward, separate_reward=None,
                            device=torch.device("cpu"), fuse_roles=True)
    want = UNFUSED.get(family)
    if want is None:
        assert ac.unfused_reason is None and ac.fused
    else:
        assert re.search(want, ac.unfused_reason or ""), ac.unfused_reason
        assert not ac.fused

    prompts = encode_prompts(tok, [DIALOGUE[1:2], DIALOGUE[:4]])
    responses = [tok("fine thanks", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 tok("I like tea", add_special_tokens=False)["input_ids"]]

    def forward(rows: list[int]) -> list[tuple]:
        p_ids, p_mask = left_pad([prompts[i] for i in rows], tok.pad_token_id)
        r_ids, r_mask = right_pad([responses[i] for i in rows], tok.pad_token_id)
        ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
        ref, values, scores = ac.rollout_forward(ids, mask, r_ids.shape[1])
        logprobs = logprobs_from_logits(ref, r_ids)
        P = p_ids.shape[1]
        return [(logprobs[k, : len(responses[i])], values[k, P - 1: P - 1 + len(responses[i])], scores[k])
                for k, i in enumerate(rows)]

    together = forward([0, 1])
    for i in (0, 1):
        for got, alone in zip(together[i], forward([i])[0]):
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)

    eot = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    word = tok.convert_tokens_to_ids(tok.tokenize("tea")[0])
    handle = _scripted(ac.model.get_base_model(), [[word, word, eot, word], [word]])
    batch = rollout(ac, prompts, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, temperature=1.0,
                    response_length=6, forward_batch_size=2, group_by_length=True, device=torch.device("cpu"))
    handle.remove()
    assert batch.mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch.has_eos.tolist() == [True, False]
    assert batch.responses[0, :3].tolist() == [word, word, eot]


@pytest.mark.parametrize("family", ALL)
def test_added_tokens_get_rows_like_the_trained_ones_the_same_on_every_load(models, family):
    """Tokens load_tokenizer adds (a pad for Llama 3 and Mistral; the demo's role tokens, EOS and pad for OPT and
    GPT-NeoX) get embedding rows drawn from the other rows' statistics, distinct, the same on every load (LoRA
    keeps them frozen; the merged SFT model is rebuilt from a fresh load); the model's config and generation
    config stop at the new EOS first, then at the model's own stop tokens."""
    from transformers import AutoTokenizer

    tok = _tokenizer(models[family])
    n_saved = len(AutoTokenizer.from_pretrained(models[family]))
    expected_added = {"llama": 1, "mistral": 1, "opt": 4, "gpt_neox": 5}.get(family, 0)
    assert tok.rlhf_added_tokens == expected_added
    rows = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _model(models[family], tok)
        rows.append(model.get_input_embeddings().weight.detach().clone())
    torch.testing.assert_close(rows[0], rows[1])
    weight = rows[0]
    assert weight.shape[0] >= len(tok)
    if expected_added:
        old, new = weight[:n_saved], weight[n_saved:len(tok)]
        norms = old.norm(dim=-1)
        assert torch.isfinite(new).all()
        assert ((new.norm(dim=-1) > 0.5 * norms.min()) & (new.norm(dim=-1) < 2 * norms.max())).all()
        gaps = (new[:, None] - new[None]).norm(dim=-1) + torch.eye(len(new)) * 1e9
        assert gaps.min() > 0.1 * norms.mean()
    assert model.config.eos_token_id == tok.eos_token_id
    stops = model.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else stops
    own = [tok.convert_tokens_to_ids(t) for t in FAMILIES[family].generation_eos]
    assert stops == list(dict.fromkeys([tok.eos_token_id, *own]))


# ------------------------------------------------------------------------------------ every stage's command line


def _run_and_check(family: str, workdir: Path, configs: str | None = None) -> None:
    results = run_family(family, workdir, ROOT, configs=configs)
    failed = {s: f"{r.error}\n{r.output[-2500:]}" for s, r in results.items() if not r.ok}
    assert not failed, "\n\n".join(f"{s}: {e}" for s, e in failed.items())
    assert list(results) == list(MATRIX_STAGES)
    _artifacts_load_back_and_score_the_same(workdir)


def _artifacts_load_back_and_score_the_same(workdir: Path) -> None:
    """The registry verifies; the reward entry's adapter and head, loaded from its files onto the 4-bit SFT base
    as PPO loads them, reproduce the held-out metrics stage 02 registered; the LoRA SFT entry reproduces its
    registered eval loss; the ppo entry loads (policy merged) as a model that differs from its SFT base."""
    from peft import PeftModel

    from rlhf.data import load_records
    from rlhf.data_formats import explicit_pairs
    from rlhf.eval.likelihood import assistant_nll
    from rlhf.models import load_chat_model
    from rlhf.reward_model import adapter_dir, conversation_ids, load_score_head, pairwise_metrics, score_ids

    reg = Registry(workdir / "runs")
    assert reg.verify() == {}
    reward = reg.get("reward:latest")
    sft = reg.get(reward.config["base_model"])
    tok = _tokenizer(reward.path)
    base = _model(sft.path, tok, load_in_4bit=True)
    rm = PeftModel.from_pretrained(base, str(adapter_dir(reward.path)))
    pairs = explicit_pairs(load_records(reward.config["eval_data"], "preference",
                                        adapter=reward.config.get("data_adapter")))
    rows = [conversation_ids(tok, p["prompt"] + p[k], reward.config["max_length"])
            for k in ("chosen", "rejected") for p in pairs]
    scores = score_ids(rm, rows, tok.pad_token_id, head=load_score_head(reward.path))
    n = len(pairs)
    again = pairwise_metrics(scores[:n], scores[n:])
    tol = 2e-3 * max(1.0, scores.abs().max().item())
    assert again["margin"] == pytest.approx(reward.metrics["eval_margin"], abs=tol)
    assert scores.mean().item() == pytest.approx(reward.metrics["reward_mean"], abs=tol)
    assert again["accuracy"] == pytest.approx(reward.metrics["eval_accuracy"], abs=1 / n + 1e-9)

    lora_sft = next(e for e in reg.entries("sft") if e.config["mode"] == "lora")
    model, sft_tok, _ = load_chat_model(lora_sft.ref, reg)
    dialogues = load_records(lora_sft.config["eval_data"], "dialogue")
    nll, count = assistant_nll(model, sft_tok, dialogues, 256, 64)
    assert nll / count == pytest.approx(lora_sft.metrics["eval_loss"], rel=1e-4)

    from safetensors.torch import load_file

    ppo = reg.get("ppo:latest")
    trained = load_file(ppo.path / "policy" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items()), "PPO left the policy at its start"
    policy, ppo_tok, _ = load_chat_model(ppo.ref, reg)
    sft_model, _, _ = load_chat_model(ppo.config["sft_model"], reg)
    manual = PeftModel.from_pretrained(sft_model, str(ppo.path / "policy")).eval()
    row = torch.tensor([ppo_tok.encode("hello how are you", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(policy(input_ids=row).logits, manual(input_ids=row).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_qwen2_runs_every_stage_with_the_qwen_configs_as_they_are(tmp_path):
    """Qwen2 through every command line: 01 lora, 01 qlora / 02 qlora on hh-rlhf raw text / 03 in 4-bit with
    fuse_roles off and on, all three from configs/qwen2.5-0.5b/ with only the model folder, the data, the
    toxicity scorer and the number of steps overridden; then 04 and chat.py --prompt. The artifacts load back."""
    _run_and_check("qwen2", tmp_path, configs=str(ROOT / "configs" / "qwen2.5-0.5b"))


ARCH_FULL = os.environ.get("RLHF_ARCH_FULL", "0") not in ("", "0", "false", "False")


@pytest.mark.arch
@pytest.mark.slow
@pytest.mark.skipif(not ARCH_FULL, reason="every family through every stage: set RLHF_ARCH_FULL=1")
@pytest.mark.parametrize("family", ALL)
def test_every_family_runs_every_stage(family, tmp_path):
    _run_and_check(family, tmp_path)
