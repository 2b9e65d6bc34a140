"""Train/eval stage: contrastive fine-tune of a CLIP on the run's shards, then zero-shot evaluation.

``pipeline.train.train.run(recipe, store)`` trains; ``pipeline.train.evaluate.run(recipe, store)``
evaluates base vs fine-tuned on the ``role: eval`` sources. Neither imports Prefect.
"""
