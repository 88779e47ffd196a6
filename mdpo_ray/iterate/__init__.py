"""Iterative on-policy training (issue 25): sample completions from the current policy, verify them, pair a correct with an incorrect one per prompt, train a round; repeat. Never imports Ray."""
