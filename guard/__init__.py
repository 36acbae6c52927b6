"""The runtime guardrail: the policy, the two rails (`Guard`) over any judge, and the OpenAI-compatible server in
front of a deployed VLM (`server/`, which needs the `guard` extra)."""
