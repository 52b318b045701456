"""The TOML configs, shipped inside the package as `pipeline.configs` (see pyproject.toml)."""
