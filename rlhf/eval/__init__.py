"""Stage 04's measures: what the comparison report computes and writes.

    lineup.py       who is compared, under which labels, and which pairs answer a question
    sampling.py     every model sampled alike; KL of its samples to a reference model; judging them
    toxicity.py     the reward's toxicity scorer and the held-out judge
    metrics.py      per-prompt statistics, RM-judged win rates, bootstrap intervals
    differences.py  paired differences between models with bootstrap CIs
    frontier.py     the reward–KL frontier of the RL runs' policy snapshots, over-optimization flags
    text.py         BLEU, ROUGE-L, distinct-n
    likelihood.py   log-likelihoods of given tokens: KL to base, held-out perplexity
    report.py       metrics.json, samples.jsonl, report.md, report.html and the plots
"""
