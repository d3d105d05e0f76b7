"""The coefficients PPO adapts as a run goes: the KL penalty β and the toxicity multiplier.

    FixedKLController       a constant (β, or the toxicity coefficient without a budget)
    AdaptiveKLController    β moves toward a target KL per response (Ziegler et al. 2019, arXiv:1909.08593)
    LagrangeController      the toxicity coefficient as a Lagrange multiplier that keeps mean toxicity
                            under a budget (Dai et al. 2023, Safe-RLHF)

Each has `value`, `update(...)` and `state_dict()` / `load_state_dict()` (saved in PPO's checkpoints).
"""

from __future__ import annotations


def _load_value(state: dict[str, float], owner: str) -> float:
    if "value" not in state:
        raise ValueError(f"{owner}.load_state_dict: missing key 'value' in {sorted(state)}")
    return float(state["value"])


class FixedKLController:
    """A constant KL coefficient β; `update` does nothing."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep β as it is (same signature as the adaptive controller)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _load_value(state, type(self).__name__)


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv:1909.08593, §2.2): steer β so the observed KL tracks `target`.

        e = clip(KL/target − 1, −0.2, 0.2),   β ← β·(1 + e·n_steps/horizon)

    β grows when the KL is above target and shrinks when below; `horizon` (in
    episodes) sets how fast.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs target > 0 and horizon > 0, got target={target}, horizon={horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after `n_steps` episodes whose mean KL was `current_kl`."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _load_value(state, type(self).__name__)


class LagrangeController:
    """Lagrange multiplier for the constraint mean toxicity ≤ `budget` (Safe-RLHF's idea).

        λ ← clip(λ + lr·(mean_toxicity − budget), 0, max_value)

    Gradient ascent on the constraint violation: λ rises while over budget, falls
    (never below 0) while under it; `max_value` bounds it.
    """

    def __init__(self, init: float, budget: float, lr: float, max_value: float):
        if not 0.0 <= init <= max_value:
            raise ValueError(
                f"LagrangeController needs 0 <= init <= max_value, got init={init}, max_value={max_value}"
            )
        self.value = float(init)
        self.budget = float(budget)
        self.lr = float(lr)
        self.max_value = float(max_value)

    def update(self, mean_toxicity: float) -> None:
        """One ascent step on λ·(mean_toxicity − budget)."""
        stepped = self.value + self.lr * (mean_toxicity - self.budget)
        self.value = min(max(stepped, 0.0), self.max_value)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _load_value(state, type(self).__name__)


# --------------------------------------------------------------------------- batch arithmetic
