"""The ground floor: the project's errors and bad-row policy, the typed records every stage reads and writes, their
JSON Lines files, the MIS split files, the one join of responses, items and labels, and the MIS metrics.

Imports nothing above it, and never torch, transformers or vllm.
"""
