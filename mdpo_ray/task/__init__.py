"""The built-in arithmetic task: its tokenizer and model config, the SFT warm-up, and sampling/answer checks."""
