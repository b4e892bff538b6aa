"""The models wing: what a network is, how it is adapted, and how it is shipped.

`choices` names the backbones, stages and LoRA options a config chooses among (no torch), `backbone` builds the
Hugging Face ResNet and its parameter groups, `lora` adds and folds the adapters,
`calibration` fits the temperature, and `export` writes and reads the exported model. It imports `data` only for
constants (normalisation, image size, task names) and the prepared data's description, never `train` or above.
"""
