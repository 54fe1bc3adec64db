"""The pieces of launch/train_gpt.py: args (options, presets, checks before start), data (corpus,
tokenizer, batches), parallel (process group, CPU shim, gradient collectives), model (GPTModel and
the fused loss), train (the loop), report (progress, summaries, log.json, loss.png)."""
