"""Start a real, isolated, headless ComfyUI with this pack installed, and talk to it over HTTP.

Everything it writes lives in a temporary base directory (custom_nodes/, input/, output/, user/);
models come from the ComfyUI checkout's models/ folder plus an extra ``cvvae`` folder, through an
extra_model_paths.yaml. The checkout itself is not modified. Standard library only.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-CV-VAE"


def find_python(comfy_dir: Path) -> str:
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for cand in (comfy_dir.parent / "comfy-venv" / "bin" / "python", comfy_dir / "venv" / "bin" / "python",
                 comfy_dir / ".venv" / "bin" / "python"):
        if cand.exists():
            return str(cand)
    return sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_dir, base_dir, extra_cvvae_dir=None, python=None, port=None):
        self.comfy_dir = Path(comfy_dir).resolve()
        self.base = Path(base_dir)
        self.cvvae_dir = Path(extra_cvvae_dir) if extra_cvvae_dir else self.base / "cvvae_models"
        self.python = python or find_python(self.comfy_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = self.base / "comfyui.log"

    def start(self, timeout=400):
        for d in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.cvvae_dir.mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        models = self.comfy_dir / "models"
        cfg = self.base / "extra_model_paths.yaml"
        names = ["checkpoints", "vae", "clip", "text_encoders", "clip_vision", "diffusion_models", "unet"]
        lines = ["comfy_checkout:", f"  base_path: {models}"] + [f"  {n}: {n}/" for n in names]
        lines += ["cvvae_test:", f"  base_path: {self.cvvae_dir}", "  cvvae: ./"]
        cfg.write_text("\n".join(lines) + "\n")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--extra-model-paths-config", str(cfg), "--disable-auto-launch"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                self.get("/object_info/CheckpointLoaderSimple", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(2)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_text()[-4000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the process group this helper started
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # HTTP -----------------------------------------------------------------------------------------
    def get(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, payload, timeout=60):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:4000]}") from None

    def run_prompt(self, prompt: dict, timeout=900) -> dict:
        """Queue an API-format prompt; wait; return its history entry (raises on an execution error)."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                status = entry["status"]
                if status.get("status_str") != "success":
                    errs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"prompt failed: {json.dumps(errs)[:4000]}")
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (rc {self.proc.returncode}); log:\n{self.log_text()[-4000:]}")
            time.sleep(1)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s")

    def output_files(self, entry: dict) -> list[Path]:
        files = []
        for out in entry.get("outputs", {}).values():
            for key in ("images", "gifs", "videos", "animated"):
                for f in out.get(key, []) if isinstance(out.get(key), list) else []:
                    if isinstance(f, dict) and "filename" in f:
                        files.append(self.base / f.get("type", "output") / f.get("subfolder", "") / f["filename"])
        return files


def copy_example_image(server: ComfyServer, name="example.png"):
    src = server.comfy_dir / "input" / name
    if src.exists():
        shutil.copy(src, server.base / "input" / name)
    return server.base / "input" / name
