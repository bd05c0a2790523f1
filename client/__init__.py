"""What a worker imports: model handlers, RunInference, and the model-server client.

Names and meanings follow Apache Beam's ``apache_beam.ml.inference``.
"""

from client.handlers import (
    ConfigurationError,
    ModelHandler,
    PytorchModelHandlerKeyedTensor,
    PytorchModelHandlerTensor,
    default_keyed_tensor_inference_fn,
    default_tensor_inference_fn,
    make_keyed_tensor_model_fn,
    make_tensor_model_fn,
)
from client.inference import RunInference
from client.keyed import KeyedModelHandler, KeyModelMapping, KeyModelPathMapping
from client.refresh import ModelUpdates, ModelUpdateSource
from client.remote import RemoteModel
from client.results import ModelMetadata, PredictionResult
from client.serverclient import ServerClient, shared_client

__all__ = [
    "ConfigurationError",
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
    "default_keyed_tensor_inference_fn",
    "default_tensor_inference_fn",
    "make_keyed_tensor_model_fn",
    "make_tensor_model_fn",
    "shared_client",
]
