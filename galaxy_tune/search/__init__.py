"""The search wing: Ray Tune runs the trials, Optuna proposes their configs, ASHA stops weak ones.

`run` drives a search (`run_search`), `options` holds what it was asked (`SearchOptions`, saved as search.json
for --resume), `faults` handles stop signals, retried trials and killed drivers, `strategy` makes its sampler and
scheduler, `space` reads a search-space file, `trainable` is the trial Ray runs, `monitor` keeps the live tables
and the mirrored Optuna study, `tracking` the MLflow runs, `uploads` sends the live views to object storage, and
`cluster` starts or joins Ray and tells a trial which device Ray gave it. It imports `train`, `models` and `data`
below it, never `retrain`, `report`, `api` or `cli`.
"""
