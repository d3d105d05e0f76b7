"""Stage 04's measures: what the comparison report computes and writes.

    metrics.py      per-prompt statistics, RM-judged win rates, bootstrap intervals
    text.py         BLEU, ROUGE-L, distinct-n
    likelihood.py   log-likelihoods of given tokens: KL to base, held-out perplexity
    report.py       metrics.json, samples.jsonl, report.md, report.html and the plots
"""
