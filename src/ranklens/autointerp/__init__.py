"""Automated interpretability through any OpenAI-compatible server: explain, score, compare.

- ``client``: the judge (the `openai` client; concurrency, retries with backoff, a disk cache keyed by the full
  request, token accounting, one-line errors); ``cache``: that cache.
- ``prompts`` and ``templates/``: the few-shot prompts (Lorsa paper App. D, delphi, dimensional-collapse App. N.1)
  and the parsing of answers; ``samples``: which contexts explain and which are held out; ``scores``: the numbers
  (simulation correlation, balanced accuracy, Welch's test); ``pipeline``: the judge's tasks; ``jobs``: the
  commands; ``report``: their console summaries.
"""
