"""The data_cleaning stage: raw domain JSONL -> clean, deduplicated, PII-scrubbed, decontaminated splits.

`python -m data_cleaning RECIPE`; the stdlib corpus builder is `python -m demo.stdlib_qa`.
"""
