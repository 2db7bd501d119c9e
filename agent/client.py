"""The client applications on the device use for the agent's inference endpoint (see
``shared/inference_client.py``, where it lives so the server's tools can use it too)."""

from shared.inference_client import InferenceClient, InferenceResult

__all__ = ["InferenceClient", "InferenceResult"]
