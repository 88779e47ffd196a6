"""Preference pairs from files, the hub or the built-in task -> tokenized, prompt-masked, collated batches."""
