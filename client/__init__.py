"""What a worker imports: model handlers, RunInference, and the model-server client.

Names and meanings follow Apache Beam's ``apache_beam.ml.inference``.
"""

from client.handlers import (
    ModelHandler,
    PytorchModelHandlerKeyedTensor,
    PytorchModelHandlerTensor,
    RemoteModel,
)
from client.inference import RunInference
from client.keyed import KeyedModelHandler, KeyModelMapping, KeyModelPathMapping
from client.refresh import ModelUpdates, ModelUpdateSource
from client.results import ModelMetadata, PredictionResult
from client.serverclient import ServerClient, shared_client

__all__ = [
    "KeyModelMapping",
    "KeyModelPathMapping",
    "KeyedModelHandler",
    "ModelHandler",
    "ModelMetadata",
    "ModelUpdateSource",
    "ModelUpdates",
    "PredictionResult",
    "PytorchModelHandlerKeyedTensor",
    "PytorchModelHandlerTensor",
    "RemoteModel",
    "RunInference",
    "ServerClient",
    "shared_client",
]
