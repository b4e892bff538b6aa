"""The data wing: from the Kaggle folder to normalised batches on the training device.

`kaggle` names the competition's files and its 37 answers, `tasks` turns votes into a task's targets, `prepare`
validates, splits and caches, `pixels` decodes JPEGs into that cache, `loader` serves batches from it, and `demo`
writes the built-in demo data. It imports nothing of galaxy_tune above it: only `errors` and `layout`.
"""
