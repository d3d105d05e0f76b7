"""The PPO benchmark behind `scripts/bench_ppo.py` (our stages/03_ppo.py beside TRL 1.12's PPOTrainer, and its
critic-free estimators beside TRL 1.16's GRPOTrainer and RLOOTrainer).

One module per concern; docs/BENCHMARKS.md explains the method and holds the results:

    stats        medians, means, ratios and slopes of run records (pure functions)
    harness      child processes: each run in its own interpreter, its wall time and its own peak RSS
    environment  the machine, commit and library versions a report records; the TRL 1.12 virtualenv
    setups       the shared setup (models and reward models in a registry) and the SFT policy's start score
    runs         the settings both sides get, and one run of each side as a child process
    profiling    where our time goes, read from a cProfile file
    parts        what a report runs: the plan of each mode and the parts of a benchmark
    critic_free  the critic-free part: GRPO and RLOO, ours beside TRL 1.16, the settings and runs of both sides
    report       the report's tables (docs/BENCHMARKS.md) and its JSON file
"""
