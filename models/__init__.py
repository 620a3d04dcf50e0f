"""Networks and the model folder. Imports only torch, numpy, safetensors and the standard library
(never Ray, never another folder of this repo), so a model runs wherever PyTorch does."""
from .charrnn import CharRNN, ModelConfig, detach_state, reset_state_rows
from .folder import ModelFolderError, load_model, load_series_model, model_task, save_model, save_series_model
from .generate import generate, score
from .precision import PRECISIONS, PrecisionError, autocast, choose_precision, native_bf16, require_precision
from .sampling import sample_next
from .series import Normalization, SeriesConfig, SeriesRNN, forecast

__all__ = ["CharRNN", "ModelConfig", "detach_state", "reset_state_rows", "ModelFolderError",
           "load_model", "save_model", "sample_next", "generate", "score", "load_series_model", "model_task",
           "save_series_model", "Normalization", "SeriesConfig", "SeriesRNN", "forecast", "native_bf16",
           "PRECISIONS", "PrecisionError", "autocast", "choose_precision", "require_precision"]
