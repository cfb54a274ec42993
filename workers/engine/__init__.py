"""Switchyard's PyTorch engine. Heavy modules load lazily so that plain-data modules
(plan, sampling_params, errors) import without torch."""
from workers.engine.errors import InvalidRequestError, UnknownModelError
from workers.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams", "InvalidRequestError", "UnknownModelError",
           "CompletionOutput", "RequestOutput"]


def __getattr__(name):
    if name in ("Engine", "CompletionOutput"):
        from workers.engine import engine
        return getattr(engine, name)
    if name == "EngineConfig":
        from workers.engine.config import EngineConfig
        return EngineConfig
    if name == "RequestOutput":
        from batcher.engine_core import RequestOutput
        return RequestOutput
    raise AttributeError(name)
