"""Everything that runs a model: the engines (transformers, vLLM, OpenAI-compatible HTTP) and, later, the judge
and the guardrail server. Heavy libraries are imported lazily, inside the engine that needs them."""
