"""Stand-in for ComfyUI's folder_paths.py (v0.8.0): model folders, input/output folders, name resolution.

The functions mirror ComfyUI's (lines 97-428); `set_base_path` does what `--base-directory` does.
"""

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths: dict = {}
base_path = models_dir = output_directory = temp_directory = input_directory = ""
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "embeddings")


def set_base_path(path):
    """Stand-in only: every folder under `path`, as ComfyUI's --base-directory sets them."""
    global base_path, models_dir, output_directory, temp_directory, input_directory
    base_path = os.path.abspath(path)
    models_dir = os.path.join(base_path, "models")
    folder_names_and_paths.clear()
    for name in MODEL_FOLDERS:
        folder_names_and_paths[name] = ([os.path.join(models_dir, name)], supported_pt_extensions)
        os.makedirs(os.path.join(models_dir, name), exist_ok=True)
    output_directory, temp_directory, input_directory = (os.path.join(base_path, d)
                                                         for d in ("output", "temp", "input"))
    for d in (output_directory, temp_directory, input_directory):
        os.makedirs(d, exist_ok=True)


def map_legacy(folder_name: str) -> str:
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        paths.remove(full_folder_path)
    paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list:
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def get_full_path(folder_name: str, filename: str):
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for x in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(x, filename)
        if os.path.isfile(full_path):
            return full_path
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path


def get_filename_list(folder_name: str) -> list:
    folders, exts = folder_names_and_paths[map_legacy(folder_name)]
    found = set()
    for root in folders:
        for dirpath, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if d != ".git"]
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if not exts or os.path.splitext(rel)[-1].lower() in exts:
                    found.add(rel)
    return sorted(found)
