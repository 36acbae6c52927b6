"""Fine-tuning an open VLM judge on GPT-4o's labels: training examples from responses + verdicts, split by MIS
item, LoRA (or full) fine-tuning in exactly the prompt and answer format `misguard score` reads."""
