"""The lite judge: a frozen pretrained text encoder (all-MiniLM-L6-v2, shipped in a wheel) and logistic heads
distilled from GPT-4o's labels. Runs on a CPU in milliseconds; needs the `lite` extra."""
