"""PPO's four roles on one base model: policy, reference, value and reward.

The SFT model is loaded once (4-bit NF4 by default) and wrapped by peft with
named LoRA adapters:

    policy     adapter "policy" (trainable)                 -> logits
    reference  the same base with every adapter disabled     -> logits
    value      adapter "value" (trainable) + `value_head`    -> V(s_t), one per position
    reward     adapter "reward" (frozen) + `reward_head`     -> score at the last real token

The value adapter and head start from the reward model's (as DeepSpeed-Chat and
OpenRLHF initialize the critic from the RM) when the reward entry is an adapter
trained on this same base. A value rank above the reward adapter's widens that
copy (`widen_adapter`): the critic still starts as the reward model and gets more
directions to fit the returns with. Otherwise the value adapter is fresh, its head zero,
and the reward model is loaded on its own (`rlhf.reward_scoring.load_reward_scorer`),
scoring decoded responses with its own tokenizer. One copy of
the base weights serves all four roles, which is where the memory goes.

A critic-free estimator (`critic=False`: GRPO, RLOO, REINFORCE++) builds no value adapter and no
value head: the roles are policy, reference and reward, and the rollout's and update's forwards
return None for values.

Every forward takes left-padded prompt + right-padded response ids with their
attention mask and passes explicit position ids (cumsum of the mask), matching
what `generate` used for the same rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from rlhf.quant import adapters_off, dequantized_4bit, lora_layers, mixed_lora_hook
from rlhf.sequences import last_token_index, position_ids


def load_head(reward_dir: Path, hidden: int, device: torch.device) -> nn.Linear:
    """A reward entry's scalar score head (`rlhf.reward_model.load_score_head`) as an `nn.Linear(H, 1)`."""
    from rlhf.reward_model import load_score_head

    tensors = load_score_head(reward_dir)
    head = nn.Linear(hidden, 1, bias="bias" in tensors)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"].reshape(1, hidden).float())
        if "bias" in tensors:
            head.bias.copy_(tensors["bias"].reshape(1).float())
    return head.to(device)


class ActorCritic(nn.Module):
    """The peft-wrapped base plus the value head (trainable) and reward head (frozen).

    `fused` (set by `check_fused`): the rollout's reference, value and reward forwards run as one forward
    of the rows repeated per role, and the update's policy and value forwards as another, each copy
    through its own adapter (`_mixed_hidden`). Same results up to float rounding; the base weights
    are read (and 4-bit ones dequantized) once instead of once per role, with fewer, larger calls.
    """

    def __init__(self, model: Any, value_head: nn.Linear | None, reward_head: nn.Linear | None,
                 separate_reward: Any | None = None):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.reward_head = reward_head
        self.separate_reward = separate_reward
        self.fused = False
        self.dequantize_for_generation = False  # see rlhf.quant.dequantized_4bit
        if reward_head is not None:
            reward_head.requires_grad_(False)
        self._trainable = [p for _, p in self.trainable_named_parameters()]
        self._lora_layers = lora_layers(model)

    # -------------------------------------------------------------- parameters

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Policy and value adapters and the value head (none without a critic): everything the optimizer updates."""
        out = [(n, p) for n, p in self.model.named_parameters() if ".policy." in n or ".value." in n]
        if self.value_head is not None:
            out += [(f"value_head.{n}", p) for n, p in self.value_head.named_parameters()]
        for _, p in out:
            p.requires_grad_(True)
        return out

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.trainable_named_parameters()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.trainable_named_parameters())
        missing = set(params) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))

    # -------------------------------------------------------------- roles

    @contextmanager
    def role(self, adapter: str | None) -> Iterator[None]:
        """Run the base with one adapter active, or none (`adapter=None`: the reference)."""
        if adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    def _forward(self, ids: Tensor, mask: Tensor, hidden: bool, logits_to_keep: int) -> Any:
        # logits_to_keep: the LM head runs on the last N positions only (1 where only hidden states are read).
        return self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                          output_hidden_states=hidden, use_cache=False, logits_to_keep=logits_to_keep)

    def policy_logits(self, ids: Tensor, mask: Tensor, n_response: int) -> Tensor:
        """(B, R, V) logits predicting the last `n_response` tokens of `ids`."""
        with self.role("policy"):
            return self._forward(ids, mask, hidden=False, logits_to_keep=n_response + 1).logits[:, :-1]

    def ref_logits(self, ids: Tensor, mask: Tensor, n_response: int) -> Tensor:
        """(B, R, V) reference logits predicting the last `n_response` tokens of `ids`."""
        with self.role(None):
            return self._forward(ids, mask, hidden=False, logits_to_keep=n_response + 1).logits[:, :-1]

    def values(self, ids: Tensor, mask: Tensor) -> Tensor:
        with self.role("value"):
            h = self._forward(ids, mask, hidden=True, logits_to_keep=1).hidden_states[-1]  # (B, T, H)
        return self._value(h)

    @torch.no_grad()
    def reward_scores(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B,) raw RM score read at each row's last real token (never a pad)."""
        with self.role("reward"):
            h = self._forward(ids, mask, hidden=True, logits_to_keep=1).hidden_states[-1]  # (B, T, H)
        return self._score(h, mask)

    def _value(self, h: Tensor) -> Tensor:
        """(B, T) values from last hidden states (B, T, H)."""
        return self.value_head(h.float()).squeeze(-1)

    def _score(self, h: Tensor, mask: Tensor) -> Tensor:
        """(B,) reward head read at each row's last real token (never a pad) of last hidden states (B, T, H)."""
        last = last_token_index(mask)  # (B,)
        return self.reward_head(h[torch.arange(h.shape[0], device=h.device), last].float()).squeeze(-1)

    def generate(self, **kwargs: Any) -> Tensor:
        with self.role("policy"), dequantized_4bit(self.model, enabled=self.dequantize_for_generation):
            return self.model.generate(**kwargs)

    # -------------------------------------------------------------- several roles in one forward

    def _mixed_hidden(self, ids: Tensor, mask: Tensor, roles: list[str | None]) -> Tensor:
        """(len(roles), B, T, H) last hidden states: the rows once per role, each copy through its own adapter
        (`None`: none), in one forward. The base runs with adapters disabled and a hook on every LoRA layer adds
        each copy's own LoRA term (out of place, so autograd also works through bitsandbytes' 4-bit matmul,
        whose output peft's mixed-adapter batches would modify in place): the base weights are read, and 4-bit
        ones dequantized, once for every role."""
        n, b = len(roles), ids.shape[0]
        hook = mixed_lora_hook(roles, b)
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self._lora_layers]
        try:
            with adapters_off(self._lora_layers):
                self._trainable_requires_grad()  # set_adapter (generation) froze all adapters but the policy
                out = self.model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1),
                                 position_ids=position_ids(mask).repeat(n, 1), output_hidden_states=True,
                                 use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        return out.hidden_states[-1].unflatten(0, (n, b))

    def _trainable_requires_grad(self) -> None:
        if torch.is_grad_enabled():
            for p in self._trainable:
                p.requires_grad_(True)

    def _lm_logits(self, h: Tensor, n_response: int) -> Tensor:
        """(B, R, V) logits from last hidden states (B, T, H), predicting the last `n_response` tokens."""
        return self.model.get_output_embeddings()(h[:, -(n_response + 1):-1])

    @property
    def critic(self) -> bool:
        return self.value_head is not None

    def rollout_roles(self) -> list[str | None]:
        """The roles of the rollout's forwards: reference (None), value, reward (those present)."""
        return [None] + (["value"] if self.critic else []) + (["reward"] if self.reward_head is not None else [])

    def rollout_forward(self, ids: Tensor, mask: Tensor,
                        n_response: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Without gradients: reference logits (B, R, V), values (B, T) (None without a critic) and raw RM scores
        (B,) (None when the reward model is separate): one mixed forward when `fused`, else one forward per role."""
        roles = self.rollout_roles()
        with torch.no_grad():
            if not self.fused or len(roles) == 1:
                scores = self.reward_scores(ids, mask) if self.reward_head is not None else None
                return (self.ref_logits(ids, mask, n_response), self.values(ids, mask) if self.critic else None,
                        scores)
            h = dict(zip(roles, self._mixed_hidden(ids, mask, roles)))
            return (self._lm_logits(h[None], n_response), self._value(h["value"]) if self.critic else None,
                    self._score(h["reward"], mask) if "reward" in h else None)

    def update_forward(self, ids: Tensor, mask: Tensor, n_response: int) -> tuple[Tensor, Tensor | None]:
        """With gradients: policy logits (B, R, V) and values (B, T) (None without a critic); one mixed forward
        when `fused`, so one backward of the summed losses reaches both adapters; else one forward per role."""
        if not self.critic:
            return self.policy_logits(ids, mask, n_response), None
        if not self.fused:
            out = self.policy_logits(ids, mask, n_response), self.values(ids, mask)
            self._trainable_requires_grad()  # set_adapter("value") froze the policy adapter before the backward
            return out
        h = self._mixed_hidden(ids, mask, ["policy", "value"])
        return self._lm_logits(h[0], n_response), self._value(h[1])

    def check_fused(self, vocab_size: int, device: torch.device, atol: float = 1e-4) -> str | None:
        """Turn `fused` on if mixed forwards give what one forward per role gives on a probe batch (two rows,
        one left-padded), gradients included; return why not otherwise (e.g. the model's logits are more than
        its LM head applied to the last hidden state, or a LoRA variant such as DoRA)."""
        if len(self.rollout_roles()) == 1 and not self.critic:
            self.fused = False
            return "no two roles read the same rows (no critic, and the reward model is separate)"
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (2, 7), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        self.fused = False

        def probe() -> list[Tensor | None]:
            ref, values, scores = self.rollout_forward(ids, mask, 3)
            logits, new_values = self.update_forward(ids, mask, 3)  # with gradients, as in the update
            loss = logits.float().logsumexp(-1).mean()
            (loss + new_values.float().mean() if new_values is not None else loss).backward()
            grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self._trainable]
            for p in self._trainable:
                p.grad = None
            return [ref, values, scores, logits.detach(), new_values.detach() if new_values is not None else None,
                    *grads]

        try:
            want = probe()
            self.fused = True
            got = probe()
        except Exception as e:  # noqa: BLE001 - any failure means: keep one forward per role
            self.fused = False
            return f"{type(e).__name__}: {e}"
        k = len(names := ["reference logits", "values", "reward scores", "policy logits", "values"])
        groups = [(name, [a], [b]) for name, a, b in zip(names, want[:k], got[:k]) if a is not None]
        groups.append(("gradients", want[k:], got[k:]))
        for name, xs, ys in groups:
            # Up to rounding: atol of the largest magnitude (of 1 for outputs), looser in bf16/fp16, where a
            # batch of another shape may take another summation order.
            tol = max(atol, 4 * torch.finfo(xs[0].dtype).eps)
            scale = max(float(x.float().abs().max()) for x in xs)
            diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(xs, ys))
            if not diff <= tol * (scale if name == "gradients" else max(1.0, scale)):
                self.fused = False
                return f"{name} differ by {diff:.3g}"
        return None


def widen_adapter(model: Any, source: str, target: str, r: int) -> None:
    """Add adapter `target` of rank `r` computing what adapter `source` computes.

    Same modules and scaling α/r as `source` (α grows with r): A's first r₀ rows and B's first
    r₀ columns are the source's, the other rows of A keep peft's random init and the other
    columns of B are 0, so B·A (and the output) is unchanged while all r directions train.
    """
    from peft import LoraConfig

    src = model.peft_config[source]
    if r < src.r:
        raise ValueError(f"value_lora_r ({r}) is below the reward adapter's rank ({src.r}): the value adapter "
                         f"starts as a copy of the reward adapter, so its rank must be at least {src.r}")
    config = LoraConfig(r=r, lora_alpha=src.lora_alpha * r / src.r, lora_dropout=0.0,
                        target_modules=src.target_modules, fan_in_fan_out=src.fan_in_fan_out,
                        use_rslora=src.use_rslora, task_type=src.task_type)
    model.add_adapter(target, config)
    if src.use_rslora:  # scaling α/√r: keep B·A·scaling by rescaling the copied columns of B
        ratio = (src.lora_alpha / src.r ** 0.5) / (config.lora_alpha / r ** 0.5)
    else:
        ratio = 1.0
    with torch.no_grad():
        for module in model.modules():
            if source in getattr(module, "lora_A", {}) and target in module.lora_A:
                r0 = module.r[source]
                module.lora_A[target].weight[:r0].copy_(module.lora_A[source].weight)
                module.lora_B[target].weight.zero_()
                module.lora_B[target].weight[:, :r0].copy_(module.lora_B[source].weight * ratio)


def adapter_rank(folder: Path) -> int:
    """The LoRA rank `r` of a saved peft adapter folder."""
    import json

    return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])


def build_actor_critic(
    sft_path: str,
    tokenizer: Any,
    *,
    load_in_4bit: bool,
    lora_r: int,
    lora_alpha: int,
    lora_target_modules: str,
    reward_dir: Path | None,
    separate_reward: Any | None,
    device: torch.device,
    value_lora_r: int | None = None,
    trust_remote_code: bool = False,
    fuse_roles: bool = False,
    critic: bool = True,
) -> ActorCritic:
    """Load the base once and attach the adapters (see module docstring). `reward_dir`: a reward entry's folder
    of kind "adapter" on this same base (its adapter and score head become the reward and the critic's start);
    None: the reward model is `separate_reward` (or absent) and the critic starts fresh. `critic=False`: no
    value adapter or head."""
    from peft import LoraConfig, get_peft_model

    from rlhf import quant
    from rlhf.models import fit_embeddings, load_model, lora_targets
    from rlhf.reward_model import adapter_dir

    base = load_model(sft_path, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    fit_embeddings(base, tokenizer)
    if not load_in_4bit:
        base.to(device)
    base.requires_grad_(False)
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                      target_modules=lora_targets(lora_target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora, adapter_name="policy")
    hidden = base.get_input_embeddings().weight.shape[1]
    value_head = frozen_head = None
    if reward_dir is not None:
        reward_adapter = adapter_dir(reward_dir)
        copy = critic and (value_lora_r is None or value_lora_r == adapter_rank(reward_adapter))
        if copy:
            model.load_adapter(str(reward_adapter), adapter_name="value", is_trainable=True)
        model.load_adapter(str(reward_adapter), adapter_name="reward", is_trainable=False)
        if critic and not copy:
            widen_adapter(model, "reward", "value", value_lora_r)
        value_head = load_head(reward_dir, hidden, device) if critic else None
        frozen_head = load_head(reward_dir, hidden, device)
    elif critic:
        model.add_adapter("value", lora if value_lora_r is None else LoraConfig(
            r=value_lora_r, lora_alpha=lora_alpha * value_lora_r / lora_r, lora_dropout=0.0,
            target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        value_head = nn.Linear(hidden, 1).to(device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
    # Dropout stays off for the whole run (PPO's ratios assume the same network at rollout and update);
    # evaluating and then training a 4-bit layer on this CPU needs packing off (see set_cpu_4bit_packing).
    model.eval()
    quant.set_cpu_4bit_packing(model, enabled=False)
    ac = ActorCritic(model, value_head, frozen_head, separate_reward)
    # Why the roles run one forward each (None: they share forwards), for the stage's log.
    if not fuse_roles:
        ac.unfused_reason = "fuse_roles is off"
    elif quant.PEFT_UNTESTED:  # the fused forward reads peft's LoRA internals
        ac.unfused_reason = quant.PEFT_UNTESTED
    else:
        ac.unfused_reason = ac.check_fused(base.get_input_embeddings().weight.shape[0], device)
    return ac
