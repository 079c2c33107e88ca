# pytest (default "prepend" import mode, no tests/__init__.py) puts tests/ on sys.path, which
# makes this directory the top-level package "cuda" and hides NVIDIA's "cuda" namespace
# package (cuda.bindings, cuda.core, cuda.pathfinder) that numba-cuda imports.  Extending
# this package's path with the namespace's portions lets both resolve.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
