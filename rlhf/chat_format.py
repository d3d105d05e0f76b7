"""The chat format of the embedded demo's base model (stage 00 writes it into the tokenizer).

A conversation renders as

    <|system|>\\n{content}<|end|>\\n      (optional, first)
    <|user|>\\n{content}<|end|>\\n
    <|assistant|>\\n{content}<|end|>\\n
    ...

`<|end|>` is the EOS token that closes every turn; `<|pad|>` is a dedicated pad
token (never EOS, so masking pads never masks a real end of turn). The Jinja
template marks assistant content with `{% generation %}` so TRL's SFTTrainer
(`assistant_only_loss=True`) trains on assistant tokens only. Models brought
from the hub keep their own template; this one is only for models we create.

Any tokenizer's template (the demo's, or the one a model brings: Llama 3, Qwen, Mistral, Gemma, Phi-3, ...)
is read through the functions below, which every stage uses instead of calling `apply_chat_template`:

    render / encode       a conversation as text / token ids; a system turn the template refuses
                          (Gemma 2 raises) is folded into the first user turn (`fold_system`), as Gemma 3's own
                          template does
    end_of_turn_token     the special token the template closes an assistant turn with (Qwen: <|im_end|>,
                          Llama 3: <|eot_id|>), which `rlhf.models.load_tokenizer` makes the EOS
    assistant_mask        per token, whether it is part of an assistant reply (its content and the EOS that
                          closes it): the SFT loss mask, from any template, with or without
                          `{% generation %}` markers
"""

from __future__ import annotations

import re
from typing import Any

from rlhf.errors import UserError

BOS = "<|bos|>"
EOS = "<|end|>"
PAD = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_messages(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render a conversation exactly as CHAT_TEMPLATE does (used to write pretraining text).

    >>> render_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    '<|user|>\\nhi<|end|>\\n<|assistant|>\\nhello<|end|>\\n'
    """
    parts = [f"{ROLE_TOKENS[m['role']]}\n{m['content']}{EOS}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{ROLE_TOKENS['assistant']}\n")
    return "".join(parts)


# ---------------------------------------------------------------------------- any tokenizer's template

# Stand-ins for message contents when a template's layout is read: private-use characters, which no template
# trims, escapes or tests for.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("(\ue000\\d+\ue001)")


def fold_system(messages: list[dict]) -> list[dict]:
    """The conversation with a leading system turn moved into the first user turn (its content, a blank line,
    the user's content): what templates without a system role (Gemma 3) do themselves.

    >>> fold_system([{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}])
    [{'role': 'user', 'content': 'be kind\\n\\nhi'}]
    """
    if len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
        first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        return [first, *messages[2:]]
    return messages


def _apply(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _fitted(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[dict]]:
    """(text, messages as rendered): the conversation through the template, or, when the template refuses a system
    role (Gemma 2's raises), with the system turn folded into the first user turn. Other refusals are the user's to
    fix: UserError. One render when the template takes the conversation as it is."""
    from jinja2 import TemplateError

    try:
        return _apply(tokenizer, messages, add_generation_prompt), messages
    except TemplateError as exc:
        folded = fold_system(messages)
        if folded is not messages:
            try:
                return _apply(tokenizer, folded, add_generation_prompt), folded
            except TemplateError:
                pass
        roles = "/".join(m["role"] for m in messages)
        raise UserError(f"the model's chat template refuses a conversation with roles {roles}: {exc}") from None


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (a refused system turn folded, `_fitted`)."""
    return _fitted(tokenizer, messages, add_generation_prompt)[0]


def encode(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `render(...)`, with no special tokens added beyond the template's (as apply_chat_template)."""
    return list(tokenizer(render(tokenizer, messages, add_generation_prompt), add_special_tokens=False)["input_ids"])


def _special_strings(tokenizer: Any) -> set[str]:
    return set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template puts first after an assistant reply's content (None: the template
    closes the reply with plain text, or with nothing).

    That is the token a model trained on the template emits to end its reply: Qwen's <|im_end|> (while its
    tokenizer's EOS is <|endoftext|>), Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>,
    Mistral's </s> (its EOS), the demo's <|end|>.
    """
    probe = [{"role": "user", "content": _MARK.format(0)}, {"role": "assistant", "content": _MARK.format(1)}]
    try:
        text = render(tokenizer, probe)
    except UserError:  # a template that wants more than one exchange: nothing to learn from it here
        return None
    if _MARK.format(1) not in text:
        return None
    after = text.split(_MARK.format(1), 1)[1]
    specials = _special_strings(tokenizer)
    for token in tokenizer.convert_ids_to_tokens(tokenizer(after, add_special_tokens=False)["input_ids"]):
        if token in specials:
            return token
    return None


def assistant_mask(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation through the chat template: mask 1 on the tokens of every assistant reply,
    from its first content token through the EOS that closes it (`tokenizer.eos_token`, when the template puts
    it right after the content), 0 on everything else (system and user turns, role headers, separators).

    The template is rendered once with each message's content replaced by a mark, which splits the text into
    the template's own pieces and the contents; the real conversation must render as those pieces around the
    contents (or their stripped form, for templates that trim), so every reply's characters are known exactly,
    for any template that renders contents verbatim (prefix-preserving or not, with or without generation
    markers). A token is masked when its characters lie inside a reply.

    >>> from rlhf.testing.arch import build_tokenizer
    >>> tok = build_tokenizer("qwen2")
    >>> tok.eos_token = "<|im_end|>"  # what load_tokenizer does for Qwen
    >>> ids, mask = assistant_mask(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    >>> tok.decode([i for i, m in zip(ids, mask) if m])
    'hello<|im_end|>'
    """
    if not getattr(tokenizer, "is_fast", True):
        raise UserError(f"{type(tokenizer).__name__}: the SFT loss mask needs a fast tokenizer (character offsets)")
    text, messages = _fitted(tokenizer, messages, False)
    skeleton = _apply(tokenizer, [{**m, "content": _MARK.format(k)} for k, m in enumerate(messages)], False)
    parts = _MARK_RE.split(skeleton)  # template piece, mark, template piece, mark, ..., template piece
    shown = [int(p[1:-1]) for p in parts[1::2]]
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and shown.count(k) != 1:
            raise UserError(f"the model's chat template shows assistant message {k} {shown.count(k)} times; "
                            "cannot tell which tokens are the reply")
    specials = sorted(_special_strings(tokenizer), key=len, reverse=True)
    eos = tokenizer.eos_token
    spans: list[tuple[int, int]] = []
    pos = len(parts[0])
    if not text.startswith(parts[0]):
        raise UserError("the model's chat template renders a conversation differently from its own layout")
    for j in range(1, len(parts), 2):
        k, piece = int(parts[j][1:-1]), parts[j + 1]
        content = messages[k]["content"]
        for candidate in dict.fromkeys((content, content.strip())):
            if text.startswith(candidate, pos) and text.startswith(piece, pos + len(candidate)):
                break
        else:
            raise UserError(f"the model's chat template changes the content of message {k} ({messages[k]['role']}) "
                            "beyond trimming it; cannot tell which tokens are the reply")
        start, pos = pos, pos + len(candidate)
        if messages[k]["role"] == "assistant":
            end = pos
            at = piece.find(eos) if eos else -1
            if at >= 0 and not any(s in piece[:at] for s in specials):  # the reply's own EOS, not a later turn's
                end = pos + at + len(eos)
            spans.append((start, end))
        pos += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(e > s and any(a <= s and e <= b for a, b in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
