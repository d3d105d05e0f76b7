"""Model references and loading, shared by every stage.

A model reference is `stage:latest` / `stage:<id>` (the registry), a local folder
in Hugging Face format, or a hub id. `resolve_model` turns it into a local
folder or a hub id and fails fast, with a message, when a hub id cannot be
reached (offline machines otherwise hang in retries).

`load_tokenizer` guarantees what every stage relies on: a dedicated pad token
(never EOS: masking pads must never mask a real end of turn), an EOS that ends
assistant turns, and a chat template. Hub models without a chat template get
the demo's (`rlhf.chat_format`), with its special tokens added; the caller then
resizes the model's embeddings (`fit_embeddings`). A template that ends assistant
turns with another token than the tokenizer's EOS (Qwen2.5 base: <|im_end|> vs
<|endoftext|>; Llama 3: <|eot_id|> vs <|end_of_text|>; Gemma: <end_of_turn> vs <eos>;
Phi-3: <|end|> vs <|endoftext|>) gets that token as its EOS, as the families' instruct
releases and TRL's `SFTConfig.eos_token` do, so generation stops, PPO's masks end and the
reward model reads its score where a reply ends. `fit_embeddings` keeps the model's own
stop tokens (its generation config) besides it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.errors import RegistryError, UserError
from rlhf.hub import is_hub_id, unreachable
from rlhf.registry import STAGES, Entry, Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from. `entry` is set for registry references, `hub_id` for hub models."""

    ref: str
    path: str
    entry: Entry | None = None
    hub_id: str | None = None

    @property
    def parents(self) -> list[str]:
        return [self.entry.ref] if self.entry else []


def is_registry_ref(ref: str) -> bool:
    return ":" in ref and ref.split(":", 1)[0] in STAGES


def resolve_model(ref: str, registry: Registry, stages: tuple[str, ...] = STAGES) -> ResolvedModel:
    """Resolve a model reference (see module docstring); `stages` are the registry stages accepted."""
    if is_registry_ref(ref):
        if ref.split(":", 1)[0] not in stages:
            raise RegistryError(f"{ref}: is a '{ref.split(':', 1)[0]}' entry, but this needs a "
                                f"{' or '.join(repr(s) for s in stages)} entry")
        entry = registry.get(ref, stage=stages)
        return ResolvedModel(ref=ref, path=str(entry.path), entry=entry)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{ref}: folder has no config.json; expected a model saved with save_pretrained")
        return ResolvedModel(ref=ref, path=str(path.resolve()))
    if ref.startswith((".", "/", "~")) or os.sep in ref.rstrip("/").replace("/", "", 1) or not is_hub_id(ref):
        raise UserError(f"{ref}: no such folder, and not a registry reference (stage:latest, stage:<id>) or hub id")
    return ResolvedModel(ref=ref, path=ref, hub_id=_check_hub_model(ref))


def _check_hub_model(repo_id: str, timeout: float = 10.0) -> str:
    """Return `repo_id` when it is in the local cache or reachable on the hub; else fail fast."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return repo_id
    hint = "download it first (scripts/fetch_assets.py) or pass a local folder"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise RegistryError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    from huggingface_hub import constants, model_info

    # The bounded probe first: model_info's timeout covers neither name resolution nor its retries.
    reason = unreachable(timeout)
    if reason is not None:
        raise RegistryError(
            f"{repo_id}: cannot reach it on the Hugging Face hub at {constants.ENDPOINT} ({reason}); {hint}"
        )
    try:
        model_info(repo_id, timeout=timeout)
    except Exception as exc:  # not found, gated, or the network failing after all: many types, one meaning here
        reason = type(exc).__name__
        raise RegistryError(f"{repo_id}: cannot reach it on the Hugging Face hub ({reason}); {hint}") from None
    return repo_id


def device() -> "torch.device":
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype() -> "torch.dtype":
    """bf16 on a GPU that supports it, fp32 on the CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: str, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """Load a tokenizer and give it a dedicated pad token and a chat template when it lacks them."""
    from transformers import AutoTokenizer

    from rlhf import chat_format

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    n_saved = len(tok)
    if tok.chat_template is None:
        tok.add_special_tokens(
            {"eos_token": chat_format.EOS, "additional_special_tokens": list(chat_format.ROLE_TOKENS.values())}
        )
        tok.chat_template = chat_format.CHAT_TEMPLATE
    end_of_turn = chat_format.end_of_turn_token(tok) if isinstance(tok.chat_template, str) else None
    if end_of_turn is not None and end_of_turn != tok.eos_token:
        if tok.eos_token is not None:  # the template keeps rendering the EOS it was written for (Phi-3's last line)
            tok.chat_template = "{%- set eos_token = " + json.dumps(tok.eos_token) + " %}" + tok.chat_template
        tok.add_special_tokens({"eos_token": end_of_turn})  # already in the vocabulary: nothing is added
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": chat_format.PAD})
    tok.rlhf_added_tokens = len(tok) - n_saved  # tokens added here, which `fit_embeddings` makes room for
    return tok


def fit_embeddings(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", where: str = "model") -> None:
    """Grow the embeddings for the tokens `load_tokenizer` added and record pad/eos ids on the model config.

    A tokenizer that already had more tokens than the model embeds does not belong to
    that model: refused (`check_vocab`) before anything is resized.
    """
    check_vocab(model, tokenizer, where)
    n_old = model.get_input_embeddings().weight.shape[0]
    if n_old < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_new_rows(model, n_old)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        stops = stop_token_ids(model, tokenizer)
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops


def stop_token_ids(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """The ids that end a generated reply: the tokenizer's EOS (the end of an assistant turn, see
    `load_tokenizer`) first, then the other stop tokens the model's generation config names (Llama 3's
    <|end_of_text|>, Gemma's <eos>: what the base model ends a document with)."""
    config = getattr(model, "generation_config", None)
    own = getattr(config, "eos_token_id", None) if config is not None else None
    own = [own] if isinstance(own, int) else list(own or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *(i for i in own if 0 <= i < len(tokenizer))]))


def init_new_rows(model: "PreTrainedModel", n_old: int) -> None:
    """Rows `n_old:` of the input (and untied output) embeddings: mean + std · z of the old rows, per dimension,
    with z drawn from a generator seeded by `n_old` alone.

    The same on every load: LoRA keeps these rows frozen, and the merged SFT model is rebuilt by loading the
    base again, so random rows (transformers' default) would differ between training and the merged model.
    """
    import torch

    layers = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != layers[0].weight.data_ptr():
        layers.append(out)
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            old = w[:n_old].float()
            g = torch.Generator().manual_seed(n_old)
            z = torch.randn(w.shape[0] - n_old, w.shape[1], generator=g)
            w[n_old:] = (old.mean(0) + old.std(0) * z).to(w.dtype)
            if getattr(layer, "bias", None) is not None:
                layer.bias[n_old:] = layer.bias[:n_old].mean()


def load_model(
    path: str,
    kind: str = "causal_lm",
    *,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> "PreTrainedModel":
    """Load a causal LM (`kind="causal_lm"`) or a scalar-score classifier (`kind="score"`).

    4-bit loading places the model on the GPU when there is one (bitsandbytes
    quantizes on load); full precision loads in fp32 on CPU / bf16 on GPU.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    if kind == "score":
        kwargs.setdefault("num_labels", 1)
    from rlhf.quant import quantization_config

    quant = quantization_config(load_in_4bit)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs.setdefault("device_map", {"": device().index or 0} if device().type == "cuda" else {"": "cpu"})
    try:
        model = cls.from_pretrained(path, dtype=compute_dtype(), trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if quant is not None:
        from rlhf.quant import own_unquantized_tensors

        own_unquantized_tensors(model)  # release the checkpoint's memory map (CPU)
    return model


def check_vocab(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", where: str) -> None:
    """Refuse a tokenizer whose ids the model cannot embed (a tokenizer/model mismatch)."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    n_own = len(tokenizer) - getattr(tokenizer, "rlhf_added_tokens", 0)
    if n_own > n_embed:
        raise UserError(
            f"{where}: tokenizer has {n_own} tokens but the model embeds only {n_embed}; "
            "tokenizer and model do not belong together"
        )


def memory_footprint_mb(model: Any) -> float:
    """Bytes held by parameters and buffers (4-bit weights counted at their packed size), in MiB."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total / 2**20


def context_length(model: Any, wanted: int) -> int:
    """`wanted`, capped at the model's maximum number of positions when it has one."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return min(wanted, limit) if limit else wanted


def trainer_precision_args() -> dict[str, bool]:
    """`bf16` and `use_cpu` for a TRL/transformers Trainer config, from the device (`compute_dtype()`).

    TRL's SFTConfig and RewardConfig default to bf16=True; on a CPU without AVX-512 BF16 that autocast made
    SFT ~9x slower. Every Trainer stage takes its precision from here instead.
    """
    import torch

    return {"bf16": compute_dtype() == torch.bfloat16, "use_cpu": not torch.cuda.is_available()}


def trainable_to_compute_dtype(model: Any) -> None:
    """Cast the trainable weights to `compute_dtype()`.

    With a 4-bit base TRL's SFTTrainer and RewardTrainer cast them to bf16 (as the QLoRA paper does); the
    CPU computes in fp32 (no bf16 autocast), so they come back to fp32 there (a no-op on a bf16 GPU).
    """
    dtype = compute_dtype()
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)


def load_chat_model(ref: str, registry: Registry, *, load_in_4bit: bool = False, trust_remote_code: bool = False,
                    policy: str | Path | None = None) -> tuple[Any, Any, ResolvedModel]:
    """(model, tokenizer, resolved) for generating with any reference, on the default device.

    A `ppo` entry is its SFT base (recorded in the entry's config) with the trained
    `policy` adapter merged in; `pretrain` / `sft` / `dpo` entries (LoRA ones hold the merged model),
    folders and hub ids load as they are. `policy` (ppo entries only) merges another policy adapter of the
    entry instead of its final one, e.g. a snapshot `snapshots/step-N/policy` (stage 04's reward–KL frontier).
    """
    resolved = resolve_model(ref, registry)
    if policy is not None and (resolved.entry is None or resolved.entry.stage != "ppo"):
        raise UserError(f"{ref}: only a ppo entry has policy adapters to merge (got policy={policy})")
    if resolved.entry is not None and resolved.entry.stage == "ppo":
        from peft import PeftModel

        base = resolve_model(resolved.entry.config["sft_model"], registry, stages=("sft", "pretrain"))
        tokenizer = load_tokenizer(str(resolved.entry.path), trust_remote_code)
        model = load_model(base.path, trust_remote_code=trust_remote_code)
        fit_embeddings(model, tokenizer, ref)
        model = PeftModel.from_pretrained(model, str(policy or resolved.entry.path / "policy")).merge_and_unload()
    else:
        if resolved.entry is not None and resolved.entry.stage == "reward":
            raise RegistryError(f"{ref}: is a 'reward' entry; a chat model is a pretrain, sft, ppo or dpo entry")
        tokenizer = load_tokenizer(resolved.path, trust_remote_code)
        model = load_model(resolved.path, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
        fit_embeddings(model, tokenizer, ref)
    if not load_in_4bit:
        model.to(device())
    model.eval()
    return model, tokenizer, resolved


def lora_targets(spec: str) -> str | list[str]:
    """peft's `target_modules` from a config string: 'all-linear' or comma-separated module names."""
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def lora_config(r: int, alpha: int, dropout: float, target_modules: str, task_type: str = "CAUSAL_LM") -> Any:
    """peft's `LoraConfig` of the stages that train LoRA on a causal LM (01 SFT, 03 DPO); `target_modules` as in
    `lora_targets`."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=task_type,
                      target_modules=lora_targets(target_modules))


def merge_lora(base_path: str, adapter_dir: str | Path, tokenizer: "PreTrainedTokenizerBase",
               trust_remote_code: bool = False) -> "PreTrainedModel":
    """The base in full precision with the adapter merged in: a plain model later stages load as a base.

    The base is loaded again (a QLoRA run trained on a 4-bit copy of it) and its embeddings fitted to
    `tokenizer` exactly as in training (`fit_embeddings`), so the adapter finds the same modules and rows.
    """
    from peft import PeftModel

    base = load_model(base_path, trust_remote_code=trust_remote_code)
    fit_embeddings(base, tokenizer)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()



def save_trained_model(model: "PreTrainedModel", staged: Path, *, lora: bool, base_path: str,
                       tokenizer: "PreTrainedTokenizerBase", trust_remote_code: bool = False) -> "PreTrainedModel":
    """A trained model into an entry's staging folder as later stages load it: the full model, or (`lora`) the adapter
    in `adapter/` and the base with it merged (`merge_lora`); the tokenizer beside it (stages 01 SFT and 03 DPO).
    Returns the model saved (the merged one with `lora`)."""
    if lora:
        model.save_pretrained(Path(staged) / "adapter")
        model = merge_lora(base_path, Path(staged) / "adapter", tokenizer, trust_remote_code)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    return model


def model_positions(path: str, trust_remote_code: bool = False) -> int | None:
    """The number of positions a model's config allows (None when it sets no limit), read without loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the model config ({str(exc).splitlines()[0]})") from None
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
