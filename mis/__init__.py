"""The MIS benchmark's stages, each a pipeline from the previous stage's files to its own: `infer` (target
responses), `score` (judgments and metrics), `calibrate` and `agree` (against GPT-4o or human labels), `train` (a
judge), and `demo` (all of them on generated data)."""
