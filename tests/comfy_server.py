"""Start and stop a real ComfyUI for integration and browser tests.

ComfyUI runs from ``COMFYUI_DIR`` (never modified: everything it writes goes to a temporary ``--base-directory``,
its database included, and Python byte-code goes to a cache outside the tree). Custom node packs are symlinked
into that base directory's ``custom_nodes``.

Use it as a context manager::

    from comfy_server import running_comfy, require_comfy_dir
    with running_comfy(require_comfy_dir(), custom_nodes={"ComfyUI-ActAvatar": REPO_ROOT}) as comfy:
        comfy.post_json("/prompt", {"prompt": ...})

or as a pytest fixture in a test module::

    from comfy_server import make_comfy_fixture
    comfy = make_comfy_fixture(custom_nodes={"ComfyUI-ActAvatar": REPO_ROOT})

    def test_something(comfy):
        assert comfy.get_json("/object_info/ActAvatarPhasePrompt")

Environment: ``COMFYUI_DIR`` (required, a ComfyUI checkout with main.py), ``COMFYUI_PYTHON`` (the interpreter to
run it with; default: the one running the tests), ``COMFYUI_KEEP_BASE=1`` (keep the temporary base directory),
``COMFYUI_FRONTEND_ROOT`` (serve this frontend build instead of the installed ``comfyui-frontend-package``: the
``static`` folder of another release, passed as ``--front-end-root``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]


def comfy_dir_from_env() -> Path | None:
    """COMFYUI_DIR when it points at a ComfyUI checkout, else None."""
    raw = os.environ.get("COMFYUI_DIR")
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    return path if (path / "main.py").is_file() and (path / "comfy").is_dir() else None


def require_comfy_dir() -> Path:
    """The ComfyUI checkout to test against, or skip the test with the reason."""
    raw = os.environ.get("COMFYUI_DIR")
    if not raw:
        pytest.skip("COMFYUI_DIR is not set (point it at a ComfyUI 0.33.0 or newer checkout to run this test)")
    path = comfy_dir_from_env()
    if path is None:
        pytest.skip(f"COMFYUI_DIR={raw} is not a ComfyUI checkout (no main.py / comfy/)")
    return path


def frontend_root_from_env() -> Path | None:
    """COMFYUI_FRONTEND_ROOT: a frontend build (a folder with index.html) to serve instead of the installed one."""
    raw = os.environ.get("COMFYUI_FRONTEND_ROOT")
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not (path / "index.html").is_file():
        raise FileNotFoundError(f"COMFYUI_FRONTEND_ROOT={raw} has no index.html. Fix: point it at the static folder "
                                "of a comfyui-frontend-package (pip install --target DIR comfyui-frontend-package; "
                                "DIR/comfyui_frontend_package/static)")
    return path


def frontend_version(root: Path) -> str | None:
    """The version of a comfyui-frontend-package installed with ``pip install --target`` (its dist-info name)."""
    for info in root.parent.parent.glob("comfyui_frontend_package-*.dist-info"):
        return info.name[len("comfyui_frontend_package-"):-len(".dist-info")]
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    comfy_dir: Path
    base_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    _log_file: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str, timeout: float = 30) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body)

    def post_json(self, path: str, body: Any, timeout: float = 30) -> tuple[int, Any]:
        status, raw = self.request("POST", path, body, timeout=timeout)
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode("utf-8", "replace")

    def set_setting(self, key: str, value: Any) -> None:
        status, raw = self.request("POST", f"/api/settings/{key}", value)
        if status != 200:
            raise RuntimeError(f"setting {key} failed: {status} {raw[:200]!r}")

    def wait_for_prompt(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll /history until the prompt has finished; return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            self.check_alive()
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log_tail()}")

    # ------------------------------------------------------------------------------------------------ process
    def log_tail(self, chars: int = 4000) -> str:
        try:
            if self._log_file:
                self._log_file.flush()
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, _ = self.request("GET", "/system_stats", timeout=2)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not answer /system_stats within {timeout} s\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """Stop the server by its PID and wait until it has exited (the port is free again afterwards)."""
        proc = self.process
        if proc.poll() is None:
            # SIGTERM, not SIGINT: a process started from a background shell job ignores SIGINT.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_comfy(
    comfy_dir: Path | str,
    *,
    base_dir: Path | str | None = None,
    custom_nodes: Mapping[str, Path | str] | Sequence[Path | str] = (),
    input_files: Mapping[str, Path | str | bytes] | None = None,
    settings: Mapping[str, Any] | None = None,
    port: int | None = None,
    python: str | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    disable_api_nodes: bool = True,
    timeout: float = 180,
) -> ComfyServer:
    """Start ComfyUI on CPU on a free port and wait until it answers.

    ``custom_nodes``: packs to symlink into ``custom_nodes`` (name -> path, or paths named after their folder).
    ``input_files``: files to put into ComfyUI's input folder (name -> source path or bytes).
    ``settings``: user settings to store before the first browser visit; ``Comfy.TutorialCompleted`` is always
    set so that the Templates dialog does not cover the canvas.
    ``env``: extra environment variables for the ComfyUI process.
    """
    comfy_dir = Path(comfy_dir).resolve()
    base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="actavatar-comfy-"))
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    packs = custom_nodes.items() if isinstance(custom_nodes, Mapping) else ((Path(p).name, p) for p in custom_nodes)
    for name, src in packs:
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(Path(src).resolve(), target_is_directory=True)
    for name, src in (input_files or {}).items():
        dest = base / "input" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, (bytes, bytearray)):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)

    port = port or free_port()
    cmd = [
        python or os.environ.get("COMFYUI_PYTHON") or sys.executable,
        str(comfy_dir / "main.py"),
        "--cpu",
        "--listen", "127.0.0.1",
        "--port", str(port),
        "--base-directory", str(base),
        "--database-url", f"sqlite:///{base / 'comfyui.db'}",
        *(["--disable-api-nodes"] if disable_api_nodes else []),
        *(["--front-end-root", str(frontend)] if (frontend := frontend_root_from_env()) else []),
        *extra_args,
    ]
    env = {**os.environ, **(env or {})}
    # Keep byte-code out of the ComfyUI tree (and reuse it between runs).
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "actavatar-comfy-pycache"))
    env["PYTHONUNBUFFERED"] = "1"
    log_path = base / "comfyui.log"
    log_file = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=log_file, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    server = ComfyServer(comfy_dir=comfy_dir, base_dir=base, port=port, process=proc, log_path=log_path, _log_file=log_file)
    try:
        server.wait_ready(timeout)
        server.set_setting("Comfy.TutorialCompleted", True)
        for key, value in (settings or {}).items():
            server.set_setting(key, value)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_comfy(comfy_dir: Path | str, *, keep_base: bool | None = None, **kwargs) -> Iterator[ComfyServer]:
    """start_comfy() as a context manager; the temporary base directory is removed afterwards unless kept."""
    own_base = kwargs.get("base_dir") is None
    server = start_comfy(comfy_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()
        keep = keep_base if keep_base is not None else os.environ.get("COMFYUI_KEEP_BASE") == "1"
        if own_base and not keep:
            shutil.rmtree(server.base_dir, ignore_errors=True)


def make_comfy_fixture(scope: str = "module", **kwargs):
    """A pytest fixture that yields a running ComfyServer (skips when COMFYUI_DIR is unset)."""

    @pytest.fixture(scope=scope)
    def _comfy() -> Iterator[ComfyServer]:
        with running_comfy(require_comfy_dir(), **kwargs) as server:
            yield server

    return _comfy
