"""What runs on each Train worker: the losses, log-probs, model loading, FSDP2, the reference, eval and the loop. Never imports Ray."""
