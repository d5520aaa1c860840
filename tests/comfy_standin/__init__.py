"""A stand-in ComfyUI host for sdtune's node tests: the few host modules the nodes call, and ComfyUI's steps.

The folder holds stand-ins for `comfy_api.latest`, `comfy.model_management`, `comfy.utils`, `comfy.sd`,
`folder_paths` and `server` with ComfyUI v0.8.0's signatures (each file names its source lines). `comfy_host`
puts them on sys.path, points the folders at a base directory (as --base-directory does), installs a
progress hook like the server's (it raises ComfyUI's interrupt when Cancel was pressed), imports the pack
as `nodes.load_custom_node` does, and removes all of it again afterwards. `Host.run` executes a node as
ComfyUI's executor does: inputs validated against the schema, a class clone with the hidden inputs, the
call under `torch.inference_mode()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]
HOST_MODULES = ("comfy", "comfy_api", "folder_paths", "server")


@dataclass
class Host:
    """The loaded pack: node classes by id, and what the host saw (progress events)."""

    nodes: dict[str, type]
    base: Path
    module_name: str
    progress: list[tuple[Optional[str], int, int]] = field(default_factory=list)
    on_progress: Optional[Callable[[int, int], None]] = None  # a test's hook, e.g. to press Cancel

    def pack_module(self, name: str) -> Any:
        """A module of the loaded pack's comfy_nodes, e.g. "train"."""
        return sys.modules[f"{self.module_name}.comfy_nodes.{name}"]

    def schema(self, node_id: str):
        return self.nodes[node_id].GET_SCHEMA()

    def check_inputs(self, node_id: str, inputs: dict[str, Any]) -> None:
        """What ComfyUI's validate_inputs checks: required inputs present, no unknown ones, combo values
        listed, numbers within min/max (the schema is built anew, as ComfyUI does for every prompt)."""
        schema = self.schema(node_id)
        known = {i.id: i for i in schema.inputs}
        unknown = set(inputs) - set(known)
        assert not unknown, f"{node_id}: unknown inputs {unknown}"
        for spec in schema.inputs:
            if spec.id not in inputs:
                assert spec.optional, f"{node_id}: required input {spec.id} is missing"
                continue
            value = inputs[spec.id]
            if spec.io_type == "COMBO":
                assert value in spec.options, f"{node_id}.{spec.id}: {value!r} not in {spec.options}"
            if spec.io_type in ("INT", "FLOAT"):
                assert spec.min is None or value >= spec.min, f"{node_id}.{spec.id}: {value} < {spec.min}"
                assert spec.max is None or value <= spec.max, f"{node_id}.{spec.id}: {value} > {spec.max}"

    def run(self, node_id: str, unique_id: str = "1", **inputs: Any):
        """Execute a node as ComfyUI's executor does; returns its NodeOutput."""
        import torch
        from comfy_api.latest import io

        self.check_inputs(node_id, inputs)
        clone = self.nodes[node_id].PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: unique_id}})
        with torch.inference_mode():
            return clone.EXECUTE_NORMALIZED(**inputs)


def load_pack() -> tuple[str, Any]:
    """Import the repository root as ComfyUI imports a custom-node folder (nodes.py load_custom_node)."""
    name = str(PACK_ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, str(PACK_ROOT / "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name, module


async def _node_list(module: Any) -> list[type]:
    from comfy_api.latest import ComfyExtension

    extension = await module.comfy_entrypoint()
    assert isinstance(extension, ComfyExtension)
    return await extension.get_node_list()


@contextlib.contextmanager
def comfy_host(base: Path) -> Iterator[Host]:
    """The stand-in host with the pack loaded, folders under `base`; everything is unloaded afterwards."""
    sys.path.insert(0, str(HERE))
    name = ""
    try:
        import comfy.model_management as mm
        import comfy.utils
        import folder_paths
        import server

        folder_paths.set_base_path(base)
        server.PromptServer()
        name, module = load_pack()
        nodes = {}
        for cls in asyncio.run(_node_list(module)):
            nodes[cls.GET_SCHEMA().node_id] = cls
        host = Host(nodes, Path(base), name)

        def hook(value, total, preview_image, prompt_id=None, node_id=None):  # main.py hijack_progress
            mm.throw_exception_if_processing_interrupted()
            host.progress.append((node_id, value, total))
            if host.on_progress is not None:
                host.on_progress(value, total)

        comfy.utils.set_progress_bar_global_hook(hook)
        yield host
    finally:
        sys.path.remove(str(HERE))
        for mod in list(sys.modules):
            if mod.split(".")[0] in HOST_MODULES or (name and (mod == name or mod.startswith(name + "."))):
                del sys.modules[mod]
