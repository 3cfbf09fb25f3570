# The one place the version is written: pyproject.toml reads it for pip builds
# ([tool.setuptools.dynamic]) and for the Comfy Registry ([tool.comfy.version]).
__version__ = "0.2.0"
