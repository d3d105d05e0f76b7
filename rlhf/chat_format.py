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
"""

from __future__ import annotations

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
