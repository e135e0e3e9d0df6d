"""Training the tokenizer: the objective (objective.py), the loop (loop.py), its config and recipes, data, checkpoints.

Nothing here is imported by inference; the loop is `loop.train_tokenizer`.
"""
