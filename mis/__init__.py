"""The MIS benchmark: items, responses and reference verdicts, their files, and the target-inference loop.

Importing this package never imports torch, transformers or vllm.
"""
from mis.errors import DataError, MisguardError
from mis.records import CATEGORIES, SPLITS, Item, Response, Verdict

__all__ = ["CATEGORIES", "SPLITS", "DataError", "Item", "MisguardError", "Response", "Verdict"]
