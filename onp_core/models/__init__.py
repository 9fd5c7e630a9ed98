"""Architectures, the model manifest and model I/O."""
from .io import FORMATS, LoadedModel, ModelLoadError, load_model, save_model
from .manifest import ModelManifest
from .registry import ARCHITECTURES, ImageClassifier, UnknownArchitecture, build_backbone, build_model

__all__ = ["ARCHITECTURES", "FORMATS", "ImageClassifier", "LoadedModel", "ModelLoadError", "ModelManifest",
           "UnknownArchitecture", "build_backbone", "build_model", "load_model", "save_model"]
