"""eclreco: online reconstruction of a CsI(Tl) electromagnetic calorimeter.

A C++ module chain (unpacker, clustering, CNN energy correction, output) steered from Python,
in the manner of basf2.
"""
from eclreco._core import Geometry

__version__ = "0.1.0"
__all__ = ["Geometry", "__version__"]
