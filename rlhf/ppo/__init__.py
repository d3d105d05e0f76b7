"""PPO (and, in time, the critic-free estimators) on one base model: the RL core of stage 03.

    actor_critic.py   policy, reference, value and reward as adapters of one (4-bit) base
    rollout.py        Rollout and rollout(): sample responses, record logprobs, values, RM scores
    rewards.py        per-response rewards, per-token KL penalty, GAE advantages and returns
    losses.py         the pure math: masked statistics, GAE, KL estimators, clipped losses
    controllers.py    the KL coefficient β and the toxicity multiplier as the run adapts them
    update.py         ppo_update(): epochs × minibatches × micro-batches of clipped steps
    metrics.py        the step's metrics dict and the run's summary
    checkpoint.py     atomic checkpoints and the metrics log, for --resume
    distributed.py    gradients, statistics and the stop decision across processes

`stages/03_ppo.py` composes them into the loop; each module is importable on its own.
"""
