"""What produced a result: the library versions recorded next to every search and retrain."""

from importlib.metadata import version

LIBRARIES = ("galaxy_tune", "torch", "torchvision", "transformers", "loralib", "ray", "optuna", "numpy")


def library_versions() -> dict[str, str]:
    """Installed version of each library the results depend on."""
    return {name: version(name) for name in LIBRARIES}
