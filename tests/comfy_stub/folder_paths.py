"""Stand-in for ComfyUI's folder_paths, rooted in a directory the tests choose (COMFY_STUB_MODELS)."""
import os
import tempfile

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
models_dir = os.environ.get("COMFY_STUB_MODELS") or tempfile.mkdtemp(prefix="comfy_stub_models_")
folder_names_and_paths = {"vae": ([os.path.join(models_dir, "vae")], set(supported_pt_extensions))}


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[folder_name]
    out = set()
    for root in paths:
        for dirpath, _, files in os.walk(root, followlinks=True):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name, filename):
    if folder_name not in folder_names_and_paths:
        return None
    for root in folder_names_and_paths[folder_name][0]:
        p = os.path.join(root, filename)
        if os.path.isfile(p):
            return p
    return None


def get_temp_directory():
    return os.path.join(models_dir, "temp")
