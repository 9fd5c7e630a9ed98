"""``torch.export`` programs (``.pt2``): models of architectures the registry does not know.

The program carries its own graph, so the engine can run and prune it without the
uploader's Python code. Normalisation is the program's business (done inside it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .manifest import ModelManifest
from .registry import ImageClassifier


def load_exported_program(path: Path, manifest: ModelManifest | None = None) -> "LoadedModel":  # noqa: F821
    from .io import LoadedModel, ModelLoadError

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"not a loadable torch.export program: {exc}") from None
    net = program.module()
    if manifest is None:
        manifest = _infer_manifest(program)
    model = ImageClassifier(net, manifest.model_copy(update={"arch": "exported", "mean": None, "std": None}))
    return LoadedModel(model.eval(), model.manifest, "pt2")


def _infer_manifest(program: torch.export.ExportedProgram) -> ModelManifest:
    from .io import ModelLoadError

    inputs = [s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if len(inputs) != 1:
        raise ModelLoadError(f"the program must take exactly one image tensor, it takes {len(inputs)} inputs")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    shape = tuple(int(s) if isinstance(s, int) else -1 for s in node.meta["val"].shape)
    if len(shape) != 4 or min(shape[1:]) < 1:
        raise ModelLoadError(f"the program's input must be N x C x H x W with static C, H, W; got {shape}")
    out = next(n for n in program.graph.nodes if n.op == "output").args[0]
    out_node = out[0] if isinstance(out, (tuple, list)) else out
    num_classes = int(out_node.meta["val"].shape[-1])
    return ModelManifest(arch="exported", num_classes=num_classes, input_shape=shape[1:])  # type: ignore[arg-type]


def save_exported_program(model: ImageClassifier, path: Path) -> None:
    c, h, w = model.manifest.input_shape
    example = (torch.rand(2, c, h, w),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model.eval(), example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
