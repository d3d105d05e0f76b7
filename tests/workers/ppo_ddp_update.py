"""Run one PPO update on a fixed synthetic rollout, alone or as one of several processes.

    python tests/workers/ppo_ddp_update.py MODEL_DIR OUT.safetensors [MICRO_BATCH [GROUP_BY_LENGTH 0|1 [FUSE_ROLES 0|1 [MODE]]]]
    torchrun --nproc_per_node 2 tests/workers/ppo_ddp_update.py MODEL_DIR OUT.safetensors - 1 1 MODE

MODE (default gae): `gae` takes given advantages and returns and updates policy and critic;
`grpo` (no critic, GRPO advantages of k = 2 groups, loss_type grpo, β·k3 KL in the loss) and
`reinforce_pp` (no critic, REINFORCE++ advantages whitened over every process, loss_type dr_grpo,
KL in the reward) compute their advantages from synthetic response totals, as the stage does.
Every process builds the same model and the same global batch (seeded); rank r keeps
rows r, r+W, ... (gae) or the groups r, r+W, ... of 2 rows. Rank 0 writes what the update changed
in each trainable tensor, so the one-process and two-process results can be compared.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(model_dir: str, out: str, micro_batch: int | None = None, group_by_length: bool = True,
         fuse_roles: bool = True, mode: str = "gae") -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from conftest import load_stage
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.models import load_tokenizer
    from rlhf.ppo.rollout import Rollout
    from rlhf.ppo.update import ppo_update

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    ppo = load_stage("03_ppo.py")
    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    ac = build_actor_critic(model_dir, tok, load_in_4bit=False, lora_r=4, lora_alpha=8, lora_target_modules="all-linear",
                            reward_dir=None, separate_reward=None, device=torch.device("cpu"),
                            fuse_roles=fuse_roles, critic=mode == "gae")
    assert ac.fused == (fuse_roles and mode == "gae"), ac.unfused_reason  # no critic, no reward: one role
    params = [p for _, p in ac.trainable_named_parameters()]

    # A fixed global rollout: 8 rows, prompts left-padded to 5 tokens and responses right-padded to 6, both
    # ragged, so micro-batches of one row and of several drop different padding columns (rlhf.sequences.trim_columns).
    g = torch.Generator().manual_seed(1)
    B, P, R = 8, 5, 6
    qr = torch.randint(10, len(tok) - 10, (B, P + R), generator=g)
    prompt_lengths = torch.tensor([5, 2, 3, 5, 1, 4, 5, 3])
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
    pmask = (torch.arange(P)[None] >= P - prompt_lengths[:, None]).long()
    mask = (torch.arange(R)[None] < lengths[:, None]).long()
    qr = qr.masked_fill(torch.cat([pmask, mask], 1) == 0, tok.pad_token_id)
    logprobs, values = -torch.rand(B, R, generator=g) - 3, torch.randn(B, R, generator=g)
    advantages, returns = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    ref_logprobs = logprobs - 0.2 * torch.rand(B, R, generator=g)
    totals = torch.randn(B, generator=g)
    am = torch.cat([pmask, mask], 1)
    if mode == "gae":
        rows = torch.arange(rank, B, world)
        extra: dict = {}
    else:  # whole groups of 2 rows per process
        rows = torch.arange(B).view(-1, 2)[rank::world].flatten()
        values = returns = None
        extra = {"grpo": dict(advantage_estimator="grpo", num_generations=2, loss_type="grpo", kl_in_loss=True,
                              kl_estimator="k3"),
                 "reinforce_pp": dict(advantage_estimator="reinforce_pp", loss_type="dr_grpo", response_length=R)}[mode]
    local = Rollout(query_responses=qr[rows], attention_mask=am[rows], responses=qr[rows, P:], mask=mask[rows],
                    logprobs=logprobs[rows], ref_logprobs=ref_logprobs[rows] if mode != "gae" else logprobs[rows],
                    values=values[rows] if values is not None else None,
                    has_eos=torch.ones(len(rows), dtype=torch.bool), prompt_width=P, rm_scores=None)

    micro = micro_batch or len(rows) // 2
    cfg = ppo.PPOStageConfig(per_device_train_batch_size=micro, gradient_accumulation_steps=len(rows) // micro,
                             num_mini_batches=1, num_ppo_epochs=2, total_episodes=B, learning_rate=1e-2,
                             group_by_length=group_by_length, kl_coef=0.1, **extra)
    settings = ppo.update_settings(cfg, ppo.derive_sizes(cfg, world))
    if mode != "gae":  # the stage's own advantages (global statistics over every process for reinforce_pp)
        targets = ppo.advantage_targets(cfg, local, SimpleNamespace(total=totals[rows]), cfg.kl_coef, world)
        advantages, returns = torch.zeros(B, R), None
        advantages[rows] = targets.advantages
    # Plain SGD: the update is then linear in the gradients, so a wrongly scaled micro-batch loss shows (Adam's
    # first steps are scale-free) and float rounding is not blown up where a gradient is near Adam's eps.
    opt = torch.optim.SGD(params, lr=cfg.learning_rate)
    before = {k: v.clone() for k, v in ac.trainable_state_dict().items()}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ppo_update(ac, opt, sched, params, local, advantages[rows], returns[rows] if returns is not None else None,
               settings, step_seed=0, kl_coef_in_loss=cfg.kl_coef if cfg.kl_in_loss else 0.0)
    if rank == 0:
        save_file({k: v - before[k] for k, v in ac.trainable_state_dict().items()}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None,
         sys.argv[4] != "0" if len(sys.argv) > 4 else True, sys.argv[5] != "0" if len(sys.argv) > 5 else True,
         sys.argv[6] if len(sys.argv) > 6 else "gae")
