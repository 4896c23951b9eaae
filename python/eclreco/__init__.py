"""eclreco: online reconstruction of a CsI(Tl) electromagnetic calorimeter.

A C++ module chain (unpacker, clustering, CNN energy correction, output) steered from Python,
in the manner of basf2::

    import eclreco
    path = eclreco.create_path()
    path.add_module("SimulationInput", events=1000)
    path.add_module("RootOutput", filename="out.root")
    eclreco.process(path)
    print(eclreco.statistics)
"""
import os as _os

# onnxruntime 1.32's Linux wheel collects usage telemetry (a device id and an SQLite event store under
# ~/.cache/Microsoft, a .ses file in the temporary directory, for upload to events.data.microsoft.com):
# nothing an HLT node should do. Off unless the user says otherwise; read once, at onnxruntime's first
# session, so it must be set before any.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from eclreco._core import (ERROR_DISCARDED, ERROR_MODULE, ERROR_REJECTED, EventBatch, Geometry, ParameterError,
                           ParameterTypeError)
from eclreco.framework import (REQUIRED, Module, Path, available_modules, create_module, create_path,
                               job_failure, per_event_sum, process, statistics)

__version__ = "0.1.0"
__all__ = [
    "ERROR_DISCARDED", "ERROR_MODULE", "ERROR_REJECTED", "EventBatch", "Geometry", "Module", "ParameterError",
    "ParameterTypeError", "Path",
    "REQUIRED", "available_modules", "create_module", "create_path", "job_failure", "per_event_sum", "process",
    "statistics", "__version__",
]
