"""Tiny, randomly initialised models of the architectures users bring, each with a tokenizer made here.

    from rlhf.testing.arch import FAMILIES, build_model
    path = build_model("qwen2", tmp_path / "qwen2")      # a folder any stage takes as --model

Every family is its transformers config class at 2 layers, width 64 (the smallest bitsandbytes' CPU 4-bit
packs) and a vocabulary of a few hundred tokens, saved with `save_pretrained` next to a tokenizer trained
here on a few lines (`tokenizers` BPE, byte-level like Llama 3 / Qwen / OPT / GPT-NeoX or metaspace like
Mistral / Gemma / Phi-3) and wrapped in `PreTrainedTokenizerFast`. The tokenizer carries the family's special
tokens and a chat template written here from the family's published conventions: what matters to the
pipeline is where each turn starts and ends, which token ends an assistant turn, whether that token is the
tokenizer's EOS, whether there is a pad token and a system role. The families, and what each tests:

    llama     Llama 3: <|start_header_id|>role<|end_header_id|>, turns end with <|eot_id|>, EOS <|end_of_text|>,
              BOS added by the tokenizer and by the template, no pad token, GQA
    qwen2     Qwen2/2.5: ChatML <|im_start|>/<|im_end|> with a default system turn, EOS = pad = <|endoftext|>,
              no BOS, tied embeddings, a vocabulary padded past the tokenizer (as Qwen's is), q/k/v biases
    qwen3     Qwen3: ChatML without a default system turn, EOS <|im_end|>, pad <|endoftext|>, <think> tokens,
              q/k norms, tied embeddings
    mistral   Mistral: [INST] ... [/INST] reply</s>, EOS ends turns, the system turn folded into the first user
              turn by the template, no pad token
    gemma2    Gemma 2: <start_of_turn>user/model ... <end_of_turn>, EOS <eos>, no system role (the template
              raises), tied and scaled embeddings, final logit soft-capping (logits are not the LM head's output)
    gemma3    Gemma 3 (text): the Gemma turns, the system turn folded into the first user turn by the template
    phi3      Phi-3: <|user|>/<|assistant|> ... <|end|>, EOS = pad = <|endoftext|> (rendered after the last turn)
    opt       OPT: no chat template, pad <pad>, BOS = EOS = </s>, learned positions
    gpt_neox  GPT-NeoX: no chat template, no pad, BOS = EOS = <|endoftext|>, partial rotary, parallel residual

`FAMILIES[name].end_of_turn` is the token a reply must end with once `rlhf.models.load_tokenizer` has read
the template; `README.md` ("Your own model") lists what each family needed from the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HIDDEN = 64  # the smallest width bitsandbytes' CPU 4-bit layout packs
LAYERS = 2
HEADS = 2
VOCAB = 400  # trained tokens, special tokens included

# What the tokenizers are trained on: the words of the tests' data, the template glue, hh-rlhf's turn labels.
_CORPUS = [
    "hello how are you today fine thanks what is your name the weather nice good day",
    "I like tea coffee music books please tell me about it sure",
    "shut up you idiot that is a stupid question moron go away loser nobody cares",
    "system user assistant model You are a helpful assistant. you are kind",
    "Human: hi there Assistant: hello! How can I help? question number answer is",
    "The quick brown fox jumps over the lazy dog, 0123456789 (yes) [no] {ok}; a-b_c/d?",
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

_GEMMA_TURNS = (
    "{%- for message in turns %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
GEMMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- set system = '' %}{%- set turns = messages %}"
    "{{- bos_token }}" + _GEMMA_TURNS
)
GEMMA3_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] | trim + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}" + _GEMMA_TURNS
)

PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    """One architecture: its config class and sizes, its tokenizer's special tokens and chat template."""

    name: str
    config_class: str  # transformers class, e.g. "LlamaConfig"
    pretokenizer: str  # "byte" (byte-level BPE) or "metaspace" (sentencepiece-style)
    special: dict[str, str | None]  # bos / eos / pad / unk token strings (None: the family has none)
    extra: tuple[str, ...]  # further special tokens (roles, turn markers), in vocabulary order
    chat_template: str | None
    end_of_turn: str  # the token that ends an assistant reply, once load_tokenizer has read the template
    config: dict[str, Any] = field(default_factory=dict)  # config fields beyond the shared tiny sizes
    adds_bos: bool = False  # the tokenizer puts BOS before text it encodes with special tokens
    pad_vocab_to: int | None = None  # embedding rows rounded up to a multiple of this (Qwen pads its vocabulary)
    generation_eos: tuple[str, ...] = ()  # generation_config.eos_token_id, as the family's checkpoints ship it

    def special_tokens(self) -> list[str]:
        """Every special token once, in vocabulary order (they take the first ids)."""
        out: list[str] = []
        for tok in [*self.special.values(), *self.extra]:
            if tok is not None and tok not in out:
                out.append(tok)
        return out


_ROPE_SMALL = {"max_position_embeddings": 512}

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", "byte",
           {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": None, "unk": None},
           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), LLAMA3_TEMPLATE, "<|eot_id|>",
           {"num_key_value_heads": 1, "rope_theta": 500000.0, "tie_word_embeddings": False, **_ROPE_SMALL},
           adds_bos=True, generation_eos=("<|end_of_text|>",)),
    Family("qwen2", "Qwen2Config", "byte",
           {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": None},
           ("<|im_start|>", "<|im_end|>"), QWEN2_TEMPLATE, "<|im_end|>",
           # 32768 positions, as the real model: configs/qwen2.5-0.5b asks for 512 + 256 tokens.
           {"num_key_value_heads": 1, "tie_word_embeddings": True, "max_position_embeddings": 32768,
            "use_sliding_window": False},
           pad_vocab_to=64, generation_eos=("<|endoftext|>",)),
    Family("qwen3", "Qwen3Config", "byte",
           {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None},
           ("<|im_start|>", "<think>", "</think>"), QWEN3_TEMPLATE, "<|im_end|>",
           {"num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": True, **_ROPE_SMALL},
           pad_vocab_to=64, generation_eos=("<|im_end|>", "<|endoftext|>")),
    Family("mistral", "MistralConfig", "metaspace",
           {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": None},
           ("[INST]", "[/INST]"), MISTRAL_TEMPLATE, "</s>",
           {"num_key_value_heads": 1, "sliding_window": None, "tie_word_embeddings": False, **_ROPE_SMALL},
           adds_bos=True, generation_eos=("</s>",)),
    Family("gemma2", "Gemma2Config", "metaspace",
           {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
           ("<start_of_turn>", "<end_of_turn>"), GEMMA2_TEMPLATE, "<end_of_turn>",
           # Soft-capping scaled to a random model's logits (about 1; Gemma 2's own reach its cap of 30), so it
           # changes them here as it does there.
           {"num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 256,
            "final_logit_softcapping": 1.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True,
            **_ROPE_SMALL},
           adds_bos=True, generation_eos=("<eos>", "<end_of_turn>")),
    Family("gemma3", "Gemma3TextConfig", "metaspace",
           {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
           ("<start_of_turn>", "<end_of_turn>"), GEMMA3_TEMPLATE, "<end_of_turn>",
           {"num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 256,
            "tie_word_embeddings": True, **_ROPE_SMALL},
           adds_bos=True, generation_eos=("<eos>", "<end_of_turn>")),
    Family("phi3", "Phi3Config", "metaspace",
           {"unk": "<unk>", "bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"},
           ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), PHI3_TEMPLATE, "<|end|>",
           {"num_key_value_heads": 2, "tie_word_embeddings": False, "max_position_embeddings": 512,
            "original_max_position_embeddings": 512},
           adds_bos=True, generation_eos=("<|endoftext|>", "<|end|>")),
    Family("opt", "OPTConfig", "byte",
           {"unk": "<unk>", "pad": "<pad>", "bos": "</s>", "eos": "</s>"},
           (), None, "<|end|>",
           {"ffn_dim": 128, "word_embed_proj_dim": HIDDEN, **_ROPE_SMALL},
           adds_bos=True, generation_eos=("</s>",)),
    Family("gpt_neox", "GPTNeoXConfig", "byte",
           {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": None},
           (), None, "<|end|>",
           {"rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False, **_ROPE_SMALL},
           generation_eos=("<|endoftext|>",)),
]}


def build_tokenizer(family: str | Family) -> Any:
    """The family's tokenizer: BPE trained on `_CORPUS`, its special tokens first, its chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family] if isinstance(family, str) else family
    specials = fam.special_tokens()
    if fam.pretokenizer == "byte":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # sentencepiece-style: spaces become "▁", a newline is a token of its own
        bpe = Tokenizer(models.BPE(unk_token=fam.special["unk"]))
        bpe.normalizer = normalizers.Replace(" ", "▁")
        bpe.pre_tokenizer = pre_tokenizers.Split(Regex("\n|▁?[^▁\n]+|▁+"), behavior="isolated")
        bpe.decoder = decoders.Sequence([decoders.Replace("▁", " ")])
        alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    if fam.adds_bos:
        bos = fam.special["bos"]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    named = {f"{k}_token": v for k, v in fam.special.items() if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **named)
    extra = [t for t in fam.extra if t not in named.values()]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.chat_template = fam.chat_template
    return tok


def build_config(family: str | Family, tokenizer: Any) -> Any:
    """The family's config class at the tiny sizes, with its token ids."""
    import transformers

    fam = FAMILIES[family] if isinstance(family, str) else family
    vocab = len(tokenizer)
    if fam.pad_vocab_to:
        vocab = -(-vocab // fam.pad_vocab_to) * fam.pad_vocab_to
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(v) if v is not None else None
           for k, v in fam.special.items() if k != "unk"}
    cls = getattr(transformers, fam.config_class)
    return cls(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, **ids, **fam.config)


def build_model(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny randomly initialised `family` model and its tokenizer to `folder` (created); return it."""
    import torch
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[family]
    folder = Path(folder)
    tokenizer = build_tokenizer(fam)
    config = build_config(fam, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    stop = [tokenizer.convert_tokens_to_ids(t) for t in fam.generation_eos]
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- data and the stage matrix

MATRIX_STAGES = ("sft_lora", "sft_qlora", "reward_qlora", "ppo_fused", "ppo_unfused", "compare", "chat")

_USER = ["hello how are you", "what is your name", "tell me about tea", "I like music please tell me",
         "how is the weather today", "what books do you like"]
_POLITE = ["fine thanks", "sure, I like tea", "good day to you", "thanks, nice music", "the weather is nice",
           "I like books about coffee"]
_RUDE = ["shut up you idiot", "that is a stupid question moron", "go away loser nobody cares"]


def write_data(folder: str | Path, n: int = 32) -> dict[str, Path]:
    """Small valid files for every stage (a quarter held out): multi-turn dialogues, some with a system turn;
    preference pairs; the same pairs in hh-rlhf's raw text (for `data_adapter: hh-rlhf`); prompts."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {k: [] for k in ("sft", "sft_eval", "pref", "pref_eval", "hh", "hh_eval",
                                                   "prompts")}
    for i in range(n):
        user, polite, rude = _USER[i % 6], _POLITE[(i * 5) % 6], _RUDE[i % 3]
        first = [{"role": "user", "content": _USER[(i + 1) % 6]}, {"role": "assistant", "content": _POLITE[i % 6]}]
        system = [{"role": "system", "content": "you are kind"}] if i % 2 else []
        prompt = system + (first if i % 3 == 0 else []) + [{"role": "user", "content": user}]
        split = "_eval" if i % 4 == 0 else ""
        rows["sft" + split].append({"messages": [*prompt, {"role": "assistant", "content": polite}]})
        rows["pref" + split].append({"prompt": prompt, "chosen": [{"role": "assistant", "content": polite}],
                                     "rejected": [{"role": "assistant", "content": rude}]})
        turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                        for m in prompt if m["role"] != "system")
        rows["hh" + split].append({"chosen": f"{turns}\n\nAssistant: {polite}",
                                   "rejected": f"{turns}\n\nAssistant: {rude}"})
        rows["prompts"].append({"messages": prompt, "category": "adversarial" if i % 3 == 0 else "normal"})
    paths = {}
    for name, records in rows.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def stage_commands(model: str | Path, data: dict[str, Path], registry: str | Path,
                   configs: str | Path | None = None) -> dict[str, list[str]]:
    """The command line (script and arguments) of each stage of `MATRIX_STAGES`, on tiny settings.

    `configs` (e.g. "configs/qwen2.5-0.5b"): stages 01 (qlora), 02 and 03 run that folder's YAML files as they
    are, with only the model, the data, the toxicity scorer (its detoxify checkpoint is a download) and the
    number of steps overridden.
    """
    reg = ["--registry", str(registry)]
    lora = ["--lora_r", "4", "--lora_alpha", "8"]
    sft = ["stages/01_sft.py", "--model", str(model), "--data", str(data["sft"]), "--eval_data",
           str(data["sft_eval"]), *reg, "--max_steps", "2", "--per_device_train_batch_size", "8",
           "--gen_eval_samples", "4", "--max_new_tokens", "8", "--learning_rate", "1e-3"]
    ppo = ["stages/03_ppo.py", "--data", str(data["prompts"]), *reg, "--total_episodes", "8",
           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_mini_batches", "1",
           "--num_ppo_epochs", "1", "--response_length", "8", "--toxicity", "profanity-check", "--save_steps", "10"]
    commands = {
        "sft_lora": [*sft, "--mode", "lora", *lora, "--gradient_checkpointing", "false"],
        "sft_qlora": [*sft, "--mode", "qlora", *lora, "--gradient_checkpointing", "false"],
        "reward_qlora": ["stages/02_reward.py", "--model", "sft:latest", "--data", str(data["pref"]), "--eval_data",
                         str(data["pref_eval"]), *reg, "--mode", "qlora", *lora, "--max_steps", "2",
                         "--per_device_train_batch_size", "8", "--gradient_checkpointing", "false"],
        "ppo_fused": [*ppo, "--max_prompt_length", "64", *lora, "--fuse_roles", "true"],
        "ppo_unfused": [*ppo, "--max_prompt_length", "64", *lora, "--fuse_roles", "false"],
        "compare": ["stages/04_compare.py", *reg, "--prompts", str(data["prompts"]), "--max_prompts", "4",
                    "--samples_per_prompt", "2", "--max_new_tokens", "8", "--max_eval_dialogues", "4",
                    "--bootstrap_resamples", "50", "--toxicity", "profanity-check", "--num_threads", "1"],
        "chat": ["scripts/chat.py", "--model", "ppo:latest", *reg, "--prompt", "hello how are you",
                 "--system", "you are kind", "--max_new_tokens", "8", "--toxicity", "profanity-check"],
    }
    if configs is not None:
        c = Path(configs)
        commands["sft_qlora"] = ["stages/01_sft.py", "--config", str(c / "sft.yaml"), "--model", str(model),
                                 "--data", str(data["sft"]), "--eval_data", str(data["sft_eval"]), *reg,
                                 "--max_steps", "2", "--gradient_accumulation_steps", "1"]
        commands["reward_qlora"] = ["stages/02_reward.py", "--config", str(c / "reward.yaml"), "--data",
                                    str(data["hh"]), "--eval_data", str(data["hh_eval"]), *reg, "--max_steps", "2",
                                    "--gradient_accumulation_steps", "1"]
        ppo_config = ["stages/03_ppo.py", "--config", str(c / "ppo.yaml"), "--data", str(data["prompts"]), *reg,
                      "--toxicity", "profanity-check", "--total_episodes", "8", "--per_device_train_batch_size", "4",
                      "--gradient_accumulation_steps", "1", "--num_ppo_epochs", "1", "--response_length", "16"]
        commands["ppo_fused"] = [*ppo_config, "--fuse_roles", "true"]
        commands["ppo_unfused"] = ppo_config
    return commands


@dataclass
class StageResult:
    ok: bool
    seconds: float
    error: str | None  # the failing command's `error:` line, or the last line of its traceback
    output: str = ""  # its stderr (tests show the tail when a stage fails)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 2), "error": self.error}


def run_stage(argv: list[str], cwd: str | Path, timeout: float = 900) -> StageResult:
    """Run `python <argv>` from `cwd` (the repository) on one thread, offline, and time it."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                             env=env)
    except subprocess.TimeoutExpired:
        return StageResult(False, time.time() - t0, f"timed out after {timeout:.0f} s")
    seconds = time.time() - t0
    if res.returncode == 0:
        return StageResult(True, seconds, None, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
    return StageResult(False, seconds, f"exit {res.returncode}: {error[:500]}", res.stderr)


def run_family(family: str, workdir: str | Path, repo: str | Path, configs: str | Path | None = None,
               stages: tuple[str, ...] = MATRIX_STAGES) -> dict[str, StageResult]:
    """Build `family`'s tiny model in `workdir`, then run `stages` in order on one registry there; each stage's
    console output goes to `workdir/logs/<stage>.log`. A stage whose input a failed stage should have made is not
    run (error says which)."""
    import time

    workdir = Path(workdir)
    t0 = time.time()
    try:
        model = build_model(family, workdir / "model")
        data = write_data(workdir / "data")
    except Exception as exc:  # noqa: BLE001 - the matrix reports what failed, for every family
        return {s: StageResult(False, time.time() - t0, f"building the model: {type(exc).__name__}: {exc}")
                for s in stages}
    commands = stage_commands(model, data, workdir / "runs", configs)
    needs = {"reward_qlora": ("sft_qlora",), "ppo_fused": ("reward_qlora",), "ppo_unfused": ("reward_qlora",),
             "compare": ("ppo_fused", "ppo_unfused"), "chat": ("ppo_fused", "ppo_unfused")}
    results: dict[str, StageResult] = {}
    for stage in stages:
        failed = [s for s in needs.get(stage, ()) if s in results and not results[s].ok]
        if failed and all(not results[s].ok for s in needs[stage] if s in results):
            results[stage] = StageResult(False, 0.0, f"not run: {', '.join(failed)} failed")
            continue
        results[stage] = run_stage(commands[stage], repo)
        (workdir / "logs").mkdir(exist_ok=True)
        (workdir / "logs" / f"{stage}.log").write_text(results[stage].output)
    return results
