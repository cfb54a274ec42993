"""Switchyard's PyTorch engine: the model-execution library (loader, Llama model, paged attention, sampler,
detokenizer, ModelRunner). Heavy modules load lazily so that plain-data modules (config, plan,
sampling_params, errors) import without torch.

The in-process `Engine` (model + scheduler + step loop) is one layer up, in batcher/engine.py: it
combines this package's ModelRunner with the batcher's scheduler.
"""
from workers.engine.errors import InvalidRequestError, UnknownModelError
from workers.engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "SamplingParams", "InvalidRequestError", "UnknownModelError"]


def __getattr__(name):
    if name == "EngineConfig":
        from workers.engine.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
